"""protoc plugin that runs grpcio-tools' built-in grpc_python generator.

grpcio-tools bundles protoc with the gRPC Python generator compiled in, but ships no standalone
`protoc-gen-grpc_python` executable, which `buf generate` needs. This plugin receives buf's
CodeGeneratorRequest, hands the same descriptors to the bundled protoc, and returns its output.
"""

from __future__ import annotations

import pathlib
import sys
import tempfile

from google.protobuf import descriptor_pb2
from google.protobuf.compiler import plugin_pb2
from grpc_tools import protoc


def main() -> int:
    """Read a CodeGeneratorRequest on stdin and write a CodeGeneratorResponse on stdout."""
    request = plugin_pb2.CodeGeneratorRequest.FromString(sys.stdin.buffer.read())
    # The bundled protoc handles proto3 `optional`; say so, or buf refuses such files.
    response = plugin_pb2.CodeGeneratorResponse(
        supported_features=plugin_pb2.CodeGeneratorResponse.FEATURE_PROTO3_OPTIONAL
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = pathlib.Path(tmp)
        descriptor_set = descriptor_pb2.FileDescriptorSet(file=request.proto_file)
        (tmpdir / "in.binpb").write_bytes(descriptor_set.SerializeToString())
        out = tmpdir / "out"
        out.mkdir()
        args = [
            "grpc_tools.protoc",
            f"--descriptor_set_in={tmpdir / 'in.binpb'}",
            f"--grpc_python_out={out}",
            *request.file_to_generate,
        ]
        if protoc.main(args) != 0:
            response.error = "grpc_tools.protoc failed for " + ", ".join(request.file_to_generate)
        else:
            for path in sorted(out.rglob("*.py")):
                generated = response.file.add()
                generated.name = str(path.relative_to(out))
                generated.content = path.read_text(encoding="utf-8")
    sys.stdout.buffer.write(response.SerializeToString())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
