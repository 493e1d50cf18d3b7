"""Every element of our API protos carries a comment: the protos are the API's documentation.

Reads the source info that `buf build` keeps in gen/azora.binpb, so a new uncommented message,
field, enum, enum value, service or rpc fails here.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import descriptor_pb2

DESCRIPTOR_SET = Path(__file__).resolve().parents[2] / "gen" / "azora.binpb"

# descriptor.proto field numbers used in SourceCodeInfo paths.
FILE_MESSAGE, FILE_ENUM, FILE_SERVICE, FILE_EXTENSION = 4, 5, 6, 7
MESSAGE_FIELD, MESSAGE_NESTED, MESSAGE_ENUM = 2, 3, 4
ENUM_VALUE = 2
SERVICE_METHOD = 2


def _missing_comments(file: descriptor_pb2.FileDescriptorProto) -> list[str]:
    commented = {
        tuple(location.path)
        for location in file.source_code_info.location
        if location.leading_comments.strip()
    }
    missing: list[str] = []

    def need(path: tuple[int, ...], name: str) -> None:
        if path not in commented:
            missing.append(f"{file.name}: {name}")

    def enum(path: tuple[int, ...], proto: descriptor_pb2.EnumDescriptorProto, prefix: str) -> None:
        need(path, f"enum {prefix}{proto.name}")
        for i, value in enumerate(proto.value):
            need((*path, ENUM_VALUE, i), f"enum value {prefix}{proto.name}.{value.name}")

    def message(path: tuple[int, ...], proto: descriptor_pb2.DescriptorProto, prefix: str) -> None:
        full = f"{prefix}{proto.name}"
        need(path, f"message {full}")
        for i, field in enumerate(proto.field):
            need((*path, MESSAGE_FIELD, i), f"field {full}.{field.name}")
        for i, nested in enumerate(proto.nested_type):
            if not nested.options.map_entry:
                message((*path, MESSAGE_NESTED, i), nested, f"{full}.")
        for i, nested_enum in enumerate(proto.enum_type):
            enum((*path, MESSAGE_ENUM, i), nested_enum, f"{full}.")

    for i, proto in enumerate(file.message_type):
        message((FILE_MESSAGE, i), proto, "")
    for i, proto_enum in enumerate(file.enum_type):
        enum((FILE_ENUM, i), proto_enum, "")
    for i, service in enumerate(file.service):
        need((FILE_SERVICE, i), f"service {service.name}")
        for j, method in enumerate(service.method):
            need((FILE_SERVICE, i, SERVICE_METHOD, j), f"rpc {service.name}.{method.name}")
    for i, extension in enumerate(file.extension):
        need((FILE_EXTENSION, i), f"extension {extension.name}")
    return missing


def test_every_api_element_has_a_comment() -> None:
    # All azora/ files: every service, rpc, message, field, enum and enum value is commented.
    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes()).file
    ours = [f for f in files if f.name.startswith("azora/")]
    assert len(ours) >= 6
    assert all(f.HasField("source_code_info") for f in ours), "rebuild with source info"
    missing = [problem for f in ours for problem in _missing_comments(f)]
    assert missing == []
