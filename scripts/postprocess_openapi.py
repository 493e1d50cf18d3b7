"""Finish the OpenAPI document that protoc-gen-openapiv2 generates from protos/.

`make generate` runs this right after `buf generate` and `buf build`:

    python scripts/postprocess_openapi.py gen/openapi/azora.swagger.json \
        --descriptor-set gen/azora.binpb

The generator knows only what the protos say, and our protos deliberately carry no OpenAPI
annotations (that would mean vendoring grpc-gateway's options protos into every consumer of the
API). What it cannot know is added here, derived from sources that already exist, never typed
twice:

* `info`: the API's title and description, and the version from pyproject.toml.
* `securityDefinitions`: the two ways to send credentials (README "Tenants and credentials"):
  `Authorization: Bearer <JWT or API key>` and `x-api-key`.
* per-operation `security` and required scope, from each rpc's `azora.iam.v1.access` option
  (the same option the services' auth interceptor enforces): `allow_anonymous` rpcs (health
  probes) get `security: []`, every other operation accepts either scheme.
* the error ("default") response of every operation says what the google.rpc.Status means.
* rpcs returning `google.api.HttpBody` (`GET /metrics`) send the raw body, not the HttpBody
  message as JSON; their 200 response becomes a plain string of any media type.

The result is written back in place, deterministically (same input, same bytes), and running
the script twice changes nothing. It fails when an http rule of the descriptor set has no
operation in the document, so generator and gateways cannot silently disagree.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Registers the google.api.http and azora.iam.v1.access extensions in the default pool, so
# that parsing the descriptor set fills MethodOptions.Extensions[...] (imported for that effect).
from azora.iam.v1 import options_pb2
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2

REPO_ROOT = Path(__file__).resolve().parent.parent
TITLE = "Azora Email Hosting API"
DESCRIPTION = """\
Domains, SMTP relays with their authentication records (DKIM, SPF, DMARC) and email delivery \
for Azora. This document is generated from the gRPC API in `protos/`: the REST paths are the \
rpcs' `google.api.http` annotations, served by the REST gateway, and the same calls are \
available over gRPC.

**Credentials.** Send a JWT (HS256, claims `sub`, `tenant`, `exp`, `scope`) or an API key \
(`azk_...`, created with `POST /api/v1/api-keys`) as `Authorization: Bearer <token>`; an API \
key may instead go in the `x-api-key` header. Each operation names the scope it needs. Outside \
production a request without credentials acts as the development tenant.

**JSON.** Field names are lowerCamelCase (proto names are accepted too); 64-bit integers are \
strings; times are RFC 3339 strings; enums are their names.

**Errors.** Every error is a `google.rpc.Status` (`code`, `message`, `details` such as \
`google.rpc.ErrorInfo` and `google.rpc.BadRequest`) with the HTTP status of google/rpc/code.proto \
(INVALID_ARGUMENT 400, UNAUTHENTICATED 401, PERMISSION_DENIED 403, NOT_FOUND 404, ...)."""

# Names under securityDefinitions; OpenAPI 2 has no bearer scheme, so both are header API keys.
BEARER = "bearer"
API_KEY = "apiKey"
SECURITY_DEFINITIONS: dict[str, dict[str, str]] = {
    BEARER: {
        "type": "apiKey",
        "name": "Authorization",
        "in": "header",
        "description": "`Bearer <JWT>` or `Bearer azk_...` (an API key).",
    },
    API_KEY: {
        "type": "apiKey",
        "name": "x-api-key",
        "in": "header",
        "description": "An API key, `azk_...`.",
    },
}
# Either scheme authenticates a request (a list of alternatives in OpenAPI).
AUTHENTICATED: list[dict[str, list[str]]] = [{BEARER: []}, {API_KEY: []}]
# Replaces the generator's "An unexpected error response." of every operation's default response.
ERROR_RESPONSE_DESCRIPTION = (
    "An error: google.rpc.Status, with the HTTP status that google/rpc/code.proto maps its code to."
)
HTTP_BODY = ".google.api.HttpBody"
HTTP_BODY_RESPONSE = {
    "description": "The raw response body (google.api.HttpBody); the rpc sets its media type.",
    "schema": {"type": "string", "format": "binary"},
}
# Variables of a path template: `{field.path}` or `{field.path=pattern}`.
TEMPLATE_VARIABLE = re.compile(r"\{([^}=]+)(?:=[^}]*)?\}")


@dataclass(frozen=True)
class Route:
    """One REST binding of an rpc, as it appears in the OpenAPI document."""

    method: str  # lower case, as OpenAPI path items spell it
    path: str  # template with JSON field names, e.g. /api/v1/smtp/domains/{domainId}/config
    rpc: str  # e.g. azora.mail.v1.MailService.SendEmail
    output_type: str  # fully qualified with a leading dot
    allow_anonymous: bool
    required_scope: str


def lower_camel(name: str) -> str:
    """Protobuf's default JSON name of a field (used when a descriptor lacks json_name)."""
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _rule_binding(rule: http_pb2.HttpRule) -> tuple[str, str]:
    """The (method, path template) of one http rule; custom verbs keep their own name."""
    pattern = rule.WhichOneof("pattern")
    if pattern is None:
        raise ValueError("http rule without a pattern")
    if pattern == "custom":
        return rule.custom.kind.lower(), rule.custom.path
    return pattern, str(getattr(rule, pattern))


def routes_of(descriptor_set: descriptor_pb2.FileDescriptorSet) -> list[Route]:
    """Every REST binding (additional bindings included) of every rpc in the descriptor set."""
    messages: dict[str, descriptor_pb2.DescriptorProto] = {}

    def index(prefix: str, message: descriptor_pb2.DescriptorProto) -> None:
        messages[f"{prefix}.{message.name}"] = message
        for nested in message.nested_type:
            index(f"{prefix}.{message.name}", nested)

    for file in descriptor_set.file:
        for message in file.message_type:
            index(f".{file.package}" if file.package else "", message)

    def json_path(message_type: str, field_path: str) -> str:
        # The generator names path parameters by the fields' JSON names, segment by segment.
        names = []
        message = messages[message_type]
        for part in field_path.split("."):
            field = next(f for f in message.field if f.name == part)
            names.append(field.json_name or lower_camel(field.name))
            if field.type == descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE:
                message = messages.get(field.type_name, message)
        return ".".join(names)

    routes = []
    for file in descriptor_set.file:
        for service in file.service:
            for method in service.method:
                options = method.options
                if not options.HasExtension(annotations_pb2.http):
                    continue
                rule = options.Extensions[annotations_pb2.http]
                access = options.Extensions[options_pb2.access]
                for binding in [rule, *rule.additional_bindings]:
                    verb, template = _rule_binding(binding)
                    variables = TEMPLATE_VARIABLE.split(template)
                    # split() alternates literal text and variable field paths.
                    path = "".join(
                        part if i % 2 == 0 else "{" + json_path(method.input_type, part) + "}"
                        for i, part in enumerate(variables)
                    )
                    routes.append(
                        Route(
                            method=verb,
                            path=path,
                            rpc=f"{file.package}.{service.name}.{method.name}",
                            output_type=method.output_type,
                            allow_anonymous=access.allow_anonymous,
                            required_scope=access.required_scope,
                        )
                    )
    return routes


def project_version() -> str:
    """The project's version, from pyproject.toml (the one place it is written)."""
    with (REPO_ROOT / "pyproject.toml").open("rb") as file:
        return str(tomllib.load(file)["project"]["version"])


def _with_key_after(mapping: dict[str, Any], after: str, key: str, value: object) -> dict[str, Any]:
    """A copy of mapping with key set to value and placed right after `after` (stable output)."""
    result: dict[str, Any] = {}
    for existing, existing_value in mapping.items():
        if existing == key:
            continue
        result[existing] = existing_value
        if existing == after:
            result[key] = value
    if key not in result:
        result[key] = value
    return result


def postprocess(document: dict[str, Any], routes: list[Route]) -> dict[str, Any]:
    """Return the finished document (see the module docstring for what changes)."""
    document = _with_key_after(
        document,
        "swagger",
        "info",
        {"title": TITLE, "description": DESCRIPTION, "version": project_version()},
    )
    document = _with_key_after(document, "produces", "securityDefinitions", SECURITY_DEFINITIONS)

    paths: dict[str, dict[str, Any]] = document["paths"]
    missing = [r for r in routes if r.method not in paths.get(r.path, {})]
    if missing:
        listed = ", ".join(f"{r.method.upper()} {r.path} ({r.rpc})" for r in missing)
        raise SystemExit(f"postprocess_openapi: no operation in the document for {listed}")

    for route in routes:
        operation: dict[str, Any] = paths[route.path][route.method]
        if route.allow_anonymous:
            operation["security"] = []
        else:
            operation["security"] = AUTHENTICATED
            if route.required_scope:
                note = f"Required scope: `{route.required_scope}`."
                description = operation.get("description", "")
                if note not in description:
                    operation["description"] = f"{description}\n\n{note}".strip()
        if "default" in operation["responses"]:
            operation["responses"]["default"]["description"] = ERROR_RESPONSE_DESCRIPTION
        if route.output_type == HTTP_BODY:
            operation["responses"]["200"] = HTTP_BODY_RESPONSE
            operation["produces"] = ["*/*"]

    # The HttpBody message schema is unused once its responses are raw bodies.
    definitions: dict[str, Any] = document.get("definitions", {})
    if '"#/definitions/HttpBody"' not in json.dumps([paths, definitions]):
        definitions.pop("HttpBody", None)
    return document


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("document", type=Path, help="OpenAPI JSON written by protoc-gen-openapiv2")
    parser.add_argument(
        "--descriptor-set", type=Path, required=True, help="`buf build` output of protos/"
    )
    args = parser.parse_args(argv)

    descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(args.descriptor_set.read_bytes())
    document = json.loads(args.document.read_text(encoding="utf-8"))
    finished = postprocess(document, routes_of(descriptor_set))
    args.document.write_text(
        json.dumps(finished, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
