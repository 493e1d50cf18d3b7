"""Events: the builder, recording with the state change (outbox + hint + publisher), ListEvents.

The publisher runs against email documents written here the way the state-change writer
writes them (`with_events` on the update, `EventRecorder.announce` before it), on a real
FerretDB. ListEvents is called over gRPC on the mail service (`local_mail`), with events the
publisher stored.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from azora.mail.v1 import events_pb2, events_pb2_grpc
from google.protobuf import timestamp_pb2
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from services.core.clock import ManualClock
from services.core.mongo import Document, ensure_indexes
from services.mail.feedback.event_log import (
    EVENTS,
    HINTS,
    OUTBOX_FIELD,
    TAG_KEYS,
    Change,
    EventPublisher,
    EventRecorder,
    SmtpFacts,
    announced_changes,
    build_event,
    metadata_of,
    with_events,
)
from services.mail.feedback.event_store import EventFilter, EventStore
from services.mail.feedback.event_wiring import FEEDBACK_INDEXES
from tests.conftest import REPO_ROOT, Tenant, new_tenant
from tests.mail.conftest import START, LocalMail
from tests.support.grpc_errors import failure_of


@pytest.fixture
async def db(ferretdb: str) -> AsyncIterator[AsyncDatabase[Document]]:
    """A fresh database with the events and suppressions indexes."""
    client: AsyncMongoClient[Document] = AsyncMongoClient(ferretdb, tz_aware=True)
    name = f"azora_events_{secrets.token_hex(4)}"
    await ensure_indexes(client[name], FEEDBACK_INDEXES)
    yield client[name]
    await client.drop_database(name)
    await client.close()


def event(kind: str, at: datetime, email_id: str, **fields: object) -> Document:
    return build_event(
        type=kind,
        occurred_at=at,
        tenant_id=str(fields.pop("tenant_id", "t-1")),
        domain=str(fields.pop("domain", "sender.example")),
        email_id=email_id,
        **fields,  # type: ignore[arg-type]
    )


async def record_change(
    db: AsyncDatabase[Document],
    email_id: str,
    events: list[Document],
    *,
    now: datetime,
    status: str,
    insert: bool = False,
) -> None:
    """What the state-change writer does: hint first, then the one update with its events."""
    await EventRecorder(db).announce([Change(email_id, events)], now=now)
    if insert:
        await db["emails"].insert_one({"_id": email_id, "tenant_id": "t-1", "status": "queued"})
    update = with_events({"$set": {"status": status, "updated_at": now}}, events)
    await db["emails"].update_one({"_id": email_id}, update)


# --- the builder --------------------------------------------------------------------------


def test_build_event_follows_the_contract() -> None:
    # Ids are evt_ + a ULID carrying occurredAt; optional fields are absent when empty.
    at = datetime(2026, 11, 23, 12, 0, 0, 123456, tzinfo=UTC)
    doc = build_event(
        type="bounced",
        occurred_at=at,
        tenant_id="t-1",
        domain="sender.example",
        email_id="e1",
        recipient="Bob@example.org",
        tags=["welcome"],
        metadata={"user": "42"},
        smtp=SmtpFacts(550, "5.1.1", "no such user"),
    )
    assert doc["_id"].startswith("evt_")
    assert len(doc["_id"]) == 30
    assert doc["occurredAt"] == datetime(2026, 11, 23, 12, 0, 0, 123000)
    assert doc["smtp"] == {"code": 550, "enhancedCode": "5.1.1", "message": "no such user"}
    assert {k: doc[k] for k in ("tenantId", "type", "emailId", "recipient", "domain")} == {
        "tenantId": "t-1",
        "type": "bounced",
        "emailId": "e1",
        "recipient": "Bob@example.org",
        "domain": "sender.example",
    }
    assert (doc["tags"], metadata_of(doc)) == (["welcome"], {"user": "42"})
    assert "reason" not in doc
    assert "webhookId" not in doc
    later = build_event(
        type="sent",
        occurred_at=at + timedelta(milliseconds=1),
        tenant_id="t",
        domain="d",
        email_id="e",
    )
    assert later["_id"] > doc["_id"]
    endpoint = build_event(
        type="webhook.disabled", occurred_at=at, tenant_id="t", domain="d", webhook_id="w1"
    )
    assert "emailId" not in endpoint
    assert endpoint["webhookId"] == "w1"
    with pytest.raises(ValueError, match="unknown event type"):
        build_event(type="opened", occurred_at=at, tenant_id="t", domain="d", email_id="e")
    with pytest.raises(ValueError, match="email id"):
        build_event(type="sent", occurred_at=at, tenant_id="t", domain="d")


def test_with_events_merges_into_the_state_change_update() -> None:
    # The caller's $push (its timeline) and $set stay; the outbox push is added.
    events = [event("sent", START, "e1")]
    update = {"$set": {"status": "sent"}, "$push": {"events": {"type": "sent"}}}
    merged = with_events(update, events)
    assert merged["$set"] == {"status": "sent"}
    assert merged["$push"] == {"events": {"type": "sent"}, OUTBOX_FIELD: {"$each": events}}
    assert update == {"$set": {"status": "sent"}, "$push": {"events": {"type": "sent"}}}
    with pytest.raises(ValueError, match="already records"):
        with_events(merged, events)


# --- recording and publishing --------------------------------------------------------------


async def test_publisher_copies_recorded_events_once(db: AsyncDatabase[Document]) -> None:
    # Two state changes of one email and one of another: every event lands in `events` once,
    # hints are gone, the email documents are untouched by the publisher, a rerun adds nothing.
    clock = ManualClock(START)
    accepted = event("accepted", START, "e1", tags=["a", "b"])
    await record_change(db, "e1", [accepted], now=START, status="queued", insert=True)
    sent = [event("sent", START, "e1", recipient="x@example.org"), event("sent", START, "e1")]
    await record_change(db, "e1", sent, now=START, status="sent")
    other = event("cancelled", START, "e2", reason="user asked")
    await record_change(db, "e2", [other], now=START, status="cancelled", insert=True)
    before = {d["_id"]: d async for d in db["emails"].find()}

    publisher = EventPublisher(db, clock=clock)
    assert await publisher.run() == 4
    stored = {d["_id"]: d async for d in db[EVENTS].find()}
    assert set(stored) == {e["_id"] for e in (accepted, *sent, other)}
    assert stored[other["_id"]]["reason"] == "user asked"
    assert await db[HINTS].count_documents({}) == 0
    assert {d["_id"]: d async for d in db["emails"].find()} == before
    assert sorted([k["tag"] async for k in db[TAG_KEYS].find()]) == ["a", "b"]
    assert await publisher.run() == 0
    assert await db[EVENTS].count_documents({}) == 4


async def test_a_change_that_never_landed_publishes_nothing(db: AsyncDatabase[Document]) -> None:
    # The writer died after its hint and before its update: the hint stays while the write
    # could still be in flight, then is dropped; no event appears. A change that landed
    # after its hint was dropped is still published with the email's next change.
    clock = ManualClock(START)
    await db["emails"].insert_one({"_id": "e1", "tenant_id": "t-1", "status": "queued"})
    lost = event("sent", START, "e1")
    await EventRecorder(db).announce([Change("e1", [lost])], now=START)
    publisher = EventPublisher(db, clock=clock, abandon_after=timedelta(minutes=30))
    assert await publisher.run() == 0
    assert await db[HINTS].count_documents({}) == 1
    clock.advance(timedelta(minutes=31))
    assert await publisher.run() == 0
    assert await db[HINTS].count_documents({}) == 0
    assert await db[EVENTS].count_documents({}) == 0
    # The late write lands now (the hung writer came back), then the email changes again.
    await db["emails"].update_one({"_id": "e1"}, with_events({"$set": {"x": 1}}, [lost]))
    nxt = event("deferred", clock.now(), "e1")
    await record_change(db, "e1", [nxt], now=clock.now(), status="deferred")
    assert await publisher.run() == 2
    assert {d["_id"] async for d in db[EVENTS].find()} == {lost["_id"], nxt["_id"]}


async def test_one_hint_announces_a_group_and_shrinks_to_what_has_not_landed(
    db: AsyncDatabase[Document],
) -> None:
    # A group commit announces its changes in one hint document; each landed change is
    # published at once, and the hint shrinks to the changes still in flight (a change that
    # never lands must not have the whole group re-read until it is abandoned).
    clock = ManualClock(START)
    ids = ["g1", "g2", "g3"]
    await db["emails"].insert_many(
        [{"_id": i, "tenant_id": "t-1", "status": "queued"} for i in ids]
    )
    sent = {i: event("sent", START, i) for i in ids}
    await EventRecorder(db).announce([Change(i, [sent[i]]) for i in ids], now=START)
    [hint] = await db[HINTS].find().to_list()
    assert announced_changes(hint) == [(i, [sent[i]["_id"]]) for i in ids]
    for i in ids[:2]:
        await db["emails"].update_one({"_id": i}, with_events({"$set": {"s": 1}}, [sent[i]]))
    publisher = EventPublisher(db, clock=clock)
    assert await publisher.run() == 2
    # g3's write is still in flight: a hint of g3 alone replaces the group's, with its time.
    [rest] = await db[HINTS].find().to_list()
    assert announced_changes(rest) == [("g3", [sent["g3"]["_id"]])]
    assert rest["at"] == hint["at"]
    assert await publisher.run() == 0
    assert [h["_id"] async for h in db[HINTS].find()] == [rest["_id"]]
    await db["emails"].update_one({"_id": "g3"}, with_events({"$set": {"s": 1}}, [sent["g3"]]))
    assert await publisher.run() == 1
    assert await db[HINTS].count_documents({}) == 0
    assert {d["_id"] async for d in db[EVENTS].find()} == {e["_id"] for e in sent.values()}


async def test_a_one_change_hint_of_an_earlier_version_is_still_published(
    db: AsyncDatabase[Document],
) -> None:
    # A database upgraded with hints in flight: the one-change shape earlier versions wrote.
    sent = event("sent", START, "e1")
    await db["emails"].insert_one({"_id": "e1", "tenant_id": "t-1", OUTBOX_FIELD: [sent]})
    await db[HINTS].insert_one(
        {"_id": sent["_id"], "email_id": "e1", "event_ids": [sent["_id"]], "at": START}
    )
    assert await EventPublisher(db, clock=ManualClock(START)).run() == 1
    assert await db[HINTS].count_documents({}) == 0
    assert await db[EVENTS].count_documents({"_id": sent["_id"]}) == 1


async def test_copy_outbox_saves_events_of_an_email_about_to_be_removed(
    db: AsyncDatabase[Document],
) -> None:
    # Whoever removes an email hands its document over first: nothing recorded is lost.
    doc = {"_id": "e9", OUTBOX_FIELD: [event("accepted", START, "e9"), event("sent", START, "e9")]}
    publisher = EventPublisher(db, clock=ManualClock(START))
    assert await publisher.copy_outbox([doc]) == 2
    assert await publisher.copy_outbox([doc]) == 0
    assert await db[EVENTS].count_documents({"emailId": "e9"}) == 2


async def test_concurrent_publishers_store_each_event_once(db: AsyncDatabase[Document]) -> None:
    # Two replicas publishing the same hints at once: one document per event.
    clock = ManualClock(START)
    ids = []
    for n in range(30):
        events = [event("accepted", START, f"e{n}"), event("sent", START, f"e{n}")]
        ids += [e["_id"] for e in events]
        await record_change(db, f"e{n}", events, now=START, status="sent", insert=True)
    a, b = EventPublisher(db, clock=clock), EventPublisher(db, clock=clock)
    await asyncio.gather(a.run(), b.run())
    assert sorted([d["_id"] async for d in db[EVENTS].find()]) == sorted(ids)
    assert await db[HINTS].count_documents({}) == 0


PUBLISHER_SCRIPT = """
import asyncio, sys
from datetime import datetime, UTC
from pymongo import AsyncMongoClient
from services.core.clock import ManualClock
from services.mail.feedback.event_log import EventPublisher

async def main() -> None:
    client = AsyncMongoClient(sys.argv[1], tz_aware=True)
    publisher = EventPublisher(client[sys.argv[2]], clock=ManualClock(datetime.now(UTC)), scan=5)
    print("ready", flush=True)
    while True:
        await publisher.run_once()

asyncio.run(main())
"""


async def test_publisher_killed_mid_run_and_rerun_stores_every_event_once(
    db: AsyncDatabase[Document], ferretdb: str
) -> None:
    # A publisher process is killed (SIGKILL) while it copies; a new one finishes the work:
    # every recorded event is stored exactly once and no hint is left.
    ids = []
    for n in range(120):
        events = [event("accepted", START, f"k{n}"), event("sent", START, f"k{n}")]
        ids += [e["_id"] for e in events]
        await record_change(db, f"k{n}", events, now=START, status="sent", insert=True)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        PUBLISHER_SCRIPT,
        ferretdb,
        db.name,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT}/gen/python"},
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    assert await process.stdout.readline() == b"ready\n"
    while await db[EVENTS].count_documents({}) < 10:  # noqa: ASYNC110 - another process writes
        await asyncio.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    await process.wait()
    copied_when_killed = await db[EVENTS].count_documents({})
    assert copied_when_killed >= 10
    await EventPublisher(db, clock=ManualClock(datetime.now(UTC))).run(rounds=100)
    assert sorted([d["_id"] async for d in db[EVENTS].find()]) == sorted(ids)
    assert await db[HINTS].count_documents({}) == 0


# --- ListEvents and retention ------------------------------------------------------------


def ts(value: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


async def stored_events(
    local_mail: LocalMail, tenant: Tenant
) -> tuple[events_pb2_grpc.EventServiceAsyncStub, list[Document]]:
    """A history of two emails of `tenant` (plus another tenant's), published."""
    db = local_mail.app.running.database.db
    t = tenant.id
    history = [
        event("accepted", START, "e1", tenant_id=t, tags=["welcome"], metadata={"u": "1"}),
        event("accepted", START + timedelta(seconds=1), "e2", tenant_id=t, domain="other.example"),
        event(
            "deferred",
            START + timedelta(seconds=2),
            "e1",
            tenant_id=t,
            tags=["welcome"],
            recipient="Bob@example.org",
            smtp=SmtpFacts(451, "4.2.0", "busy"),
        ),
        event(
            "sent",
            START + timedelta(seconds=3),
            "e1",
            tenant_id=t,
            tags=["welcome"],
            recipient="Bob@example.org",
        ),
        event(
            "bounced",
            START + timedelta(seconds=4),
            "e2",
            tenant_id=t,
            domain="other.example",
            recipient="ann@example.org",
            smtp=SmtpFacts(550, "5.1.1", "unknown"),
        ),
        event("accepted", START + timedelta(seconds=5), "e3", tenant_id="someone-else"),
    ]
    outboxes: dict[str, list[Document]] = {}
    for e in history:
        outboxes.setdefault(e["emailId"], []).append(e)
    await EventPublisher(db, clock=local_mail.clock).copy_outbox(
        [{"_id": k, OUTBOX_FIELD: v} for k, v in outboxes.items()]
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{local_mail.app.running.port}")
    local_mail.app.running.channels.append(channel)
    return events_pb2_grpc.EventServiceStub(channel), history


async def test_list_events_filters_newest_first(local_mail: LocalMail, tenant: Tenant) -> None:
    # Each filter alone and combined; newest first; another tenant's events never show.
    stub, h = await stored_events(local_mail, tenant)

    async def ids(**filters: object) -> list[str]:
        answer = await stub.ListEvents(
            events_pb2.ListEventsRequest(**filters),  # type: ignore[arg-type]
            metadata=tenant.metadata,
        )
        return [e.id for e in answer.events]

    mine = [e["_id"] for e in h[:5]]
    assert await ids() == mine[::-1]
    assert await ids(type="accepted") == [mine[1], mine[0]]
    assert await ids(email_id="e1") == [mine[3], mine[2], mine[0]]
    assert await ids(recipient="Bob@EXAMPLE.org") == [mine[3], mine[2]]
    assert await ids(recipient="bob@example.org") == []
    assert await ids(domain="Other.Example") == [mine[4], mine[1]]
    assert await ids(tag="welcome") == [mine[3], mine[2], mine[0]]
    assert await ids(tag="welcome", type="sent") == [mine[3]]
    assert await ids(email_id="e2", type="bounced") == [mine[4]]
    window = {
        "start_time": ts(START + timedelta(seconds=1)),
        "end_time": ts(START + timedelta(seconds=3)),
    }
    assert await ids(**window) == [mine[2], mine[1]]
    assert await ids(tag="welcome", **window) == [mine[2]]
    # Times before 1970 (which no event id can carry) are valid filters, not errors.
    long_ago = datetime(306, 1, 7, tzinfo=UTC)
    assert await ids(end_time=ts(long_ago)) == []
    assert await ids(start_time=ts(long_ago)) == mine[::-1]
    answer = await stub.ListEvents(
        events_pb2.ListEventsRequest(type="deferred"), metadata=tenant.metadata
    )
    (deferred,) = answer.events
    assert deferred.tenant_id == tenant.id
    assert deferred.recipient == "Bob@example.org"
    assert list(deferred.tags) == ["welcome"]
    assert (deferred.smtp.code, deferred.smtp.enhanced_code) == (451, "4.2.0")
    assert deferred.occurred_at.ToDatetime(tzinfo=UTC) == START + timedelta(seconds=2)
    other = new_tenant(local_mail.settings)
    assert (
        await stub.ListEvents(events_pb2.ListEventsRequest(), metadata=other.metadata)
    ).events == []


async def test_list_events_pages(local_mail: LocalMail, tenant: Tenant) -> None:
    # Pages of two follow each other without gaps or repeats; a token is bound to its filters.
    stub, h = await stored_events(local_mail, tenant)
    seen: list[str] = []
    token = ""
    while True:
        page = await stub.ListEvents(
            events_pb2.ListEventsRequest(page_size=2, page_token=token), metadata=tenant.metadata
        )
        seen += [e.id for e in page.events]
        token = page.next_page_token
        if not token:
            break
        assert len(page.events) == 2
    assert seen == [e["_id"] for e in h[:5]][::-1]
    first = await stub.ListEvents(
        events_pb2.ListEventsRequest(page_size=1), metadata=tenant.metadata
    )
    failure = await failure_of(
        stub.ListEvents(
            events_pb2.ListEventsRequest(page_token=first.next_page_token, type="sent"),
            metadata=tenant.metadata,
        )
    )
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(failure.field_violations) == {"pageToken"}


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"type": "opened"}, "type"),
        ({"recipient": "not an address"}, "recipient"),
        ({"domain": "bad domain!"}, "domain"),
        ({"page_token": "garbage"}, "pageToken"),
        ({"page_size": -1}, "pageSize"),
        ({"start_time": ts(START), "end_time": ts(START)}, "endTime"),
    ],
)
async def test_list_events_refuses_bad_filters_naming_the_field(
    local_mail: LocalMail, tenant: Tenant, request_fields: dict[str, object], field: str
) -> None:
    # Every bad filter is INVALID_ARGUMENT naming its field (JSON spelling).
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{local_mail.app.running.port}")
    local_mail.app.running.channels.append(channel)
    stub = events_pb2_grpc.EventServiceStub(channel)
    failure = await failure_of(
        stub.ListEvents(
            events_pb2.ListEventsRequest(**request_fields),  # type: ignore[arg-type]
            metadata=tenant.metadata,
        )
    )
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(failure.field_violations) == {field}


async def test_retention_sweeps_only_old_events(db: AsyncDatabase[Document]) -> None:
    # Events (and their tag keys) older than the retention go; younger ones stay; bounded runs.
    clock = ManualClock(START + timedelta(days=30))
    old = [event("sent", START - timedelta(minutes=n), f"o{n}", tags=["t"]) for n in range(1, 50)]
    young = [event("sent", START + timedelta(minutes=1), "y1", tags=["t"])]
    await EventPublisher(db, clock=clock).copy_outbox(
        [{"_id": e["emailId"], OUTBOX_FIELD: [e]} for e in (*old, *young)]
    )
    store = EventStore(
        db, clock=clock, retention=timedelta(days=30), default_page_size=50, max_page_size=200
    )
    assert await store.sweep() == len(old)
    assert [d["_id"] async for d in db[EVENTS].find()] == [young[0]["_id"]]
    assert [d["eventId"] async for d in db[TAG_KEYS].find()] == [young[0]["_id"]]
    page = await store.page(tenant_id="t-1", filter=EventFilter(tag="t"), size=0, page_token="")
    assert [e["_id"] for e in page.events] == [young[0]["_id"]]


# --- every query is served by an index on the embedded database ---------------------------

LO, HI = "evt_01KAAAAAAA0000000000000000", "evt_01KZZZZZZZ0000000000000000"
HOT = [
    ("events", {"tenantId": "t-1"}, {"_id": -1}, "events_tenant_newest", True),
    ("events", {"tenantId": "t-1", "_id": {"$lt": HI}}, {"_id": -1}, "events_tenant_newest", True),
    ("events", {"tenantId": "t-1", "type": "sent"}, {"_id": -1}, "events_tenant_type", True),
    ("events", {"tenantId": "t-1", "emailId": "e1"}, {"_id": -1}, "events_tenant_emailId", True),
    (
        "events",
        {"tenantId": "t-1", "recipient": "a0@x.example", "_id": {"$gte": LO, "$lt": HI}},
        {"_id": -1},
        "events_tenant_recipient",
        True,
    ),
    (
        "events",
        {"tenantId": "t-1", "domain": "x.example"},
        {"_id": -1},
        "events_tenant_domain",
        True,
    ),
    ("events", {"occurredAt": {"$lt": START}}, {"occurredAt": 1}, "events_age", True),
    ("event_tags", {"tenantId": "t-1", "tag": "a"}, {"eventId": -1}, "event_tags_newest", True),
    ("event_hints", {"at": {"$lte": START}}, {"at": 1}, "event_hint_age", True),
    ("suppressions", {"tenantId": "t-1"}, {"_id": 1}, "suppressions_tenant", True),
    (
        "suppressions",
        {"tenantId": "t-1", "_id": {"$gte": "t-1|ab", "$lt": "t-1|ab\U0010ffff"}},
        {"_id": 1},
        "suppressions_tenant",
        True,
    ),
    (
        "suppressions",
        {"tenantId": "t-1", "reason": "manual"},
        {"_id": 1},
        "suppressions_tenant_reason",
        True,
    ),
    (
        "suppressions",
        {"tenantId": "t-1", "domain": "x.example"},
        {"_id": 1},
        "suppressions_tenant_domain",
        True,
    ),
    ("suppressions", {"expiresAt": {"$lt": START}}, {"expiresAt": 1}, "suppressions_expiry", True),
]


@pytest.mark.parametrize(("coll", "flt", "sort", "index", "sorted_"), HOT)
async def test_queries_use_an_index_on_the_embedded_database(
    db: AsyncDatabase[Document], coll: str, flt: Document, sort: Document, index: str, sorted_: bool
) -> None:
    # The shapes ListEvents, the publisher, the sweepers and the suppression list issue are
    # answered from their index (no table scan, no temporary sort) by the local FerretDB build.
    history = [
        event(
            "sent",
            START + timedelta(seconds=n),
            f"e{n}",
            tags=["a"],
            domain="x.example",
            # Whole-email events (no recipient) mixed with recipient events, as in real life.
            recipient="a0@x.example" if n % 2 else None,
        )
        for n in range(5)
    ]
    await EventPublisher(db, clock=ManualClock(START)).copy_outbox(
        [{"_id": "e", OUTBOX_FIELD: history}]
    )
    await EventRecorder(db).announce([Change("e", history)], now=START)
    await db["suppressions"].insert_one(
        {
            "_id": "t-1|ab@x.example",
            "tenantId": "t-1",
            "address": "ab@x.example",
            "domain": "x.example",
            "reason": "manual",
            "createdAt": START,
            "expiresAt": START,
        }
    )
    plan = await db.command("explain", {"find": coll, "filter": flt, "sort": sort, "limit": 20})
    lines = " ".join(plan["queryPlanner"]["Plan"])
    used = lines.split("USING INDEX ")[1].split(" ")[0] if "USING INDEX " in lines else ""
    assert used.endswith(f"_{index}"), lines
    assert "SCAN" not in lines, lines
    assert "TEMP B-TREE" not in lines, lines
    assert plan["filterPushdown"] is True
    assert plan["sortPushdown"] is sorted_
