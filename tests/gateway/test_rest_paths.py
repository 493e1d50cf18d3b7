"""Every REST path of DESIGN.md's table, called over real HTTP through the local gateway.

Domains, API keys and health are checked answer by answer. For the SMTP and mail paths these
tests prove the routing: the access log names the rpc the gateway called (e.g.
/api/v1/emails/stats reaches GetEmailStats, not GetEmail) and the answer comes from that
service's implementation, never a 5xx. Their answers are checked in test_rest_smtp_mail.py
and the services' own tests.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import aiohttp
import pytest

from services.core.settings import Settings
from tests.conftest import Tenant, new_tenant, unique_domain
from tests.gateway.conftest import bearer
from tests.gateway.rest import (
    RESOURCE_INFO,
    access_line,
    assert_answered_by,
    assert_status_json,
    call,
)

# Well-formed (24 lowercase hex characters) but never issued.
UNKNOWN_ID = "0123456789abcdef01234567"
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


async def create_domain(
    http: aiohttp.ClientSession, base: str, auth: dict[str, str], name: str
) -> dict[str, Any]:
    reply = await call(http, "POST", f"{base}/api/v1/domains", json={"name": name}, headers=auth)
    assert reply.status == 200, reply.json
    return dict(reply.json)


# Register, read, list, replace DNS records, export the zone, verify, delete: status and JSON.
async def test_domain_paths(
    http: aiohttp.ClientSession, rest_base_url: str, auth: dict[str, str]
) -> None:
    base = rest_base_url
    name = unique_domain()
    domain = await create_domain(http, base, auth, name)
    assert domain["name"] == name
    assert domain["status"] == "DOMAIN_STATUS_PENDING"
    assert RFC3339.match(domain["createTime"])
    # Fields without presence are printed even when empty (Envoy's always_print_primitive_fields).
    assert domain["statusReason"] == ""
    assert domain["dnsRecords"] == []
    ownership = domain["requiredRecords"][0]
    assert ownership == {
        "purpose": "verification",
        "type": "DNS_RECORD_TYPE_TXT",
        "name": name,
        "value": f"azora-verify={domain['verificationToken']}",
        "required": True,
        "description": ownership["description"],
    }
    domain_url = f"{base}/api/v1/domains/{domain['id']}"

    got = await call(http, "GET", domain_url, headers=auth)
    assert got.status == 200
    assert got.content_type == "application/json"
    assert got.json == domain

    listed = await call(http, "GET", f"{base}/api/v1/domains", headers=auth)
    assert listed.status == 200
    assert [d["id"] for d in listed.json["domains"]] == [domain["id"]]
    assert listed.json["totalSize"] == 1
    assert listed.json["nextPageToken"] == ""

    records = {"records": [{"type": "DNS_RECORD_TYPE_A", "name": "www", "value": "192.0.2.1"}]}
    updated = await call(http, "PUT", f"{domain_url}/dns", json=records, headers=auth)
    assert updated.status == 200, updated.json
    (record,) = updated.json["dnsRecords"]
    assert record["type"] == "A"  # today's enum name is still accepted, RFC's spelling returned
    assert record["name"] == f"www.{name}"
    assert record["value"] == "192.0.2.1"

    # google.api.HttpBody answers are sent raw with their own content type.
    zone = await call(http, "GET", f"{domain_url}/zone", headers=auth)
    assert zone.status == 200
    assert zone.content_type.startswith("text/dns")
    assert b"192.0.2.1" in zone.body

    verified = await call(http, "POST", f"{domain_url}/verify", json={}, headers=auth)
    assert verified.status == 200, verified.json
    assert verified.json["verified"] is False
    assert verified.json["domain"]["status"] == "DOMAIN_STATUS_PENDING"
    assert verified.json["check"]["outcome"] != "VERIFICATION_OUTCOME_MATCHED"

    deleted = await call(http, "DELETE", domain_url, headers=auth)
    assert deleted.status == 200
    assert deleted.json == {}
    gone = await call(http, "GET", domain_url, headers=auth)
    assert_status_json(gone, http_status=404, code=5)
    assert gone.detail(RESOURCE_INFO)["resourceName"] == domain["id"]


# Domain errors through the same paths: 400, 404, 409 with their Status JSON.
async def test_domain_path_errors(
    http: aiohttp.ClientSession, rest_base_url: str, auth: dict[str, str]
) -> None:
    base = rest_base_url
    bad = await call(http, "POST", f"{base}/api/v1/domains", json={"name": "no"}, headers=auth)
    assert_status_json(bad, http_status=400, code=3)
    assert "name" in bad.violations
    malformed = await call(http, "GET", f"{base}/api/v1/domains/nope", headers=auth)
    assert_status_json(malformed, http_status=400, code=3)
    assert "id" in malformed.violations
    missing = await call(http, "GET", f"{base}/api/v1/domains/{UNKNOWN_ID}", headers=auth)
    assert_status_json(missing, http_status=404, code=5)
    for path in ("/dns", "/verify"):
        method = "PUT" if path == "/dns" else "POST"
        reply = await call(
            http, method, f"{base}/api/v1/domains/{UNKNOWN_ID}{path}", json={}, headers=auth
        )
        assert_status_json(reply, http_status=404, code=5)
    deleted = await call(http, "DELETE", f"{base}/api/v1/domains/{UNKNOWN_ID}", headers=auth)
    assert_status_json(deleted, http_status=404, code=5)
    name = unique_domain()
    await create_domain(http, base, auth, name)
    again = await call(http, "POST", f"{base}/api/v1/domains", json={"name": name}, headers=auth)
    assert_status_json(again, http_status=409, code=6)


# API keys: create (secret shown once), list, use through both headers, revoke -> 401.
async def test_api_key_paths(
    http: aiohttp.ClientSession, rest_base_url: str, auth: dict[str, str]
) -> None:
    base = rest_base_url
    created = await call(
        http,
        "POST",
        f"{base}/api/v1/api-keys",
        json={"name": "ci", "scopes": ["domains:read"]},
        headers=auth,
    )
    assert created.status == 200, created.json
    secret = created.json["secret"]
    key = created.json["apiKey"]
    assert secret.startswith("azk_")
    assert key["scopes"] == ["domains:read"]
    assert key["name"] == "ci"

    listed = await call(http, "GET", f"{base}/api/v1/api-keys", headers=auth)
    assert listed.status == 200
    assert [k["id"] for k in listed.json["apiKeys"]] == [key["id"]]
    assert "secret" not in listed.json["apiKeys"][0]

    for headers in ({"x-api-key": secret}, {"Authorization": f"Bearer {secret}"}):
        domains = await call(http, "GET", f"{base}/api/v1/domains", headers=headers)
        assert domains.status == 200, domains.json
        assert domains.json["domains"] == []
    # The key was scoped to reading.
    refused = await call(
        http,
        "POST",
        f"{base}/api/v1/domains",
        json={"name": unique_domain()},
        headers={"x-api-key": secret},
    )
    assert_status_json(refused, http_status=403, code=7)

    revoked = await call(
        http, "POST", f"{base}/api/v1/api-keys/{key['id']}/revoke", json={}, headers=auth
    )
    assert revoked.status == 200
    assert RFC3339.match(revoked.json["revokeTime"])
    after = await call(http, "GET", f"{base}/api/v1/domains", headers={"x-api-key": secret})
    assert_status_json(after, http_status=401, code=16)


# /health, /health/ready and /health/ping answer JSON; every required component is up. /health
# also lists the mail service's queue and relays (optional: other tests of the session may have
# left a relay that never answered, which makes the suite "degraded", never 503).
async def test_health_paths(http: aiohttp.ClientSession, rest_base_url: str) -> None:
    required = {
        "mongodb": "COMPONENT_STATUS_UP",
        "domain-service": "COMPONENT_STATUS_UP",
        "smtp-service": "COMPONENT_STATUS_UP",
        "mail-service": "COMPONENT_STATUS_UP",
    }
    for path, optional in (("/health", {"queue", "smtp-relays"}), ("/health/ready", set())):
        reply = await call(http, "GET", f"{rest_base_url}{path}")
        assert reply.status == 200, reply.json
        assert reply.content_type == "application/json"
        components = {c["name"]: c for c in reply.json["components"]}
        assert set(components) == set(required) | optional
        assert {n: components[n]["status"] for n in required} == required
        assert not any(components[n].get("required") for n in optional)
        down = any(c["status"] != "COMPONENT_STATUS_UP" for c in components.values())
        assert reply.json["status"] == ("degraded" if down else "healthy")
    ping = await call(http, "GET", f"{rest_base_url}/health/ping")
    assert ping.status == 200
    assert ping.json["message"] == "pong"
    assert RFC3339.match(ping.json["time"])


# (method, path, body, rpc) of every SMTP and mail path of the table (+ the additional binding);
# {domain} is a registered domain of the test's tenant, e1 an email id.
CONTRACT_PATHS = [
    (
        "POST",
        "/api/v1/smtp/test",
        {"domainId": "{domain}"},
        "azora.smtp.v1.SmtpService/TestSmtpConnection",
    ),
    (
        "GET",
        "/api/v1/smtp/domains/{domain}/config",
        None,
        "azora.smtp.v1.SmtpService/GetSmtpConfig",
    ),
    (
        "PUT",
        "/api/v1/smtp/domains/{domain}/config",
        {"host": "smtp.example.com", "port": 587},
        "azora.smtp.v1.SmtpService/UpdateSmtpConfig",
    ),
    (
        "PUT",
        "/api/v1/domains/{domain}/smtp",
        {"host": "smtp.example.com", "port": 587},
        "azora.smtp.v1.SmtpService/UpdateSmtpConfig",
    ),
    ("POST", "/api/v1/smtp/domains/{domain}/dkim", {}, "azora.smtp.v1.SmtpService/GenerateDkimKey"),
    (
        "POST",
        "/api/v1/smtp/domains/{domain}/spf",
        {},
        "azora.smtp.v1.SmtpService/GenerateSpfRecord",
    ),
    (
        "POST",
        "/api/v1/smtp/domains/{domain}/dmarc",
        {"policy": "DMARC_POLICY_REJECT"},
        "azora.smtp.v1.SmtpService/GenerateDmarcRecord",
    ),
    (
        "POST",
        "/api/v1/emails",
        {"from": "noreply@example.com", "to": ["user@example.com"], "subject": "Hi"},
        "azora.mail.v1.MailService/SendEmail",
    ),
    ("GET", "/api/v1/emails", None, "azora.mail.v1.MailService/ListEmails"),
    ("GET", "/api/v1/emails/stats", None, "azora.mail.v1.MailService/GetEmailStats"),
    ("GET", "/api/v1/emails/e1", None, "azora.mail.v1.MailService/GetEmail"),
    ("POST", "/api/v1/emails/e1/resend", {}, "azora.mail.v1.MailService/ResendEmail"),
    ("DELETE", "/api/v1/emails/e1", None, "azora.mail.v1.MailService/DeleteEmail"),
]


# Each SMTP/mail path reaches its rpc (access log) and is answered by that service's
# implementation (success or its own error, never a 5xx).
@pytest.mark.parametrize(("method", "path", "body", "rpc"), CONTRACT_PATHS)
async def test_smtp_and_mail_paths_reach_their_rpc(
    http: aiohttp.ClientSession,
    rest_base_url: str,
    auth: dict[str, str],
    caplog: pytest.LogCaptureFixture,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    rpc: str,
) -> None:
    domain = await create_domain(http, rest_base_url, auth, unique_domain())
    path = path.replace("{domain}", domain["id"])
    if body and body.get("domainId") == "{domain}":
        body = {**body, "domainId": domain["id"]}
    caplog.set_level(logging.INFO, logger="azora.gateway.access")
    reply = await call(http, method, f"{rest_base_url}{path}", json=body, headers=auth)
    assert_answered_by(reply, rpc, caplog)
    fields = access_line(caplog)
    assert fields["status"] == reply.status
    assert fields["method"] == method
    # The log names the route template, never the raw path with its ids.
    assert domain["id"] not in fields["route"]
    assert "/e1" not in fields["route"]
    assert fields["request_id"] == reply.headers["x-request-id"]


# An expired, foreign or garbage token is 401; a token without the scope is 403.
async def test_credentials_are_checked_behind_the_gateway(
    http: aiohttp.ClientSession, rest_base_url: str, settings: Settings
) -> None:
    url = f"{rest_base_url}/api/v1/domains"
    garbage = await call(http, "GET", url, headers={"Authorization": "Bearer not-a-jwt"})
    assert_status_json(garbage, http_status=401, code=16)
    reader: Tenant = new_tenant(settings, frozenset({"domains:read"}))
    listed = await call(http, "GET", url, headers=bearer(reader))
    assert listed.status == 200
    refused = await call(http, "POST", url, json={"name": unique_domain()}, headers=bearer(reader))
    assert_status_json(refused, http_status=403, code=7)
