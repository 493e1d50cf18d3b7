"""The descriptor set: its own descriptor pool, message classes and every rpc's HTTP rules.

The gateway knows the API only through ``gen/azora.binpb``, the FileDescriptorSet ``buf build``
makes from ``protos/`` (with imports, so google/api and google/rpc are in it too). Its files go
into a private `DescriptorPool` (never the default pool, which the generated stubs of this
process may also fill); message classes come from `message_factory.GetMessageClass`.

The ``google.api.http`` option is an extension of ``MethodOptions``. It is read from the
FileDescriptorProtos, parsed by the generated ``descriptor_pb2`` classes after
``google.api.annotations_pb2`` has registered the extension: the pool's own descriptors would
hand back options parsed without it. Every rule and its ``additional_bindings`` becomes one
`HttpBinding`; the bindings are the gateway's whole routing table.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message

from gateway.templates import PathTemplate, TemplateError

HTTP_BODY = "google.api.HttpBody"
_PATTERNS = ("get", "put", "post", "delete", "patch")


class DescriptorSetError(ValueError):
    """The descriptor set cannot serve as a routing table (bad template, unknown field, ...)."""


class FieldPathError(ValueError):
    """A dotted field path does not name a field of a message."""


def message_type_of(field: FieldDescriptor) -> Descriptor:
    """The message type of a message field.

    Raises:
        FieldPathError: the field is not a message field.
    """
    if field.message_type is None:
        raise FieldPathError(f'"{field.name}" is not a message field')
    return field.message_type


def is_map_field(field: FieldDescriptor) -> bool:
    """Whether a field is a map (a repeated field of a map-entry message type)."""
    return field.message_type is not None and bool(field.message_type.GetOptions().map_entry)


def descriptor_of(message: Message) -> Descriptor:
    """A message's descriptor, typed as the pure-Python API (the upb one has the same shape)."""
    return cast("Descriptor", message.DESCRIPTOR)


def find_field(message: Descriptor, name: str) -> FieldDescriptor | None:
    """A field by its proto name or its JSON name (Envoy's transcoder accepts both)."""
    field = message.fields_by_name.get(name)
    if field is not None:
        return field
    for candidate in message.fields:
        if candidate.json_name == name:
            return candidate
    return None


def resolve_field_path(message: Descriptor, names: Sequence[str]) -> list[FieldDescriptor]:
    """The fields along a dotted path; every step but the last is a singular message field.

    Raises:
        FieldPathError: a step is not a field, or a step before the last is not a message.
    """
    fields: list[FieldDescriptor] = []
    current = message
    for index, name in enumerate(names):
        field = find_field(current, name)
        if field is None:
            raise FieldPathError(f'could not find field "{name}" in the type "{current.full_name}"')
        fields.append(field)
        if index < len(names) - 1:
            if field.type != FieldDescriptor.TYPE_MESSAGE or field.is_repeated:
                raise FieldPathError(
                    f'"{field.name}" is not a singular message field, so "{".".join(names)}" '
                    "cannot go through it"
                )
            current = message_type_of(field)
    return fields


@dataclass(frozen=True, slots=True)
class HttpBinding:
    """One HTTP binding of an rpc (its rule or one of the rule's additional_bindings)."""

    http_method: str
    template: PathTemplate
    body: str
    response_body: str
    method: MethodDescriptor
    binding_index: int

    @property
    def service(self) -> str:
        """Full name of the rpc's service, e.g. "azora.mail.v1.MailService"."""
        return str(self.method.containing_service.full_name)

    @property
    def rpc(self) -> str:
        """The rpc as "Service/Method", as logged and as in the gRPC path."""
        return f"{self.service}/{self.method.name}"

    @property
    def grpc_path(self) -> str:
        """The gRPC request path, "/package.Service/Method"."""
        return f"/{self.rpc}"


def _rule_bindings(rule: http_pb2.HttpRule) -> Iterator[tuple[int, http_pb2.HttpRule]]:
    yield 0, rule
    yield from enumerate(rule.additional_bindings, start=1)


def _method_and_path(rule: http_pb2.HttpRule) -> tuple[str, str]:
    pattern = rule.WhichOneof("pattern")
    if pattern in _PATTERNS:
        return pattern.upper(), str(getattr(rule, pattern))
    if pattern == "custom":
        return str(rule.custom.kind).upper(), str(rule.custom.path)
    raise DescriptorSetError("an HttpRule without a pattern")


class DescriptorSet:
    """A loaded descriptor set: pool, message classes and HTTP bindings."""

    def __init__(self, files: descriptor_pb2.FileDescriptorSet) -> None:
        """Build the pool and collect the bindings.

        Raises:
            DescriptorSetError: a file does not load, or an HTTP rule is not usable.
        """
        self.pool = descriptor_pool.DescriptorPool()
        by_name = {file.name: file for file in files.file}
        added: set[str] = set()

        def add(name: str) -> None:
            # Dependencies first, whatever order the set lists its files in.
            if name in added:
                return
            added.add(name)
            file = by_name.get(name)
            if file is None:
                raise DescriptorSetError(f"{name} is imported but not in the descriptor set")
            for dependency in file.dependency:
                add(dependency)
            self.pool.Add(file)

        try:
            for name in by_name:
                add(name)
        except TypeError as exc:  # the pool's complaint about conflicting definitions
            raise DescriptorSetError(str(exc)) from exc
        self.bindings: list[HttpBinding] = []
        self.methods: list[MethodDescriptor] = []
        for file in files.file:
            for service in file.service:
                full_service = f"{file.package}.{service.name}" if file.package else service.name
                service_descriptor = self.pool.FindServiceByName(full_service)
                for method_proto in service.method:
                    method = service_descriptor.methods_by_name[method_proto.name]
                    self.methods.append(method)
                    if not method_proto.options.HasExtension(annotations_pb2.http):
                        continue
                    rule = method_proto.options.Extensions[annotations_pb2.http]
                    for index, binding in _rule_bindings(rule):
                        self.bindings.append(self._binding(method, index, binding))

    @classmethod
    def load(cls, path: Path) -> DescriptorSet:
        """Read a binary FileDescriptorSet (``buf build -o x.binpb``).

        Raises:
            OSError: the file cannot be read.
            DescriptorSetError: the file is not a usable descriptor set.
        """
        try:
            files = descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes())
        except OSError:
            raise
        except Exception as exc:  # DecodeError and friends: a corrupt or wrong file
            raise DescriptorSetError(f"{path} is not a FileDescriptorSet: {exc}") from exc
        return cls(files)

    def _binding(
        self, method: MethodDescriptor, index: int, rule: http_pb2.HttpRule
    ) -> HttpBinding:
        where = f"{method.full_name} (binding {index})"
        http_method, path = _method_and_path(rule)
        try:
            template = PathTemplate.parse(path)
        except TemplateError as exc:
            raise DescriptorSetError(f"{where}: {exc}") from exc
        request = method.input_type
        try:
            for field_path in template.field_paths:
                resolve_field_path(request, field_path)
            if rule.body and rule.body != "*":
                resolve_field_path(request, rule.body.split("."))
            if rule.response_body:
                resolve_field_path(method.output_type, rule.response_body.split("."))
        except FieldPathError as exc:
            raise DescriptorSetError(f"{where}: {exc}") from exc
        return HttpBinding(
            http_method=http_method,
            template=template,
            body=str(rule.body),
            response_body=str(rule.response_body),
            method=method,
            binding_index=index,
        )

    def message_class(self, descriptor: Descriptor) -> type[Message]:
        """The dynamic message class of a message type of this set."""
        return message_factory.GetMessageClass(descriptor)
