"""Error answers of the local gateway: google.rpc.Status JSON, code.proto's HTTP mapping, no 500.

Errors the services raise travel as grpc-status-details-bin and come out as Status JSON with
their details; errors the gateway finds itself (route, query, body) carry an ErrorInfo in the
domain gateway.azora.dev and a BadRequest field violation naming what is wrong.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.app import create_app
from gateway.config import GatewayConfig
from tests.conftest import unique_domain
from tests.gateway.conftest import RestStack
from tests.gateway.rest import BAD_REQUEST, access_line, assert_status_json, call


def domains(base: str) -> str:
    return f"{base}/api/v1/domains"


async def serve(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    address: Any = runner.addresses[0]
    try:
        yield f"http://127.0.0.1:{address[1]}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def small_limit_url(rest_stack: RestStack) -> AsyncIterator[str]:
    """A second gateway, same upstreams, that accepts bodies of at most 1 KiB."""
    app = await create_app(rest_stack.settings, config=GatewayConfig(max_body_bytes=1024))
    async for url in serve(app):
        yield url


@pytest.fixture
async def unreachable_url(rest_stack: RestStack) -> AsyncIterator[str]:
    """A gateway whose domain service is a closed port."""
    config = GatewayConfig(
        upstreams={"azora.domain.v1.DomainService": "127.0.0.1:1"}, deadline_seconds=5.0
    )
    app = await create_app(rest_stack.settings, config=config)
    async for url in serve(app):
        yield url


# An invalid domain name is 400 with the service's BadRequest detail, typed for JSON readers.
async def test_invalid_argument_carries_bad_request(
    http: aiohttp.ClientSession, rest_base_url: str, auth: dict[str, str]
) -> None:
    reply = await call(
        http, "POST", domains(rest_base_url), json={"name": "not a domain!"}, headers=auth
    )
    assert_status_json(reply, http_status=400, code=3)
    types = [d["@type"] for d in reply.json["details"]]
    assert types == ["type.googleapis.com/google.rpc.ErrorInfo", BAD_REQUEST]
    assert reply.error_info["domain"] == "domain.azora.dev"
    assert list(reply.violations) == ["name"]


# NOT_FOUND 404, ALREADY_EXISTS 409, UNAUTHENTICATED 401, PERMISSION_DENIED 403.
async def test_service_errors_map_to_http(
    http: aiohttp.ClientSession, rest_base_url: str, auth: dict[str, str]
) -> None:
    missing = await call(
        http, "GET", f"{domains(rest_base_url)}/0123456789abcdef01234567", headers=auth
    )
    assert_status_json(missing, http_status=404, code=5)
    name = unique_domain()
    first = await call(http, "POST", domains(rest_base_url), json={"name": name}, headers=auth)
    assert first.status == 200
    duplicate = await call(http, "POST", domains(rest_base_url), json={"name": name}, headers=auth)
    assert_status_json(duplicate, http_status=409, code=6)
    assert duplicate.error_info["reason"]
    bad_token = await call(
        http, "GET", domains(rest_base_url), headers={"Authorization": "Bearer x.y.z"}
    )
    assert_status_json(bad_token, http_status=401, code=16)


# An unknown query parameter is refused (Envoy: ignore_unknown_query_parameters false).
async def test_unknown_query_parameter_is_400(
    http: aiohttp.ClientSession, rest_base_url: str, auth: dict[str, str]
) -> None:
    reply = await call(http, "GET", f"{domains(rest_base_url)}?pageSize=1&colour=red", headers=auth)
    assert_status_json(reply, http_status=400, code=3)
    assert reply.error_info == {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": "UNKNOWN_QUERY_PARAMETER",
        "domain": "gateway.azora.dev",
        "metadata": {},
    }
    assert list(reply.violations) == ["colour"]
    assert "colour" in reply.json["message"]


# Request bodies the gateway cannot turn into the request message: 400 naming the problem.
@pytest.mark.parametrize(
    ("body", "reason", "field", "words"),
    [
        (b'{"name": ', "MALFORMED_JSON", "body", "malformed JSON"),
        (b'{"name": "a.example"} trailing', "MALFORMED_JSON", "body", "malformed JSON"),
        (b'{"name": 5}', "INVALID_JSON_BODY", "name", "name"),
        (b'{"name": {"nested": true}}', "INVALID_JSON_BODY", "name", "name"),
        (b'["a.example"]', "INVALID_JSON_BODY", "body", "JSON object"),
        (b'"a.example"', "INVALID_JSON_BODY", "body", "JSON object"),
        (b'{"name": "\xff\xfe"}', "INVALID_UTF8", "body", "UTF-8"),
        (b"[" * 100_000, "MALFORMED_JSON", "body", "JSON"),
    ],
    ids=[
        "truncated",
        "trailing-garbage",
        "number-for-string",
        "object-for-string",
        "array-body",
        "string-body",
        "invalid-utf8",
        "too-deep",
    ],
)
async def test_bad_bodies_are_400(
    http: aiohttp.ClientSession,
    rest_base_url: str,
    auth: dict[str, str],
    body: bytes,
    reason: str,
    field: str,
    words: str,
) -> None:
    headers = {**auth, "Content-Type": "application/json"}
    reply = await call(http, "POST", domains(rest_base_url), data=body, headers=headers)
    assert_status_json(reply, http_status=400, code=3)
    assert reply.error_info["reason"] == reason
    assert reply.error_info["domain"] == "gateway.azora.dev"
    assert field in reply.violations
    assert words in reply.json["message"]


# Wrong JSON types deeper in a body and in query values are 400 as well.
async def test_wrong_types_are_400(
    http: aiohttp.ClientSession, rest_base_url: str, auth: dict[str, str]
) -> None:
    created = await call(
        http, "POST", domains(rest_base_url), json={"name": unique_domain()}, headers=auth
    )
    dns_url = f"{domains(rest_base_url)}/{created.json['id']}/dns"
    for body in ({"records": "x"}, {"records": [{"ttl": "soon"}]}):
        reply = await call(http, "PUT", dns_url, json=body, headers=auth)
        assert_status_json(reply, http_status=400, code=3)
        assert reply.error_info["reason"] == "INVALID_JSON_BODY"
    # A record type that is no type is refused naming the field, never dropped.
    reply = await call(http, "PUT", dns_url, json={"records": [{"type": "MX!"}]}, headers=auth)
    assert_status_json(reply, http_status=400, code=3)
    assert "records[0].type" in reply.violations
    for query in ("pageSize=abc", "pageSize=1.5", "pageSize=99999999999", "status=PENDING"):
        reply = await call(http, "GET", f"{domains(rest_base_url)}?{query}", headers=auth)
        assert_status_json(reply, http_status=400, code=3)
        assert reply.error_info["reason"] == "INVALID_QUERY_PARAMETER"


# A body over the limit is 413 (what Envoy's local reply answers), declared or streamed.
async def test_oversized_body_is_413(
    http: aiohttp.ClientSession, small_limit_url: str, auth: dict[str, str]
) -> None:
    big = b'{"name": "' + b"a" * 2048 + b'"}'
    declared = await call(http, "POST", domains(small_limit_url), data=big, headers=auth)
    assert_status_json(declared, http_status=413, code=3)
    assert declared.error_info["reason"] == "REQUEST_BODY_TOO_LARGE"
    assert declared.error_info["metadata"] == {"limit_bytes": "1024"}

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 256):
            yield big[start : start + 256]

    streamed = await call(http, "POST", domains(small_limit_url), data=chunks(), headers=auth)
    assert_status_json(streamed, http_status=413, code=3)
    # Within the limit the same gateway transcodes normally.
    small = await call(
        http, "POST", domains(small_limit_url), json={"name": unique_domain()}, headers=auth
    )
    assert small.status == 200


# Unknown paths and paths of other methods are 404 with a Status JSON (Envoy: no 405).
async def test_unknown_routes_are_404(http: aiohttp.ClientSession, rest_base_url: str) -> None:
    unknown = await call(http, "GET", f"{rest_base_url}/api/v1/nothing")
    assert_status_json(unknown, http_status=404, code=5)
    assert unknown.error_info["reason"] == "ROUTE_NOT_FOUND"
    assert unknown.json["message"] == "Could not resolve /api/v1/nothing to a method."
    wrong_method = await call(http, "PATCH", f"{rest_base_url}/api/v1/emails/e1")
    assert_status_json(wrong_method, http_status=404, code=5)
    assert wrong_method.error_info["metadata"]["allowed_methods"] == "DELETE,GET"
    for path in ("/", "/api/v1/domains/", "/api/v1/domains//dns", "/API/V1/DOMAINS"):
        reply = await call(http, "GET", f"{rest_base_url}{path}")
        assert_status_json(reply, http_status=404, code=5)


# A path variable that is not UTF-8 once decoded is 400, not a crash.
async def test_undecodable_path_is_400(http: aiohttp.ClientSession, rest_base_url: str) -> None:
    reply = await call(http, "GET", f"{rest_base_url}/api/v1/domains/%FF%FE")
    assert_status_json(reply, http_status=400, code=3)
    assert reply.error_info["reason"] == "INVALID_PATH_ENCODING"


# A service that cannot be reached is 503 with Retry-After, without internal addresses.
async def test_unreachable_service_is_503(
    http: aiohttp.ClientSession, unreachable_url: str
) -> None:
    reply = await call(http, "GET", domains(unreachable_url))
    assert_status_json(reply, http_status=503, code=14)
    assert reply.headers["retry-after"] == "1"
    assert reply.error_info["reason"] == "UPSTREAM_UNAVAILABLE"
    assert "127.0.0.1" not in reply.json["message"]


# The request id is kept when valid, generated otherwise, and returned on every answer.
async def test_request_id_round_trip(
    http: aiohttp.ClientSession, rest_base_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="azora.gateway.access")
    kept = await call(
        http, "GET", f"{rest_base_url}/health/ping", headers={"x-request-id": "req-42.a"}
    )
    assert kept.headers["x-request-id"] == "req-42.a"
    assert access_line(caplog)["request_id"] == "req-42.a"
    caplog.clear()
    replaced = await call(
        http, "GET", f"{rest_base_url}/health/ping", headers={"x-request-id": "bad id;"}
    )
    assert replaced.headers["x-request-id"] != "bad id;"
    assert len(replaced.headers["x-request-id"]) == 16
    caplog.clear()
    error = await call(http, "GET", f"{rest_base_url}/nowhere")
    assert len(error.headers["x-request-id"]) == 16


# Credentials never reach the log, whatever the outcome.
async def test_credentials_are_not_logged(
    http: aiohttp.ClientSession, rest_base_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "azk_never_log_this_0123456789"
    await call(http, "GET", domains(rest_base_url), headers={"x-api-key": secret})
    await call(http, "GET", domains(rest_base_url), headers={"Authorization": f"Bearer {secret}"})
    logged = caplog.text + "".join(str(getattr(r, "fields", "")) for r in caplog.records)
    assert secret not in logged
    assert len([r for r in caplog.records if r.name == "azora.gateway.access"]) == 2


# An unknown JSON body field is refused naming it (at any depth), and nothing is created:
# a misspelt field must not be silently dropped (Envoy cannot do this; gateway/README.md).
async def test_unknown_body_fields_are_refused_naming_them(
    http: aiohttp.ClientSession, rest_base_url: str, auth: dict[str, str]
) -> None:
    name = unique_domain()
    reply = await call(
        http, "POST", domains(rest_base_url), json={"name": name, "colour": "red"}, headers=auth
    )
    assert_status_json(reply, http_status=400, code=3)
    assert reply.error_info["reason"] == "UNKNOWN_FIELD"
    assert list(reply.violations) == ["colour"]
    listed = await call(http, "GET", domains(rest_base_url), headers=auth)
    assert name not in [d["name"] for d in listed.json["domains"]]
    created = await call(http, "POST", domains(rest_base_url), json={"name": name}, headers=auth)
    dns_url = f"{domains(rest_base_url)}/{created.json['id']}/dns"
    txt = "DNS_RECORD_TYPE_TXT"
    nested = {"records": [{"type": txt, "value": "x"}, {"type": txt, "value": "y", "tll": 60}]}
    reply = await call(http, "PUT", dns_url, json=nested, headers=auth)
    assert_status_json(reply, http_status=400, code=3)
    assert list(reply.violations) == ["records[1].tll"]
