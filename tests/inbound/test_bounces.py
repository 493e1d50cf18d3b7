"""Bounces and complaints after the fact: reports to the return paths of sent mail, end to end.

Real programs on loopback: the mail service (FerretDB) delivers through an aiosmtpd relay,
which accepts; the relay's transaction shows the message's VERP return path; a real-world
report (tests/mail/reports/, Postfix, Exim, Microsoft, Gmail, a delayed-delivery warning, an
ARF complaint) is then delivered with smtplib to the inbound server's port, addressed to that
return path, exactly as the remote system would send it. What must follow: the recipient's
state, the email's status and timeline, the suppression list, and the report kept (listed by
GET /api/v1/inbound) with what was done with it. Forged return paths and unparsable reports
change nothing and are kept with the reason.
"""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from azora.mail.v1 import (
    inbound_pb2,
    mail_pb2,
    suppressions_pb2,
    suppressions_pb2_grpc,
    webhooks_pb2,
    webhooks_pb2_grpc,
)
from standardwebhooks import Webhook as Verifier

from services.mail.return_paths import ReturnPaths
from tests.conftest import Tenant
from tests.inbound.conftest import Inbound
from tests.mail.conftest import Script, ScriptedRelay, scripted_relay  # noqa: F401 - fixture
from tests.mail.test_webhook_end_to_end import deliver_feedback
from tests.support.smtp_relay import StartRelay
from tests.support.webhook_receiver import Receiver

SAMPLES = Path(__file__).parent.parent / "mail" / "reports"
E = mail_pb2


def sample(name: str) -> bytes:
    """A sample report with the CRLF line ends it has on the wire."""
    return (SAMPLES / name).read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def report_from_mta(port: int, return_path: str, raw: bytes) -> tuple[int, bytes]:
    """Send `raw` to `return_path` as a reporting MTA does (null sender); the final reply."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("mx.reporter.example")
        client.mail("")
        code, text = client.rcpt(return_path)
        if code != 250:
            return code, text
        return client.data(raw)


async def deliver_report(inbound: Inbound, return_path: str, raw: bytes) -> tuple[int, bytes]:
    """`report_from_mta` off the event loop (the inbound server runs in this one)."""
    return await asyncio.to_thread(report_from_mta, inbound.port, return_path, raw)


async def sent_to(inbound: Inbound, relay: Any, name: str, to: list[str]) -> mail_pb2.Email:
    """An email from `name` to `to`, delivered: the relay accepted every recipient."""
    mail = inbound.mail
    email = await mail.send(
        inbound.tenant, from_address=f"shop@{name}", to=to, subject="Order", text="Thanks"
    )
    assert await mail.worker().run_once() == 1
    got = await mail.get(inbound.tenant, email.id)
    assert got.status == E.EMAIL_STATUS_SENT
    return got


def return_path_of(relay: Any, recipient: str) -> str:
    """The envelope sender the relay saw for `recipient`."""
    [path] = [e.mail_from for e in relay.envelopes if e.rcpt_tos == [recipient]]
    return str(path)


async def suppression(inbound: Inbound, address: str) -> suppressions_pb2.Suppression | None:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{inbound.mail.app.running.port}")
    try:
        stub = suppressions_pb2_grpc.SuppressionServiceStub(channel)
        return await stub.GetSuppression(
            suppressions_pb2.GetSuppressionRequest(address=address),
            metadata=inbound.tenant.metadata,
        )
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise
        return None
    finally:
        await channel.close()


async def kept(inbound: Inbound, tenant: Tenant) -> list[inbound_pb2.InboundMessage]:
    """What GET /api/v1/inbound lists for `tenant`."""
    page = await inbound.inbound.ListInboundMessages(
        inbound_pb2.ListInboundMessagesRequest(page_size=50), metadata=tenant.metadata
    )
    return list(page.messages)


def timeline(email: mail_pb2.Email) -> list[tuple[str, str]]:
    return [
        (E.EventType.Name(e.type).removeprefix("EVENT_TYPE_").lower(), e.recipient)
        for e in email.events
        if e.type not in (E.EVENT_TYPE_CLAIMED, E.EVENT_TYPE_ACCEPTED)
    ]


@pytest.mark.parametrize(
    ("name", "address", "status", "reply"),
    [
        ("postfix_bounce.eml", "nosuchuser@example.org", "5.1.1", 550),
        ("exim_bounce.eml", "gone@example.com", "5.1.1", 0),
        ("microsoft_ndr.eml", "john@contoso.com", "5.1.10", 550),
        ("gmail_bounce.eml", "missing.person@gmail.com", "5.1.1", 550),
    ],
)
async def test_a_dsn_after_the_relays_250_bounces_the_recipient_and_suppresses_it(
    inbound: Inbound, start_smtp_relay: StartRelay, name: str, address: str, status: str, reply: int
) -> None:
    # The relay said 250; hours later the recipient's system bounces it: BOUNCED after all.
    relay = await start_smtp_relay()
    _, domain = inbound.mail.add_domain(inbound.tenant, port=relay.port)
    email = await sent_to(inbound, relay, domain, [address])
    return_path = return_path_of(relay, address)
    assert return_path.endswith(f"@bounces.{domain}")

    code, _ = await deliver_report(inbound, return_path, sample(name))
    assert code == 250

    got = await inbound.mail.get(inbound.tenant, email.id)
    assert got.status == E.EMAIL_STATUS_BOUNCED
    [recipient] = got.recipients
    assert recipient.status == E.RECIPIENT_STATUS_BOUNCED
    assert (recipient.last_reply.code, recipient.last_reply.enhanced_code) == (reply, status)
    assert timeline(got) == [("sent", address), ("bounced", address)]
    bounced = got.events[-1]
    assert bounced.detail.startswith("reported after delivery by ")
    # 5.1.1 and 5.1.10 say the mailbox does not exist: the address is suppressed, naming the
    # bounced event.
    entry = await suppression(inbound, address)
    assert entry is not None
    assert entry.reason == "hard_bounce"
    assert entry.event_id.startswith("evt_")
    # The report is kept for the tenant, with what was done with it.
    [record] = await kept(inbound, inbound.tenant)
    assert (record.action, record.recipient, record.route_id) == ("bounce", return_path, "")
    assert record.outcome == f"applied: bounced {address} ({status})"


async def test_the_same_dsn_twice_leaves_one_change_and_one_event(
    inbound: Inbound, start_smtp_relay: StartRelay
) -> None:
    # A reporting MTA that lost our 250 sends the report again: nothing changes twice.
    relay = await start_smtp_relay()
    _, domain = inbound.mail.add_domain(inbound.tenant, port=relay.port)
    email = await sent_to(inbound, relay, domain, ["nosuchuser@example.org"])
    return_path = return_path_of(relay, "nosuchuser@example.org")
    raw = sample("postfix_bounce.eml")
    assert (await deliver_report(inbound, return_path, raw))[0] == 250
    first = await inbound.mail.get(inbound.tenant, email.id)
    assert (await deliver_report(inbound, return_path, raw))[0] == 250
    again = await inbound.mail.get(inbound.tenant, email.id)
    assert (
        timeline(again)
        == timeline(first)
        == [
            ("sent", "nosuchuser@example.org"),
            ("bounced", "nosuchuser@example.org"),
        ]
    )
    assert again.update_time == first.update_time
    # The same message to the same return path is one record.
    assert len(await kept(inbound, inbound.tenant)) == 1


async def test_a_second_recipients_bounce_makes_the_email_partially_sent(
    inbound: Inbound, start_smtp_relay: StartRelay
) -> None:
    # One transaction per recipient, each with its own return path: the bounce names its own.
    relay = await start_smtp_relay()
    _, domain = inbound.mail.add_domain(inbound.tenant, port=relay.port)
    to = ["reader@example.net", "nosuchuser@example.org"]
    email = await sent_to(inbound, relay, domain, to)
    paths = {r: return_path_of(relay, r) for r in to}
    assert len(set(paths.values())) == 2
    code, _ = await deliver_report(
        inbound, paths["nosuchuser@example.org"], sample("postfix_bounce.eml")
    )
    assert code == 250
    got = await inbound.mail.get(inbound.tenant, email.id)
    assert got.status == E.EMAIL_STATUS_PARTIALLY_SENT
    assert {(r.address, r.status) for r in got.recipients} == {
        ("reader@example.net", E.RECIPIENT_STATUS_SENT),
        ("nosuchuser@example.org", E.RECIPIENT_STATUS_BOUNCED),
    }


async def test_a_delay_warning_is_a_deferred_event_without_changing_the_status(
    inbound: Inbound, start_smtp_relay: StartRelay
) -> None:
    # "Still trying" after the relay's 250: a deferred event; the email stays SENT.
    relay = await start_smtp_relay()
    _, domain = inbound.mail.add_domain(inbound.tenant, port=relay.port)
    email = await sent_to(inbound, relay, domain, ["slow@example.com"])
    return_path = return_path_of(relay, "slow@example.com")
    raw = sample("postfix_delayed.eml")
    assert (await deliver_report(inbound, return_path, raw))[0] == 250
    assert (await deliver_report(inbound, return_path, raw))[0] == 250
    got = await inbound.mail.get(inbound.tenant, email.id)
    assert got.status == E.EMAIL_STATUS_SENT
    assert got.recipients[0].status == E.RECIPIENT_STATUS_SENT
    assert timeline(got) == [("sent", "slow@example.com"), ("deferred", "slow@example.com")]
    assert got.events[-1].reply.enhanced_code == "4.4.1"
    assert await suppression(inbound, "slow@example.com") is None
    [record] = await kept(inbound, inbound.tenant)
    assert record.outcome == "applied: deferred slow@example.com (4.4.1)"


async def test_an_arf_complaint_is_a_complained_event_and_a_suppression(
    inbound: Inbound, start_smtp_relay: StartRelay
) -> None:
    # The recipient pressed "report spam": complained, and never mailed again.
    relay = await start_smtp_relay()
    _, domain = inbound.mail.add_domain(inbound.tenant, port=relay.port)
    email = await sent_to(inbound, relay, domain, ["reader@mailbox.example"])
    return_path = return_path_of(relay, "reader@mailbox.example")
    assert (await deliver_report(inbound, return_path, sample("arf_abuse.eml")))[0] == 250
    got = await inbound.mail.get(inbound.tenant, email.id)
    assert got.status == E.EMAIL_STATUS_SENT
    assert timeline(got) == [
        ("sent", "reader@mailbox.example"),
        ("complained", "reader@mailbox.example"),
    ]
    assert "arf abuse report from mx.mailbox.example" in got.events[-1].detail
    entry = await suppression(inbound, "reader@mailbox.example")
    assert entry is not None
    assert entry.reason == "complaint"
    again = await inbound.mail.send(
        inbound.tenant, from_address=f"shop@{domain}", to=["reader@mailbox.example"], text="x"
    )
    assert again.status == E.EMAIL_STATUS_SUPPRESSED


async def test_a_forged_or_altered_return_path_changes_nothing(
    inbound: Inbound, start_smtp_relay: StartRelay
) -> None:
    # Only the suite can make a valid token: a changed one is kept as ignored, applied to nothing.
    relay = await start_smtp_relay()
    _, domain = inbound.mail.add_domain(inbound.tenant, port=relay.port)
    email = await sent_to(inbound, relay, domain, ["nosuchuser@example.org"])
    genuine = return_path_of(relay, "nosuchuser@example.org")
    local, _, at = genuine.partition("@")
    altered = f"{local[:-1]}{'a' if local[-1] != 'a' else 'b'}@{at}"
    assert ReturnPaths.from_settings(inbound.mail.settings).parse(altered) is None
    # A token made with another key for the same email and recipient.
    other = ReturnPaths((b"k" * 32,), "bounces.{domain}")
    forged = other.envelope_sender(
        email_id=email.id, sender_domain=domain, recipient="nosuchuser@example.org"
    )
    for address in (altered, forged):
        code, _ = await deliver_report(inbound, address, sample("postfix_bounce.eml"))
        assert code == 250
    got = await inbound.mail.get(inbound.tenant, email.id)
    assert got.status == E.EMAIL_STATUS_SENT
    assert timeline(got) == [("sent", "nosuchuser@example.org")]
    assert await suppression(inbound, "nosuchuser@example.org") is None
    # Kept under no tenant: the email's tenant does not see them.
    assert await kept(inbound, inbound.tenant) == []
    # Not of our shape, or not on a bounce domain: refused at RCPT like any stranger.
    for address in (f"bounce-short@bounces.{domain}", f"{local}@elsewhere.{domain}"):
        code, _ = await deliver_report(inbound, address, sample("postfix_bounce.eml"))
        assert code == 550


async def test_an_unparsable_report_is_kept_with_the_reason(
    inbound: Inbound, start_smtp_relay: StartRelay
) -> None:
    # An out-of-office reply to the return path is no report: listed with why, nothing applied.
    relay = await start_smtp_relay()
    _, domain = inbound.mail.add_domain(inbound.tenant, port=relay.port)
    email = await sent_to(inbound, relay, domain, ["away@example.org"])
    return_path = return_path_of(relay, "away@example.org")
    assert (await deliver_report(inbound, return_path, sample("out_of_office.eml")))[0] == 250
    got = await inbound.mail.get(inbound.tenant, email.id)
    assert got.status == E.EMAIL_STATUS_SENT
    [record] = await kept(inbound, inbound.tenant)
    assert record.outcome == "unparsable: no failed or delayed recipient found"
    raw = await inbound.inbound.GetInboundMessageRaw(
        inbound_pb2.GetInboundMessageRawRequest(id=record.id), metadata=inbound.tenant.metadata
    )
    assert raw.data.endswith(sample("out_of_office.eml"))


async def test_a_report_about_an_email_still_being_delivered_is_retried_later(
    inbound: Inbound,
    scripted_relay: Any,  # noqa: F811
) -> None:
    # Another recipient still deferred: a worker may write the email, so the report waits (451)
    # and the reporting MTA's retry applies it once the email is finished.
    relay: ScriptedRelay = await scripted_relay(
        Script(rcpt={"busy@example.net": "450 4.2.0 mailbox busy"})
    )
    mail = inbound.mail
    _, domain = mail.add_domain(inbound.tenant, port=relay.port)
    email = await mail.send(
        inbound.tenant,
        from_address=f"shop@{domain}",
        to=["nosuchuser@example.org", "busy@example.net"],
        text="x",
    )
    assert await mail.worker().run_once() == 1
    [return_path] = [r.mail_from for r in relay.received if r.rcpt_to == ["nosuchuser@example.org"]]
    raw = sample("postfix_bounce.eml")
    code, _ = await deliver_report(inbound, return_path, raw)
    assert code == 451
    assert await kept(inbound, inbound.tenant) == []
    relay.script = Script()
    mail.clock.advance(timedelta(seconds=120))
    assert await mail.worker().run_once() == 1
    assert (await deliver_report(inbound, return_path, raw))[0] == 250
    got = await mail.get(inbound.tenant, email.id)
    assert got.status == E.EMAIL_STATUS_PARTIALLY_SENT
    assert timeline(got)[-1] == ("bounced", "nosuchuser@example.org")


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """An HTTP receiver on loopback that answers 200 to everything."""
    running = await Receiver().start()
    yield running
    await running.close()


async def test_full_loop_send_relay_accepts_dsn_bounced_webhook_then_suppressed(
    inbound: Inbound, start_smtp_relay: StartRelay, receiver: Receiver
) -> None:
    # The whole story: 250 from the relay, a DSN at the inbound port, BOUNCED, a signed
    # `bounced` webhook, and the next email to the address never reaches the relay.
    mail = inbound.mail
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{mail.app.running.port}")
    mail.app.running.channels.append(channel)
    endpoint = await webhooks_pb2_grpc.WebhookServiceStub(channel).CreateWebhook(
        webhooks_pb2.CreateWebhookRequest(url=receiver.url, description="all events"),
        metadata=inbound.tenant.metadata,
    )
    relay = await start_smtp_relay()
    _, domain = mail.add_domain(inbound.tenant, port=relay.port)
    email = await sent_to(inbound, relay, domain, ["nosuchuser@example.org"])
    return_path = return_path_of(relay, "nosuchuser@example.org")

    code, _ = await deliver_report(inbound, return_path, sample("postfix_bounce.eml"))
    assert code == 250
    got = await mail.get(inbound.tenant, email.id)
    assert got.status == E.EMAIL_STATUS_BOUNCED
    assert got.recipients[0].status == E.RECIPIENT_STATUS_BOUNCED

    await deliver_feedback(mail)
    payloads = [Verifier(endpoint.secret).verify(r.body, r.headers) for r in receiver.requests]
    story = sorted(
        (p["type"], p.get("recipient", "")) for p in payloads if p["emailId"] == email.id
    )
    assert story == [
        ("accepted", ""),
        ("bounced", "nosuchuser@example.org"),
        ("sent", "nosuchuser@example.org"),
    ]
    [bounced] = [p for p in payloads if p["type"] == "bounced"]
    assert bounced["smtp"]["code"] == 550
    assert bounced["smtp"]["enhancedCode"] == "5.1.1"
    assert bounced["smtp"]["message"].startswith("5.1.1 <nosuchuser@example.org>: Recipient")
    entry = await suppression(inbound, "nosuchuser@example.org")
    assert entry is not None
    assert entry.event_id == bounced["id"]

    before = len(relay.envelopes)
    again = await mail.send(
        inbound.tenant, from_address=f"shop@{domain}", to=["nosuchuser@example.org"], text="x"
    )
    assert again.status == E.EMAIL_STATUS_SUPPRESSED
    assert await mail.worker().run_once() == 0
    assert len(relay.envelopes) == before
