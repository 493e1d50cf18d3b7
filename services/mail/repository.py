"""The API's storage of emails: accept, read, list, cancel, reschedule, delete, count.

What the use cases (`services.mail.manager`) read and change; the delivery queue itself (due
entries, leases, attempt outcomes) is the queue engine's (`services.mail.queue`), which this
storage asks to add, move or drop an email's entry, and whose leases say whether a worker is
on an email. Email documents are built in `services.mail.documents`; every change of state
goes through one transition decided by `services.mail.outcomes` and written with
`documents.transition_update`.

* ``emails`` (`services.mail.documents`); writes of a change win a transition claim first.
* ``email_idempotency``: ``_id`` = tenant + key; insert-first, so concurrent duplicates meet on
  the unique ``_id``. Expired records are removed by our sweeper (no TTL index: FerretDB).
* ``email_contents``: the built message of each email under the inline limit, by email id,
  out of the email document (`services.mail.documents`). Written before the email, with the
  queue entries, removed after it.
* GridFS bucket ``email_content``: built messages above the inline limit (FerretDB 1.24 serves
  GridFS: it is two ordinary collections, ``files`` and ``chunks`` of 255 KiB).
* ``email_tallies``: stats counts kept as mail flows, one writer per document
  (`services.mail.tallies`).
FerretDB 1.24 has no transactions: the writes of one step go in an order where a crash between
them leaves work to redo, never work lost.

Reads of this module, and the index that serves each (the same declared index serves it on
MongoDB 7; on FerretDB through the local build's pushdown of equality, range, sort and limit on
indexed scalar fields):

* GetEmail and every read of one email: ``{_id}`` (primary key);
* ListEmails by recipient or tag: ``{tenant_id, recipient_addresses | tags, _id < page}``
  sorted by ``_id`` descending (``tenant_recipient_newest_multikey``,
  ``tenant_tag_newest_multikey``: multikey indexes, which the embedded database keeps as side
  tables with a row per array element, docs/data-layer.md);
* GetEmailStats: ``email_tallies`` ``{tenant_id, g, bucket range}`` (``tally_window``), at most
  five ranges, plus the emails of the window's ragged seconds ``{tenant_id, created_at range}``
  (``tenant_created``);
* GetEmailStats' queue depth and oldest due time: ``{tenant_id, status, next_attempt_at <= now}``
  per waiting status (``tenant_due``): the tenant's backlog, not its stored mail;
* retention: ``{status, updated_at < cutoff}`` sorted by ``updated_at`` (``finished_age``),
  40 at a time; test emails' shorter retention: ``{test: true, updated_at < cutoff}``
  (``test_age``); the other sweepers: one indexed time field each (`delete_older`).

Test emails live in their tenant's test partition (`documents.partition`): each tenant-scoped
query above names the partition it reads (live, or test when asked), on the same indexes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from bson import ObjectId
from gridfs.asynchronous import AsyncGridFSBucket
from gridfs.errors import NoFile
from pymongo import ASCENDING, DESCENDING, DeleteOne
from pymongo.asynchronous.database import AsyncDatabase

from services.core.clock import SystemClock
from services.core.errors import Conflict, NotFound
from services.core.mongo import (
    MAX_WRITE_BATCH,
    Document,
    IndexSpec,
    chunked,
    delete_older,
    reserve_expiring,
)
from services.mail import outcomes
from services.mail.documents import (
    API_VIEW,
    CLAIMS,
    CONTENT_BUCKET,
    CONTENTS,
    EMAILS,
    IDEMPOTENCY,
    NO_CONTENT,
    QUEUE,
    belongs_to,
    content_doc,
    email_doc,
    email_from_doc,
    feed_events,
    insert_many_unique,
    partition,
    transition_update,
)
from services.mail.feedback.event_log import OUTBOX_FIELD, Change, EventPublisher, EventRecorder
from services.mail.feedback.suppression_store import SuppressionList
from services.mail.group_commit import GroupCommit
from services.mail.models import FINISHED, UNFINISHED, Email, EmailFilter, Event
from services.mail.queue import INDEXES as QUEUE_INDEXES
from services.mail.queue import MongoDeliveryQueue, queue_entry, read_content
from services.mail.tallies import FINEST, Tallies, ceil_to, floor_to
from services.mail.tallies import INDEXES as TALLY_INDEXES

# A new email's writes: its queue entry (None: nothing to deliver), its ``email_contents``
# document (None: content in GridFS) and its document.
_NewEmail = tuple[Document | None, Document | None, Document]
# Called with a group of new emails before their documents are written (may change them).
Screen = Callable[[Sequence[Email]], Awaitable[None]]
# Collections of earlier versions that nothing reads any more, dropped at start-up
# (`ensure_indexes`): ``email_keys`` held a document per recipient and tag of every email for
# ListEmails' recipient and tag filters before multikey indexes served them, and
# ``email_migrations`` its backfill's position.
RETIRED_COLLECTIONS = ("email_keys", "email_migrations")
_WAITING = [s.value for s in outcomes.WAITING]
_CLAIMABLE = [s.value for s in outcomes.CLAIMABLE]

INDEXES = (
    # The queue poll's index before the queue had its own collection; no query uses it now.
    IndexSpec(EMAILS, [("status", ASCENDING), ("next_attempt_at", ASCENDING)], "due", retired=True),
    IndexSpec(EMAILS, [("tenant_id", ASCENDING), ("_id", DESCENDING)], "tenant_newest"),
    IndexSpec(EMAILS, [("tenant_id", ASCENDING), ("created_at", ASCENDING)], "tenant_created"),
    # ListEmails filtered by status or domain: equality prefix, then newest first by _id, so the
    # embedded database streams the page from the index (docs/data-layer.md).
    IndexSpec(
        EMAILS,
        [("tenant_id", ASCENDING), ("status", ASCENDING), ("_id", DESCENDING)],
        "tenant_status_newest",
    ),
    IndexSpec(
        EMAILS,
        [("tenant_id", ASCENDING), ("domain_id", ASCENDING), ("_id", DESCENDING)],
        "tenant_domain_newest",
    ),
    # A tenant's queue depth (GetEmailStats' queue figures, delivery health): status $in, then
    # the due range.
    IndexSpec(
        EMAILS,
        [("tenant_id", ASCENDING), ("status", ASCENDING), ("next_attempt_at", ASCENDING)],
        "tenant_due",
    ),
    IndexSpec(IDEMPOTENCY, [("expires_at", ASCENDING)], "idempotency_expiry"),
    # Retention: finished emails in the order they finished (updated_at is the last write).
    IndexSpec(EMAILS, [("status", ASCENDING), ("updated_at", ASCENDING)], "finished_age"),
    # Test emails' own, shorter retention: test emails by their last write.
    IndexSpec(EMAILS, [("test", ASCENDING), ("updated_at", ASCENDING)], "test_age"),
    # ListEmails by recipient or tag: newest first among the emails holding the address or
    # tag in the array. Multikey on MongoDB as any index on an array; on the embedded database
    # the "_multikey" name asks for a side table with one row per element (docs/data-layer.md).
    IndexSpec(
        EMAILS,
        [("tenant_id", ASCENDING), ("recipient_addresses", ASCENDING), ("_id", DESCENDING)],
        "tenant_recipient_newest_multikey",
    ),
    IndexSpec(
        EMAILS,
        [("tenant_id", ASCENDING), ("tags", ASCENDING), ("_id", DESCENDING)],
        "tenant_tag_newest_multikey",
    ),
    # The queue engine's and the stats counts': this storage writes through both.
    *QUEUE_INDEXES,
    *TALLY_INDEXES,
)


@dataclass(frozen=True, slots=True)
class LateChange:
    """What `MongoEmailRepository.change_finished` did to an email."""

    email: Email  # as stored after the change
    written: list[Document]  # the events the change recorded now (their feed documents)
    recorded: list[Document]  # the events the email had recorded before (its outbox)


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    """The first request made with a key."""

    tenant_id: str
    key: str
    fingerprint: str
    email_id: str
    expires_at: datetime


class EmailRepository(Protocol):
    """Tenant-scoped storage of emails: what the API reads and changes."""

    async def insert(self, *, email: Email, screen: Screen | None = None) -> bool:
        """Store a new email (content included). False when its id already exists.

        `screen`, if given, is awaited with the emails about to be written together (this one
        among them) before their documents are, and may change them (the suppression check):
        what is stored is the email as the screen left it.
        """
        ...

    async def insert_many(self, *, emails: Sequence[Email]) -> list[bool]:
        """Store new emails with a few commands (chunks); which went in (False: id taken)."""
        ...

    async def get(self, *, tenant_id: str, email_id: str, now: datetime | None = None) -> Email:
        """The tenant's email, without content; SENDING while a live lease holds it at `now`.

        Raises:
            NotFound: no such email in this tenant.
        """
        ...

    async def page(
        self, *, tenant_id: str, filter: EmailFilter, before_id: str | None, limit: int
    ) -> list[Email]:
        """A page of the tenant's emails, newest first (ids are time-ordered)."""
        ...

    async def content(self, *, email: Email) -> bytes:
        """The built message of an email."""
        ...

    async def sweep_claims(self, *, before: datetime) -> int:
        """Forget claim bookkeeping older than `before`."""
        ...

    async def sweep_finished(
        self,
        *,
        now: datetime,
        retention: Callable[[str], timedelta],
        shortest: timedelta,
        batches: int = 25,
    ) -> int:
        """Remove finished emails whose tenant's retention has passed since they finished."""
        ...

    async def sweep_test(self, *, now: datetime, retention: timedelta, batches: int = 25) -> int:
        """Remove finished test emails whose last change is older than `retention`."""
        ...

    async def sweep_tallies(self, *, before: datetime) -> int:
        """Remove stats counts of creation buckets before `before`."""
        ...

    async def cancel(self, *, tenant_id: str, email_id: str, event: Event) -> Email | None:
        """Cancel an unfinished email that no live lease holds; None otherwise.

        Queued, scheduled or deferred, and no worker delivering it at the event's time.
        """
        ...

    async def reschedule(
        self,
        *,
        tenant_id: str,
        email_id: str,
        start: datetime,
        scheduled: bool,
        expires_at: datetime,
        event: Event,
    ) -> Email | None:
        """Move an unfinished email no live lease holds to `start`; None if it is not one."""
        ...

    async def delete(self, *, tenant_id: str, email_id: str) -> Email | None:
        """Remove a finished email and its content; None if it is not finished."""
        ...

    async def unfinished_ids(self, *, tenant_id: str, domain_id: str) -> list[str]:
        """Ids of the tenant's queued, scheduled or deferred emails sent from `domain_id`."""
        ...

    async def add_event(self, *, tenant_id: str, email_id: str, event: Event) -> None:
        """Append an event to an email's timeline."""
        ...

    async def stats(
        self,
        *,
        tenant_id: str,
        start: datetime,
        end: datetime,
        domain_id: str | None,
        test: bool = False,
    ) -> list[tuple[str, str, int]]:
        """(domain_id, status, count) of live (or, with `test`, test) emails of the window."""
        ...

    async def queue(
        self, *, tenant_id: str, now: datetime, domain_id: str | None, test: bool = False
    ) -> tuple[int, datetime | None]:
        """How many of the tenant's live (or test) emails are due now; the oldest due time."""
        ...

    async def queue_health(self, *, now: datetime) -> tuple[int, float]:
        """Entries due now in the whole queue, and how long the oldest has been due (s)."""
        ...


class IdempotencyRepository(Protocol):
    """Idempotency keys per tenant."""

    async def reserve(self, *, record: IdempotencyRecord, now: datetime) -> IdempotencyRecord:
        """Store `record` unless a live record holds the key; return the record that holds it.

        An expired record is replaced (the key is free again after its window).
        """
        ...

    async def release(self, *, record: IdempotencyRecord) -> None:
        """Free the key `record` reserved, if that record still holds it.

        For a request that failed before its email was stored: its key must not refuse the
        corrected retry for a whole window.
        """
        ...

    async def sweep(self, *, now: datetime) -> int:
        """Remove expired records."""
        ...


# --- MongoDB ---------------------------------------------------------------------------------


# --- MongoDB ---------------------------------------------------------------------------------


def _transition_id(doc: Document, *, removal: bool) -> str:
    """The claim that decides who makes a change of the email `doc` shows.

    A removal (delete, retention) happens once whatever the timeline says meanwhile (a RESENT
    event may be added to a finished email); other changes are claimed per timeline length.
    """
    return f"{doc['_id']}:gone" if removal else f"{doc['_id']}:v{len(doc.get('events', []))}"


async def _all_or_first_error(*writes: Awaitable[object]) -> None:
    """Run `writes` at once; once all have ended (landed or failed), raise the first failure.

    None is left running unobserved, and a caller that goes on to a dependent write after a
    failure does not race one still in flight.
    """
    results = await asyncio.gather(*writes, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


class MongoEmailRepository:
    """`EmailRepository` on MongoDB/FerretDB, large content in GridFS."""

    def __init__(
        self,
        db: AsyncDatabase[Document],
        *,
        inline_limit: int,
        queue: MongoDeliveryQueue | None = None,
        suppressions: SuppressionList | None = None,
    ) -> None:
        self._db = db
        self._recorder = EventRecorder(db)
        # Only its `copy_outbox` is used here (before an email is removed); no clock needed.
        self._outbox = EventPublisher(db, clock=SystemClock())
        self._emails = db[EMAILS]
        self._contents = db[CONTENTS]
        self._bucket = AsyncGridFSBucket(db, bucket_name=CONTENT_BUCKET)
        self._inline_limit = inline_limit
        self._inserts = GroupCommit(self._write_screened)
        # The queue engine of this process (its workers', when they run here) and the stats
        # counts both share (one writer of its own documents; see tallies).
        self.delivery_queue = queue or MongoDeliveryQueue(
            db, tallies=Tallies(db), suppressions=suppressions
        )
        self.tallies = self.delivery_queue.tallies

    async def insert(self, *, email: Email, screen: Screen | None = None) -> bool:
        """See `EmailRepository.insert`.

        Concurrent inserts are written together (`GroupCommit`): one ``insertMany`` per
        collection for every email submitted while the previous batch was being written; each
        distinct `screen` is called once with its emails of the batch, while the writes that
        precede the emails go out.
        """
        content = email.content or b""
        file_id: ObjectId | None = None
        if len(content) > self._inline_limit:
            # Content first: an email document never points at missing content. A crash
            # between the two leaves an orphan file, never a broken email.
            file_id = await self._bucket.upload_from_stream(f"{email.id}.eml", content)
            email.content_file_id = str(file_id)
            email.content = None
        try:
            stored = await self._inserts.submit((email, screen))
        except Exception:
            # (Not on cancellation: the shielded write may still store the email.)
            if file_id is not None:
                await self._bucket.delete(file_id)
            raise
        if not stored and file_id is not None:
            await self._bucket.delete(file_id)
        if stored:
            self.tallies.add(
                tenant_id=partition(email.tenant_id, email.test),
                created_at=email.created_at,
                domain_id=email.domain_id,
                status=email.status.value,
                n=1,
            )
            self.tallies.flush_soon()
        return stored

    def _count_doc(self, doc: Document, n: int) -> None:
        self.tallies.add(
            tenant_id=doc["tenant_id"],
            created_at=doc["created_at"],
            domain_id=doc["domain_id"],
            status=doc["status"],
            n=n,
        )

    async def _transition(self, doc: Document, now: datetime, *, removal: bool = False) -> bool:
        """Win the right to change an email from the state `doc` shows (False: someone did).

        A unique claim (`_transition_id`): of two concurrent cancels or reschedules of the same
        email, or two removals (API delete, retention), one writes and counts the change.
        Lives with the leases in ``email_claims`` and is swept with them (a removal that
        crashed after its claim can be made again once the claim is swept).
        """
        won = await self.delivery_queue.win_transitions(
            [_transition_id(doc, removal=removal)], now=now
        )
        return won[0]

    async def insert_many(self, *, emails: Sequence[Email]) -> list[bool]:
        """See `EmailRepository.insert_many`.

        Written in chunks of `MAX_WRITE_BATCH` documents per command (FerretDB 1.24 can hang on
        a write command of 64 or more statements), queue entries before emails as `insert`
        does; large content goes to GridFS first, one file per email.
        """
        stored: list[bool] = []
        for chunk in chunked(emails):
            items: list[_NewEmail] = []
            files: list[ObjectId | None] = []
            for email in chunk:
                content = email.content or b""
                file_id: ObjectId | None = None
                if len(content) > self._inline_limit:
                    file_id = await self._bucket.upload_from_stream(f"{email.id}.eml", content)
                    email.content_file_id = str(file_id)
                    email.content = None
                files.append(file_id)
                items.append((queue_entry(email), content_doc(email), email_doc(email)))
            verdicts = await self._write_new(items)
            for ok, file_id, email in zip(verdicts, files, chunk, strict=True):
                if not ok and file_id is not None:
                    await self._bucket.delete(file_id)
                if ok:
                    self.tallies.add(
                        tenant_id=partition(email.tenant_id, email.test),
                        created_at=email.created_at,
                        domain_id=email.domain_id,
                        status=email.status.value,
                        n=1,
                    )
            stored.extend(verdicts)
        await self.tallies.flush()
        return stored

    async def _write_screened(self, batch: list[tuple[Email, Screen | None]]) -> list[bool]:
        # The screens (one call each for its emails of this batch: the send path's suppression
        # lookup, shared by the concurrent sends written together) read while the writes that
        # come before the emails go out, made from the emails as they are: a screen rarely
        # changes an email, and the group (the send path's critical path) then reaches its
        # emails' insert one read sooner. What a screen did change is amended before the
        # emails are written (`_amend`).
        screens: dict[Screen, list[Email]] = {}
        for email, screen in batch:
            if screen is not None:
                screens.setdefault(screen, []).append(email)
        emails = [email for email, _ in batch]
        before = [(email.status, len(email.events)) for email in emails]
        items = [(queue_entry(email), content_doc(email), email_doc(email)) for email in emails]

        async def screen_all() -> None:
            for screen, group in screens.items():
                await screen(group)

        await _all_or_first_error(screen_all(), self._write_before_emails(items))
        changed = [
            i for i, email in enumerate(emails) if (email.status, len(email.events)) != before[i]
        ]
        if changed:
            await self._amend(items, emails, changed)
        return await self._insert_emails(items)

    async def _amend(self, items: list[_NewEmail], emails: list[Email], changed: list[int]) -> None:
        """Bring what went before the emails in line with what the screens changed.

        A screen only adds events and may finish an email (all its recipients suppressed):
        the added events get a hint of their own (the first hint's events are still in the
        outbox, so it is not wrong, only short), and a finished email's queue entry goes
        (left, the first claim that met it would remove it as stale).
        """
        changes: list[Change] = []
        gone: list[str] = []
        for i in changed:
            entry, body, old = items[i]
            doc = email_doc(emails[i])
            added = doc[OUTBOX_FIELD][len(old.get(OUTBOX_FIELD, [])) :]
            if added:
                changes.append(Change(doc["_id"], added))
            new_entry = queue_entry(emails[i])
            if entry is not None and new_entry is None:
                gone.append(doc["_id"])
            items[i] = (new_entry, body, doc)
        await _all_or_first_error(
            self._recorder.announce(changes, now=max(doc["created_at"] for _, _, doc in items)),
            *(self.delivery_queue.remove_entry(email_id) for email_id in gone),
        )

    async def _write_new(self, batch: list[_NewEmail]) -> list[bool]:
        await self._write_before_emails(batch)
        return await self._insert_emails(batch)

    async def _write_before_emails(self, batch: list[_NewEmail]) -> None:
        # Entries and contents before emails, as for a single email: a crash in between leaves
        # entries and contents without email (dropped together by the claimer after
        # `ORPHAN_AGE`), never an email nobody will deliver or one without its message. A
        # taken entry or content _id is a concurrent duplicate's (same idempotency key, same
        # request, same Message-ID); whether this email is the one stored is decided by the
        # email's own _id.
        # Hints of the emails' first events (see `event_log`) before the emails too.
        # The three inserts at once: they depend on each other in nothing, and the embedded
        # database commits concurrent writes together (one fsync for all three).
        await _all_or_first_error(
            self._recorder.announce(
                [Change(doc["_id"], doc[OUTBOX_FIELD]) for _, _, doc in batch],
                now=max(doc["created_at"] for _, _, doc in batch),
            ),
            self.delivery_queue.add_entries([entry for entry, _, _ in batch if entry]),
            self._write_contents([body for _, body, _ in batch if body]),
        )

    async def _write_contents(self, bodies: list[Document]) -> None:
        # A taken _id is a concurrent duplicate's content (same email id): nothing to do.
        await insert_many_unique(self._contents, bodies)

    async def _insert_emails(self, batch: list[_NewEmail]) -> list[bool]:
        stored = await insert_many_unique(self._emails, [doc for _, _, doc in batch])
        if any(entry for entry, _, _ in batch):
            self.delivery_queue.announce_arrival()
        return stored

    async def get(self, *, tenant_id: str, email_id: str, now: datetime | None = None) -> Email:
        """See `EmailRepository.get`."""
        doc = await self._own(tenant_id, email_id, API_VIEW)
        if doc is None:
            raise NotFound("Email", email_id)
        email = email_from_doc(doc)
        if now is not None and email.status in UNFINISHED:
            lease = await self.delivery_queue.live_lease(email_id, now)
            if lease is not None:
                # Claims do not write the email (one write less per delivery); the lease is
                # what says a worker is delivering it, and until when it may.
                return outcomes.leased(email, lease_expires=lease["expires_at"])
        return email

    async def _own(
        self, tenant_id: str, email_id: str, projection: Document | None = None
    ) -> Document | None:
        # By _id alone, tenant checked here: FerretDB 1.24 uses its primary key only for a
        # filter that is exactly {_id: value}; any other field makes it scan the collection
        # (measured: 6 ms against 40-80 ms at 300 emails, growing with every email kept).
        # Live or test: an id names one email, whichever partition holds it.
        doc = await self._emails.find_one({"_id": email_id}, projection)
        if doc is None or not belongs_to(doc, tenant_id):
            return None
        return doc

    async def page(
        self, *, tenant_id: str, filter: EmailFilter, before_id: str | None, limit: int
    ) -> list[Email]:
        """See `EmailRepository.page`.

        Every filter queries the emails on a ``(tenant_id, ..., _id)`` index (recipient and
        tag: an element of the array). ``filter.test`` picks the partition read.
        """
        tenant_id = partition(tenant_id, filter.test)
        query: Document = {"tenant_id": tenant_id}
        if before_id:
            query["_id"] = {"$lt": before_id}
        if filter.status is not None:
            query["status"] = filter.status.value
        if filter.domain_id:
            query["domain_id"] = filter.domain_id
        if filter.recipient:
            query["recipient_addresses"] = filter.recipient
        if filter.tag:
            query["tags"] = filter.tag
        created: Document = {}
        if filter.start is not None:
            created["$gte"] = filter.start
        if filter.end is not None:
            created["$lt"] = filter.end
        if created:
            query["created_at"] = created
        cursor = self._emails.find(query, API_VIEW).sort("_id", DESCENDING).limit(limit)
        return [email_from_doc(d) async for d in cursor]

    async def content(self, *, email: Email) -> bytes:
        """See `EmailRepository.content`."""
        return await read_content(self._db, self._bucket, email)

    async def queue_health(self, *, now: datetime) -> tuple[int, float]:
        """See `EmailRepository.queue_health` (the queue engine's entries)."""
        return await self.delivery_queue.queue_health(now=now)

    async def sweep_claims(self, *, before: datetime) -> int:
        """See `EmailRepository.sweep_claims` (the queue engine's claims)."""
        return await self.delivery_queue.sweep_claims(before=before)

    async def _waiting(self, tenant_id: str, email_id: str, now: datetime) -> Document | None:
        """The tenant's email if it waits for an attempt and no worker holds it at `now`.

        Queued, scheduled or deferred: what cancel and reschedule may change.
        """
        doc = await self._own(tenant_id, email_id, NO_CONTENT)
        if doc is None or doc["status"] not in _WAITING:
            return None
        if await self.delivery_queue.live_lease(email_id, now) is not None:
            return None  # a worker is delivering it right now
        return doc

    async def unfinished_ids(self, *, tenant_id: str, domain_id: str) -> list[str]:
        """See `EmailRepository.unfinished_ids`.

        Asked once per deleted domain, never on a request or queue path: served by the
        tenant index on MongoDB; FerretDB 1.24 scans the tenant's emails (DESIGN.md's measured
        facts), which a rare deletion can afford.
        """
        ids: list[str] = []
        for test in (False, True):
            query: Document = {
                "tenant_id": partition(tenant_id, test),
                "domain_id": domain_id,
                "status": {"$in": _WAITING},
            }
            ids.extend([str(doc["_id"]) async for doc in self._emails.find(query, {"_id": 1})])
        return ids

    async def _apply(
        self, email: Email, transition: outcomes.Transition, feed: list[Document] | None = None
    ) -> Email:
        """Write an API change of `email` (one write of its document), then count it.

        The API's only write of a state change; the workers' is the queue engine's
        (`MongoDeliveryQueue.finish_attempt`). Both build it with `transition_update`, with
        the change's events announced first. `feed`: the change's `feed_events`, when the
        caller needs their ids (built here otherwise).
        """
        if feed is None:
            feed = feed_events(email, transition.events)
        await self._recorder.announce([Change(email.id, feed)], now=transition.time)
        await self._emails.update_one({"_id": email.id}, transition_update(transition, feed))
        if transition.old_status is not None and transition.status is not None:
            self.tallies.move(
                tenant_id=partition(email.tenant_id, email.test),
                created_at=email.created_at,
                domain_id=email.domain_id,
                old=transition.old_status.value,
                new=transition.status.value,
            )
            await self.tallies.flush()
        return outcomes.apply(email, transition)

    async def cancel(self, *, tenant_id: str, email_id: str, event: Event) -> Email | None:
        """See `EmailRepository.cancel`."""
        doc = await self._waiting(tenant_id, email_id, event.time)
        if doc is None:
            return None
        email = email_from_doc(doc)
        transition = outcomes.cancel(email, event=event)
        if transition is None or not await self._transition(doc, event.time):
            return None
        # Queue entry first: no worker takes the email from here on.
        await self.delivery_queue.remove_entry(email_id)
        return await self._apply(email, transition)

    async def reschedule(
        self,
        *,
        tenant_id: str,
        email_id: str,
        start: datetime,
        scheduled: bool,
        expires_at: datetime,
        event: Event,
    ) -> Email | None:
        """See `EmailRepository.reschedule`."""
        doc = await self._waiting(tenant_id, email_id, event.time)
        if doc is None:
            return None
        email = email_from_doc(doc)
        transition = outcomes.reschedule(
            email, start=start, scheduled=scheduled, expires_at=expires_at, event=event
        )
        if transition is None or not await self._transition(doc, event.time):
            return None
        # Entry first: a crash before the email's update can make the email late by its new
        # time, never early (its document still shows the old time until then).
        await self.delivery_queue.move_entry(email_id, due=start, now=event.time)
        return await self._apply(email, transition)

    async def delete(self, *, tenant_id: str, email_id: str) -> Email | None:
        """See `EmailRepository.delete`."""
        doc = await self._own(tenant_id, email_id, NO_CONTENT)
        if doc is None or doc["status"] in _CLAIMABLE:
            return None
        email = email_from_doc(doc)
        if not await self._transition(doc, self._now_of(doc), removal=True):
            return email  # a concurrent delete removes it
        await self._remove([doc])
        return email

    @staticmethod
    def _now_of(doc: Document) -> datetime:
        # Claims need a time for their sweeper; a finished email's last write is close enough.
        return doc["updated_at"]  # type: ignore[no-any-return]

    async def _remove(self, docs: list[Document]) -> None:
        """Delete finished emails (won by the caller), then their content, then count it.

        Email first: a crash after it leaves an orphan content document or file, never an
        email whose content is missing. Their recorded events
        are copied to the events collection before (idempotent: a retry copies none twice).
        """
        await self._outbox.copy_outbox(docs)
        await self._emails.bulk_write([DeleteOne({"_id": d["_id"]}) for d in docs], ordered=False)
        # (The caller's batch is at most `MAX_WRITE_BATCH`; chunked all the same.)
        for ids in chunked([d["_id"] for d in docs]):
            await self._contents.delete_many({"_id": {"$in": list(ids)}})
        for doc in docs:
            if doc.get("content_file_id"):
                # NoFile: deleted by an earlier attempt of this call.
                with contextlib.suppress(NoFile):
                    await self._bucket.delete(ObjectId(doc["content_file_id"]))
            self._count_doc(doc, -1)
        await self.tallies.flush()

    async def get_any(self, *, email_id: str) -> Email | None:
        """Any tenant's email by id, without its content; None when it is not stored.

        For callers that authenticated the id otherwise, such as a return path's token.
        """
        doc = await self._emails.find_one({"_id": email_id}, API_VIEW)
        return email_from_doc(doc) if doc is not None else None

    async def change_finished(
        self,
        *,
        email_id: str,
        now: datetime,
        change: Callable[[Email], outcomes.Transition | None],
    ) -> LateChange | None:
        """Apply `change` (a rule of `outcomes`) to a finished email: reports after delivery.

        A finished email is one no worker writes again, so the only writers left are the API's
        and this, which meet on the unique transition claim of the email's timeline length:
        of two concurrent changes one writes, the other is refused (and retried by its
        caller, whose next read sees the first one's change). A process killed between the
        claim and the write leaves the change refused until the claim is swept with the
        leases (after an hour); the caller's retries apply it then.

        Returns:
            None when no such email is stored; otherwise the email as stored after the change,
            the events written now (empty when `change` found nothing to do) and those it had
            recorded before (its event outbox).

        Raises:
            Conflict: the email is not finished (a worker may still write it), or another
                change was made concurrently: try again later.
        """
        doc = await self._emails.find_one({"_id": email_id}, NO_CONTENT)
        if doc is None:
            return None
        email = email_from_doc(doc)
        recorded = list(doc.get(OUTBOX_FIELD, []))
        if email.status in UNFINISHED:
            raise Conflict(f"email {email_id} is still being delivered; try again later")
        transition = change(email)
        if transition is None:
            return LateChange(email, [], recorded)
        if not await self._transition(doc, now):
            raise Conflict(f"email {email_id} changed concurrently; try again")
        feed = feed_events(email, transition.events)
        return LateChange(await self._apply(email, transition, feed), feed, recorded)

    async def add_event(self, *, tenant_id: str, email_id: str, event: Event) -> None:
        """See `EmailRepository.add_event`."""
        doc = await self._own(tenant_id, email_id, NO_CONTENT)
        if doc is not None:
            email = email_from_doc(doc)
            await self._apply(email, outcomes.note(email, event=event))

    async def stats(
        self,
        *,
        tenant_id: str,
        start: datetime,
        end: datetime,
        domain_id: str | None,
        test: bool = False,
    ) -> list[tuple[str, str, int]]:
        """See `EmailRepository.stats`.

        Whole minutes of the window come from the counts kept as mail flows
        (`services.mail.tallies`); the seconds before the first whole minute and after the last
        are counted from the emails created then (``tenant_created`` index range).
        """
        tenant_id = partition(tenant_id, test)
        grain = int(FINEST.total_seconds())
        first, last = ceil_to(start, grain), floor_to(end, grain)
        counts: Counter[tuple[str, str]] = Counter()
        edges = [(start, end)]
        if first < last:
            # This process's own counts first (sends do not wait for theirs to be written).
            await self.tallies.flush()
            counts = await self.tallies.count(tenant_id=tenant_id, start=first, end=last)
            edges = [(start, first), (last, end)]
        for lo, hi in edges:
            if lo >= hi:
                continue
            query: Document = {"tenant_id": tenant_id, "created_at": {"$gte": lo, "$lt": hi}}
            async for doc in self._emails.find(query, {"domain_id": 1, "status": 1}):
                counts[(doc["domain_id"], doc["status"])] += 1
        return [
            (d, s, n)
            for (d, s), n in sorted(counts.items())
            if n and (not domain_id or d == domain_id)
        ]

    async def sweep_finished(
        self,
        *,
        now: datetime,
        retention: Callable[[str], timedelta],
        shortest: timedelta,
        batches: int = 25,
    ) -> int:
        """Remove finished emails (content and timeline with them) older than their retention.

        Reads each finished status in the order emails finished (``finished_age`` index:
        status, updated_at), at most `batches` batches of `MAX_WRITE_BATCH` per status, up
        to `now - shortest`; an email is removed once `now - retention(tenant)` has passed its
        last write. Emails waiting for delivery (queued, scheduled however far ahead, deferred)
        are never read. Each removal wins its transition claim first, so concurrent sweepers
        and API deletes remove and count an email once.

        Returns:
            How many emails were removed.
        """
        removed = 0
        for status in sorted(s.value for s in FINISHED):
            removed += await self._sweep_oldest(
                {"status": status},
                before=now - shortest,
                now=now,
                batches=batches,
                # A test email's partition names no tenant's retention: the default applies
                # (`sweep_test` removes them sooner).
                due=lambda d: d["updated_at"] < now - retention(d["tenant_id"]),
            )
        return removed

    async def sweep_test(self, *, now: datetime, retention: timedelta, batches: int = 25) -> int:
        """Remove finished test emails whose last change is older than `retention`.

        Reads test emails in the order of their last write (``test_age`` index: test,
        updated_at), at most `batches` batches of `MAX_WRITE_BATCH`; unfinished ones (a
        deferring test recipient) are passed over until they finish. Removal as in
        `sweep_finished`: claim first, events copied out, then the email and its content.

        Returns:
            How many test emails were removed.
        """
        finished = {s.value for s in FINISHED}
        return await self._sweep_oldest(
            {"test": True},
            before=now - retention,
            now=now,
            batches=batches,
            due=lambda d: d["status"] in finished,
        )

    async def _sweep_oldest(
        self,
        query: Document,
        *,
        before: datetime,
        now: datetime,
        batches: int,
        due: Callable[[Document], bool],
    ) -> int:
        """Remove the emails matching `query`, last written before `before`, that are `due`.

        Oldest first through an index ending in ``updated_at``, at most `batches` batches of
        `MAX_WRITE_BATCH`; each removal wins its transition claim first, so concurrent
        sweepers and API deletes remove (and count) an email once.
        """
        removed = 0
        after: datetime | None = None
        for _ in range(batches):
            window: Document = {"$lt": before}
            if after is not None:
                window["$gt"] = after
            cursor = (
                self._emails.find({**query, "updated_at": window}, NO_CONTENT)
                .sort("updated_at", ASCENDING)
                .limit(MAX_WRITE_BATCH)
            )
            docs = [d async for d in cursor]
            if not docs:
                break
            after = docs[-1]["updated_at"]
            chosen = [d for d in docs if due(d)]
            won = await self.delivery_queue.win_transitions(
                [_transition_id(d, removal=True) for d in chosen], now=now
            )
            gone = [d for d, ok in zip(chosen, won, strict=True) if ok]
            if gone:
                await self._remove(gone)
            removed += len(gone)
            if len(docs) < MAX_WRITE_BATCH:
                break
        return removed

    async def sweep_tallies(self, *, before: datetime) -> int:
        """Remove stats counts of buckets before `before` (no email created then is left)."""
        return await self.tallies.sweep(before=before)

    async def queue(
        self, *, tenant_id: str, now: datetime, domain_id: str | None, test: bool = False
    ) -> tuple[int, datetime | None]:
        """See `EmailRepository.queue`.

        One range per waiting status on the ``tenant_due`` index (tenant, status, due time):
        what it reads is the tenant's backlog due now, never the mail it stored.
        """

        async def due(status: str) -> list[Document]:
            query: Document = {
                "tenant_id": partition(tenant_id, test),
                "status": status,
                "next_attempt_at": {"$lte": now},
            }
            cursor = self._emails.find(query, {"next_attempt_at": 1, "domain_id": 1})
            return [d async for d in cursor]

        found = await asyncio.gather(*(due(status) for status in _WAITING))
        times = [
            d["next_attempt_at"]
            for docs in found
            for d in docs
            if not domain_id or d.get("domain_id") == domain_id
        ]
        return len(times), (min(times) if times else None)


class MongoIdempotencyRepository:
    """`IdempotencyRepository` on MongoDB/FerretDB."""

    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self._records = db[IDEMPOTENCY]

    async def reserve(self, *, record: IdempotencyRecord, now: datetime) -> IdempotencyRecord:
        """See `IdempotencyRepository.reserve`."""
        doc_id = f"{record.tenant_id}\x1f{record.key}"
        doc: Document = {
            "_id": doc_id,
            "tenant_id": record.tenant_id,
            "key": record.key,
            "fingerprint": record.fingerprint,
            "email_id": record.email_id,
            "expires_at": record.expires_at,
        }
        held = await reserve_expiring(self._records, doc, now=now)
        return record if held is doc else _record(held)

    async def release(self, *, record: IdempotencyRecord) -> None:
        """See `IdempotencyRepository.release`."""
        doc_id = f"{record.tenant_id}\x1f{record.key}"
        # Read, then delete by _id alone (the only filter FerretDB serves from an index); a
        # live record is only ever replaced by its own expiry, so nobody else wins in between.
        existing = await self._records.find_one({"_id": doc_id})
        if existing is not None and existing.get("email_id") == record.email_id:
            await self._records.delete_one({"_id": doc_id})

    async def sweep(self, *, now: datetime) -> int:
        """See `IdempotencyRepository.sweep`."""
        return await delete_older(self._records, "expires_at", now)


def _record(doc: dict[str, Any]) -> IdempotencyRecord:
    return IdempotencyRecord(
        doc["tenant_id"], doc["key"], doc["fingerprint"], doc["email_id"], doc["expires_at"]
    )


__all__ = [
    "CLAIMS",
    "CONTENTS",
    "CONTENT_BUCKET",
    "EMAILS",
    "IDEMPOTENCY",
    "INDEXES",
    "RETIRED_COLLECTIONS",
    "QUEUE",
    "EmailRepository",
    "Screen",
    "IdempotencyRecord",
    "IdempotencyRepository",
    "LateChange",
    "MongoEmailRepository",
    "MongoIdempotencyRepository",
]
