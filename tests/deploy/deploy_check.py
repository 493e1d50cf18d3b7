"""Deployment-file checks that need the tool environment (build/deploy-tools/venv), not .venv.

Run by tests/deploy with that venv's python; every command prints one JSON document on stdout
and exits 0, or prints the problem on stderr and exits 1:

    deploy_check.py envoy FILE              parse into envoy.config.bootstrap.v3.Bootstrap -> facts
    deploy_check.py yaml FILE               every YAML document of FILE as JSON (a list)
    deploy_check.py compose-schema FILE SCHEMA    Compose Specification JSON-schema errors (a list)
    deploy_check.py k8s-schema VERSION FILE...    kubernetes-validate (strict) errors (a list)

Tool-only modules (xds-protos, PyYAML, jsonschema, kubernetes-validate) are imported by name so
that this file also type-checks in .venv, where they are absent on purpose.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.message import Message

yaml: Any = importlib.import_module("yaml")

# Every message type an `@type` in gateway/envoy.yaml may name. An Any whose type is not imported
# here fails to parse ("Can not find message descriptor"): import the module of a new extension.
ENVOY_MODULES = (
    "envoy.config.bootstrap.v3.bootstrap_pb2",
    "envoy.config.route.v3.route_components_pb2",
    "envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2",
    "envoy.extensions.filters.http.grpc_json_transcoder.v3.transcoder_pb2",
    "envoy.extensions.filters.http.router.v3.router_pb2",
    "envoy.extensions.filters.http.header_mutation.v3.header_mutation_pb2",
    "envoy.extensions.filters.http.health_check.v3.health_check_pb2",
    "envoy.extensions.filters.http.buffer.v3.buffer_pb2",
    "envoy.extensions.access_loggers.stream.v3.stream_pb2",
    "envoy.extensions.upstreams.http.v3.http_protocol_options_pb2",
)
HCM_TYPE = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
TRANSCODER_TYPE = "envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder"
PROTOCOL_OPTIONS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def _unpack(any_message: AnyMessage) -> Any:
    """Unpack an Any into a message of the type its URL names (imported via ENVOY_MODULES)."""
    descriptor = descriptor_pool.Default().FindMessageTypeByName(any_message.TypeName())
    message = message_factory.GetMessageClass(descriptor)()
    if not any_message.Unpack(message):
        raise ValueError(f"cannot unpack {any_message.TypeName()}")
    return message


def _to_dict(message: Message) -> dict[str, Any]:
    result: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return result


def _address(socket_address: Any) -> dict[str, Any]:
    return {"address": socket_address.address, "port": socket_address.port_value}


def _route_facts(route: Any) -> dict[str, Any]:
    match = route.match
    kind = match.WhichOneof("path_specifier")
    action = route.WhichOneof("action")
    disabled_filters = []
    for filter_name, config in route.typed_per_filter_config.items():
        if config.TypeName() == "envoy.config.route.v3.FilterConfig" and _unpack(config).disabled:
            disabled_filters.append(filter_name)
    return {
        "name": route.name,
        "match_kind": kind,
        "match": getattr(match, kind) if kind else None,
        "action": action,
        "cluster": route.route.cluster if action == "route" else None,
        "timeout_seconds": route.route.timeout.ToTimedelta().total_seconds()
        if action == "route" and route.route.HasField("timeout")
        else None,
        "direct_response_status": route.direct_response.status
        if action == "direct_response"
        else None,
        "disabled_filters": disabled_filters,
    }


def envoy_facts(path: Path) -> dict[str, Any]:
    """Parse an Envoy bootstrap strictly and summarise what the tests cross-check."""
    modules = {name: importlib.import_module(name) for name in ENVOY_MODULES}
    raw = yaml.safe_load(path.read_text())
    bootstrap = modules["envoy.config.bootstrap.v3.bootstrap_pb2"].Bootstrap()
    # Strict: unknown or misspelled fields, bad enum names and unresolvable Any types all fail.
    json_format.ParseDict(raw, bootstrap)

    listeners = []
    for listener in bootstrap.static_resources.listeners:
        managers = []
        for chain in listener.filter_chains:
            for network_filter in chain.filters:
                if network_filter.typed_config.TypeName() != HCM_TYPE:
                    continue
                hcm: Any = _unpack(network_filter.typed_config)
                http_filters = []
                transcoder = None
                for http_filter in hcm.http_filters:
                    http_filters.append(
                        {"name": http_filter.name, "type": http_filter.typed_config.TypeName()}
                    )
                    if http_filter.typed_config.TypeName() == TRANSCODER_TYPE:
                        transcoder_message: Any = _unpack(http_filter.typed_config)
                        transcoder = json_format.MessageToDict(
                            transcoder_message,
                            preserving_proto_field_name=True,
                            always_print_fields_with_no_presence=True,
                        )
                access_logs = []
                for log in hcm.access_log:
                    log_config: Any = _unpack(log.typed_config)
                    log_format = getattr(log_config, "log_format", None)
                    access_logs.append(
                        {
                            "name": log.name,
                            "type": log.typed_config.TypeName(),
                            "json_format": _to_dict(log_format.json_format)
                            if log_format is not None and log_format.HasField("json_format")
                            else None,
                        }
                    )
                routes = [
                    {"virtual_host": host.name, "domains": list(host.domains), **_route_facts(r)}
                    for host in hcm.route_config.virtual_hosts
                    for r in host.routes
                ]
                local_replies = [
                    {
                        "status": mapper.filter.status_code_filter.comparison.value.default_value,
                        "rewritten_status": mapper.status_code.value
                        if mapper.HasField("status_code")
                        else None,
                        "json_format": _to_dict(mapper.body_format_override.json_format),
                    }
                    for mapper in hcm.local_reply_config.mappers
                ]
                default_reply = _to_dict(hcm.local_reply_config.body_format.json_format)
                managers.append(
                    {
                        "stat_prefix": hcm.stat_prefix,
                        "local_reply_mappers": local_replies,
                        "local_reply_default": default_reply,
                        "generate_request_id": hcm.generate_request_id.value
                        if hcm.HasField("generate_request_id")
                        else True,  # Envoy's default
                        "preserve_external_request_id": hcm.preserve_external_request_id,
                        "always_set_request_id_in_response": (
                            hcm.always_set_request_id_in_response
                        ),
                        "http_filters": http_filters,
                        "transcoder": transcoder,
                        "access_logs": access_logs,
                        "routes": routes,
                    }
                )
        listeners.append(
            {
                "name": listener.name,
                **_address(listener.address.socket_address),
                "per_connection_buffer_limit_bytes": (
                    listener.per_connection_buffer_limit_bytes.value
                    if listener.HasField("per_connection_buffer_limit_bytes")
                    else None
                ),
                "http_connection_managers": managers,
            }
        )

    clusters = []
    for cluster in bootstrap.static_resources.clusters:
        http2 = False
        options = cluster.typed_extension_protocol_options.get(PROTOCOL_OPTIONS_KEY)
        if options is not None:
            protocol: Any = _unpack(options)
            http2 = protocol.HasField("explicit_http_config") and (
                protocol.explicit_http_config.HasField("http2_protocol_options")
            )
        health_checks = []
        for check in cluster.health_checks:
            kind = check.WhichOneof("health_checker")
            health_checks.append(
                {
                    "kind": kind,
                    "grpc_service_name": check.grpc_health_check.service_name
                    if kind == "grpc_health_check"
                    else None,
                    "http_path": check.http_health_check.path
                    if kind == "http_health_check"
                    else None,
                    "has_timeout": check.HasField("timeout"),
                }
            )
        endpoints = [
            _address(lb_endpoint.endpoint.address.socket_address)
            for locality in cluster.load_assignment.endpoints
            for lb_endpoint in locality.lb_endpoints
        ]
        clusters.append(
            {
                "name": cluster.name,
                "type": cluster.DESCRIPTOR.fields_by_name["type"]
                .enum_type.values_by_number[cluster.type]
                .name,
                "http2": http2,
                "connect_timeout_seconds": cluster.connect_timeout.ToTimedelta().total_seconds()
                if cluster.HasField("connect_timeout")
                else None,
                "endpoints": endpoints,
                "load_assignment_name": cluster.load_assignment.cluster_name,
                "health_checks": health_checks,
            }
        )

    return {
        "admin": _address(bootstrap.admin.address.socket_address),
        "listeners": listeners,
        "clusters": clusters,
        "config": raw,
    }


def yaml_documents(path: Path) -> list[Any]:
    """Every document of a YAML file, as JSON-compatible data."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def compose_schema_errors(path: Path, schema_path: Path) -> list[str]:
    """Errors of a compose file against the Compose Specification JSON schema."""
    jsonschema: Any = importlib.import_module("jsonschema")
    schema = json.loads(schema_path.read_text())
    # The schema says draft-07 in a form jsonschema does not look up ("...draft-07/schema").
    if "draft-07" not in schema.get("$schema", ""):
        raise ValueError(f"{schema_path.name}: expected a draft-07 schema")
    validator_class = jsonschema.Draft7Validator
    validator_class.check_schema(schema)
    validator = validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)
    document = yaml.safe_load(path.read_text())
    return [
        f"{'/'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
        for error in sorted(validator.iter_errors(document), key=lambda e: list(e.path))
    ]


def k8s_schema_errors(version: str, paths: list[Path]) -> list[str]:
    """Errors of Kubernetes manifests against that version's schemas (strict: no unknown fields)."""
    kubernetes_validate: Any = importlib.import_module("kubernetes_validate")
    errors = []
    for path in paths:
        for index, document in enumerate(yaml_documents(path)):
            where = f"{path.name}[{index}] {document.get('kind')}/"
            where += str(document.get("metadata", {}).get("name"))
            try:
                kubernetes_validate.validate(document, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                location = "/".join(str(p) for p in error.path)
                errors.append(f"{where}: {location}: {error.message}")
            except (
                kubernetes_validate.SchemaNotFoundError,
                kubernetes_validate.VersionNotSupportedError,
            ) as error:
                errors.append(f"{where}: {error.message}")
    return errors


def main(argv: list[str]) -> int:
    """Dispatch one command; see the module docstring."""
    command, *args = argv
    result: Any
    if command == "envoy":
        result = envoy_facts(Path(args[0]))
    elif command == "yaml":
        result = yaml_documents(Path(args[0]))
    elif command == "compose-schema":
        result = compose_schema_errors(Path(args[0]), Path(args[1]))
    elif command == "k8s-schema":
        result = k8s_schema_errors(args[0], [Path(a) for a in args[1:]])
    else:
        print(f"unknown command {command!r}", file=sys.stderr)
        return 2
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
