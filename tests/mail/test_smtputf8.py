"""Internationalised addresses (RFC 6531/6532), e.g. josé@exämple.com, end to end.

Accepted by SendEmail; delivered in an SMTPUTF8 transaction when the relay offers SMTPUTF8;
failed at once with the reason recorded when it does not (never sent 8-bit anyway, never
retried for nothing). The relays are the suite's aiosmtpd ones (tests/support/smtp_relay.py),
with and without SMTPUTF8.
"""

from __future__ import annotations

import email
from email import policy
from typing import Any

import idna
from azora.mail.v1 import mail_pb2

from tests.conftest import Tenant
from tests.mail.conftest import LocalMail
from tests.support.smtp_relay import StartRelay

E = mail_pb2


async def send(mail: LocalMail, tenant: Tenant, name: str, **fields: Any) -> str:
    sent = await mail.send(
        tenant,
        **{
            "from_address": f"Équipe <équipe@{name}>",
            "to": ['"José Müller" <josé@exämple.com>', "plain@example.org"],
            "subject": "Grüße",
            "text": "¡Hola!",
            **fields,
        },
    )
    return sent.id


async def test_delivered_with_smtputf8_when_the_relay_offers_it(
    local_mail: LocalMail, tenant: Tenant, start_smtp_relay: StartRelay
) -> None:
    relay = await start_smtp_relay(smtputf8=True)
    _, name = local_mail.add_domain(tenant, port=relay.port, name="bücher-utf8.example")
    a_label = idna.encode(name, uts46=True).decode()
    email_id = await send(local_mail, tenant, name)
    stored = await local_mail.get(tenant, email_id)
    assert [r.address for r in stored.recipients] == [
        "josé@xn--exmple-cua.com",
        "plain@example.org",
    ]
    assert await local_mail.worker().run_once() == 1
    got = await local_mail.get(tenant, email_id)
    assert got.status == E.EMAIL_STATUS_SENT, [e.detail for e in got.events]
    # One transaction per recipient (each with its return path on the bounce domain), both
    # SMTPUTF8: the headers are UTF-8.
    assert [e.rcpt_tos for e in relay.envelopes] == [
        ["josé@xn--exmple-cua.com"],
        ["plain@example.org"],
    ]
    assert all(e.smtp_utf8 for e in relay.envelopes)
    assert all(e.mail_from.endswith(f"@bounces.{a_label}") for e in relay.envelopes)
    envelope = relay.envelopes[0]
    # Headers as UTF-8 (RFC 6532), addresses as they travel in the envelope.
    headers = envelope.content.split(b"\r\n\r\n", 1)[0].decode()
    assert 'To: "José Müller" <josé@xn--exmple-cua.com>, plain@example.org' in headers
    assert f'From: "Équipe" <équipe@{a_label}>' in headers
    message = email.message_from_bytes(envelope.content, policy=policy.SMTPUTF8)
    assert message["Subject"] == "Grüße"


async def test_failed_with_the_reason_when_the_relay_lacks_smtputf8(
    local_mail: LocalMail, tenant: Tenant, start_smtp_relay: StartRelay
) -> None:
    relay = await start_smtp_relay()
    _, name = local_mail.add_domain(tenant, port=relay.port)
    email_id = await send(local_mail, tenant, name, from_address=f"team@{name}")
    assert await local_mail.worker().run_once() == 1
    got = await local_mail.get(tenant, email_id)
    assert got.status == E.EMAIL_STATUS_FAILED, got
    assert not got.HasField("next_attempt_time")
    assert relay.envelopes == []
    assert {r.status for r in got.recipients} == {E.RECIPIENT_STATUS_FAILED}
    failed = [e for e in got.events if e.type == E.EVENT_TYPE_FAILED]
    assert len(failed) == 2
    for event in failed:
        assert "does not offer SMTPUTF8" in event.detail
        assert event.reply.enhanced_code == "5.6.7"
    # Nothing is left to retry.
    assert await local_mail.worker().run_once() == 0


async def test_ascii_mail_still_goes_through_a_relay_without_smtputf8(
    local_mail: LocalMail, tenant: Tenant, start_smtp_relay: StartRelay
) -> None:
    # A Unicode display name or domain needs no SMTPUTF8 (RFC 2047 words, A-labels).
    relay = await start_smtp_relay()
    _, name = local_mail.add_domain(tenant, port=relay.port)
    email_id = await send(
        local_mail,
        tenant,
        name,
        from_address=f"Équipe <team@{name}>",
        to=["José <jose@exämple.com>"],
    )
    assert await local_mail.worker().run_once() == 1
    assert (await local_mail.get(tenant, email_id)).status == E.EMAIL_STATUS_SENT
    (envelope,) = relay.envelopes
    assert not envelope.smtp_utf8
    assert envelope.content.split(b"\r\n\r\n", 1)[0].isascii()
