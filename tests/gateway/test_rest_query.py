"""Query parameters over HTTP: JSON and proto names, enums, pagination, repeated, nested, times.

The list rpcs of the domain service show the values really arrive. For the mail and SMTP rpcs
the test shows the gateway accepts the parameters and the service answers (a 501 while an rpc
is a contract), while a bad parameter is refused by the gateway itself (400, domain
gateway.azora.dev). The message the gateway builds from them is checked in test_routing.py.
"""

from __future__ import annotations

import logging

import aiohttp
import pytest

from tests.conftest import unique_domain
from tests.gateway.rest import assert_answered_by, assert_status_json, call


async def _domains(
    http: aiohttp.ClientSession, base: str, auth: dict[str, str], query: str
) -> dict[str, object]:
    reply = await call(http, "GET", f"{base}/api/v1/domains?{query}", headers=auth)
    assert reply.status == 200, reply.json
    return dict(reply.json)


# pageSize / page_size, pageToken and status (by name or number) filter and page the list.
async def test_list_domains_query(
    http: aiohttp.ClientSession, rest_base_url: str, auth: dict[str, str]
) -> None:
    ids = []
    for _ in range(2):
        reply = await call(
            http,
            "POST",
            f"{rest_base_url}/api/v1/domains",
            json={"name": unique_domain()},
            headers=auth,
        )
        ids.append(reply.json["id"])
    for size_name in ("pageSize", "page_size"):
        first = await _domains(http, rest_base_url, auth, f"{size_name}=1")
        assert [d["id"] for d in first["domains"]] == ids[:1]  # type: ignore[attr-defined]
        token = first["nextPageToken"]
        assert token
        second = await _domains(http, rest_base_url, auth, f"{size_name}=1&pageToken={token}")
        assert [d["id"] for d in second["domains"]] == ids[1:]  # type: ignore[attr-defined]
        assert second["nextPageToken"] == ""
    for status in ("DOMAIN_STATUS_PENDING", "1"):
        pending = await _domains(http, rest_base_url, auth, f"pageSize=1&status={status}")
        assert pending["totalSize"] == 2
    active = await _domains(http, rest_base_url, auth, "status=DOMAIN_STATUS_ACTIVE")
    assert active == {"domains": [], "nextPageToken": "", "totalSize": 0}
    # Enum names are case-sensitive, as in Envoy (case_insensitive_enum_parsing: false).
    lower = await call(
        http, "GET", f"{rest_base_url}/api/v1/domains?status=domain_status_pending", headers=auth
    )
    assert_status_json(lower, http_status=400, code=3)


# ListEmails takes its filters (times with a raw "+" offset, enums, strings) and reaches the rpc.
async def test_list_emails_query_reaches_the_rpc(
    http: aiohttp.ClientSession,
    rest_base_url: str,
    auth: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="azora.gateway.access")
    accepted = [
        "tag=welcome&startTime=2026-11-01T00:00:00Z&endTime=2026-11-23T12:00:00+02:00",
        "status=EMAIL_STATUS_SENT&domainId=d1&recipient=user%40example.com&page_size=10",
        "start_time=2026-11-01T00:00:00.5Z&pageToken=abc",
    ]
    for query in accepted:
        caplog.clear()
        reply = await call(http, "GET", f"{rest_base_url}/api/v1/emails?{query}", headers=auth)
        assert_answered_by(reply, "azora.mail.v1.MailService/ListEmails", caplog)
    refused = {
        "colour=red": "UNKNOWN_QUERY_PARAMETER",
        "startTime=yesterday": "INVALID_QUERY_PARAMETER",
        "status=SENT": "INVALID_QUERY_PARAMETER",
        # tag is a single string in ListEmailsRequest: giving it twice is an error.
        "tag=a&tag=b": "INVALID_QUERY_PARAMETER",
    }
    for query, reason in refused.items():
        reply = await call(http, "GET", f"{rest_base_url}/api/v1/emails?{query}", headers=auth)
        assert_status_json(reply, http_status=400, code=3)
        assert reply.error_info["domain"] == "gateway.azora.dev"
        assert reply.error_info["reason"] == reason, (query, reply.json)


# Repeated (tags=a&tags=b) and nested (config.port) parameters bind on POST bindings too.
async def test_repeated_and_nested_parameters_reach_the_rpc(
    http: aiohttp.ClientSession,
    rest_base_url: str,
    auth: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="azora.gateway.access")
    send = await call(
        http,
        "POST",
        f"{rest_base_url}/api/v1/emails?tags=a&tags=b&idempotencyKey=k1",
        json={"from": "noreply@example.com", "to": ["user@example.com"]},
        headers=auth,
    )
    assert_answered_by(send, "azora.mail.v1.MailService/SendEmail", caplog)
    caplog.clear()
    test = await call(
        http,
        "POST",
        f"{rest_base_url}/api/v1/smtp/test?config.host=smtp.example.com&config.port=587"
        "&config.secure=false&config.timeout=2.5s",
        json={},
        headers=auth,
    )
    assert_answered_by(test, "azora.smtp.v1.SmtpService/TestSmtpConnection", caplog)
    for query in ("config.port=port", "config.secure=yes", "config.nothing=1", "config=x"):
        reply = await call(
            http, "POST", f"{rest_base_url}/api/v1/smtp/test?{query}", json={}, headers=auth
        )
        assert_status_json(reply, http_status=400, code=3)
        assert reply.error_info["domain"] == "gateway.azora.dev"
