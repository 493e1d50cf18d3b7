"""Events: the pure builder of event documents, and how they are recorded with a state change.

An event document (collection ``events``, shape fixed by the events contract, docs/events.md)
is built by `build_event`: ``_id`` = ``evt_`` + a ULID whose time part is ``occurredAt``
(to the millisecond, which is also all a BSON date keeps), so ids sort as times do.

Recording: an event is recorded with the state change it reports; a process killed between
the two leaves neither or both. The argument, on what MongoDB 7 and FerretDB 1.24 both
guarantee (no multi-document transactions; a single-document write is all or nothing on both):

1. **The state change carries its events.** The one update that changes an email's status
   (or a recipient's) also pushes the event documents onto the email's ``event_outbox``
   array (`with_events` merges that ``$push`` into the caller's update). One document, one
   write: it lands with its events or not at all. This is the guarantee; everything after it
   only copies.
2. **A hint, written before.** The publisher must find emails whose outbox holds events not
   yet copied, through an index. The email document cannot carry a "pending" flag that the
   publisher clears: FerretDB 1.24 applies an update as read, modify, write back the whole
   document, not atomically (docs/data-layer.md), so a publisher writing the email while a
   worker records an outcome could write back the older document and erase the outcome
   (measured on the local build: 4 clients pushing onto and 4 pulling from the same 100
   documents lost 27 of 400 pushes).
   The publisher therefore never writes an email. Instead, before the state-change write,
   the writer inserts a small hint (`EventRecorder.announce`, collection ``event_hints``: per
   change the email id and event ids, one document for a group of changes written together,
   and the time). A kill after the hint and before
   the update leaves a hint for events that never happened: the publisher finds no such ids in
   the outbox and drops the hint once it is older than the longest a write can be in flight
   (`abandon_after`); nothing is published. A kill after the update leaves both.
3. **The publisher copies, idempotently.** `EventPublisher.run_once` reads hints oldest first
   (index on ``at``), reads their emails by ``_id``, inserts every outbox event not yet in
   ``events`` with ``_id`` = the event id (a repeated insert is a duplicate-key no-op, so a
   publisher killed anywhere and run again, or two publishers at once, store each event once),
   and only then deletes the hints whose events it found. Tag keys (``event_tags``, for the
   events API's tag filter) are written before their event, so an event is never listed
   without them.
4. **A safety net for the pathological case.** A write that stays in flight longer than
   `abandon_after` (a worker whose database connection hung) lands after its hint was dropped:
   its events sit in the outbox undiscovered until the email's next change (the publisher
   copies the whole outbox of every email it reads) or until the email is removed: whoever
   removes an email first calls `EventPublisher.copy_outbox` with its document.

The outbox stays in the email document (entries are never pulled: that would be a second
writer, see 2); it is bounded by the email's state changes and leaves with the email.
Readers (events API, webhook dispatcher) read ``events`` only and rely on nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import ASCENDING
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

from services.core.clock import Clock
from services.core.ids import new_ulid
from services.core.mongo import MAX_WRITE_BATCH, Document, IndexSpec, chunked

log = logging.getLogger(__name__)

EVENTS = "events"
HINTS = "event_hints"
TAG_KEYS = "event_tags"
# The email document's array of recorded events (copied to `events` by the publisher).
OUTBOX_FIELD = "event_outbox"
EVENT_ID_PREFIX = "evt_"

# Every event type of the contract: email and recipient state changes, then endpoint events.
EMAIL_EVENT_TYPES = frozenset(
    {
        "accepted",
        "scheduled",
        "rescheduled",
        "cancelled",
        "sent",
        "deferred",
        "bounced",
        "failed",
        "suppressed",
        "resent",
        "complained",
    }
)
ENDPOINT_EVENT_TYPES = frozenset({"webhook.disabled"})
EVENT_TYPES = EMAIL_EVENT_TYPES | ENDPOINT_EVENT_TYPES

INDEXES = (IndexSpec(HINTS, [("at", ASCENDING)], "event_hint_age"),)


@dataclass(frozen=True, slots=True)
class SmtpFacts:
    """The relay's reply an event reports."""

    code: int
    enhanced_code: str
    message: str


def to_millis(at: datetime) -> datetime:
    """`at` in UTC, naive, cut to the millisecond (what a BSON date keeps)."""
    if at.tzinfo is not None:
        at = at.astimezone(UTC).replace(tzinfo=None)
    return at.replace(microsecond=at.microsecond // 1000 * 1000)


def build_event(
    *,
    type: str,
    occurred_at: datetime,
    tenant_id: str,
    domain: str,
    email_id: str | None = None,
    recipient: str | None = None,
    tags: Sequence[str] = (),
    metadata: Mapping[str, str] | None = None,
    smtp: SmtpFacts | None = None,
    reason: str | None = None,
    webhook_id: str | None = None,
    test: bool = False,
) -> Document:
    """One event document of the contract (pure: no I/O; the id is new each call).

    Args:
        type: one of `EVENT_TYPES`.
        occurred_at: when the state change happened (kept to the millisecond, in UTC).
        tenant_id: the owning tenant.
        domain: the sender (From) domain.
        email_id: the email; None only for endpoint events (``webhook.*``).
        recipient: the recipient address as stored, when the event concerns one recipient.
        tags: the email's tags.
        metadata: the email's metadata.
        smtp: the relay's reply, when there was one.
        reason: a human reason (cancel reason, suppression reason, ...).
        webhook_id: the endpoint concerned (``webhook.*`` events only).
        test: an event of a test email (simulated, never relayed): stored and shown as
            ``test: true``; live events carry no ``test`` field.

    Raises:
        ValueError: an unknown type, or an email event without email id (a programming error).
    """
    if type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {type!r}")
    if type in EMAIL_EVENT_TYPES and not email_id:
        raise ValueError(f"a {type!r} event needs the email id")
    at = to_millis(occurred_at)
    doc: Document = {
        "_id": EVENT_ID_PREFIX + new_ulid(at),
        "tenantId": tenant_id,
        "type": type,
        "occurredAt": at,
        "domain": domain,
        "tags": list(tags),
        # Pairs, not a sub-document: the email's metadata keys may hold "$" or "." (which the
        # embedded database refuses as field names), as the email document stores them.
        "metadata": [{"k": k, "v": v} for k, v in (metadata or {}).items()],
    }
    if email_id:
        doc["emailId"] = email_id
    if recipient:
        doc["recipient"] = recipient
    if smtp is not None:
        doc["smtp"] = {
            "code": smtp.code,
            "enhancedCode": smtp.enhanced_code,
            "message": smtp.message,
        }
    if reason:
        doc["reason"] = reason
    if webhook_id:
        doc["webhookId"] = webhook_id
    if test:
        doc["test"] = True
    return doc


def metadata_of(event: Mapping[str, Any]) -> dict[str, str]:
    """An event document's metadata as a mapping (stored as ``[{k, v}]`` pairs)."""
    stored = event.get("metadata") or []
    if isinstance(stored, dict):  # documents written before the pairs form
        return {str(k): str(v) for k, v in stored.items()}
    return {str(p["k"]): str(p["v"]) for p in stored}


def with_events(update: Document, events: Sequence[Document]) -> Document:
    """`update` (a state-change update of one email) that also records `events`.

    Returns a new update document: the caller's operators, plus ``$push`` of the events onto
    the email's outbox (merged with a ``$push`` the update already has). Apply it with the
    single ``update_one``/``UpdateOne`` that makes the state change, after `announce`.

    Raises:
        ValueError: the update already pushes onto the outbox.
    """
    merged = {op: dict(fields) for op, fields in update.items()}
    push = merged.setdefault("$push", {})
    if OUTBOX_FIELD in push:
        raise ValueError("the update already records events")
    push[OUTBOX_FIELD] = {"$each": list(events)}
    return merged


@dataclass(frozen=True, slots=True)
class Change:
    """One state change about to be written: the email and the events it records."""

    email_id: str
    events: Sequence[Document]


class EventRecorder:
    """The writer's side: hints before state-change writes (see the module docstring)."""

    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self._hints = db[HINTS]

    async def announce(self, changes: Sequence[Change], *, now: datetime) -> None:
        """Insert the hints of `changes`, before the writes that apply them.

        One hint document announces up to `MAX_WRITE_BATCH` changes (a group commit of
        outcomes, a batch send), and they go in one insert: every hint is a document written
        and later deleted, with its index entry, and one per change cost the embedded database
        two writes per delivered email. Its ``_id`` is the first event's, so a hint repeated by
        a retry is a duplicate-key no-op.

        Raises:
            PyMongoError: the database failed (apply no change then: its hint may be missing).
        """
        announced = [
            {"email_id": change.email_id, "event_ids": [e["_id"] for e in change.events]}
            for change in changes
            if change.events
        ]
        docs = [
            {"_id": part[0]["event_ids"][0], "changes": list(part), "at": now}
            for part in chunked(announced)
        ]
        if docs:
            await insert_new(self._hints, docs)


def announced_changes(hint: Document) -> list[tuple[str, list[str]]]:
    """(email id, event ids) of every change a hint announces.

    Also reads the one-change hints (``email_id``, ``event_ids`` at the top) that earlier
    versions wrote, which a database being upgraded may still hold.
    """
    if "changes" in hint:
        return [(c["email_id"], list(c["event_ids"])) for c in hint["changes"]]
    return [(hint["email_id"], list(hint["event_ids"]))]


async def insert_new(collection: AsyncCollection[Document], docs: Sequence[Document]) -> int:
    """Insert `docs`, skipping those whose ``_id`` exists; how many were new.

    Raises:
        BulkWriteError: a write failed for another reason than a duplicate key.
    """
    if not docs:
        return 0
    try:
        result = await collection.insert_many(list(docs), ordered=False)
        return len(result.inserted_ids)
    except BulkWriteError as exc:
        errors = exc.details.get("writeErrors", [])
        if any(e.get("code") != 11000 for e in errors):
            raise
        return int(exc.details.get("nInserted", len(docs) - len(errors)))


def tag_keys(event: Document) -> list[Document]:
    """The ``event_tags`` documents of an event: one per tag, with the event's filter fields."""
    keys = []
    for tag in sorted(set(event.get("tags", []))):
        key: Document = {
            "_id": f"{event['tenantId']}|{tag}|{event['_id']}",
            "tenantId": event["tenantId"],
            "tag": tag,
            "eventId": event["_id"],
            "occurredAt": event["occurredAt"],
            "type": event["type"],
        }
        for name in ("emailId", "recipient", "domain"):
            if name in event:
                key[name] = event[name]
        keys.append(key)
    return keys


class EventPublisher:
    """Copies outbox events into ``events`` (see the module docstring), in bounded runs."""

    def __init__(
        self,
        db: AsyncDatabase[Document],
        *,
        clock: Clock,
        abandon_after: timedelta = timedelta(minutes=30),
        scan: int = 200,
    ) -> None:
        """A publisher over the mail service's database.

        Args:
            db: the mail service's database.
            clock: time source.
            abandon_after: a hint whose events are still not in their email's outbox after
                this long belongs to a change that never happened (its writer died): dropped.
            scan: the most hints one run reads.
        """
        self._db = db
        self._events = db[EVENTS]
        self._tags = db[TAG_KEYS]
        self._hints = db[HINTS]
        self._emails = db["emails"]
        self._clock = clock
        self._abandon_after = abandon_after
        self._scan = scan
        self._last_read = 0

    async def run(self, *, rounds: int = 10) -> int:
        """`run_once` again while runs find a full scan of hints, at most `rounds` times."""
        stored = 0
        for _ in range(rounds):
            stored += await self.run_once()
            if self._last_read < self._scan:
                break
        return stored

    async def run_once(self) -> int:
        """Publish what the oldest hints announce; how many events this run stored.

        Hints whose events were not found and are younger than `abandon_after` stay for a
        later run (their state change is still being written).
        """
        now = self._clock.now()
        cursor = self._hints.find({"at": {"$lte": now}}).sort("at", ASCENDING).limit(self._scan)
        hints = [doc async for doc in cursor]
        self._last_read = len(hints)
        stored = 0
        for part in chunked(hints):
            stored += await self._publish(list(part), now)
        return stored

    async def _publish(self, hints: list[Document], now: datetime) -> int:
        announced = {h["_id"]: announced_changes(h) for h in hints}
        email_ids = sorted({eid for changes in announced.values() for eid, _ in changes})
        emails = []
        for part in chunked(email_ids):
            emails += [
                doc
                async for doc in self._emails.find(
                    {"_id": {"$in": list(part)}}, {OUTBOX_FIELD: 1, "tenant_id": 1}
                )
            ]
        stored = await self.copy_outbox(emails)
        outboxes = {doc["_id"]: {e["_id"] for e in doc.get(OUTBOX_FIELD, [])} for doc in emails}
        done = []
        rest = []
        for hint in hints:
            # A hint goes once every change it announces is found; a change still being
            # written keeps a hint for the next run, which copies idempotently.
            changes = announced[hint["_id"]]
            missing = [(e, v) for e, v in changes if not set(v) <= outboxes.get(e, set())]
            if not missing:
                done.append(hint["_id"])
            elif _aware(hint["at"]) <= _aware(now) - self._abandon_after:
                log.warning(
                    "event hint dropped: its state change never landed",
                    extra={
                        "fields": {"changes": [{"email_id": e, "events": v} for e, v in missing]}
                    },
                )
                done.append(hint["_id"])
            elif len(missing) < len(changes):
                # Some changes landed: a hint of the missing ones alone replaces it, so that a
                # change that never lands does not have the whole group re-read until it is
                # abandoned. Its _id follows from what it holds (two publishers write the same
                # document), its time stays the original's.
                rest.append(_remaining_hint(missing, hint["at"]))
                done.append(hint["_id"])
        if rest:
            # Before the originals go: a crash in between leaves both, never neither.
            await insert_new(self._hints, rest)
        if done:
            # One command for the group (the caller's slice is `chunked`), not one per hint.
            await self._hints.delete_many({"_id": {"$in": done}})
        return stored

    async def copy_outbox(self, emails: Sequence[Document]) -> int:
        """Store every event in these email documents' outboxes that ``events`` lacks.

        Also what removes an email (retention, delete) calls with its document first, so that
        no recorded event is lost with it. Idempotent; safe to run concurrently.

        Returns:
            How many events were stored by this call.
        """
        entries = [e for doc in emails for e in doc.get(OUTBOX_FIELD, [])]
        stored = 0
        for part in chunked(entries):
            ids = [e["_id"] for e in part]
            present = {d["_id"] async for d in self._events.find({"_id": {"$in": ids}}, {"_id": 1})}
            missing = [e for e in part if e["_id"] not in present]
            keys = [k for e in missing for k in tag_keys(e)]
            # Tag keys first: an event is never listed by tag without its key.
            for key_part in chunked(keys, MAX_WRITE_BATCH):
                await insert_new(self._tags, key_part)
            stored += await insert_new(self._events, missing)
        return stored


def _remaining_hint(missing: list[tuple[str, list[str]]], at: datetime) -> Document:
    """The hint of the changes of a hint that have not landed yet (see `EventPublisher`)."""
    return {
        "_id": f"{missing[0][1][0]}+{len(missing)}",
        "changes": [{"email_id": e, "event_ids": v} for e, v in missing],
        "at": at,
    }


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo else at.replace(tzinfo=UTC)
