"""Unit tests of the gateway's routing and transcoding on the real descriptor set (no network).

The expected routes are computed here straight from gen/azora.binpb, independently of the
gateway's own loader: every http rule (and additional binding) must be routable, so an rpc
that gains an http rule is served without an edit to the gateway.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2, duration_pb2, json_format
from google.rpc import code_pb2, error_details_pb2, status_pb2

from gateway.config import DEFAULT_MAX_BODY_BYTES, GatewayConfig, upstream_targets
from gateway.descriptors import DescriptorSet, DescriptorSetError, HttpBinding
from gateway.errors import (
    HTTP_STATUS_BY_CODE,
    GatewayError,
    StatusPrinter,
    pack_any,
    retry_after_seconds,
)
from gateway.router import Router
from gateway.templates import PathTemplate, TemplateError
from gateway.transcode import Transcoder, parse_query
from services.core.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
DESCRIPTOR_SET = REPO_ROOT / "gen" / "azora.binpb"
VARIABLE = re.compile(r"\{([^}=]+)(?:=([^}]*))?\}")


@pytest.fixture(scope="module")
def files() -> descriptor_pb2.FileDescriptorSet:
    return descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes())


@pytest.fixture(scope="module")
def descriptors(files: descriptor_pb2.FileDescriptorSet) -> DescriptorSet:
    return DescriptorSet(files)


@pytest.fixture(scope="module")
def router(descriptors: DescriptorSet) -> Router:
    return Router(descriptors.bindings)


@pytest.fixture(scope="module")
def transcoder(descriptors: DescriptorSet) -> Transcoder:
    return Transcoder(descriptors)


def rules(
    files: descriptor_pb2.FileDescriptorSet,
) -> Iterator[tuple[str, str, str, str]]:
    """(rpc, HTTP method, template, body) of every rule and additional binding, from the protos."""
    for file in files.file:
        for service in file.service:
            for method in service.method:
                if not method.options.HasExtension(annotations_pb2.http):
                    continue
                rule = method.options.Extensions[annotations_pb2.http]
                for one in (rule, *rule.additional_bindings):
                    kind = one.WhichOneof("pattern")
                    verb, path = (
                        (one.custom.kind, one.custom.path)
                        if kind == "custom"
                        else (kind.upper(), getattr(one, kind))
                    )
                    yield f"{file.package}.{service.name}/{method.name}", verb, path, one.body


def concrete(template: str) -> str:
    """A request path for a template: each variable replaced by a sample value."""
    return VARIABLE.sub(lambda m: "a/b" if m.group(2) and "**" in m.group(2) else "x1", template)


def route(router: Router, method: str, path: str) -> tuple[str, dict[str, str]]:
    found = router.match(method, path)
    return found.binding.rpc, dict(found.variables)


# Every http rule of the descriptor set, additional bindings included, routes to its rpc.
def test_every_http_rule_is_routable(
    files: descriptor_pb2.FileDescriptorSet, router: Router
) -> None:
    expected = list(rules(files))
    assert len(expected) >= 30  # the five services' REST surface
    for rpc, verb, template, _ in expected:
        assert route(router, verb, concrete(template))[0] == rpc, (verb, template)
    assert len(router.bindings) == len(expected)


# The DESIGN.md table, path by path.
@pytest.mark.parametrize(
    ("method", "path", "rpc", "variables"),
    [
        ("GET", "/api/v1/domains", "azora.domain.v1.DomainService/ListDomains", {}),
        ("POST", "/api/v1/domains", "azora.domain.v1.DomainService/CreateDomain", {}),
        ("GET", "/api/v1/domains/d1", "azora.domain.v1.DomainService/GetDomain", {"id": "d1"}),
        (
            "PUT",
            "/api/v1/domains/d1/dns",
            "azora.domain.v1.DomainService/UpdateDnsRecords",
            {"id": "d1"},
        ),
        (
            "PUT",
            "/api/v1/domains/d1/smtp",
            "azora.smtp.v1.SmtpService/UpdateSmtpConfig",
            {"domain_id": "d1"},
        ),
        (
            "POST",
            "/api/v1/domains/d1/verify",
            "azora.domain.v1.DomainService/VerifyDomain",
            {"id": "d1"},
        ),
        (
            "DELETE",
            "/api/v1/domains/d1",
            "azora.domain.v1.DomainService/DeleteDomain",
            {"id": "d1"},
        ),
        ("POST", "/api/v1/smtp/test", "azora.smtp.v1.SmtpService/TestSmtpConnection", {}),
        (
            "GET",
            "/api/v1/smtp/domains/d1/config",
            "azora.smtp.v1.SmtpService/GetSmtpConfig",
            {"domain_id": "d1"},
        ),
        (
            "PUT",
            "/api/v1/smtp/domains/d1/config",
            "azora.smtp.v1.SmtpService/UpdateSmtpConfig",
            {"domain_id": "d1"},
        ),
        (
            "POST",
            "/api/v1/smtp/domains/d1/dkim",
            "azora.smtp.v1.SmtpService/GenerateDkimKey",
            {"domain_id": "d1"},
        ),
        (
            "POST",
            "/api/v1/smtp/domains/d1/spf",
            "azora.smtp.v1.SmtpService/GenerateSpfRecord",
            {"domain_id": "d1"},
        ),
        (
            "POST",
            "/api/v1/smtp/domains/d1/dmarc",
            "azora.smtp.v1.SmtpService/GenerateDmarcRecord",
            {"domain_id": "d1"},
        ),
        ("POST", "/api/v1/emails", "azora.mail.v1.MailService/SendEmail", {}),
        ("GET", "/api/v1/emails", "azora.mail.v1.MailService/ListEmails", {}),
        ("GET", "/api/v1/emails/stats", "azora.mail.v1.MailService/GetEmailStats", {}),
        ("GET", "/api/v1/emails/e1", "azora.mail.v1.MailService/GetEmail", {"id": "e1"}),
        ("POST", "/api/v1/emails/e1/resend", "azora.mail.v1.MailService/ResendEmail", {"id": "e1"}),
        ("DELETE", "/api/v1/emails/e1", "azora.mail.v1.MailService/DeleteEmail", {"id": "e1"}),
        ("GET", "/health", "azora.health.v1.SuiteHealthService/GetHealth", {}),
        ("GET", "/health/ready", "azora.health.v1.SuiteHealthService/GetReadiness", {}),
        ("GET", "/health/metrics", "azora.health.v1.SuiteHealthService/GetHealthMetrics", {}),
        ("GET", "/health/ping", "azora.health.v1.SuiteHealthService/Ping", {}),
        ("GET", "/metrics", "azora.health.v1.SuiteHealthService/GetMetrics", {}),
    ],
)
def test_design_table_routes(
    router: Router, method: str, path: str, rpc: str, variables: dict[str, str]
) -> None:
    assert route(router, method, path) == (rpc, variables)


# A literal segment beats a variable, whatever order the bindings are declared in.
def test_literal_beats_variable(descriptors: DescriptorSet) -> None:
    for bindings in (descriptors.bindings, list(reversed(descriptors.bindings))):
        router = Router(bindings)
        assert route(router, "GET", "/api/v1/emails/stats")[0].endswith("/GetEmailStats")
        assert route(router, "GET", "/api/v1/emails/statz")[0].endswith("/GetEmail")
        # A literal also matches in its percent-encoded form.
        assert route(router, "GET", "/api/v1/emails/st%61ts")[0].endswith("/GetEmailStats")


# The additional binding is routed and binds its own variable name.
def test_additional_binding_is_found(router: Router) -> None:
    found = router.match("PUT", "/api/v1/domains/d1/smtp")
    assert found.binding.binding_index == 1
    assert found.binding.body == "*"
    assert dict(found.variables) == {"domain_id": "d1"}
    primary = router.match("PUT", "/api/v1/smtp/domains/d1/config")
    assert primary.binding.binding_index == 0
    assert primary.binding.method is found.binding.method


# Single-segment variables are fully percent-decoded.
def test_percent_encoded_segments(router: Router) -> None:
    assert route(router, "GET", "/api/v1/domains/a%20b")[1] == {"id": "a b"}
    assert route(router, "GET", "/api/v1/domains/a%2Fb")[1] == {"id": "a/b"}
    assert route(router, "GET", "/api/v1/domains/b%C3%BCcher")[1] == {"id": "bücher"}
    with pytest.raises(GatewayError) as raised:
        router.match("GET", "/api/v1/domains/%FF")
    assert raised.value.code == code_pb2.INVALID_ARGUMENT


# Another method on a known path is NOT_FOUND naming the accepted methods (Envoy: no 405).
def test_method_must_match(router: Router) -> None:
    with pytest.raises(GatewayError) as raised:
        router.match("PATCH", "/api/v1/domains/d1")
    assert raised.value.http_status == 404
    assert raised.value.metadata["allowed_methods"] == "DELETE,GET"
    with pytest.raises(GatewayError) as unknown:
        router.match("GET", "/api/v2/domains")
    assert "allowed_methods" not in unknown.value.metadata


# {name=**} takes the rest of the path, keeping %2F encoded; "**" may match nothing.
def test_multi_segment_variables() -> None:
    template = PathTemplate.parse("/v1/{name=shelves/*/books/**}")
    found = template.match(["v1", "shelves", "s1", "books", "a", "b%2Fc", "d%20e"])
    assert found is not None
    assert found.bindings == {"name": "shelves/s1/books/a/b%2Fc/d e"}
    assert template.match(["v1", "shelves", "s1", "books"]) is not None
    assert template.match(["v1", "shelves", "s1"]) is None
    rest = PathTemplate.parse("/files/{path=**}")
    assert rest.match(["files"]) is not None
    found_rest = rest.match(["files", "a", "b"])
    assert found_rest is not None
    assert found_rest.bindings == {"path": "a/b"}


# Templates: nested field paths, verbs, wildcards; malformed ones are refused.
def test_template_grammar() -> None:
    nested = PathTemplate.parse("/v1/{config.domain_id}/x")
    found = nested.match(["v1", "d1", "x"])
    assert found is not None
    assert found.bindings == {"config.domain_id": "d1"}
    verb = PathTemplate.parse("/v1/emails/{id}:cancel")
    assert verb.verb == "cancel"
    assert verb.match(["v1", "emails", "e1:cancel"]) is not None
    assert verb.match(["v1", "emails", "e1"]) is None
    anonymous = PathTemplate.parse("/v1/*/x")
    assert anonymous.match(["v1", "anything", "x"]) is not None
    assert anonymous.match(["v1", "", "x"]) is None
    for bad in ("v1/x", "/v1/**/x", "/v1/{a}/{a}", "/v1/{a", "/v1/{a{b}}", "/v1//x", "/v1/{1a}"):
        with pytest.raises(TemplateError):
            PathTemplate.parse(bad)


def _extended(
    files: descriptor_pb2.FileDescriptorSet, name: str, rule: http_pb2.HttpRule
) -> descriptor_pb2.FileDescriptorSet:
    """The descriptor set with one more MailService rpc carrying `rule`."""
    copy = descriptor_pb2.FileDescriptorSet()
    copy.CopyFrom(files)
    (mail,) = [f for f in copy.file if f.name == "azora/mail/v1/mail.proto"]
    method = mail.service[0].method.add(
        name=name, input_type=".azora.mail.v1.GetEmailRequest", output_type=".azora.mail.v1.Email"
    )
    method.options.Extensions[annotations_pb2.http].CopyFrom(rule)
    return copy


# A new rpc with an http rule is routed without any edit to the gateway.
def test_new_rpc_is_routed_without_edits(files: descriptor_pb2.FileDescriptorSet) -> None:
    extended = _extended(
        files, "ArchiveEmail", http_pb2.HttpRule(post="/api/v1/emails/{id}:archive", body="*")
    )
    router = Router(DescriptorSet(extended).bindings)
    assert route(router, "POST", "/api/v1/emails/e1:archive") == (
        "azora.mail.v1.MailService/ArchiveEmail",
        {"id": "e1"},
    )
    # The verb route does not shadow GetEmail's.
    assert route(router, "GET", "/api/v1/emails/e1")[0].endswith("/GetEmail")


# A rule that cannot be served fails at start-up with a message naming the rpc.
def test_unroutable_rules_fail_at_start_up(files: descriptor_pb2.FileDescriptorSet) -> None:
    unknown_field = _extended(files, "Broken", http_pb2.HttpRule(get="/api/v1/x/{nope}"))
    with pytest.raises(DescriptorSetError, match=r"Broken.*nope"):
        DescriptorSet(unknown_field)
    duplicate = _extended(files, "Twin", http_pb2.HttpRule(get="/api/v1/emails/{id}"))
    with pytest.raises(DescriptorSetError, match="bound to both"):
        Router(DescriptorSet(duplicate).bindings)


def _binding(router: Router, method: str, path: str) -> HttpBinding:
    return router.match(method, path).binding


# Query values become typed fields: names in both spellings, enums, times with a raw "+".
def test_query_binding_list_emails(router: Router, transcoder: Transcoder) -> None:
    binding = _binding(router, "GET", "/api/v1/emails")
    query = parse_query(
        "page_size=10&pageToken=t%2B1&status=EMAIL_STATUS_SENT&tag=welcome"
        "&startTime=2026-11-01T00:00:00+02:00&end_time=2026-11-23T12:00:00Z&recipient=a%40b.c"
    )
    request = transcoder.build_request(
        binding, variables={}, query=query, body=b"", content_type=""
    )
    assert json_format.MessageToDict(request) == {
        "pageSize": 10,
        "pageToken": "t+1",
        "status": "EMAIL_STATUS_SENT",
        "tag": "welcome",
        "startTime": "2026-10-31T22:00:00Z",
        "endTime": "2026-11-23T12:00:00Z",
        "recipient": "a@b.c",
    }
    by_number = transcoder.build_request(
        binding, variables={}, query=[("status", "5")], body=b"", content_type=""
    )
    assert json_format.MessageToDict(by_number) == {"status": "EMAIL_STATUS_SENT"}


# Repeated fields take every occurrence; nested fields are reached with dots.
def test_query_binding_repeated_and_nested(router: Router, transcoder: Transcoder) -> None:
    send = transcoder.build_request(
        _binding(router, "POST", "/api/v1/emails"),
        variables={},
        query=parse_query("tags=a&tags=b"),
        body=b'{"from": "x@y.z", "tags": ["first"]}',
        content_type="application/json",
    )
    assert json_format.MessageToDict(send) == {"from": "x@y.z", "tags": ["first", "a", "b"]}
    test = transcoder.build_request(
        _binding(router, "POST", "/api/v1/smtp/test"),
        variables={},
        query=parse_query("config.host=h&config.port=25&config.secure=true&config.timeout=1.5s"),
        body=b"",
        content_type="",
    )
    assert json_format.MessageToDict(test) == {
        "config": {"host": "h", "port": 25, "secure": True, "timeout": "1.500s"}
    }


# Bad query parameters are INVALID_ARGUMENT naming the parameter.
@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("colour=red", "UNKNOWN_QUERY_PARAMETER"),
        ("config.colour=red", "UNKNOWN_QUERY_PARAMETER"),
        ("domainId.x=1", "UNKNOWN_QUERY_PARAMETER"),
        ("config=x", "INVALID_QUERY_PARAMETER"),
        ("config.secure=yes", "INVALID_QUERY_PARAMETER"),
        ("config.port=-1", "INVALID_QUERY_PARAMETER"),
        ("domainId=a&domainId=b", "INVALID_QUERY_PARAMETER"),
    ],
)
def test_bad_query_parameters(
    router: Router, transcoder: Transcoder, query: str, reason: str
) -> None:
    with pytest.raises(GatewayError) as raised:
        transcoder.build_request(
            _binding(router, "POST", "/api/v1/smtp/test"),
            variables={},
            query=parse_query(query),
            body=b"",
            content_type="",
        )
    assert raised.value.reason == reason
    assert raised.value.http_status == 400
    assert raised.value.violations[0][0] == query.split("=")[0]


# An enum filter given in another spelling says which names it takes (what ListEmails' status
# accepts is not guessable from "Invalid enum value sent").
def test_bad_enum_query_value_lists_the_accepted_names(
    router: Router, transcoder: Transcoder
) -> None:
    with pytest.raises(GatewayError) as raised:
        transcoder.build_request(
            _binding(router, "GET", "/api/v1/emails"),
            variables={},
            query=parse_query("status=sent"),
            body=b"",
            content_type="",
        )
    assert raised.value.reason == "INVALID_QUERY_PARAMETER"
    field, description = raised.value.violations[0]
    assert field == "status"
    assert "EMAIL_STATUS_SENT" in description
    assert "EMAIL_STATUS_UNSPECIFIED" not in description
    assert "got 'sent'" in description


# "+" stays a plus (Envoy's query_param_unescape_plus false); bad encodings are refused.
def test_parse_query() -> None:
    assert parse_query("a=1+2&b=%2B&c&=x&&d=%C3%A9") == [
        ("a", "1+2"),
        ("b", "+"),
        ("c", ""),
        ("", "x"),
        ("d", "é"),
    ]
    with pytest.raises(GatewayError):
        parse_query("a=%FF")


# A path value and a different body value for the same field is refused; equal is fine.
def test_binding_body_collisions(router: Router, transcoder: Transcoder) -> None:
    binding = _binding(router, "PUT", "/api/v1/domains/d1/smtp")
    same = transcoder.build_request(
        binding,
        variables={"domain_id": "d1"},
        query=[],
        body=b'{"domainId": "d1", "host": "h", "port": 25}',
        content_type="application/json",
    )
    assert json_format.MessageToDict(same) == {"domainId": "d1", "host": "h", "port": 25}
    with pytest.raises(GatewayError) as raised:
        transcoder.build_request(
            binding,
            variables={"domain_id": "d1"},
            query=[],
            body=b'{"domain_id": "d2"}',
            content_type="application/json",
        )
    assert raised.value.reason == "BINDING_BODY_COLLISION"


# JSON field names: lowerCamelCase, proto names and json_name ("from") are all accepted.
def test_body_field_spellings(router: Router, transcoder: Transcoder) -> None:
    binding = _binding(router, "POST", "/api/v1/emails")
    for body in (
        b'{"from": "a@b.c", "replyTo": ["r@b.c"], "sendAt": "2026-11-24T00:00:00Z"}',
        b'{"from_address": "a@b.c", "reply_to": ["r@b.c"], "send_at": "2026-11-24T00:00:00Z"}',
    ):
        request = transcoder.build_request(
            binding, variables={}, query=[], body=body, content_type="application/json"
        )
        assert json_format.MessageToDict(request, preserving_proto_field_name=True) == {
            "from_address": "a@b.c",
            "reply_to": ["r@b.c"],
            "send_at": "2026-11-24T00:00:00Z",
        }


# A field given twice, as a repeated JSON key or under both of its names, is refused naming
# it: the parser kept the last value and dropped the first without a word (a recipient lost,
# another sender used).
@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"from": "a@b.c", "to": ["x@b.c"], "to": ["y@b.c"]}', "to"),
        (b'{"from": "a@b.c", "from_address": "b@b.c"}', "from_address"),
        (b'{"sendAt": "2026-11-24T00:00:00Z", "send_at": "2026-11-25T00:00:00Z"}', "send_at"),
        (
            b'{"attachments": [{"filename": "a"}, {"contentType": "a/b", "content_type": "c/d"}]}',
            "attachments[1].content_type",
        ),
        (b'{"variables": {"name": "A", "name": "B"}}', "name"),
    ],
)
def test_field_given_twice_is_refused(
    router: Router, transcoder: Transcoder, body: bytes, field: str
) -> None:
    with pytest.raises(GatewayError) as raised:
        transcoder.build_request(
            _binding(router, "POST", "/api/v1/emails"),
            variables={},
            query=[],
            body=body,
            content_type="application/json",
        )
    assert raised.value.reason == "INVALID_JSON_BODY"
    assert raised.value.http_status == 400
    assert raised.value.violations[0][0] == field
    assert "twice" in raised.value.violations[0][1]


# Responses: camelCase JSON with every field without presence printed; HttpBody sent raw.
def test_render_response(
    descriptors: DescriptorSet, router: Router, transcoder: Transcoder
) -> None:
    get_domain = _binding(router, "GET", "/api/v1/domains/d1")
    domain_type = descriptors.message_class(get_domain.method.output_type)
    body, content_type = transcoder.render_response(get_domain, domain_type(id="d1"))
    assert content_type == "application/json"
    printed = json.loads(body)
    assert printed["id"] == "d1"
    assert printed["statusReason"] == ""
    assert printed["status"] == "DOMAIN_STATUS_UNSPECIFIED"
    assert printed["requiredRecords"] == []
    assert "createTime" not in printed  # a message field has presence: unset stays absent
    zone = _binding(router, "GET", "/api/v1/domains/d1/zone")
    http_body = descriptors.message_class(zone.method.output_type)(
        content_type="text/dns; charset=utf-8", data=b"$ORIGIN x.\n"
    )
    assert transcoder.render_response(zone, http_body) == (
        b"$ORIGIN x.\n",
        "text/dns; charset=utf-8",
    )
    empty = _binding(router, "DELETE", "/api/v1/domains/d1")
    assert transcoder.render_response(
        empty, descriptors.message_class(empty.method.output_type)()
    ) == (b"{}", "application/json")


# Status JSON: details are typed Any entries; an unknown detail type is kept, base64.
def test_status_printer(descriptors: DescriptorSet) -> None:
    status = status_pb2.Status(
        code=code_pb2.RESOURCE_EXHAUSTED,
        message="slow down",
        details=[
            pack_any(error_details_pb2.ErrorInfo(reason="RATE", domain="mail.azora.dev")),
            pack_any(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field="to", description="x")
                    ]
                )
            ),
        ],
    )
    status.details.add(type_url="type.googleapis.com/unknown.Type", value=b"\x01")
    printed = StatusPrinter(descriptors.pool).to_json(status)
    assert printed["code"] == 8
    assert printed["details"][0] == {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": "RATE",
        "domain": "mail.azora.dev",
        "metadata": {},
    }
    assert printed["details"][1]["fieldViolations"][0]["field"] == "to"
    assert printed["details"][2] == {"@type": "type.googleapis.com/unknown.Type", "value": "AQ=="}


# Retry-After is RetryInfo's delay rounded up to whole seconds; no RetryInfo, no header.
def test_retry_after() -> None:
    delay = duration_pb2.Duration(seconds=2, nanos=200_000_000)
    status = status_pb2.Status(
        code=code_pb2.UNAVAILABLE,
        details=[pack_any(error_details_pb2.RetryInfo(retry_delay=delay))],
    )
    assert retry_after_seconds(status) == 3
    assert retry_after_seconds(status_pb2.Status(code=code_pb2.UNAVAILABLE)) is None


# The HTTP mapping is google/rpc/code.proto's, code by code.
def test_http_mapping_is_code_proto() -> None:
    assert dict(HTTP_STATUS_BY_CODE) == {
        0: 200, 1: 499, 2: 500, 3: 400, 4: 504, 5: 404, 6: 409, 7: 403,
        8: 429, 9: 400, 10: 409, 11: 400, 12: 501, 13: 500, 14: 503, 15: 500, 16: 401,
    }  # fmt: skip


# Every service of the descriptor set has an upstream; gateway settings come from the env.
def test_configuration(descriptors: DescriptorSet) -> None:
    settings = Settings.from_env({"AZORA_SMTP_GRPC_PORT": "6000"}, service_name="gateway")
    targets = upstream_targets(settings)
    assert {b.service for b in descriptors.bindings} <= set(targets)
    assert targets["azora.smtp.v1.SmtpService"] == "127.0.0.1:6000"
    assert GatewayConfig().max_body_bytes == DEFAULT_MAX_BODY_BYTES == 64 * 1024 * 1024
    config = GatewayConfig.from_env(
        {"AZORA_GATEWAY_MAX_BODY_BYTES": "2048", "AZORA_GATEWAY_DEADLINE": "2.5"}
    )
    assert (config.max_body_bytes, config.deadline_seconds) == (2048, 2.5)
    with pytest.raises(ValueError, match="AZORA_GATEWAY_DEADLINE"):
        GatewayConfig.from_env({"AZORA_GATEWAY_DEADLINE": "soon"})
