"""Retention: finished mail, its content and timeline go after their tenant's retention.

The sweeper (`MailManager.sweep_retention`, `MongoEmailRepository.sweep_finished`) is driven
with the manual clock: nothing is removed before it is old enough, unfinished mail (however
far ahead it is scheduled) never is, removals are counted out of the stats, and one run does
bounded work.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta

import grpc
from azora.mail.v1 import mail_pb2
from google.protobuf import timestamp_pb2

from services.mail.app import policy_from
from services.mail.repository import CLAIMS, CONTENTS, EMAILS, IDEMPOTENCY
from tests.conftest import Tenant, make_settings
from tests.mail.conftest import START, LocalMail, Script, ScriptedRelay
from tests.support.grpc_errors import failure_of
from tests.support.settings import SuiteSettings

Start = Callable[[Script], "asyncio.Future[ScriptedRelay]"]
E = mail_pb2


def ts(value: object) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)  # type: ignore[arg-type]
    return stamp


async def test_sweeps_only_finished_mail_past_its_retention(
    local_mail: LocalMail, tenant: Tenant, scripted_relay: Start
) -> None:
    # Sent and bounced emails (one with GridFS content) go 30 days after they finished, with
    # their content and timeline; a scheduled email 29 days ahead and a deferred one stay;
    # stats still agree with the emails; expired idempotency records and old claims go too.
    relay = await scripted_relay(
        Script(rcpt={"bounce@example.org": "550 5.1.1 unknown", "later@example.org": "451 busy"})
    )
    _, name = local_mail.add_domain(tenant, port=relay.port)
    sent = await local_mail.send(
        tenant,
        from_address=f"s@{name}",
        to=["a@example.org"],
        text="t",
        idempotency_key="k1",
        attachments=[E.Attachment(filename="b.bin", content=b"z" * 400_000)],
    )
    bounced = await local_mail.send(
        tenant, from_address=f"s@{name}", to=["bounce@example.org"], text="t"
    )
    far = await local_mail.send(
        tenant,
        from_address=f"s@{name}",
        to=["a@example.org"],
        text="t",
        send_at=ts(START + timedelta(days=29)),
    )
    await local_mail.worker().run_once()
    local_mail.clock.advance(timedelta(days=20))
    deferred = await local_mail.send(
        tenant, from_address=f"s@{name}", to=["later@example.org"], text="t"
    )
    await local_mail.worker(AZORA_MAIL_MAX_LIFETIME=str(90 * 86400)).run_once()
    assert (await local_mail.get(tenant, deferred.id)).status == E.EMAIL_STATUS_DEFERRED
    db = local_mail.app.running.database.db
    assert await db["email_content.files"].count_documents({}) == 1
    assert await db[CONTENTS].find_one({"_id": bounced.id}) is not None
    manager = local_mail.app.mail

    local_mail.clock.advance(timedelta(days=9, hours=23))  # 29 d 23 h after they finished
    assert await manager.sweep_retention() == 0
    assert (await local_mail.get(tenant, sent.id)).status == E.EMAIL_STATUS_SENT

    local_mail.clock.advance(timedelta(hours=2))  # 30 d 1 h
    assert await manager.sweep_retention() == 2
    for gone in (sent, bounced):
        failure = await failure_of(local_mail.get(tenant, gone.id))
        assert failure.code == grpc.StatusCode.NOT_FOUND
    assert await db["email_content.files"].count_documents({}) == 0
    assert await db["email_content.chunks"].count_documents({}) == 0
    left = {doc["_id"]: doc["status"] async for doc in db[EMAILS].find({})}
    assert left == {far.id: "scheduled", deferred.id: "deferred"}
    # The messages kept beside the emails go with them (the large one was in GridFS).
    assert {doc["_id"] async for doc in db[CONTENTS].find({}, {"_id": 1})} == set(left)
    stats = await local_mail.stub.GetEmailStats(
        E.GetEmailStatsRequest(
            start_time=ts(START - timedelta(days=1)),
            end_time=ts(local_mail.clock.now()),
        ),
        metadata=tenant.metadata,
    )
    assert {c.status: c.count for c in stats.counts} == {
        E.EMAIL_STATUS_SCHEDULED: 1,
        E.EMAIL_STATUS_DEFERRED: 1,
    }
    # Far ahead of anything: still nothing unfinished is swept.
    local_mail.clock.advance(timedelta(days=400))
    assert await manager.sweep_retention() == 0
    assert await db[EMAILS].count_documents({}) == 2
    # Idempotency records past their window and claims older than an hour go as well.
    assert await db[IDEMPOTENCY].count_documents({}) == 1
    assert await db[CLAIMS].count_documents({}) > 0
    await manager.sweep_idempotency()
    assert await db[IDEMPOTENCY].count_documents({}) == 0
    assert await db[CLAIMS].count_documents({}) == 0


async def test_a_tenant_override_and_bounded_batches(
    local_mail: LocalMail, tenant: Tenant, other_tenant: Tenant, scripted_relay: Start
) -> None:
    # One tenant keeps mail for 2 days, the other for the default 30: after 3 days only the
    # first one's mail goes, at most one batch of 40 per status per run when asked to.
    relay = await scripted_relay(Script())
    _, short_name = local_mail.add_domain(tenant, port=relay.port)
    _, long_name = local_mail.add_domain(other_tenant, port=relay.port)
    for _ in range(45):
        await local_mail.send(
            tenant, from_address=f"s@{short_name}", to=["a@example.org"], text="t"
        )
    for _ in range(3):
        await local_mail.send(
            other_tenant, from_address=f"s@{long_name}", to=["a@example.org"], text="t"
        )
    worker = local_mail.worker(AZORA_MAIL_WORKER_CONCURRENCY="16")
    while await worker.run_once():
        pass
    settings: SuiteSettings = make_settings(
        local_mail.settings.mongodb_uri,
        local_mail.settings.mongodb_database,
        AZORA_RETENTION_TENANT_DAYS=f"{tenant.id}=2",
    )
    policy = policy_from(settings)
    assert policy.retention_of(tenant.id) == timedelta(days=2)
    assert policy.retention_of(other_tenant.id) == timedelta(days=30)
    local_mail.clock.advance(timedelta(days=3))
    emails = local_mail.app.emails
    first = await emails.sweep_finished(
        now=local_mail.clock.now(),
        retention=policy.retention_of,
        shortest=timedelta(days=2),
        batches=1,
    )
    assert first == 40
    rest = await emails.sweep_finished(
        now=local_mail.clock.now(), retention=policy.retention_of, shortest=timedelta(days=2)
    )
    assert rest == 5
    db = local_mail.app.running.database.db
    assert await db[EMAILS].count_documents({"tenant_id": tenant.id}) == 0
    assert await db[EMAILS].count_documents({"tenant_id": other_tenant.id}) == 3


def test_retention_settings_refuse_a_malformed_tenant_map() -> None:
    # A per-tenant retention that is not tenant=days (days >= 0) stops the process at start.
    import pytest

    from services.core.settings import SettingsError

    with pytest.raises(SettingsError, match="AZORA_RETENTION_TENANT_DAYS"):
        make_settings("mongodb://127.0.0.1:1/", "x", AZORA_RETENTION_TENANT_DAYS="t1=abc")
