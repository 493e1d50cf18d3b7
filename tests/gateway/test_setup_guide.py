"""The product spec's Domain Setup Guide, its five curl steps, over real HTTP, as a newcomer.

1. ``POST /api/v1/domains {"name": "yourdomain.com"}`` registers the domain and returns the TXT
   record to publish;
2. the record is published at the domain's DNS host (here: the test's Knot DNS server);
3. ``POST /api/v1/domains/{id}/verify`` proves ownership;
4. ``PUT /api/v1/domains/{id}/smtp`` configures the relay;
5. ``POST /api/v1/emails`` sends the first email.
"""

from __future__ import annotations

import aiohttp

from tests.conftest import unique_domain
from tests.gateway.rest import call
from tests.support.dns_server import KnotServer


# The guide works as written: every step answers JSON, none is a missing route.
async def test_domain_setup_guide(
    http: aiohttp.ClientSession,
    rest_base_url: str,
    auth: dict[str, str],
    knot_server: KnotServer,
) -> None:
    name = unique_domain("com")

    # Step 1: register.
    created = await call(
        http, "POST", f"{rest_base_url}/api/v1/domains", json={"name": name}, headers=auth
    )
    assert created.status == 200, created.json
    domain = created.json
    assert domain["name"] == name
    assert domain["status"] == "DOMAIN_STATUS_PENDING"
    (txt,) = [r for r in domain["requiredRecords"] if r["purpose"] == "verification"]
    assert txt["type"] == "DNS_RECORD_TYPE_TXT"
    assert txt["name"] == name
    assert txt["value"] == f"azora-verify={domain['verificationToken']}"

    # Step 2: publish the TXT record exactly as returned.
    knot_server.set_zone(name, [("@", "TXT", f'"{txt["value"]}"')])

    # Step 3: verify.
    verified = await call(
        http, "POST", f"{rest_base_url}/api/v1/domains/{domain['id']}/verify", headers=auth
    )
    assert verified.status == 200, verified.json
    assert verified.json["verified"] is True
    assert verified.json["domain"]["status"] == "DOMAIN_STATUS_ACTIVE"
    assert verified.json["check"]["outcome"] == "VERIFICATION_OUTCOME_MATCHED"
    assert verified.json["check"]["found"] == [txt["value"]]

    # Step 4: configure SMTP: the stored configuration comes back, never the password.
    smtp = await call(
        http,
        "PUT",
        f"{rest_base_url}/api/v1/domains/{domain['id']}/smtp",
        json={
            "host": "smtp.example.com",
            "port": 587,
            "secure": False,
            "username": "u",
            "password": "p",
        },
        headers=auth,
    )
    assert smtp.status == 200, smtp.json
    assert smtp.json["host"] == "smtp.example.com"
    assert smtp.json["passwordSet"] is True
    assert "password" not in smtp.json
    # Step 5: send: accepted and queued at once; delivery is asynchronous.
    sent = await call(
        http,
        "POST",
        f"{rest_base_url}/api/v1/emails",
        json={
            "from": f"noreply@{name}",
            "to": ["user@example.com"],
            "subject": "Hello",
            "text": "Hi",
            "html": "<p>Hi</p>",
        },
        headers=auth,
    )
    assert sent.status == 200, sent.json
    assert sent.json["from"] == f"noreply@{name}"
    assert sent.json["to"] == ["user@example.com"]
    assert sent.json["status"] in ("EMAIL_STATUS_QUEUED", "EMAIL_STATUS_SENDING")
    assert sent.json["messageId"].endswith(f"@{name}")
