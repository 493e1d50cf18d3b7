"""The SMTP and mail paths of DESIGN.md's table over HTTP: a success and an error each.

The routing of every path is checked in test_rest_paths.py; here the answers themselves.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp

from tests.conftest import unique_domain
from tests.gateway.rest import assert_status_json, call
from tests.support.dns_server import KnotServer
from tests.support.ports import closed_port


def relay_settings() -> dict[str, Any]:
    """A relay on a loopback port nothing listens on (picked now, never a fixed number)."""
    return {
        "host": "127.0.0.1",
        "port": closed_port(),
        "secure": False,
        "username": "u",
        "password": "pw",
    }


async def active_domain(
    http: aiohttp.ClientSession, base: str, auth: dict[str, str], knot: KnotServer
) -> dict[str, Any]:
    name = unique_domain()
    created = await call(http, "POST", f"{base}/api/v1/domains", json={"name": name}, headers=auth)
    knot.set_zone(name, [("@", "TXT", f'"azora-verify={created.json["verificationToken"]}"')])
    verified = await call(
        http, "POST", f"{base}/api/v1/domains/{created.json['id']}/verify", headers=auth
    )
    assert verified.json["verified"] is True
    return dict(verified.json["domain"])


async def test_smtp_paths_answer_over_http(
    http: aiohttp.ClientSession, rest_base_url: str, auth: dict[str, str], knot_server: KnotServer
) -> None:
    # Config, connection test, DKIM, SPF, DMARC and DNS check: 200 with their JSON, and a bad
    # field in each family is 400 naming it.
    domain = await active_domain(http, rest_base_url, auth, knot_server)
    smtp = f"{rest_base_url}/api/v1/smtp/domains/{domain['id']}"
    relay = relay_settings()
    stored = await call(http, "PUT", f"{smtp}/config", json=relay, headers=auth)
    assert stored.status == 200, stored.json
    fetched = await call(http, "GET", f"{smtp}/config", headers=auth)
    assert fetched.status == 200
    assert fetched.json["passwordSet"] is True
    assert "pw" not in str(fetched.json)
    bad_port = await call(http, "PUT", f"{smtp}/config", json={**relay, "port": 0}, headers=auth)
    assert_status_json(bad_port, http_status=400, code=3)
    assert "port" in bad_port.violations

    test = await call(
        http,
        "POST",
        f"{rest_base_url}/api/v1/smtp/test",
        json={"domainId": domain["id"]},
        headers=auth,
    )
    assert test.status == 200, test.json
    assert test.json["ok"] is False  # nothing listens on the relay port
    assert test.json["failedStep"] == "connect"
    assert "pw" not in str(test.json)

    dkim = await call(http, "POST", f"{smtp}/dkim", json={"selector": "s1"}, headers=auth)
    assert dkim.status == 200, dkim.json
    assert dkim.json["recordName"] == f"s1._domainkey.{domain['name']}"
    assert dkim.json["recordValue"].startswith("v=DKIM1; k=rsa; p=")
    assert "PRIVATE" not in str(dkim.json)
    listed = await call(http, "GET", f"{smtp}/dkim", headers=auth)
    assert [k["selector"] for k in listed.json["keys"]] == ["s1"]
    bad_bits = await call(http, "POST", f"{smtp}/dkim", json={"keyBits": 123}, headers=auth)
    assert_status_json(bad_bits, http_status=400, code=3)
    assert list(bad_bits.violations) == ["keyBits"]

    spf = await call(http, "POST", f"{smtp}/spf", json={}, headers=auth)
    assert spf.status == 200, spf.json
    assert spf.json["recordValue"].startswith("v=spf1 ")
    dmarc = await call(
        http, "POST", f"{smtp}/dmarc", json={"policy": "DMARC_POLICY_QUARANTINE"}, headers=auth
    )
    assert dmarc.status == 200, dmarc.json
    assert dmarc.json["recordName"] == f"_dmarc.{domain['name']}"
    assert "p=quarantine" in dmarc.json["recordValue"]
    no_policy = await call(http, "POST", f"{smtp}/dmarc", json={}, headers=auth)
    assert_status_json(no_policy, http_status=400, code=3)

    checked = await call(http, "GET", f"{smtp}/dns-check", headers=auth)
    assert checked.status == 200, checked.json
    purposes = {c["purpose"]: c["status"] for c in checked.json["checks"]}
    assert purposes["verification"] == "RECORD_CHECK_STATUS_OK"
    assert purposes["dkim"] == "RECORD_CHECK_STATUS_MISSING"

    missing = await call(
        http, "GET", f"{rest_base_url}/api/v1/smtp/domains/{'0' * 24}/config", headers=auth
    )
    assert_status_json(missing, http_status=404, code=5)


async def test_mail_paths_answer_over_http(
    http: aiohttp.ClientSession, rest_base_url: str, auth: dict[str, str], knot_server: KnotServer
) -> None:
    # Send (scheduled, so no worker races the test), get, list, stats, resend refused for an
    # email that has not failed, delete (cancels), and validation errors naming the field.
    domain = await active_domain(http, rest_base_url, auth, knot_server)
    relay = f"{rest_base_url}/api/v1/domains/{domain['id']}/smtp"
    assert (await call(http, "PUT", relay, json=relay_settings(), headers=auth)).status == 200
    later = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    email = {
        "from": f"Team <noreply@{domain['name']}>",
        "to": ["user@example.com"],
        "subject": "Hello",
        "text": "Hi",
        "sendAt": later,
        "tags": ["welcome"],
    }
    emails = f"{rest_base_url}/api/v1/emails"
    sent = await call(http, "POST", emails, json=email, headers=auth)
    assert sent.status == 200, sent.json
    assert sent.json["status"] == "EMAIL_STATUS_SCHEDULED"
    email_id = sent.json["id"]

    got = await call(http, "GET", f"{emails}/{email_id}", headers=auth)
    assert got.status == 200
    assert got.json["recipients"][0]["address"] == "user@example.com"
    assert got.json["events"][0]["type"] == "EVENT_TYPE_ACCEPTED"
    listed = await call(http, "GET", f"{emails}?tag=welcome", headers=auth)
    assert [e["id"] for e in listed.json["emails"]] == [email_id]
    stats = await call(http, "GET", f"{emails}/stats", headers=auth)
    assert stats.status == 200
    assert {"counts", "queueDepth"} <= set(stats.json)

    resend = await call(http, "POST", f"{emails}/{email_id}/resend", json={}, headers=auth)
    assert_status_json(resend, http_status=400, code=9)
    deleted = await call(http, "DELETE", f"{emails}/{email_id}", headers=auth)
    assert deleted.status == 200
    assert deleted.json == {}
    cancelled = await call(http, "GET", f"{emails}/{email_id}", headers=auth)
    assert cancelled.json["status"] == "EMAIL_STATUS_CANCELLED"

    # A suppressed recipient: named in the answer, not delivered; the others go on.
    gone = f"gone-{secrets.token_hex(4)}@example.com"
    added = await call(
        http,
        "POST",
        f"{rest_base_url}/api/v1/suppressions",
        json={"addresses": [gone]},
        headers=auth,
    )
    assert added.status == 200, added.json
    mixed = await call(
        http, "POST", emails, json={**email, "to": [gone, "user@example.com"]}, headers=auth
    )
    assert mixed.status == 200, mixed.json
    assert mixed.json["suppressedRecipients"] == [gone]
    assert [r["status"] for r in mixed.json["recipients"]] == [
        "RECIPIENT_STATUS_SUPPRESSED",
        "RECIPIENT_STATUS_PENDING",
    ]

    bad = await call(http, "POST", emails, json={**email, "to": ["not an address"]}, headers=auth)
    assert_status_json(bad, http_status=400, code=3)
    assert "to[0]" in bad.violations
    injected = await call(
        http, "POST", emails, json={**email, "subject": "Hi\r\nBcc: x@evil.example"}, headers=auth
    )
    assert_status_json(injected, http_status=400, code=3)
    assert "subject" in injected.violations
    unknown = await call(http, "GET", f"{emails}/{'0' * 24}", headers=auth)
    assert_status_json(unknown, http_status=404, code=5)
