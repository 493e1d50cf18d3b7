"""Tracking: get, list with filters and pages, cancel/delete, resend, stats, tenant isolation."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta

import grpc
from azora.mail.v1 import mail_pb2
from google.protobuf import timestamp_pb2

from services.core.ids import new_id
from services.mail.repository import EMAILS
from tests.conftest import Tenant
from tests.mail.conftest import LocalMail, Script, ScriptedRelay
from tests.support.grpc_errors import failure_of

Start = Callable[[Script], "asyncio.Future[ScriptedRelay]"]
E = mail_pb2


def ts(value: object) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)  # type: ignore[arg-type]
    return stamp


async def send(mail: LocalMail, tenant: Tenant, name: str, **fields: object) -> mail_pb2.Email:
    request: dict[str, object] = {
        "from_address": f"s@{name}",
        "to": ["a@example.org"],
        "text": "t",
        **fields,
    }
    return await mail.send(tenant, **request)


async def test_list_filters_and_pages(local_mail: LocalMail, tenant: Tenant) -> None:
    # Newest first; status, domain, recipient, tag and time filters; opaque page tokens that
    # walk every email exactly once and refuse a changed query.
    d1, n1 = local_mail.add_domain(tenant, port=2525)
    d2, n2 = local_mail.add_domain(tenant, port=2525)
    ids = []
    for i in range(5):
        ids.append((await send(local_mail, tenant, n1, tags=["odd" if i % 2 else "even"])).id)
        local_mail.clock.advance(timedelta(minutes=1))
    later = local_mail.clock.now()
    other = await send(local_mail, tenant, n2, to=["Zed.Smith@example.org"])
    stub, md = local_mail.stub, tenant.metadata
    everything = await stub.ListEmails(E.ListEmailsRequest(), metadata=md)
    assert [e.id for e in everything.emails] == [other.id, *reversed(ids)]
    by_domain = await stub.ListEmails(E.ListEmailsRequest(domain_id=d2), metadata=md)
    assert [e.id for e in by_domain.emails] == [other.id]
    by_rcpt = await stub.ListEmails(
        E.ListEmailsRequest(recipient="zed.smith@EXAMPLE.org"), metadata=md
    )
    assert [e.id for e in by_rcpt.emails] == [other.id]
    by_tag = await stub.ListEmails(E.ListEmailsRequest(tag="odd"), metadata=md)
    assert [e.id for e in by_tag.emails] == [ids[3], ids[1]]
    by_time = await stub.ListEmails(E.ListEmailsRequest(start_time=ts(later)), metadata=md)
    assert [e.id for e in by_time.emails] == [other.id]
    by_status = await stub.ListEmails(E.ListEmailsRequest(status=E.EMAIL_STATUS_SENT), metadata=md)
    assert list(by_status.emails) == []
    seen: list[str] = []
    token = ""
    while True:
        page = await stub.ListEmails(
            E.ListEmailsRequest(page_size=2, page_token=token, domain_id=d1), metadata=md
        )
        seen += [e.id for e in page.emails]
        token = page.next_page_token
        if not token:
            break
    assert seen == list(reversed(ids))
    first = await stub.ListEmails(E.ListEmailsRequest(page_size=2), metadata=md)
    failure = await failure_of(
        stub.ListEmails(
            E.ListEmailsRequest(page_size=2, page_token=first.next_page_token, tag="odd"),
            metadata=md,
        )
    )
    assert "pageToken" in failure.field_violations


async def test_another_tenants_email_is_not_found(
    local_mail: LocalMail, tenant: Tenant, other_tenant: Tenant
) -> None:
    # Get, delete, resend of another tenant's email are NOT_FOUND; lists and stats never show it.
    _, name = local_mail.add_domain(tenant, port=2525)
    mine = await send(local_mail, tenant, name)
    stub, theirs = local_mail.stub, other_tenant.metadata
    for call in (
        stub.GetEmail(E.GetEmailRequest(id=mine.id), metadata=theirs),
        stub.DeleteEmail(E.DeleteEmailRequest(id=mine.id), metadata=theirs),
        stub.ResendEmail(E.ResendEmailRequest(id=mine.id), metadata=theirs),
        stub.GetEmail(E.GetEmailRequest(id=new_id()), metadata=theirs),
    ):
        failure = await failure_of(call)
        assert failure.code == grpc.StatusCode.NOT_FOUND
    assert list((await stub.ListEmails(E.ListEmailsRequest(), metadata=theirs)).emails) == []
    stats = await stub.GetEmailStats(E.GetEmailStatsRequest(), metadata=theirs)
    assert list(stats.counts) == []
    assert stats.queue_depth == 0
    # Still there for its owner, untouched.
    assert (await local_mail.get(tenant, mine.id)).status == E.EMAIL_STATUS_QUEUED
    failure = await failure_of(stub.GetEmail(E.GetEmailRequest(id="nope"), metadata=theirs))
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_delete_cancels_unfinished_then_removes_finished(
    local_mail: LocalMail, tenant: Tenant, scripted_relay: Start
) -> None:
    # DELETE on a scheduled email cancels it (recorded, never delivered); DELETE again removes
    # it; a sent email with GridFS content is removed with its content.
    relay = await scripted_relay(Script())
    _, name = local_mail.add_domain(tenant, port=relay.port)
    later = local_mail.clock.now() + timedelta(hours=1)
    scheduled = await send(local_mail, tenant, name, send_at=ts(later))
    await local_mail.stub.DeleteEmail(
        E.DeleteEmailRequest(id=scheduled.id), metadata=tenant.metadata
    )
    cancelled = await local_mail.get(tenant, scheduled.id)
    assert cancelled.status == E.EMAIL_STATUS_CANCELLED
    assert cancelled.events[-1].type == E.EVENT_TYPE_CANCELLED
    assert cancelled.recipients[0].status == E.RECIPIENT_STATUS_CANCELLED
    local_mail.clock.advance(timedelta(hours=2))
    assert await local_mail.worker().run_once() == 0
    assert relay.received == []
    await local_mail.stub.DeleteEmail(
        E.DeleteEmailRequest(id=scheduled.id), metadata=tenant.metadata
    )
    failure = await failure_of(local_mail.get(tenant, scheduled.id))
    assert failure.code == grpc.StatusCode.NOT_FOUND

    big = await send(
        local_mail,
        tenant,
        name,
        attachments=[E.Attachment(filename="b.bin", content=b"z" * 400_000)],
    )
    await local_mail.worker().run_once()
    assert (await local_mail.get(tenant, big.id)).status == E.EMAIL_STATUS_SENT
    db = local_mail.app.running.database.db
    assert await db["email_content.files"].count_documents({}) == 1
    await local_mail.stub.DeleteEmail(E.DeleteEmailRequest(id=big.id), metadata=tenant.metadata)
    assert await db[EMAILS].count_documents({"_id": big.id}) == 0
    assert await db["email_content.files"].count_documents({}) == 0
    assert await db["email_content.chunks"].count_documents({}) == 0


async def test_scheduled_email_is_delivered_when_due(
    local_mail: LocalMail, tenant: Tenant, scripted_relay: Start
) -> None:
    # Nothing before sendAt; delivered once the clock reaches it.
    relay = await scripted_relay(Script())
    _, name = local_mail.add_domain(tenant, port=relay.port)
    when = local_mail.clock.now() + timedelta(minutes=30)
    email = await send(local_mail, tenant, name, send_at=ts(when))
    local_mail.clock.advance(timedelta(minutes=29, seconds=59))
    assert await local_mail.worker().run_once() == 0
    local_mail.clock.advance(timedelta(seconds=1))
    assert await local_mail.worker().run_once() == 1
    assert (await local_mail.get(tenant, email.id)).status == E.EMAIL_STATUS_SENT
    assert len(relay.received) == 1


async def test_reschedule_moves_the_send_time_both_ways(
    local_mail: LocalMail, tenant: Tenant, scripted_relay: Start
) -> None:
    # Later: nothing at the old time, delivered at the new one; earlier (a time in the past):
    # due at once. Each move is on the timeline and moves the give-up time with it.
    relay = await scripted_relay(Script())
    _, name = local_mail.add_domain(tenant, port=relay.port)
    stub, md = local_mail.stub, tenant.metadata
    start = local_mail.clock.now()
    email = await send(local_mail, tenant, name, send_at=ts(start + timedelta(minutes=10)))
    moved = await stub.RescheduleEmail(
        E.RescheduleEmailRequest(id=email.id, send_at=ts(start + timedelta(hours=2))),
        metadata=md,
    )
    assert moved.status == E.EMAIL_STATUS_SCHEDULED
    assert moved.next_attempt_time.ToDatetime() == (start + timedelta(hours=2)).replace(tzinfo=None)
    local_mail.clock.advance(timedelta(minutes=30))
    assert await local_mail.worker().run_once() == 0  # the old time passed: nothing
    local_mail.clock.advance(timedelta(hours=1, minutes=30))
    assert await local_mail.worker().run_once() == 1
    sent = await local_mail.get(tenant, email.id)
    assert sent.status == E.EMAIL_STATUS_SENT
    assert [e.type for e in sent.events][:3] == [
        E.EVENT_TYPE_ACCEPTED,
        E.EVENT_TYPE_SCHEDULED,
        E.EVENT_TYPE_RESCHEDULED,
    ]

    now = local_mail.clock.now()
    later = await send(local_mail, tenant, name, send_at=ts(now + timedelta(days=3)))
    sooner = await stub.RescheduleEmail(
        E.RescheduleEmailRequest(id=later.id, send_at=ts(now - timedelta(minutes=5))),
        metadata=md,
    )
    assert sooner.status == E.EMAIL_STATUS_QUEUED
    assert await local_mail.worker().run_once() == 1
    assert (await local_mail.get(tenant, later.id)).status == E.EMAIL_STATUS_SENT
    assert len(relay.received) == 2


async def test_reschedule_refusals_name_the_problem(
    local_mail: LocalMail, tenant: Tenant, scripted_relay: Start
) -> None:
    # Beyond the horizon or missing: INVALID_ARGUMENT on send_at; finished or cancelled:
    # FAILED_PRECONDITION; unknown, malformed or another tenant's: NOT_FOUND/INVALID_ARGUMENT.
    relay = await scripted_relay(Script())
    _, name = local_mail.add_domain(tenant, port=relay.port)
    stub, md = local_mail.stub, tenant.metadata
    now = local_mail.clock.now()
    email = await send(local_mail, tenant, name, send_at=ts(now + timedelta(hours=1)))
    too_far = await failure_of(
        stub.RescheduleEmail(
            E.RescheduleEmailRequest(id=email.id, send_at=ts(now + timedelta(days=31))),
            metadata=md,
        )
    )
    assert too_far.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "sendAt" in too_far.field_violations
    missing = await failure_of(
        stub.RescheduleEmail(E.RescheduleEmailRequest(id=email.id), metadata=md)
    )
    assert missing.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "sendAt" in missing.field_violations
    unchanged = await local_mail.get(tenant, email.id)
    assert unchanged.status == E.EMAIL_STATUS_SCHEDULED
    assert [e.type for e in unchanged.events] == [E.EVENT_TYPE_ACCEPTED, E.EVENT_TYPE_SCHEDULED]

    await stub.DeleteEmail(E.DeleteEmailRequest(id=email.id), metadata=md)
    cancelled = await failure_of(
        stub.RescheduleEmail(
            E.RescheduleEmailRequest(id=email.id, send_at=ts(now + timedelta(hours=3))),
            metadata=md,
        )
    )
    assert cancelled.code == grpc.StatusCode.FAILED_PRECONDITION
    assert cancelled.reason == "EMAIL_NOT_RESCHEDULABLE"
    assert (await local_mail.get(tenant, email.id)).status == E.EMAIL_STATUS_CANCELLED

    unknown = await failure_of(
        stub.RescheduleEmail(E.RescheduleEmailRequest(id=new_id(), send_at=ts(now)), metadata=md)
    )
    assert unknown.code == grpc.StatusCode.NOT_FOUND
    malformed = await failure_of(
        stub.RescheduleEmail(E.RescheduleEmailRequest(id="x", send_at=ts(now)), metadata=md)
    )
    assert malformed.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "id" in malformed.field_violations


async def test_reschedule_of_an_email_being_delivered_is_refused(
    local_mail: LocalMail, tenant: Tenant, scripted_relay: Start
) -> None:
    # A worker holds it (its relay hangs after DATA): FAILED_PRECONDITION, nothing changed.
    relay = await scripted_relay(Script(final="HANG"))
    _, name = local_mail.add_domain(tenant, port=relay.port, timeout=30)
    email = await send(local_mail, tenant, name)
    worker = local_mail.worker()
    claimed = await worker.claim()
    assert claimed is not None
    failure = await failure_of(
        local_mail.stub.RescheduleEmail(
            E.RescheduleEmailRequest(
                id=email.id, send_at=ts(local_mail.clock.now() + timedelta(hours=1))
            ),
            metadata=tenant.metadata,
        )
    )
    assert failure.code == grpc.StatusCode.FAILED_PRECONDITION
    assert failure.reason == "EMAIL_BEING_DELIVERED"
    held = await local_mail.get(tenant, email.id)
    assert held.status == E.EMAIL_STATUS_SENDING
    assert E.EVENT_TYPE_RESCHEDULED not in [e.type for e in held.events]


async def test_resend_creates_a_linked_new_delivery(
    local_mail: LocalMail, tenant: Tenant, scripted_relay: Start
) -> None:
    # A bounced email resent: a new email (new Message-ID) to the unsent recipients, linked
    # both ways on the timelines; a queued email cannot be resent. (A full mailbox: a bounce
    # that does not put the address on the suppression list.)
    relay = await scripted_relay(Script(rcpt={"b@example.org": "552 5.2.2 mailbox full"}))
    _, name = local_mail.add_domain(tenant, port=relay.port)
    original = await send(local_mail, tenant, name, to=["a@example.org", "b@example.org"])
    await local_mail.worker().run_once()
    assert (await local_mail.get(tenant, original.id)).status == E.EMAIL_STATUS_PARTIALLY_SENT
    relay.script = Script()
    resent = await local_mail.stub.ResendEmail(
        E.ResendEmailRequest(id=original.id), metadata=tenant.metadata
    )
    assert resent.id != original.id
    assert resent.resent_from_id == original.id
    assert resent.status == E.EMAIL_STATUS_QUEUED
    assert [r.address for r in resent.recipients] == ["b@example.org"]
    assert resent.message_id != original.message_id
    await local_mail.worker().run_once()
    assert (await local_mail.get(tenant, resent.id)).status == E.EMAIL_STATUS_SENT
    assert relay.received[-1].message_id == f"<{resent.message_id}>"
    assert relay.received[-1].rcpt_to == ["b@example.org"]
    back = await local_mail.get(tenant, original.id)
    assert back.events[-1].type == E.EVENT_TYPE_RESENT
    assert resent.id in back.events[-1].detail
    queued = await send(local_mail, tenant, name)
    failure = await failure_of(
        local_mail.stub.ResendEmail(E.ResendEmailRequest(id=queued.id), metadata=tenant.metadata)
    )
    assert failure.code == grpc.StatusCode.FAILED_PRECONDITION
    assert failure.reason == "EMAIL_NOT_RESENDABLE"


async def test_stats_count_per_status_and_domain_with_queue_health(
    local_mail: LocalMail, tenant: Tenant, scripted_relay: Start
) -> None:
    # Two sent, one bounced on domain 1, one queued on domain 2 for 90 s; window filters.
    ok = await scripted_relay(Script())
    _, n1 = local_mail.add_domain(tenant, port=ok.port)
    d2, n2 = local_mail.add_domain(tenant, port=None)
    local_mail.relays.relays.pop((tenant.id, d2), None)
    d1 = local_mail.senders.domains[(tenant.id, n1)].id
    await send(local_mail, tenant, n1)
    await send(local_mail, tenant, n1)
    await send(local_mail, tenant, n1, to=["bounce@example.org"])
    ok.script = Script(rcpt={"bounce@example.org": "550 5.1.1 unknown"})
    await local_mail.worker().run_once()
    # Domain 2 gets a relay only long enough to accept an email that then waits.
    from services.mail.relay_directory import RelaySecurity, RelaySettings

    local_mail.relays.add_relay(
        tenant_id=tenant.id,
        relay=RelaySettings(d2, "127.0.0.1", 9, RelaySecurity.NONE),
    )
    await send(local_mail, tenant, n2)
    local_mail.clock.advance(timedelta(seconds=90))
    stats = await local_mail.stub.GetEmailStats(E.GetEmailStatsRequest(), metadata=tenant.metadata)
    counts = {c.status: c.count for c in stats.counts}
    assert counts == {E.EMAIL_STATUS_QUEUED: 1, E.EMAIL_STATUS_SENT: 2, E.EMAIL_STATUS_BOUNCED: 1}
    per_domain = {d.domain_id: {c.status: c.count for c in d.counts} for d in stats.domains}
    assert per_domain == {
        d1: {E.EMAIL_STATUS_SENT: 2, E.EMAIL_STATUS_BOUNCED: 1},
        d2: {E.EMAIL_STATUS_QUEUED: 1},
    }
    assert stats.queue_depth == 1
    assert stats.oldest_due_age_seconds == 90
    only_d2 = await local_mail.stub.GetEmailStats(
        E.GetEmailStatsRequest(domain_id=d2), metadata=tenant.metadata
    )
    assert {c.status: c.count for c in only_d2.counts} == {E.EMAIL_STATUS_QUEUED: 1}
    future = local_mail.clock.now() + timedelta(hours=1)
    empty = await local_mail.stub.GetEmailStats(
        E.GetEmailStatsRequest(start_time=ts(future), end_time=ts(future + timedelta(hours=1))),
        metadata=tenant.metadata,
    )
    assert list(empty.counts) == []
    failure = await failure_of(
        local_mail.stub.GetEmailStats(
            E.GetEmailStatsRequest(start_time=ts(future), end_time=ts(future)),
            metadata=tenant.metadata,
        )
    )
    assert "startTime" in failure.field_violations
