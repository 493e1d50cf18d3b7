# Intent: gateway/envoy.yaml is a valid Envoy bootstrap that transcodes every REST rpc, for real.
from __future__ import annotations

import json
import secrets
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2

from services.core.auth import ALL_SCOPES, issue_jwt
from services.core.server import MAX_MESSAGE_BYTES
from tests.deploy.conftest import (
    DESCRIPTOR_SET,
    ENVOY_YAML,
    PROCESSES,
    REPO_ROOT,
    DeployTools,
    LiveSuite,
    ToolError,
    free_port,
)

TRANSCODER_FILTER = "envoy.filters.http.grpc_json_transcoder"
# Which cluster serves which proto package: the process that registers the package's services.
CLUSTER_OF_PACKAGE = {
    "azora.domain.v1": "domain_service",
    "azora.iam.v1": "domain_service",
    "azora.health.v1": "domain_service",
    "azora.smtp.v1": "smtp_service",
    "azora.mail.v1": "mail_service",
}
CLUSTER_OF_PROCESS = {"domain": "domain_service", "smtp": "smtp_service", "mail": "mail_service"}
# The live Envoy's request-body limit, lowered so that an oversized body is cheap to send.
TEST_MAX_BODY = 4096


# --------------------------------------------------------------------------- descriptor helpers


def http_rules_by_service(fds: descriptor_pb2.FileDescriptorSet) -> dict[str, list[str]]:
    """Full service name -> "VERB /path" of every google.api.http rule (incl. additional)."""
    result: dict[str, list[str]] = {}
    for file in fds.file:
        for service in file.service:
            rules = []
            for method in service.method:
                options = method.options
                if not options.HasExtension(annotations_pb2.http):
                    continue
                http = options.Extensions[annotations_pb2.http]
                for rule in (http, *http.additional_bindings):
                    verb = rule.WhichOneof("pattern")
                    if verb == "custom":
                        rules.append(f"{rule.custom.kind} {rule.custom.path}")
                    elif verb is not None:
                        rules.append(f"{verb.upper()} {getattr(rule, verb)}")
            if rules:
                result[f"{file.package}.{service.name}"] = rules
    return result


def rest_listener(facts: dict[str, Any]) -> dict[str, Any]:
    """The listener that carries the transcoder."""
    for listener in facts["listeners"]:
        for manager in listener["http_connection_managers"]:
            if manager["transcoder"] is not None:
                return listener  # type: ignore[no-any-return]
    raise AssertionError("no listener of gateway/envoy.yaml has the gRPC-JSON transcoder")


def rest_manager(facts: dict[str, Any]) -> dict[str, Any]:
    """The HTTP connection manager that carries the transcoder."""
    (manager,) = [m for m in rest_listener(facts)["http_connection_managers"] if m["transcoder"]]
    return manager  # type: ignore[no-any-return]


def route_cluster_for_rpc_path(routes: list[dict[str, Any]], path: str) -> str | None:
    """The cluster Envoy picks for a transcoded request (:path /<service>/<method>).

    Mirrors Envoy's first-match over the route list for the match kinds the file uses; a route
    with a direct response (or with the transcoder disabled) answers None.
    """
    for route in routes:
        kind, value = route["match_kind"], route["match"]
        if kind == "prefix":
            matched = path.startswith(value)
        elif kind == "path":
            matched = path == value
        elif kind == "path_separated_prefix":
            matched = path == value or path.startswith(value + "/")
        else:
            raise AssertionError(f"route {route['name']}: match kind {kind} not understood here")
        if matched:
            if route["action"] != "route" or TRANSCODER_FILTER in route["disabled_filters"]:
                return None
            return route["cluster"]  # type: ignore[no-any-return]
    return None


def routing_problems(fds: descriptor_pb2.FileDescriptorSet, facts: dict[str, Any]) -> list[str]:
    """Why Envoy would not transcode or route some rpc with an http rule (empty: all good)."""
    manager = rest_manager(facts)
    transcoded = set(manager["transcoder"]["services"])
    clusters = {c["name"] for c in facts["clusters"]}
    problems = []
    for file in fds.file:
        for service in file.service:
            full_name = f"{file.package}.{service.name}"
            if full_name not in http_rules_by_service(fds):
                continue
            expected = CLUSTER_OF_PACKAGE.get(file.package)
            if full_name not in transcoded:
                problems.append(
                    f"{full_name} has google.api.http rules but is not transcoded: add it to "
                    f"`services` of the grpc_json_transcoder in gateway/envoy.yaml, and a route "
                    f"`prefix: /{full_name}/` to its cluster ({expected or 'new package: add it'}"
                    f" to CLUSTER_OF_PACKAGE in {Path(__file__).name})"
                )
            for method in service.method:
                if not method.options.HasExtension(annotations_pb2.http):
                    continue
                rpc_path = f"/{full_name}/{method.name}"
                cluster = route_cluster_for_rpc_path(manager["routes"], rpc_path)
                if cluster is None or cluster not in clusters:
                    problems.append(
                        f"{rpc_path} (transcoded from its http rule) reaches no cluster: add a "
                        f"route `prefix: /{full_name}/` to gateway/envoy.yaml"
                    )
                elif cluster != expected:
                    problems.append(f"{rpc_path} is routed to {cluster}, expected {expected}")
    return problems


def with_extra_rpc(
    fds: descriptor_pb2.FileDescriptorSet, package: str, service_name: str, path: str
) -> descriptor_pb2.FileDescriptorSet:
    """A copy of `fds` with one more rpc (GET `path`) in `package`.`service_name`.

    The service is created in a new file when it does not exist yet.
    """
    copy = descriptor_pb2.FileDescriptorSet()
    copy.CopyFrom(fds)
    target = None
    for file in copy.file:
        for service in file.service:
            if file.package == package and service.name == service_name:
                target = service
    if target is None:
        new_file = copy.file.add(
            name=f"{package.replace('.', '/')}/extra.proto", package=package, syntax="proto3"
        )
        new_file.dependency.append("google/protobuf/empty.proto")
        target = new_file.service.add(name=service_name)
    method = target.method.add(
        name="Extra", input_type=".google.protobuf.Empty", output_type=".google.protobuf.Empty"
    )
    method.options.Extensions[annotations_pb2.http].get = path
    return copy


# --------------------------------------------------------------------------- static checks


def test_envoy_yaml_parses_as_v3_bootstrap(envoy_facts: dict[str, Any]) -> None:
    # The fixture parses strictly; here: it found what the rest of the file relies on.
    assert rest_manager(envoy_facts)["transcoder"]["services"]
    assert {c["name"] for c in envoy_facts["clusters"]} >= set(CLUSTER_OF_PROCESS.values())


def test_parse_is_strict_even_inside_typed_configs(
    deploy_tools: DeployTools, tmp_path: Path
) -> None:
    # A misspelled field deep inside an Any (the transcoder's config) must fail the parse.
    text = ENVOY_YAML.read_text()
    assert "convert_grpc_status: true" in text
    broken = tmp_path / "envoy.yaml"
    broken.write_text(text.replace("convert_grpc_status: true", "convert_grpc_stauts: true"))
    with pytest.raises(ToolError, match="convert_grpc_stauts"):
        deploy_tools.check("envoy", broken)


def test_real_envoy_validates_the_config(
    deploy_tools: DeployTools, envoy_facts: dict[str, Any], tmp_path: Path
) -> None:
    # `envoy --mode validate` builds every listener, filter and cluster (incl. loading the
    # descriptor set for the listed services), without deprecated fields.
    config = point_descriptor_at_repo(envoy_facts["config"])
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(config))
    result = subprocess.run(
        [str(deploy_tools.envoy), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"configuration '{path}' OK" in output
    assert "Deprecated field" not in output, output


def test_listener_admin_and_limits(envoy_facts: dict[str, Any]) -> None:
    listener = rest_listener(envoy_facts)
    assert (listener["address"], listener["port"]) == ("0.0.0.0", 3006)  # noqa: S104
    assert envoy_facts["admin"]["address"] == "127.0.0.1", "admin must stay on loopback"
    assert listener["per_connection_buffer_limit_bytes"]
    others = [x for x in envoy_facts["listeners"] if x["name"] != listener["name"]]
    for other in others:
        # Extra listeners (readiness) must not carry routes to the services.
        for manager in other["http_connection_managers"]:
            assert all(r["action"] != "route" for r in manager["routes"]), other["name"]


def test_transcoder_settings(envoy_facts: dict[str, Any]) -> None:
    transcoder = rest_manager(envoy_facts)["transcoder"]
    assert transcoder["proto_descriptor"] == "/etc/envoy/azora.binpb"
    assert transcoder["print_options"] == {
        "add_whitespace": False,
        "always_print_primitive_fields": True,
        "always_print_enums_as_ints": False,
        "preserve_proto_field_names": False,
        "stream_newline_delimited": False,
        "stream_sse_style_delimited": False,
    }
    assert transcoder["convert_grpc_status"] is True
    assert transcoder["auto_mapping"] is False
    assert transcoder["match_incoming_request_route"] is False  # routes match the rpc path
    assert transcoder["ignore_unknown_query_parameters"] is False
    assert transcoder["case_insensitive_enum_parsing"] is False
    assert transcoder["request_validation_options"] == {
        "reject_unknown_method": True,
        "reject_unknown_query_parameters": True,
        "reject_binding_body_field_collisions": True,
    }
    # Envoy refuses what the services would refuse anyway, before buffering more.
    assert transcoder["max_request_body_size"] == MAX_MESSAGE_BYTES
    assert transcoder["max_response_body_size"] == MAX_MESSAGE_BYTES


def test_filter_order_request_ids_and_json_access_log(envoy_facts: dict[str, Any]) -> None:
    manager = rest_manager(envoy_facts)
    names = [f["name"] for f in manager["http_filters"]]
    assert names[-1] == "envoy.filters.http.router"
    assert TRANSCODER_FILTER in names
    assert manager["generate_request_id"] is True
    assert manager["preserve_external_request_id"] is True
    assert manager["always_set_request_id_in_response"] is True
    (log,) = manager["access_logs"]
    assert log["type"] == "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"
    fields = log["json_format"]
    assert fields["request_id"] == "%REQ(X-REQUEST-ID)%"
    assert fields["traceparent"] == "%REQ(TRACEPARENT)%"
    assert {"method", "path", "status", "grpc_status", "duration_ms", "upstream_cluster"} <= set(
        fields
    )


def test_envoy_local_replies_use_the_google_rpc_http_mapping(envoy_facts: dict[str, Any]) -> None:
    # HTTP status of Envoy's own reply -> (status sent, google.rpc.Code in the JSON body).
    manager = rest_manager(envoy_facts)
    mapping = {
        m["status"]: (m["rewritten_status"] or m["status"], int(m["json_format"]["code"]))
        for m in manager["local_reply_mappers"]
    }
    assert mapping == {
        400: (400, 3),  # INVALID_ARGUMENT
        401: (401, 16),  # UNAUTHENTICATED
        403: (403, 7),  # PERMISSION_DENIED
        404: (404, 5),  # NOT_FOUND
        413: (413, 3),  # body over the limit: INVALID_ARGUMENT, as the local gateway answers
        415: (415, 3),  # body not JSON: INVALID_ARGUMENT, as the local gateway answers
        429: (429, 8),  # RESOURCE_EXHAUSTED
        500: (500, 13),  # INTERNAL
        502: (502, 14),  # UNAVAILABLE
        503: (503, 14),  # UNAVAILABLE
        504: (504, 4),  # DEADLINE_EXCEEDED
    }
    for body in [m["json_format"] for m in manager["local_reply_mappers"]] + [
        manager["local_reply_default"]
    ]:
        assert body["message"] == "%LOCAL_REPLY_BODY%"
        assert body["details"] == []
    assert int(manager["local_reply_default"]["code"]) == 2  # UNKNOWN


def test_every_http_service_is_transcoded_and_routed(
    envoy_facts: dict[str, Any], descriptor_set: descriptor_pb2.FileDescriptorSet
) -> None:
    services = http_rules_by_service(descriptor_set)
    assert set(services) >= {
        "azora.domain.v1.DomainService",
        "azora.iam.v1.ApiKeyService",
        "azora.health.v1.SuiteHealthService",
        "azora.smtp.v1.SmtpService",
        "azora.mail.v1.MailService",
    }
    assert routing_problems(descriptor_set, envoy_facts) == []
    # Nothing transcoded that the descriptor set does not annotate (Envoy would refuse to start).
    assert set(rest_manager(envoy_facts)["transcoder"]["services"]) <= set(services)


def test_envoy_and_the_local_gateway_read_the_same_descriptor_set(
    envoy_facts: dict[str, Any], compose: dict[str, Any]
) -> None:
    # Both gateways take their routing table from gen/azora.binpb: the local gateway by default,
    # Envoy through the file mounted at its proto_descriptor path (compose; k8s copies the same
    # file out of the services' image, see test_k8s.py).
    from gateway.config import DEFAULT_DESCRIPTOR_PATH

    assert DEFAULT_DESCRIPTOR_PATH.resolve() == DESCRIPTOR_SET.resolve()
    descriptor_path = rest_manager(envoy_facts)["transcoder"]["proto_descriptor"]
    relative = DESCRIPTOR_SET.relative_to(REPO_ROOT)
    assert f"./{relative}:{descriptor_path}:ro" in compose["services"]["envoy"]["volumes"]


def test_a_new_rpc_in_an_existing_service_needs_no_envoy_edit(
    envoy_facts: dict[str, Any], descriptor_set: descriptor_pb2.FileDescriptorSet
) -> None:
    # Envoy and the local gateway both read the http rules from gen/azora.binpb: a new rpc with
    # an http rule, in a service already listed, is transcoded and routed with no change here.
    grown = with_extra_rpc(descriptor_set, "azora.mail.v1", "MailService", "/api/v1/extra")
    assert "GET /api/v1/extra" in http_rules_by_service(grown)["azora.mail.v1.MailService"]
    assert routing_problems(grown, envoy_facts) == []


def test_a_new_service_is_reported_with_the_line_to_add(
    envoy_facts: dict[str, Any], descriptor_set: descriptor_pb2.FileDescriptorSet
) -> None:
    grown = with_extra_rpc(descriptor_set, "azora.mail.v1", "TemplateService", "/api/v1/tpl")
    problems = routing_problems(grown, envoy_facts)
    assert problems, "a new service with http rules must fail the routing check"
    first = problems[0]
    assert "azora.mail.v1.TemplateService has google.api.http rules but is not transcoded" in first
    assert "add it to `services`" in first
    assert any("prefix: /azora.mail.v1.TemplateService/" in p for p in problems)


def test_routes_point_at_defined_clusters(envoy_facts: dict[str, Any]) -> None:
    clusters = {c["name"] for c in envoy_facts["clusters"]}
    for listener in envoy_facts["listeners"]:
        for manager in listener["http_connection_managers"]:
            for route in manager["routes"]:
                if route["action"] == "route":
                    assert route["cluster"] in clusters, route
                    assert route["timeout_seconds"], f"route {route['name']} needs a timeout"
                else:
                    assert route["action"] == "direct_response", route


def test_api_docs_route_bypasses_the_transcoder(
    envoy_facts: dict[str, Any], descriptor_set: descriptor_pb2.FileDescriptorSet
) -> None:
    routes = rest_manager(envoy_facts)["routes"]
    (docs,) = [r for r in routes if r["cluster"] == "api_docs"]
    assert (docs["match_kind"], docs["match"]) == ("path_separated_prefix", "/api-docs")
    assert TRANSCODER_FILTER in docs["disabled_filters"]
    assert routes.index(docs) == 0, "the docs route must be matched before the catch-all"
    # No REST path of the API may hide behind the docs route.
    for service, rules in http_rules_by_service(descriptor_set).items():
        for rule in rules:
            assert not rule.split(" ", 1)[1].startswith("/api-docs"), (service, rule)


def test_clusters_are_http2_with_grpc_health_checks(envoy_facts: dict[str, Any]) -> None:
    routes = rest_manager(envoy_facts)["routes"]
    for cluster in envoy_facts["clusters"]:
        name = cluster["name"]
        assert cluster["type"] == "STRICT_DNS", name
        assert cluster["connect_timeout_seconds"], name
        assert cluster["load_assignment_name"] == name
        assert cluster["health_checks"], f"cluster {name} has no health check"
        assert all(check["has_timeout"] for check in cluster["health_checks"]), name
        if name == "api_docs":
            assert cluster["health_checks"][0]["http_path"] == "/api-docs/openapi.json"
            continue
        assert cluster["http2"], f"gRPC cluster {name} must speak HTTP/2 explicitly"
        (check,) = cluster["health_checks"]
        assert check["kind"] == "grpc_health_check", name
        # The health-checked service is one that this cluster serves.
        served = {
            r["match"].strip("/") for r in routes if r["cluster"] == name and r["action"] == "route"
        }
        assert check["grpc_service_name"] in served, (name, check, served)


def test_cluster_endpoints_are_the_deployed_processes(
    envoy_facts: dict[str, Any], compose: dict[str, Any]
) -> None:
    # Upstream host names are compose service names (and k8s Service names), on the ports the
    # processes listen on.
    clusters = {c["name"]: c for c in envoy_facts["clusters"]}
    for process, cluster_name in CLUSTER_OF_PROCESS.items():
        (endpoint,) = clusters[cluster_name]["endpoints"]
        assert endpoint == {"address": process, "port": PROCESSES[process][2]}
        assert process in compose["services"]
    (docs,) = clusters["api_docs"]["endpoints"]
    assert docs["address"] in compose["services"]
    assert compose["services"][docs["address"]]["environment"]["PORT"] == str(docs["port"])


# --------------------------------------------------------------------------- real Envoy


def point_descriptor_at_repo(config: dict[str, Any], max_body: int | None = None) -> dict[str, Any]:
    """A copy of the bootstrap whose transcoder reads gen/azora.binpb from this checkout.

    With `max_body`, the transcoder's request-body limit is lowered to it.
    """
    copy: dict[str, Any] = json.loads(json.dumps(config))
    found = 0
    for listener in copy["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                for http_filter in network_filter["typed_config"].get("http_filters", []):
                    if http_filter["name"] == TRANSCODER_FILTER:
                        http_filter["typed_config"]["proto_descriptor"] = str(DESCRIPTOR_SET)
                        if max_body is not None:
                            http_filter["typed_config"]["max_request_body_size"] = max_body
                        found += 1
    assert found == 1
    return copy


class _DocsStub(BaseHTTPRequestHandler):
    """Stands in for the docs server behind the api_docs cluster."""

    def do_GET(self) -> None:
        body = b'{"swagger": "stub"}' if self.path.endswith(".json") else b"<html>docs</html>"
        self.send_response(200 if self.path.startswith("/api-docs") else 404)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass(frozen=True)
class RawBody:
    """A request body sent as is (not JSON-encoded)."""

    data: bytes


@dataclass
class RunningEnvoy:
    """Envoy started from gateway/envoy.yaml in front of the live suite."""

    base_url: str
    admin_url: str
    access_log: Path
    jwt_secret: str

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """One HTTP request to the REST listener; returns status, headers, body."""
        if body is None:
            data = None
        elif isinstance(body, RawBody):
            data = body.data
        else:
            data = json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 - loopback http only
            self.base_url + path, data=data, method=method, headers=headers or {}
        )
        if data is not None and not request.has_header("Content-type"):
            request.add_header("content-type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
                return response.status, dict(response.headers.items()), response.read()
        except urllib.error.HTTPError as error:
            with error:
                return error.code, dict(error.headers.items()), error.read()

    def access_log_entry(self, request_id: str) -> dict[str, Any]:
        """The access-log line of one request (Envoy flushes stdout about once a second)."""
        deadline = time.monotonic() + 15
        while True:
            entries = [
                json.loads(line)
                for line in self.access_log.read_text().splitlines()
                if line.startswith("{")
            ]
            found = [e for e in entries if e["request_id"] == request_id]
            if found:
                assert len(found) == 1, found
                return found[0]  # type: ignore[no-any-return]
            assert time.monotonic() < deadline, f"no access-log line for {request_id}"
            time.sleep(0.1)


def _admin_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback admin
        text: str = response.read().decode()
        return text


@pytest.fixture(scope="module")
def envoy(
    deploy_tools: DeployTools,
    envoy_facts: dict[str, Any],
    live_suite: LiveSuite,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningEnvoy]:
    """The real Envoy with gateway/envoy.yaml, its upstreams rewritten to loopback ports."""
    docs = ThreadingHTTPServer(("127.0.0.1", 0), _DocsStub)
    threading.Thread(target=docs.serve_forever, daemon=True).start()
    upstream_ports = {CLUSTER_OF_PROCESS[p]: port for p, port in live_suite.ports.items()}
    upstream_ports["api_docs"] = docs.server_address[1]

    config = point_descriptor_at_repo(envoy_facts["config"], max_body=TEST_MAX_BODY)
    admin_port, rest_port = free_port(), free_port()
    config["admin"]["address"]["socket_address"]["port_value"] = admin_port
    for listener in config["static_resources"]["listeners"]:
        address = listener["address"]["socket_address"]
        address["address"] = "127.0.0.1"
        address["port_value"] = rest_port if address["port_value"] == 3006 else free_port()
    for cluster in config["static_resources"]["clusters"]:
        for locality in cluster["load_assignment"]["endpoints"]:
            for lb_endpoint in locality["lb_endpoints"]:
                address = lb_endpoint["endpoint"]["address"]["socket_address"]
                address["address"] = "127.0.0.1"
                address["port_value"] = upstream_ports[cluster["name"]]

    workdir = tmp_path_factory.mktemp("envoy")
    config_path = workdir / "envoy.json"
    config_path.write_text(json.dumps(config))
    access_log = workdir / "stdout.log"
    with access_log.open("w") as stdout, (workdir / "stderr.log").open("w") as stderr:
        process = subprocess.Popen(
            [
                str(deploy_tools.envoy),
                "-c",
                str(config_path),
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "--log-level",
                "warn",
                # The access log goes to stdout; flush it often so tests can read it.
                "--file-flush-interval-msec",
                "50",
            ],
            stdout=stdout,
            stderr=stderr,
        )
    admin_url = f"http://127.0.0.1:{admin_port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (workdir / "stderr.log").read_text()
            try:
                clusters = _admin_get(admin_url + "/clusters")
                healthy = {
                    line.split("::")[0]
                    for line in clusters.splitlines()
                    if "::health_flags::healthy" in line
                }
                if healthy >= set(upstream_ports):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "Envoy's upstreams did not turn healthy"
            time.sleep(0.2)
        yield RunningEnvoy(
            f"http://127.0.0.1:{rest_port}",
            admin_url,
            access_log,
            live_suite.env["JWT_SECRET"],
        )
    finally:
        process.terminate()
        process.wait(timeout=30)
        docs.shutdown()
        docs.server_close()


def _bearer(envoy: RunningEnvoy) -> dict[str, str]:
    tenant = "t-" + secrets.token_hex(6)
    token = issue_jwt(
        secret=envoy.jwt_secret, tenant_id=tenant, subject="envoy-test", scopes=ALL_SCOPES
    )
    return {"authorization": f"Bearer {token}"}


def test_envoy_health_checks_every_upstream_over_grpc(envoy: RunningEnvoy) -> None:
    # The fixture waited for this; here the gRPC health service names are shown to be right.
    clusters = _admin_get(envoy.admin_url + "/clusters")
    for cluster in (*CLUSTER_OF_PROCESS.values(), "api_docs"):
        assert f"{cluster}::" in clusters
        assert any(
            line.startswith(f"{cluster}::") and line.endswith("::health_flags::healthy")
            for line in clusters.splitlines()
        ), cluster


def test_envoy_transcodes_rest_to_the_domain_service(envoy: RunningEnvoy) -> None:
    name = f"d{secrets.token_hex(5)}.example"
    request_id = "req-" + secrets.token_hex(8)
    traceparent = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
    status, headers, body = envoy.request(
        "POST",
        "/api/v1/domains",
        {"name": name},
        {**_bearer(envoy), "x-request-id": request_id, "traceparent": traceparent},
    )
    assert status == 200, body
    domain = json.loads(body)
    assert domain["name"] == name
    # lowerCamelCase, primitive fields printed even when empty, enums by name.
    assert "verificationToken" in domain
    assert domain["statusReason"] == ""
    assert isinstance(domain["status"], str)
    assert domain["status"].startswith("DOMAIN_STATUS_")
    # The client's request id is kept and returned.
    lower = {k.lower(): v for k, v in headers.items()}
    assert lower["x-request-id"] == request_id
    entry = envoy.access_log_entry(request_id)
    assert entry["path"] == "/api/v1/domains"
    assert entry["rpc"] == "/azora.domain.v1.DomainService/CreateDomain"
    assert entry["traceparent"] == traceparent
    assert entry["upstream_cluster"] == "domain_service"


def test_envoy_generates_a_request_id_when_absent(envoy: RunningEnvoy) -> None:
    status, headers, _ = envoy.request("GET", "/health/ping")
    assert status == 200
    lower = {k.lower(): v for k, v in headers.items()}
    assert lower.get("x-request-id")


def test_envoy_errors_are_google_rpc_status_json(envoy: RunningEnvoy) -> None:
    status, _, body = envoy.request(
        "GET", f"/api/v1/domains/{secrets.token_hex(12)}", headers=_bearer(envoy)
    )
    assert status == 404, body
    error = json.loads(body)
    assert error["code"] == 5
    assert error["message"]
    assert any(d["@type"].endswith("google.rpc.ErrorInfo") for d in error["details"]), error
    # Without credentials in production: UNAUTHENTICATED -> 401.
    status, _, body = envoy.request("GET", "/api/v1/domains")
    assert status == 401, body
    assert json.loads(body)["code"] == 16


def _status_json(response: tuple[int, dict[str, str], bytes]) -> tuple[int, int]:
    """(HTTP status, google.rpc.Status code) of an error answer, checking its shape."""
    status, headers, body = response
    content_type = {k.lower(): v for k, v in headers.items()}["content-type"]
    assert content_type.startswith("application/json"), (content_type, body)
    error = json.loads(body)
    assert set(error) >= {"code", "message", "details"}, error
    assert error["message"], error
    return status, error["code"]


def test_envoy_own_errors_are_google_rpc_status_json(envoy: RunningEnvoy) -> None:
    # Errors Envoy answers itself (the transcoder's input errors, unknown paths, oversized
    # bodies) have the services' error shape and google/rpc/code.proto's HTTP mapping.
    auth = _bearer(envoy)
    cases = {
        "unknown path": envoy.request("GET", "/api/v1/nothing-here", headers=auth),
        "unknown query parameter": envoy.request(
            "GET", "/api/v1/domains?noSuchField=1", headers=auth
        ),
        "wrong query type": envoy.request("GET", "/api/v1/domains?pageSize=abc", headers=auth),
        "enum name in the wrong case": envoy.request(
            "GET", "/api/v1/domains?status=domain_status_active", headers=auth
        ),
        "wrong body type": envoy.request("POST", "/api/v1/domains", {"name": 5}, auth),
        "body not an object": envoy.request("POST", "/api/v1/domains", ["x"], auth),
        "malformed JSON": envoy.request("POST", "/api/v1/domains", RawBody(b"{bad"), auth),
        # The test config lowers max_request_body_size to TEST_MAX_BODY (see the fixture).
        "oversized body": envoy.request(
            "POST", "/api/v1/domains", {"name": "x" * TEST_MAX_BODY}, auth
        ),
    }
    answers = {case: _status_json(response) for case, response in cases.items()}
    assert answers == {
        "unknown path": (404, 5),
        "unknown query parameter": (400, 3),
        "wrong query type": (400, 3),
        "enum name in the wrong case": (400, 3),
        "wrong body type": (400, 3),
        "body not an object": (400, 3),
        "malformed JSON": (400, 3),
        "oversized body": (413, 3),
    }
    # Enums by their exact name (or number) and proto field names in queries are accepted.
    for query in ("status=DOMAIN_STATUS_ACTIVE", "status=2", "page_size=3", "pageSize=3"):
        status, _, body = envoy.request("GET", f"/api/v1/domains?{query}", headers=auth)
        assert status == 200, (query, body)


def test_envoy_ignores_unknown_json_fields_in_bodies(envoy: RunningEnvoy) -> None:
    # Observed behaviour of Envoy's transcoder (no option changes it): unknown fields of a JSON
    # body are dropped, unlike unknown query parameters; the local gateway refuses them. Recorded
    # here so that a future Envoy that can refuse them is noticed (gateway/README.md).
    name = f"d{secrets.token_hex(5)}.example"
    status, _, body = envoy.request(
        "POST", "/api/v1/domains", {"name": name, "noSuchField": 1}, _bearer(envoy)
    )
    assert status == 200, body
    assert json.loads(body)["name"] == name


def test_envoy_passes_the_spec_values_to_the_services(envoy: RunningEnvoy) -> None:
    # Record types, DMARC policies and relay security as the spec and RFCs write them are
    # strings the services check, so behind Envoy too they are stored as sent, and an unknown
    # one is 400 naming the field (an enum name Envoy did not know would have been dropped).
    auth = _bearer(envoy)
    status, _, body = envoy.request(
        "POST", "/api/v1/domains", {"name": f"d{secrets.token_hex(5)}.example"}, auth
    )
    assert status == 200, body
    domain_id = json.loads(body)["id"]
    smtp = f"/api/v1/smtp/domains/{domain_id}"
    relay = {"host": "smtp.example.com", "port": 2525, "security": "none"}
    status, _, body = envoy.request("PUT", f"{smtp}/config", relay, auth)
    assert status == 200, body
    assert json.loads(body)["security"] == "SECURITY_MODE_NONE"
    status, _, body = envoy.request("PUT", f"{smtp}/config", {**relay, "security": "ssl"}, auth)
    assert _status_json((status, {"content-type": "application/json"}, body)) == (400, 3)
    fields = [v["field"] for d in json.loads(body)["details"] for v in d.get("fieldViolations", [])]
    assert fields == ["security"]
    records = {"records": [{"type": "A", "name": "www", "value": "192.0.2.1"}]}
    status, _, body = envoy.request("PUT", f"/api/v1/domains/{domain_id}/dns", records, auth)
    assert status == 200, body
    assert [r["type"] for r in json.loads(body)["dnsRecords"]] == ["A"]
    dmarc = {"policy": "reject", "dkimAlignment": "s"}
    status, _, body = envoy.request("POST", f"{smtp}/dmarc", dmarc, auth)
    assert status == 200, body
    assert "p=reject; adkim=s" in json.loads(body)["recordValue"]
    status, _, body = envoy.request("POST", f"{smtp}/dmarc", {**dmarc, "dkimAlignment": "x"}, auth)
    assert status == 400, body


def test_envoy_refuses_a_json_body_with_another_content_type(envoy: RunningEnvoy) -> None:
    # 415 with a Status JSON (code 3), as the local gateway answers, for what `curl -d` sends;
    # JSON media types (with parameters, +json suffixes) are transcoded as before.
    auth = _bearer(envoy)
    body = RawBody(json.dumps({"name": f"d{secrets.token_hex(5)}.example"}).encode())
    for content_type in ("application/x-www-form-urlencoded", "text/plain"):
        response = envoy.request(
            "POST", "/api/v1/domains", body, {**auth, "content-type": content_type}
        )
        assert _status_json(response) == (415, 3), (content_type, response[2])
    # An empty body may come with any type (some clients send application/octet-stream).
    status, _, answer = envoy.request(
        "POST", "/api/v1/domains", RawBody(b""), {**auth, "content-type": "text/plain"}
    )
    assert _status_json((status, _, answer)) == (400, 3), answer  # name required, not 415
    for content_type in ("application/json; charset=utf-8", "application/merge-patch+json"):
        fresh = RawBody(json.dumps({"name": f"d{secrets.token_hex(5)}.example"}).encode())
        status, _, answer = envoy.request(
            "POST", "/api/v1/domains", fresh, {**auth, "content-type": content_type}
        )
        assert status == 200, (content_type, answer)


def test_envoy_serves_health_metrics_and_docs_routes(envoy: RunningEnvoy) -> None:
    for path in ("/health", "/health/ready", "/health/ping"):
        status, headers, body = envoy.request("GET", path)
        assert status == 200, (path, body)
        assert isinstance(json.loads(body), dict)
    # /metrics is a google.api.HttpBody (Prometheus text), /health/metrics JSON figures.
    for path in ("/health/metrics", "/metrics"):
        request_id = "req-" + secrets.token_hex(8)
        status, headers, body = envoy.request("GET", path, headers={"x-request-id": request_id})
        assert status == 200, (path, body)
        assert envoy.access_log_entry(request_id)["upstream_cluster"] == "domain_service"
        content_type = {k.lower(): v for k, v in headers.items()}["content-type"]
        if path == "/metrics":
            assert content_type.startswith("text/plain"), content_type
            assert b"azora_grpc_requests_total" in body
        else:
            assert content_type.startswith("application/json"), content_type
            assert isinstance(json.loads(body)["values"], dict)
    status, _, body = envoy.request("GET", "/api-docs")
    assert (status, body) == (200, b"<html>docs</html>")
    status, _, body = envoy.request("GET", "/api-docs/openapi.json")
    assert (status, body) == (200, b'{"swagger": "stub"}')


@pytest.mark.parametrize(
    ("path", "cluster"),
    [
        ("/api/v1/smtp/domains/some-id/config", "smtp_service"),
        ("/api/v1/emails/some-id", "mail_service"),
        ("/api/v1/api-keys", "domain_service"),
    ],
)
def test_envoy_routes_each_service_to_its_process(
    envoy: RunningEnvoy, path: str, cluster: str
) -> None:
    # Whatever the service answers (it may not be implemented yet), the answer is the service's
    # google.rpc.Status or resource, never a routing miss.
    request_id = "req-" + secrets.token_hex(8)
    status, _, body = envoy.request(
        "GET", path, headers={**_bearer(envoy), "x-request-id": request_id}
    )
    assert status != 503, body
    assert isinstance(json.loads(body), dict)
    entry = envoy.access_log_entry(request_id)
    assert entry["upstream_cluster"] == cluster, entry


def test_envoy_sets_the_same_security_headers_as_the_local_gateway(envoy: RunningEnvoy) -> None:
    # Every answer carries gateway/security.py's headers: the upstreams' (a service's error
    # too), the docs route's (with its own CSP) and Envoy's own local replies (unknown path,
    # transcoding errors, oversized body, unknown gRPC path), through the header_mutation filter.
    from gateway.security import API_CSP, DOCS_CSP, SECURITY_HEADERS

    auth = _bearer(envoy)
    cases = {
        "upstream success": (envoy.request("GET", "/health/ping"), API_CSP),
        "upstream error": (envoy.request("GET", "/api/v1/domains/bad-id"), API_CSP),
        "docs": (envoy.request("GET", "/api-docs"), DOCS_CSP),
        "unknown REST path": (envoy.request("GET", "/api/v1/nothing-here", headers=auth), API_CSP),
        "unknown query parameter": (
            envoy.request("GET", "/api/v1/domains?noSuchField=1", headers=auth),
            API_CSP,
        ),
        "malformed JSON": (
            envoy.request("POST", "/api/v1/domains", RawBody(b"{bad"), auth),
            API_CSP,
        ),
        "oversized body": (
            envoy.request("POST", "/api/v1/domains", {"name": "x" * TEST_MAX_BODY}, auth),
            API_CSP,
        ),
        "direct response": (envoy.request("GET", "/no.such.Service/Method"), API_CSP),
    }
    statuses = {}
    for case, ((status, headers, _), csp) in cases.items():
        statuses[case] = status
        lowered = {k.lower(): v for k, v in headers.items()}
        for name, value in SECURITY_HEADERS.items():
            assert lowered.get(name.lower()) == value, (case, name, headers)
        assert lowered["content-security-policy"] == csp, case
    # The cases really are what they say: Envoy's own replies are errors it answered itself.
    assert statuses["unknown REST path"] == 404
    assert statuses["unknown query parameter"] == 400
    assert statuses["malformed JSON"] == 400
    assert statuses["oversized body"] == 413
    assert statuses["direct response"] == 404


def test_envoy_refuses_header_names_with_underscores(envoy: RunningEnvoy) -> None:
    # headers_with_underscores_action: REJECT_REQUEST, answered before any service is called.
    status, headers, body = envoy.request(
        "GET", "/api/v1/domains", headers={**_bearer(envoy), "x_api_key": "azk_x"}
    )
    assert status == 400, body
    lowered = {k.lower(): v for k, v in headers.items()}
    assert lowered.get("x-content-type-options") == "nosniff", headers


def test_envoy_passes_rate_limit_headers_and_429_through(envoy: RunningEnvoy) -> None:
    # The services' rate-limit response metadata become HTTP headers through the transcoder,
    # and a refusal is 429 with Retry-After. The address counted is the one Envoy appends to
    # x-forwarded-for (what the client put there itself is ignored), so this test uses up the
    # budget (RATE_LIMIT_MAX, default 100) of every client of this Envoy: keep it last.
    headers = {**_bearer(envoy), "x-forwarded-for": "198.51.100.7"}
    remaining = []
    for _ in range(2):
        status, answer, body = envoy.request("GET", "/api/v1/domains", headers=headers)
        assert status == 200, body
        lowered = {k.lower(): v for k, v in answer.items()}
        assert int(lowered["ratelimit-reset"]) > 0
        assert lowered["ratelimit-policy"].startswith(lowered["ratelimit-limit"] + ";w=")
        remaining.append(int(lowered["ratelimit-remaining"]))
    # At least our own request is counted; other processes' counts for the same address may
    # arrive with a sync in between (services share budgets through the database).
    assert remaining[1] < remaining[0]
    refused = None
    for _ in range(remaining[1] + 1):
        status, answer, body = envoy.request("GET", "/api/v1/domains", headers=headers)
        if status != 200:
            refused = (status, {k.lower(): v for k, v in answer.items()}, body)
            break
    assert refused is not None, "the budget was not enforced"
    status, answer_headers, body = refused
    assert status == 429, body
    error = json.loads(body)
    assert error["code"] == 8
    reasons = [d.get("reason") for d in error["details"]]
    assert "RATE_LIMIT_EXCEEDED" in reasons, error
    assert int(answer_headers["retry-after"]) > 0
    assert answer_headers["ratelimit-remaining"] == "0"


def test_envoy_edge_limits(envoy_facts: dict[str, Any]) -> None:
    # Header count and size bounded, underscores in header names refused, HTTP/2 bounded.
    config = envoy_facts["config"]
    (listener,) = [x for x in config["static_resources"]["listeners"] if x["name"] == "rest"]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["max_request_headers_kb"] == 60
    assert hcm["common_http_protocol_options"]["max_headers_count"] == 100
    assert hcm["common_http_protocol_options"]["headers_with_underscores_action"] == (
        "REJECT_REQUEST"
    )
    assert hcm["http2_protocol_options"]["max_concurrent_streams"] == 100
