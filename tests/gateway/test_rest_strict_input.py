"""What a newcomer typed by mistake is refused over REST, naming it, never acted on.

A misspelt field (`scheduledAt` for `sendAt`) would otherwise send the email now; a JSON body
sent as a form (curl -d) would otherwise be read as if it were JSON. Field names in errors are
the REST spelling, lowerCamelCase, whether the gateway or the service found the problem.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import aiohttp

from tests.conftest import unique_domain
from tests.gateway.rest import assert_status_json, call
from tests.gateway.test_rest_smtp_mail import active_domain, relay_settings
from tests.support.dns_server import KnotServer


async def test_a_misspelt_send_at_is_refused_and_nothing_is_sent(
    http: aiohttp.ClientSession, rest_base_url: str, auth: dict[str, str], knot_server: KnotServer
) -> None:
    domain = await active_domain(http, rest_base_url, auth, knot_server)
    relay = f"{rest_base_url}/api/v1/domains/{domain['id']}/smtp"
    assert (await call(http, "PUT", relay, json=relay_settings(), headers=auth)).status == 200
    later = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    email = {
        "from": f"noreply@{domain['name']}",
        "to": ["user@example.com"],
        "subject": "Later",
        "text": "Hi",
        "scheduledAt": later,
    }
    emails = f"{rest_base_url}/api/v1/emails"
    reply = await call(http, "POST", emails, json=email, headers=auth)
    assert_status_json(reply, http_status=400, code=3)
    assert reply.error_info["reason"] == "UNKNOWN_FIELD"
    assert list(reply.violations) == ["scheduledAt"]
    assert "scheduledAt" in reply.json["message"]
    listed = await call(http, "GET", emails, headers=auth)
    assert [e for e in listed.json["emails"] if e["subject"] == "Later"] == []


async def test_a_json_body_with_a_form_content_type_is_415(
    http: aiohttp.ClientSession, rest_base_url: str, auth: dict[str, str]
) -> None:
    # What `curl -d '{"name": ...}'` sends without -H 'Content-Type: application/json'.
    domains = f"{rest_base_url}/api/v1/domains"
    body = b'{"name": "form.example"}'
    for content_type in ("application/x-www-form-urlencoded", "text/plain"):
        headers = {**auth, "Content-Type": content_type}
        reply = await call(http, "POST", domains, data=body, headers=headers)
        assert_status_json(reply, http_status=415, code=3)
        assert reply.error_info["reason"] == "UNSUPPORTED_MEDIA_TYPE"
        assert "application/json" in reply.json["message"]
    # An empty body may come with any type (aiohttp sends application/octet-stream).
    created = await call(http, "POST", domains, json={"name": unique_domain()}, headers=auth)
    verify = f"{domains}/{created.json['id']}/verify"
    empty = await call(
        http, "POST", verify, headers={**auth, "Content-Type": "application/octet-stream"}
    )
    assert empty.status == 200, empty.json
    for content_type in ("application/json; charset=utf-8", "application/merge-patch+json"):
        headers = {**auth, "Content-Type": content_type}
        named = json.dumps({"name": unique_domain()}).encode()
        reply = await call(http, "POST", domains, data=named, headers=headers)
        assert reply.status == 200, reply.json


async def test_field_names_in_errors_are_lower_camel_case(
    http: aiohttp.ClientSession, rest_base_url: str, auth: dict[str, str], knot_server: KnotServer
) -> None:
    # Found by the services (which name fields by proto path internally): sendAt, keyBits,
    # aggregateReportUris[0], attachments[0].contentType, as the client writes them over REST.
    domain = await active_domain(http, rest_base_url, auth, knot_server)
    smtp = f"{rest_base_url}/api/v1/smtp/domains/{domain['id']}"
    stored = await call(http, "PUT", f"{smtp}/config", json=relay_settings(), headers=auth)
    assert stored.status == 200, stored.json
    too_late = (datetime.now(UTC) + timedelta(days=400)).strftime("%Y-%m-%dT%H:%M:%SZ")
    email = {
        "from": f"noreply@{domain['name']}",
        "to": ["user@example.com"],
        "subject": "Hi",
        "text": "Hi",
        "sendAt": too_late,
        "attachments": [{"filename": "a.txt", "content": "eA==", "contentType": "nonsense"}],
    }
    sent = await call(http, "POST", f"{rest_base_url}/api/v1/emails", json=email, headers=auth)
    assert_status_json(sent, http_status=400, code=3)
    assert set(sent.violations) == {"sendAt", "attachments[0].contentType"}, sent.violations
    assert "send_at" not in sent.json["message"]
    bits = await call(http, "POST", f"{smtp}/dkim", json={"keyBits": 123}, headers=auth)
    assert_status_json(bits, http_status=400, code=3)
    assert list(bits.violations) == ["keyBits"]
    dmarc = {"policy": "DMARC_POLICY_REJECT", "aggregateReportUris": ["dmarc@example.com"]}
    uris = await call(http, "POST", f"{smtp}/dmarc", json=dmarc, headers=auth)
    assert_status_json(uris, http_status=400, code=3)
    assert list(uris.violations) == ["aggregateReportUris[0]"]
