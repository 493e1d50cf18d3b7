"""Events and suppressions wired into the send path and the state changes, end to end.

The mail service in-process (`local_mail`, real FerretDB), a real SMTP relay on loopback
(`ScriptedRelay`: it answers 550 5.1.1 for an address on demand, which aiosmtpd cannot), a
delivery worker on the same database, the event publisher as the service runs it, and the
events and suppression APIs over gRPC. Each test checks what an application sees: the email
(GetEmail), its events (ListEvents) and the suppression list agree.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import grpc
from azora.mail.v1 import (
    events_pb2,
    events_pb2_grpc,
    mail_pb2,
    suppressions_pb2,
    suppressions_pb2_grpc,
)

from services.core.clock import ManualClock
from services.mail.feedback.event_log import (
    EVENTS,
    HINTS,
    OUTBOX_FIELD,
    EventPublisher,
    announced_changes,
)
from services.mail.models import SmtpReply
from services.mail.outcomes import RetryPolicy, after_attempt, decide
from services.mail.repository import EMAILS
from tests.conftest import REPO_ROOT, Tenant
from tests.mail.conftest import START, LocalMail, Script, ScriptedRelay

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
        # A key the embedded database refuses as a field name: stored as pairs, shown as is.
        metadata={"user": "42", "$odd.key": "x"},
    )


def assert_common(events: list[events_pb2.Event], tenant: Tenant, email_id: str, name: str) -> None:
    """Every event carries the email's identity, sender domain, tags and metadata."""
    for e in events:
        assert e.id.startswith("evt_")
        assert (e.tenant_id, e.email_id, e.domain) == (tenant.id, email_id, name)
        assert list(e.tags) == ["welcome"]
        assert dict(e.metadata) == {"user": "42", "$odd.key": "x"}


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


async def test_a_change_that_never_lands_publishes_nothing_through_the_queue(
    local_mail: LocalMail, tenant: Tenant, scripted_relay: Start
) -> None:
    # The queue announces an outcome's events, then its write matches no document (as if the
    # worker died between the two): the hint waits for the write, then is dropped, and no
    # event is ever published for a change that did not happen.
    # (A relay is configured for the send to be accepted; no delivery reaches it.)
    _, name = local_mail.add_domain(tenant, port=(await scripted_relay(Script())).port)
    sent = await send(local_mail, tenant, name, ["a@example.org"])
    db = local_mail.app.running.database.db
    queue = local_mail.app.emails.delivery_queue
    publisher = EventPublisher(db, clock=local_mail.clock, abandon_after=timedelta(minutes=30))
    await publisher.run(rounds=100)  # the accepted event, published
    assert await db[HINTS].count_documents({"changes.email_id": sent.id}) == 0
    now = local_mail.clock.now()
    [claimed] = await queue.claim_batch(
        now=now, lease=timedelta(seconds=30), worker_id="w", limit=1
    )
    await db[EMAILS].delete_one({"_id": sent.id})
    replies = {"a@example.org": SmtpReply(250, "2.0.0", "ok")}
    rng = random.Random(1)  # noqa: S311 - the policy's jitter only
    outcome = decide(claimed, replies, now=now, policy=RetryPolicy(), rng=rng)
    assert await queue.finish_attempt(
        claimed=claimed, transition=after_attempt(claimed, outcome, now=now)
    )
    [hint] = await db[HINTS].find({"changes.email_id": sent.id}).to_list()
    [(email_id, event_ids)] = announced_changes(hint)
    assert email_id == sent.id
    assert len(event_ids) == 1  # the sent event (the claim is no event)
    await publisher.run(rounds=100)
    assert await db[HINTS].count_documents({"changes.email_id": sent.id}) == 1  # still in flight
    local_mail.clock.advance(timedelta(minutes=31))
    await publisher.run(rounds=100)
    assert await db[HINTS].count_documents({"changes.email_id": sent.id}) == 0
    assert await db[EVENTS].count_documents({"_id": {"$in": event_ids}}) == 0
    assert [e["type"] async for e in db[EVENTS].find({"emailId": sent.id})] == ["accepted"]


# Claims and records outcomes (250 for everyone) through the real queue engine, forever.
_WORKER = """
import asyncio, random, sys
from datetime import UTC, datetime, timedelta
from pymongo import AsyncMongoClient
from services.mail.models import SmtpReply
from services.mail.outcomes import RetryPolicy, after_attempt, decide
from services.mail.queue import MongoDeliveryQueue
from services.mail.tallies import Tallies

async def main() -> None:
    db = AsyncMongoClient(sys.argv[1], tz_aware=True)[sys.argv[2]]
    queue = MongoDeliveryQueue(db, tallies=Tallies(db))
    rng = random.Random(1)

    async def finish(claimed) -> None:
        now = datetime.now(UTC)
        replies = {r.address: SmtpReply(250, "2.0.0", "ok") for r in claimed.email.recipients}
        outcome = decide(claimed, replies, now=now, policy=RetryPolicy(), rng=rng)
        await queue.finish_attempt(
            claimed=claimed, transition=after_attempt(claimed, outcome, now=now)
        )

    while True:
        now = datetime.now(UTC)
        batch = await queue.claim_batch(now=now, lease=timedelta(hours=1), worker_id="k", limit=4)
        await asyncio.gather(*(finish(c) for c in batch))

asyncio.run(main())
"""


async def test_kill9_of_a_recording_worker_leaves_no_event_without_its_change(
    local_mail: LocalMail, tenant: Tenant, scripted_relay: Start
) -> None:
    # A worker process records outcomes; it is killed as soon as its first hints are in (the
    # announce step), then the publisher runs past the abandon time. Wherever the kill landed,
    # no event is published that its email's document does not hold (no event without its
    # change), and no hint is left. The killed client's last write may still be running in
    # the database when the publisher, its clock jumped two hours, gives up on its hint: the
    # case the removal-time copy (`copy_outbox`) exists for; after it every email has
    # published exactly its outbox, a sent event iff it is sent.
    # (A relay is configured for the send to be accepted; no delivery reaches it.)
    _, name = local_mail.add_domain(tenant, port=(await scripted_relay(Script())).port)
    ids = [(await send(local_mail, tenant, name, ["a@example.org"])).id for _ in range(12)]
    db = local_mail.app.running.database.db
    settings = local_mail.settings
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _WORKER,
        settings.mongodb_uri,
        settings.mongodb_database,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT}/gen/python"},
    )
    # The worker's hints carry the real time, far after the test clock's.
    mine = {"at": {"$gt": START + timedelta(days=1)}}
    while child.returncode is None and await db[HINTS].count_documents(mine) == 0:  # noqa: ASYNC110 - another process writes
        await asyncio.sleep(0.001)
    child.send_signal(signal.SIGKILL)
    await child.wait()
    assert child.returncode == -signal.SIGKILL
    later = ManualClock(datetime.now(UTC) + timedelta(hours=2))
    await EventPublisher(db, clock=later).run(rounds=100)
    assert await db[HINTS].count_documents({}) == 0
    published = {e["_id"] async for e in db[EVENTS].find({"emailId": {"$in": ids}})}
    docs = [d async for d in db[EMAILS].find({"_id": {"$in": ids}})]
    assert published <= {e["_id"] for d in docs for e in d[OUTBOX_FIELD]}
    await EventPublisher(db, clock=later).copy_outbox(docs)
    for doc in docs:
        types = {e["_id"]: e["type"] async for e in db[EVENTS].find({"emailId": doc["_id"]})}
        assert set(types) == {e["_id"] for e in doc[OUTBOX_FIELD]}
        assert ("sent" in types.values()) == (doc["status"] == "sent")


async def test_batch_and_smtp_submission_check_the_list_too(
    local_mail: LocalMail, tenant: Tenant, scripted_relay: Start
) -> None:
    # The same send-time check on the other ways in: a batch (one message all suppressed, one
    # mixed) and an SMTP submission.
    relay = await scripted_relay(Script())
    _, name = local_mail.add_domain(tenant, port=relay.port)
    _, suppressions = stubs(local_mail)
    await suppressions.AddSuppressions(
        suppressions_pb2.AddSuppressionsRequest(addresses=["no@example.org"]),
        metadata=tenant.metadata,
    )

    def message(to: list[str]) -> mail_pb2.SendEmailRequest:
        return mail_pb2.SendEmailRequest(from_address=f"s@{name}", to=to, subject="s", text="t")

    answer = await local_mail.stub.SendEmailBatch(
        mail_pb2.SendEmailBatchRequest(
            messages=[message(["no@example.org"]), message(["no@example.org", "yes@example.org"])]
        ),
        metadata=tenant.metadata,
    )
    alone, mixed = answer.results
    assert alone.status == E.EMAIL_STATUS_SUPPRESSED
    assert mixed.status == E.EMAIL_STATUS_QUEUED
    assert (await local_mail.get(tenant, alone.id)).status == E.EMAIL_STATUS_SUPPRESSED
    stored = await local_mail.get(tenant, mixed.id)
    assert list(stored.suppressed_recipients) == ["no@example.org"]

    raw = (
        f"From: s@{name}\r\nTo: no@example.org\r\nSubject: s\r\n"
        "Message-ID: <m1@example.org>\r\n\r\nbody\r\n"
    ).encode()
    submitted = await local_mail.stub.SubmitMessage(
        mail_pb2.SubmitMessageRequest(
            raw_message=raw, envelope_from=f"s@{name}", envelope_to=["no@example.org"]
        ),
        metadata=tenant.metadata,
    )
    assert submitted.status == E.EMAIL_STATUS_SUPPRESSED
    assert list(submitted.suppressed_recipients) == ["no@example.org"]
    assert await local_mail.worker().run_once() == 1  # the mixed one only
    assert [r.rcpt_to for r in relay.received] == [["yes@example.org"]]
    for email_id in (alone.id, submitted.id):
        events = await events_of(local_mail, tenant, email_id)
        assert story(events) == [("accepted", ""), ("suppressed", "no@example.org")]
        assert events[1].reason == "manual"
