"""Stats from counts kept as mail flows: they agree with the emails, without reading them.

GetEmailStats counts whole minutes of its window from the ``email_tallies`` documents
(`services.mail.tallies`) and only the seconds at the window's ends from the emails. These
tests run a mixed history through the real service (sends spread over hours and a day
boundary, scheduled mail, deliveries with bounces and deferrals by two workers with their own
count documents, cancels, reschedules, resends, deletes, retention) and compare every answer
with a count of the emails themselves.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import grpc
from azora.mail.v1 import mail_pb2
from google.protobuf import timestamp_pb2

from services.mail.app import RELAY_HEALTH_REFRESH, make_worker
from services.mail.relay_health import RelayHealthStore
from services.mail.repository import EMAILS, MongoEmailRepository
from services.mail.tallies import TALLIES, cover
from tests.conftest import Tenant
from tests.mail.conftest import START, LocalMail, Script, ScriptedRelay
from tests.support.grpc_errors import failure_of

Start = Callable[[Script], "asyncio.Future[ScriptedRelay]"]
E = mail_pb2
STATUS = {
    v.name.removeprefix("EMAIL_STATUS_").lower(): v.number for v in E.EmailStatus.DESCRIPTOR.values
}


def ts(value: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


async def truth(
    mail: LocalMail, tenant: Tenant, start: datetime, end: datetime, domain: str = ""
) -> dict[str, dict[int, int]]:
    """Per domain, per status: the tenant's emails created in [start, end), counted directly."""
    query: dict[str, object] = {"tenant_id": tenant.id, "created_at": {"$gte": start, "$lt": end}}
    if domain:
        query["domain_id"] = domain
    out: dict[str, Counter[int]] = {}
    async for doc in mail.app.running.database.db[EMAILS].find(
        query, {"domain_id": 1, "status": 1}
    ):
        out.setdefault(doc["domain_id"], Counter())[STATUS[doc["status"]]] += 1
    return {d: dict(c) for d, c in out.items()}


async def answer(
    mail: LocalMail, tenant: Tenant, start: datetime, end: datetime, domain: str = ""
) -> dict[str, dict[int, int]]:
    """Per domain, per status: what GetEmailStats says."""
    stats = await mail.stub.GetEmailStats(
        E.GetEmailStatsRequest(start_time=ts(start), end_time=ts(end), domain_id=domain),
        metadata=tenant.metadata,
    )
    per_domain = {d.domain_id: {int(c.status): c.count for c in d.counts} for d in stats.domains}
    totals: Counter[int] = Counter()
    for counts in per_domain.values():
        totals.update(counts)
    assert {int(c.status): c.count for c in stats.counts} == dict(totals)
    return per_domain


async def test_stats_agree_with_the_emails_after_a_mixed_run(
    local_mail: LocalMail, tenant: Tenant, scripted_relay: Start
) -> None:
    # Counts per status and domain equal a direct count of the emails for aligned and ragged
    # windows, after sends, deliveries by two writers, bounces, deferrals, cancels,
    # reschedules, resends and deletes spread over a day boundary.
    relay = await scripted_relay(
        Script(
            rcpt={"bounce@example.org": "550 5.1.1 unknown", "later@example.org": "451 4.3.0 busy"}
        )
    )
    _, n1 = local_mail.add_domain(tenant, port=relay.port)
    d2, n2 = local_mail.add_domain(tenant, port=relay.port)
    db = local_mail.app.running.database.db
    # A second process's repository: its outcomes go to count documents of its own.
    other = MongoEmailRepository(db, inline_limit=local_mail.settings.mail_inline_content_limit)
    other_worker = make_worker(
        local_mail.settings,
        emails=other,
        relays=local_mail.lookup,
        clock=local_mail.clock,
        relay_health=RelayHealthStore(db, refresh=RELAY_HEALTH_REFRESH),
    )
    recipients = [
        ["a@example.org"],
        ["bounce@example.org"],
        ["later@example.org"],
        ["a@example.org", "bounce@example.org"],
    ]
    sent: list[mail_pb2.Email] = []
    for step in range(24):
        name = n1 if step % 3 else n2
        fields: dict[str, object] = {
            "from_address": f"s@{name}",
            "to": recipients[step % 4],
            "text": "t",
            "tags": [f"t{step % 2}"],
        }
        if step % 5 == 0:
            fields["send_at"] = ts(local_mail.clock.now() + timedelta(hours=20 + step))
        sent.append(await local_mail.send(tenant, **fields))
        # 47 min 13 s steps: emails land in many minutes and hours, and past midnight.
        local_mail.clock.advance(timedelta(minutes=47, seconds=13))
        if step % 4 == 3:
            worker = local_mail.worker() if step % 8 == 3 else other_worker
            await worker.run_once()
    # Cancel two waiting emails, reschedule two (sooner and later), deliver what is due.
    current = [await local_mail.get(tenant, e.id) for e in sent]
    waiting = [
        e
        for e in current
        if e.status in (E.EMAIL_STATUS_SCHEDULED, E.EMAIL_STATUS_QUEUED, E.EMAIL_STATUS_DEFERRED)
    ]
    assert len(waiting) >= 4
    for email in waiting[:2]:
        await local_mail.stub.DeleteEmail(
            E.DeleteEmailRequest(id=email.id), metadata=tenant.metadata
        )
    await local_mail.stub.RescheduleEmail(
        E.RescheduleEmailRequest(id=waiting[2].id, send_at=ts(local_mail.clock.now())),
        metadata=tenant.metadata,
    )
    await local_mail.stub.RescheduleEmail(
        E.RescheduleEmailRequest(
            id=waiting[3].id, send_at=ts(local_mail.clock.now() + timedelta(days=3))
        ),
        metadata=tenant.metadata,
    )
    await other_worker.run_once()
    await local_mail.worker().run_once()
    # Resend the bounced and partially sent ones, delete some finished ones.
    finished = [await local_mail.get(tenant, e.id) for e in sent]
    resendable = [
        e for e in finished if e.status in (E.EMAIL_STATUS_BOUNCED, E.EMAIL_STATUS_PARTIALLY_SENT)
    ]
    assert resendable
    for email in resendable[:3]:
        await local_mail.stub.ResendEmail(
            E.ResendEmailRequest(id=email.id), metadata=tenant.metadata
        )
    deletable = [e for e in finished if e.status == E.EMAIL_STATUS_SENT]
    assert len(deletable) >= 3
    for email in deletable[:3]:
        await local_mail.stub.DeleteEmail(
            E.DeleteEmailRequest(id=email.id), metadata=tenant.metadata
        )
    local_mail.clock.advance(timedelta(minutes=90))
    await local_mail.worker().run_once()  # the resends and what became due
    statuses = Counter([doc["status"] async for doc in db[EMAILS].find({"tenant_id": tenant.id})])
    assert {"sent", "bounced", "cancelled", "scheduled", "partially_sent"} <= set(statuses)
    assert {"deferred", "failed"} & set(statuses)  # 4xx: deferred, then given up
    # Both writers hold count documents.
    writers = {doc["writer"] async for doc in db[TALLIES].find({"tenant_id": tenant.id})}
    assert len(writers) == 2

    now = local_mail.clock.now()
    windows = [
        (START - timedelta(days=1), now + timedelta(days=1)),  # everything, whole days
        (START + timedelta(seconds=17), now - timedelta(seconds=5)),  # ragged ends
        (
            START + timedelta(hours=3, minutes=59, seconds=59),
            START + timedelta(hours=14, seconds=1),
        ),
        (START + timedelta(minutes=47), START + timedelta(minutes=48)),  # one minute
        (START + timedelta(minutes=47, seconds=12), START + timedelta(minutes=47, seconds=14)),
        (now - timedelta(days=30), now),  # the 30-day window
        (now - timedelta(hours=24), now),  # the default window
    ]
    for start, end in windows:
        assert await answer(local_mail, tenant, start, end) == await truth(
            local_mail, tenant, start, end
        ), (start, end)
        assert await answer(local_mail, tenant, start, end, d2) == await truth(
            local_mail, tenant, start, end, d2
        ), (start, end)
    default = await local_mail.stub.GetEmailStats(
        E.GetEmailStatsRequest(), metadata=tenant.metadata
    )
    assert sum(c.count for c in default.counts) == sum(
        sum(c.values())
        for c in (await truth(local_mail, tenant, now - timedelta(hours=24), now)).values()
    )


async def test_whole_minutes_are_counted_without_reading_the_emails(
    local_mail: LocalMail, tenant: Tenant
) -> None:
    # Changing an email's status behind the service's back changes nothing for a window of
    # whole minutes (the counts answer it), but does for the seconds at a ragged end (read
    # from the emails). Before the counts existed, both windows read the emails.
    d1, n1 = local_mail.add_domain(tenant, port=None)
    local_mail.relays.domains.add((tenant.id, d1))
    from services.mail.relay_directory import RelaySecurity, RelaySettings

    local_mail.relays.add_relay(
        tenant_id=tenant.id, relay=RelaySettings(d1, "127.0.0.1", 9, RelaySecurity.NONE)
    )
    local_mail.clock.advance(timedelta(seconds=30))
    email = await local_mail.send(tenant, from_address=f"s@{n1}", to=["a@example.org"], text="t")
    db = local_mail.app.running.database.db
    await db[EMAILS].update_one({"_id": email.id}, {"$set": {"status": "sent"}})
    whole = (START, START + timedelta(minutes=1))
    assert await answer(local_mail, tenant, *whole) == {d1: {E.EMAIL_STATUS_QUEUED: 1}}
    ragged = (START + timedelta(seconds=10), START + timedelta(minutes=1))
    assert await answer(local_mail, tenant, *ragged) == {d1: {E.EMAIL_STATUS_SENT: 1}}
    # The default window ends at the next whole minute after now: counts only.
    default = await local_mail.stub.GetEmailStats(
        E.GetEmailStatsRequest(), metadata=tenant.metadata
    )
    assert default.end_time.ToDatetime(tzinfo=UTC) == START + timedelta(minutes=1)
    assert default.start_time.ToDatetime(tzinfo=UTC) == START + timedelta(minutes=1, hours=-24)
    assert {c.status: c.count for c in default.counts} == {E.EMAIL_STATUS_QUEUED: 1}


def test_a_window_is_cut_into_whole_days_hours_and_minutes() -> None:
    # 30 days from a ragged minute: minutes up to the hour, hours up to the day, whole days,
    # and back down at the other end; contiguous and covering the window exactly.
    start = START + timedelta(minutes=7)
    end = start + timedelta(days=30, hours=5, minutes=3)
    parts = cover(start, end)
    assert [p[0] for p in parts] == ["m", "h", "d", "h", "m"]
    assert parts[0][1] == start
    assert parts[-1][2] == end
    for (_, _, hi), (_, lo, _) in itertools.pairwise(parts):
        assert hi == lo
    assert cover(start, start + timedelta(minutes=5)) == [
        ("m", start, start + timedelta(minutes=5))
    ]


async def test_a_reversed_window_names_both_fields_as_clients_spell_them(
    local_mail: LocalMail, tenant: Tenant
) -> None:
    # The violation's field is renamed to the request's JSON name (startTime); the description
    # names the other field the same way, not by its proto name.
    failure = await failure_of(
        local_mail.stub.GetEmailStats(
            E.GetEmailStatsRequest(start_time=ts(START), end_time=ts(START - timedelta(minutes=1))),
            metadata=tenant.metadata,
        )
    )
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.field_violations == {"startTime": "must be before endTime"}
