"""Events and suppressions wired into the send path and the state changes, end to end.

The mail service in-process (`local_mail`, real FerretDB), a real SMTP relay on loopback
(`ScriptedRelay`: it answers 550 5.1.1 for an address on demand, which aiosmtpd cannot), a
delivery worker on the same database, the event publisher as the service runs it, and the
events and suppression APIs over gRPC. Each test checks what an application sees: the email
(GetEmail), its events (ListEvents) and the suppression list agree.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta

import grpc
from azora.mail.v1 import (
    events_pb2,
    events_pb2_grpc,
    mail_pb2,
    suppressions_pb2,
    suppressions_pb2_grpc,
)

from services.mail.feedback.event_log import HINTS, EventPublisher
from services.mail.repository import EMAILS
from tests.conftest import Tenant
from tests.mail.conftest import LocalMail, Script, ScriptedRelay

Start = Callable[[Script], "asyncio.Future[ScriptedRelay]"]
E = mail_pb2


def stubs(
    mail: LocalMail,
) -> tuple[
    events_pb2_grpc.EventServiceAsyncStub, suppressions_pb2_grpc.SuppressionServiceAsyncStub
]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{mail.app.running.port}")
    mail.app.running.channels.append(channel)
    return events_pb2_grpc.EventServiceStub(channel), suppressions_pb2_grpc.SuppressionServiceStub(
        channel
    )


async def events_of(mail: LocalMail, tenant: Tenant, email_id: str) -> list[events_pb2.Event]:
    """The email's events as the events API lists them after a publisher run, oldest first."""
    await EventPublisher(mail.app.running.database.db, clock=mail.clock).run(rounds=100)
    stub, _ = stubs(mail)
    answer = await stub.ListEvents(
        events_pb2.ListEventsRequest(email_id=email_id, page_size=100), metadata=tenant.metadata
    )
    return list(reversed(answer.events))


def story(events: list[events_pb2.Event]) -> list[tuple[str, str]]:
    return [(e.type, e.recipient) for e in events]


def timeline(email: mail_pb2.Email) -> list[tuple[str, str]]:
    """The email's timeline as (type, recipient), without the workers' claims."""
    return [
        (E.EventType.Name(e.type).removeprefix("EVENT_TYPE_").lower(), e.recipient)
        for e in email.events
        if e.type != E.EVENT_TYPE_CLAIMED
    ]


async def send(mail: LocalMail, tenant: Tenant, name: str, to: list[str]) -> mail_pb2.Email:
    return await mail.send(
        tenant,
        from_address=f"Sender <s@{name}>",
        to=to,
        subject="hello",
        text="body",
        tags=["welcome"],
        metadata={"user": "42"},
    )


def assert_common(events: list[events_pb2.Event], tenant: Tenant, email_id: str, name: str) -> None:
    """Every event carries the email's identity, sender domain, tags and metadata."""
    for e in events:
        assert e.id.startswith("evt_")
        assert (e.tenant_id, e.email_id, e.domain) == (tenant.id, email_id, name)
        assert list(e.tags) == ["welcome"]
        assert dict(e.metadata) == {"user": "42"}


async def test_delivered_email_has_accepted_then_sent_per_recipient(
    local_mail: LocalMail, tenant: Tenant, scripted_relay: Start
) -> None:
    relay = await scripted_relay(Script())
    _, name = local_mail.add_domain(tenant, port=relay.port)
    sent = await send(local_mail, tenant, name, ["a@example.org", "b@example.org"])
    assert list(sent.suppressed_recipients) == []
    assert await local_mail.worker().run_once() == 1
    events = await events_of(local_mail, tenant, sent.id)
    assert story(events) == [
        ("accepted", ""),
        ("sent", "a@example.org"),
        ("sent", "b@example.org"),
    ]
    assert_common(events, tenant, sent.id, name)
    for e in events[1:]:
        assert (e.smtp.code, e.smtp.enhanced_code) == (250, "2.0.0")
    # Timeline, GetEmail and the events API tell the same story.
    email = await local_mail.get(tenant, sent.id)
    assert email.status == E.EMAIL_STATUS_SENT
    assert timeline(email) == story(events)
    # Every hint was consumed: nothing announced is left unpublished.
    assert await local_mail.app.running.database.db[HINTS].count_documents({}) == 0


async def test_deferred_then_sent(
    local_mail: LocalMail, tenant: Tenant, scripted_relay: Start
) -> None:
    relay = await scripted_relay(Script(rcpt={"a@example.org": "450 4.2.0 mailbox busy"}))
    _, name = local_mail.add_domain(tenant, port=relay.port)
    sent = await send(local_mail, tenant, name, ["a@example.org"])
    assert await local_mail.worker().run_once() == 1
    relay.script = Script()
    local_mail.clock.advance(timedelta(seconds=60))
    assert await local_mail.worker().run_once() == 1
    events = await events_of(local_mail, tenant, sent.id)
    assert story(events) == [
        ("accepted", ""),
        ("deferred", "a@example.org"),
        ("sent", "a@example.org"),
    ]
    assert_common(events, tenant, sent.id, name)
    deferred = events[1]
    assert (deferred.smtp.code, deferred.smtp.enhanced_code, deferred.smtp.message) == (
        450,
        "4.2.0",
        "4.2.0 mailbox busy",  # the reply's text as the relay sent it
    )
    assert deferred.reason == "smtp; 450 4.2.0 mailbox busy"
    email = await local_mail.get(tenant, sent.id)
    assert email.status == E.EMAIL_STATUS_SENT
    assert timeline(email) == story(events)


async def test_hard_bounce_suppresses_and_the_next_email_never_reaches_the_relay(
    local_mail: LocalMail, tenant: Tenant, scripted_relay: Start
) -> None:
    relay = await scripted_relay(Script(rcpt={"gone@example.org": "550 5.1.1 no such user"}))
    _, name = local_mail.add_domain(tenant, port=relay.port)
    first = await send(local_mail, tenant, name, ["gone@example.org", "ok@example.org"])
    assert await local_mail.worker().run_once() == 1
    events = await events_of(local_mail, tenant, first.id)
    assert story(events) == [
        ("accepted", ""),
        ("bounced", "gone@example.org"),
        ("sent", "ok@example.org"),
    ]
    assert_common(events, tenant, first.id, name)
    bounced = events[1]
    assert (bounced.smtp.code, bounced.smtp.enhanced_code) == (550, "5.1.1")
    email = await local_mail.get(tenant, first.id)
    assert email.status == E.EMAIL_STATUS_PARTIALLY_SENT
    assert timeline(email) == story(events)

    # The bounce put the address on the list, naming the bounced event.
    _, suppressions = stubs(local_mail)
    entry = await suppressions.GetSuppression(
        suppressions_pb2.GetSuppressionRequest(address="gone@example.org"),
        metadata=tenant.metadata,
    )
    assert (entry.reason, entry.event_id) == ("hard_bounce", bounced.id)

    # Only suppressed recipients: SUPPRESSED at once, no attempt, nothing reaches the relay.
    received = len(relay.received)
    connections = relay.connections
    second = await send(local_mail, tenant, name, ["gone@example.org"])
    assert second.status == E.EMAIL_STATUS_SUPPRESSED
    assert list(second.suppressed_recipients) == ["gone@example.org"]
    assert [r.status for r in second.recipients] == [E.RECIPIENT_STATUS_SUPPRESSED]
    assert await local_mail.worker().run_once() == 0
    assert (len(relay.received), relay.connections) == (received, connections)
    events = await events_of(local_mail, tenant, second.id)
    assert story(events) == [("accepted", ""), ("suppressed", "gone@example.org")]
    assert events[1].reason == "hard_bounce"
    stored = await local_mail.get(tenant, second.id)
    assert stored.status == E.EMAIL_STATUS_SUPPRESSED
    assert timeline(stored) == story(events)

    # A mixed email: the suppressed one is skipped, the other goes on.
    third = await send(local_mail, tenant, name, ["gone@example.org", "ok@example.org"])
    assert list(third.suppressed_recipients) == ["gone@example.org"]
    assert third.status == E.EMAIL_STATUS_QUEUED
    assert await local_mail.worker().run_once() == 1
    assert relay.received[-1].rcpt_to == ["ok@example.org"]
    events = await events_of(local_mail, tenant, third.id)
    assert story(events) == [
        ("accepted", ""),
        ("suppressed", "gone@example.org"),
        ("sent", "ok@example.org"),
    ]


async def test_address_suppressed_after_acceptance_is_skipped_at_delivery(
    local_mail: LocalMail, tenant: Tenant, scripted_relay: Start
) -> None:
    relay = await scripted_relay(Script())
    _, name = local_mail.add_domain(tenant, port=relay.port)
    sent = await send(local_mail, tenant, name, ["late@example.org"])
    assert sent.status == E.EMAIL_STATUS_QUEUED
    _, suppressions = stubs(local_mail)
    await suppressions.AddSuppressions(
        suppressions_pb2.AddSuppressionsRequest(addresses=["late@example.org"]),
        metadata=tenant.metadata,
    )
    assert await local_mail.worker().run_once() == 1
    assert relay.connections == 0
    email = await local_mail.get(tenant, sent.id)
    assert email.status == E.EMAIL_STATUS_SUPPRESSED
    assert list(email.suppressed_recipients) == ["late@example.org"]
    events = await events_of(local_mail, tenant, sent.id)
    assert story(events) == [("accepted", ""), ("suppressed", "late@example.org")]
    assert events[1].reason == "manual"


async def test_cancel_reschedule_resend_and_delete_are_events(
    local_mail: LocalMail, tenant: Tenant, scripted_relay: Start
) -> None:
    relay = await scripted_relay(Script(rcpt={"x@example.org": "550 5.2.2 mailbox full"}))
    _, name = local_mail.add_domain(tenant, port=relay.port)
    later = local_mail.clock.now() + timedelta(hours=1)
    request = mail_pb2.SendEmailRequest(
        from_address=f"s@{name}", to=["a@example.org"], subject="s", text="t"
    )
    request.send_at.FromDatetime(later)
    first = await local_mail.stub.SendEmail(request, metadata=tenant.metadata)
    move = mail_pb2.RescheduleEmailRequest(id=first.id)
    move.send_at.FromDatetime(later + timedelta(hours=1))
    await local_mail.stub.RescheduleEmail(move, metadata=tenant.metadata)
    await local_mail.stub.DeleteEmail(
        mail_pb2.DeleteEmailRequest(id=first.id), metadata=tenant.metadata
    )
    events = await events_of(local_mail, tenant, first.id)
    assert [e.type for e in events] == ["accepted", "scheduled", "rescheduled", "cancelled"]
    assert events[-1].reason == "cancelled by the API"

    # A bounce that does not suppress (mailbox full), a resend, then removal of the original:
    # its events stay listed after the email is gone.
    bounced = await send(local_mail, tenant, name, ["x@example.org"])
    assert await local_mail.worker().run_once() == 1
    resent = await local_mail.stub.ResendEmail(
        mail_pb2.ResendEmailRequest(id=bounced.id), metadata=tenant.metadata
    )
    await local_mail.stub.DeleteEmail(
        mail_pb2.DeleteEmailRequest(id=bounced.id), metadata=tenant.metadata
    )
    assert await local_mail.app.running.database.db[EMAILS].find_one({"_id": bounced.id}) is None
    events = await events_of(local_mail, tenant, bounced.id)
    assert [e.type for e in events] == ["accepted", "bounced", "resent"]
    assert events[-1].reason == f"resent as {resent.id}"
    _, suppressions = stubs(local_mail)
    listed = await suppressions.ListSuppressions(
        suppressions_pb2.ListSuppressionsRequest(), metadata=tenant.metadata
    )
    assert list(listed.suppressions) == []
