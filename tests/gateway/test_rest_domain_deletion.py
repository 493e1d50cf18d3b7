"""Deleting a domain cancels its unfinished emails, as DeleteDomain's documentation promises.

The mail service owns emails, so the domain service asks it (internal rpc
CancelDomainEmails) after the deletion; every cancelled email records why on its timeline.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import aiohttp

from tests.gateway.rest import call
from tests.gateway.test_rest_smtp_mail import active_domain, relay_settings
from tests.support.dns_server import KnotServer


async def schedule(
    http: aiohttp.ClientSession, base: str, auth: dict[str, str], domain: dict[str, str]
) -> str:
    """A scheduled email from `domain` (tomorrow, so no worker touches it); its id."""
    relay = f"{base}/api/v1/domains/{domain['id']}/smtp"
    assert (await call(http, "PUT", relay, json=relay_settings(), headers=auth)).status == 200
    later = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    email = {
        "from": f"noreply@{domain['name']}",
        "to": ["user@example.com"],
        "subject": "Tomorrow",
        "text": "Hi",
        "sendAt": later,
    }
    sent = await call(http, "POST", f"{base}/api/v1/emails", json=email, headers=auth)
    assert sent.json["status"] == "EMAIL_STATUS_SCHEDULED", sent.json
    return str(sent.json["id"])


async def test_deleting_a_domain_cancels_its_scheduled_emails(
    http: aiohttp.ClientSession, rest_base_url: str, auth: dict[str, str], knot_server: KnotServer
) -> None:
    doomed = await active_domain(http, rest_base_url, auth, knot_server)
    kept = await active_domain(http, rest_base_url, auth, knot_server)
    doomed_emails = [await schedule(http, rest_base_url, auth, doomed) for _ in range(2)]
    kept_email = await schedule(http, rest_base_url, auth, kept)

    deleted = await call(
        http, "DELETE", f"{rest_base_url}/api/v1/domains/{doomed['id']}", headers=auth
    )
    assert deleted.status == 200, deleted.json

    for email_id in doomed_emails:
        got = await call(http, "GET", f"{rest_base_url}/api/v1/emails/{email_id}", headers=auth)
        assert got.json["status"] == "EMAIL_STATUS_CANCELLED", got.json
        last = got.json["events"][-1]
        assert last["type"] == "EVENT_TYPE_CANCELLED"
        assert f"domain {doomed['id']} was deleted" in last["detail"]
        assert {r["status"] for r in got.json["recipients"]} == {"RECIPIENT_STATUS_CANCELLED"}
    other = await call(http, "GET", f"{rest_base_url}/api/v1/emails/{kept_email}", headers=auth)
    assert other.json["status"] == "EMAIL_STATUS_SCHEDULED"
