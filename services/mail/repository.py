"""Storage of emails (the delivery queue itself), idempotency keys and large message content.

Collections (written only by the mail service):
* ``emails``: one document per email: envelope, content (or its GridFS id), recipients,
  timeline. Writes after a claim filter on the claim's lease token, which fences out a worker
  whose lease was taken over.
* ``email_queue``: one tiny entry per unfinished email: ``due`` (when a worker may take it) and
  ``claims`` (the number of the next claim). Removed when the email finishes.
* ``email_claims``: the leases, an append-only log: ``_id`` = email id + claim number, with the
  holder's token and the lease's expiry. A unique insert decides which worker wins a claim; the
  live lease of an email is its newest claim while unexpired (see
  `MongoEmailRepository.claim_batch`). Swept after an hour.
* ``email_idempotency``: ``_id`` = tenant + key; insert-first, so concurrent duplicates meet on
  the unique ``_id``. Expired records are removed by our sweeper (no TTL index: FerretDB).
FerretDB 1.24 has no transactions: the writes of one step go in an order where a crash between
them leaves work to redo, never work lost.
* GridFS bucket ``email_content``: built messages above the inline limit (FerretDB 1.24 serves
  GridFS: it is two ordinary collections, ``files`` and ``chunks`` of 255 KiB).
* ``email_keys``: one small document per (email, recipient address) and (email, tag), scalar
  fields only, for ListEmails' recipient and tag filters (array fields cannot be indexed by the
  embedded database's pushdown). Written before the email, removed after it.
* ``email_tallies``: stats counts kept as mail flows, one writer per document
  (`services.mail.tallies`).
Timeline events are an array of flat documents (no nested arrays: FerretDB).

Reads of this module outside the queue, and the index that serves each (the same declared
index serves it on MongoDB 7; on FerretDB through the local build's pushdown of equality,
range, sort and limit on indexed scalar fields):

* GetEmail and every read of one email: ``{_id}`` (primary key);
* ListEmails by recipient or tag: ``email_keys`` ``{tenant_id, key, email_id < page}`` sorted by
  ``email_id`` descending (``keys_lookup``), then the emails by ``_id``;
* GetEmailStats: ``email_tallies`` ``{tenant_id, g, bucket range}`` (``tally_window``), at most
  five ranges, plus the emails of the window's ragged seconds ``{tenant_id, created_at range}``
  (``tenant_created``);
* GetEmailStats' queue depth and oldest due time: ``{tenant_id, status, next_attempt_at <= now}``
  per waiting status (``tenant_due``): the tenant's backlog, not its stored mail;
* retention: ``{status, updated_at < cutoff}`` sorted by ``updated_at`` (``finished_age``),
  40 at a time; the other sweepers: one indexed time field each (`delete_older`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import random
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, Protocol, TypeVar

from bson import Binary, ObjectId
from gridfs.asynchronous import AsyncGridFSBucket
from gridfs.errors import NoFile
from pymongo import ASCENDING, DESCENDING, DeleteOne, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

from services.core.errors import NotFound
from services.core.mongo import (
    MAX_WRITE_BATCH,
    Document,
    IndexSpec,
    chunked,
    delete_older,
    is_transient,
    reserve_expiring,
)
from services.mail.models import (
    FINISHED,
    UNFINISHED,
    AttachmentInfo,
    Claimed,
    Email,
    EmailFilter,
    EmailStatus,
    Event,
    EventType,
    Recipient,
    RecipientKind,
    RecipientStatus,
    SmtpReply,
)
from services.mail.tallies import FINEST, Tallies, ceil_to, floor_to
from services.mail.tallies import INDEXES as TALLY_INDEXES

log = logging.getLogger(__name__)

EMAILS = "emails"
IDEMPOTENCY = "email_idempotency"
CLAIMS = "email_claims"
QUEUE = "email_queue"
KEYS = "email_keys"
# Progress of one-off data migrations of this module, one document each.
MIGRATIONS = "email_migrations"
_CANCELLABLE = (
    EmailStatus.QUEUED.value,
    EmailStatus.SCHEDULED.value,
    EmailStatus.DEFERRED.value,
)
_Item = TypeVar("_Item")
# A queue entry whose email does not exist after this long was left by a crashed submit.
_ORPHAN_AGE = timedelta(minutes=1)
# Due entries one claim reads: per email it wants, plus a few, as spares for those that other
# workers turn out to hold (this process skips the ones it knows are leased).
_CLAIM_WINDOW_FACTOR = 4
_CLAIM_WINDOW_EXTRA = 32
# Insert rounds of one claim (spares for lost emails, next numbers for expired leases), and
# expired leases followed in a row when reading who holds an email.
_MAX_ROUNDS = 16
CONTENT_BUCKET = "email_content"
# Statuses a worker takes once next_attempt_at has passed (for SENDING: the lease expired).
CLAIMABLE = [
    EmailStatus.QUEUED.value,
    EmailStatus.SCHEDULED.value,
    EmailStatus.DEFERRED.value,
    EmailStatus.SENDING.value,
]

INDEXES = (
    IndexSpec(EMAILS, [("status", ASCENDING), ("next_attempt_at", ASCENDING)], "due"),
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
    IndexSpec(CLAIMS, [("created_at", ASCENDING)], "claim_age"),
    IndexSpec(QUEUE, [("due", ASCENDING)], "queue_due"),
    # Retention: finished emails in the order they finished (updated_at is the last write).
    IndexSpec(EMAILS, [("status", ASCENDING), ("updated_at", ASCENDING)], "finished_age"),
    # ListEmails by recipient or tag: newest emails first among those with the key.
    IndexSpec(
        KEYS,
        [("tenant_id", ASCENDING), ("key", ASCENDING), ("email_id", DESCENDING)],
        "keys_lookup",
    ),
    IndexSpec(KEYS, [("created_at", ASCENDING)], "keys_age"),
    *TALLY_INDEXES,
)


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    """The first request made with a key."""

    tenant_id: str
    key: str
    fingerprint: str
    email_id: str
    expires_at: datetime


class EmailRepository(Protocol):
    """Tenant-scoped storage of emails plus the queue operations of workers."""

    async def insert(self, *, email: Email) -> bool:
        """Store a new email (content included). False when its id already exists."""
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

    async def claim_batch(
        self, *, now: datetime, lease: timedelta, worker_id: str, limit: int
    ) -> list[Claimed]:
        """Take up to `limit` due emails, the most overdue first, each under a lease."""
        ...

    async def finish_attempt(
        self,
        *,
        claimed: Claimed,
        recipients: list[Recipient],
        status: EmailStatus,
        next_attempt_at: datetime | None,
        events: Sequence[Event],
        now: datetime,
    ) -> bool:
        """Record an attempt's outcome if the lease is still ours (False otherwise).

        While the database is unreachable the outcome is kept and written once it answers;
        until then this does not return, and the email is not claimed again by this process.
        """
        ...

    async def flush_outcomes(self, *, within: float) -> int:
        """Wait up to `within` s for kept outcomes to be written; how many are still kept."""
        ...

    async def release(self, *, claimed: Claimed, now: datetime) -> None:
        """Give a claimed email back untouched (shutdown): due again at once."""
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

    async def sweep_tallies(self, *, before: datetime) -> int:
        """Remove stats counts of creation buckets before `before`."""
        ...

    async def sweep_keys(self, *, before: datetime) -> int:
        """Remove ListEmails lookup keys of emails created before `before`."""
        ...

    async def backfill_keys(self, *, batches: int = 25) -> bool:
        """Write lookup keys of emails stored before keys existed; True once all are done."""
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
        self, *, tenant_id: str, start: datetime, end: datetime, domain_id: str | None
    ) -> list[tuple[str, str, int]]:
        """(domain_id, status, count) of emails accepted in the window."""
        ...

    async def queue(
        self, *, tenant_id: str, now: datetime, domain_id: str | None
    ) -> tuple[int, datetime | None]:
        """How many of the tenant's emails are due now, and the oldest due time."""
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


def _reply_doc(reply: SmtpReply | None) -> Document | None:
    if reply is None:
        return None
    return {"code": reply.code, "enhanced": reply.enhanced_code, "text": reply.text}


def _reply(doc: Document | None) -> SmtpReply | None:
    if not doc:
        return None
    return SmtpReply(int(doc["code"]), str(doc.get("enhanced", "")), str(doc.get("text", "")))


def event_doc(event: Event) -> Document:
    """BSON form of an event."""
    return {
        "type": event.type.value,
        "time": event.time,
        "recipient": event.recipient,
        "reply": _reply_doc(event.reply),
        "detail": event.detail,
    }


def _event(doc: Document) -> Event:
    return Event(
        EventType(doc["type"]),
        doc["time"],
        doc.get("recipient", ""),
        _reply(doc.get("reply")),
        doc.get("detail", ""),
    )


def _recipient_doc(r: Recipient) -> Document:
    return {
        "address": r.address,
        "kind": r.kind.value,
        "status": r.status.value,
        "last_reply": _reply_doc(r.last_reply),
        "attempts": r.attempts,
        "updated_at": r.updated_at,
    }


def _recipient(doc: Document) -> Recipient:
    return Recipient(
        doc["address"],
        RecipientKind(doc["kind"]),
        RecipientStatus(doc["status"]),
        _reply(doc.get("last_reply")),
        int(doc.get("attempts", 0)),
        doc.get("updated_at"),
    )


def _to_doc(email: Email) -> Document:
    return {
        "_id": email.id,
        "tenant_id": email.tenant_id,
        "domain_id": email.domain_id,
        "domain_name": email.domain_name,
        "from": email.from_address,
        "envelope_from": email.envelope_from,
        "to": email.to,
        "cc": email.cc,
        "bcc": email.bcc,
        "reply_to": email.reply_to,
        "subject": email.subject,
        "message_id": email.message_id,
        "size": email.size,
        "recipients": [_recipient_doc(r) for r in email.recipients],
        # Flat lowercase copy for the recipient filter of ListEmails (which lowercases too).
        "recipient_addresses": [r.address.lower() for r in email.recipients],
        "status": email.status.value,
        "created_at": email.created_at,
        "updated_at": email.updated_at,
        "next_attempt_at": email.next_attempt_at,
        "expires_at": email.expires_at,
        "tags": email.tags,
        # A list of pairs, not a sub-document: keys may contain '$' or '.'.
        "metadata": [{"k": k, "v": v} for k, v in email.metadata.items()],
        "attachments": [
            {
                "filename": a.filename,
                "content_type": a.content_type,
                "size": a.size,
                "content_id": a.content_id,
                "inline": a.inline,
            }
            for a in email.attachments
        ],
        "send_at": email.send_at,
        "attempts": email.attempts,
        "events": [event_doc(e) for e in email.events],
        "resent_from_id": email.resent_from_id,
        "idempotency_key": email.idempotency_key,
        "content": Binary(email.content) if email.content is not None else None,
        "content_file_id": email.content_file_id,
        "trace_context": dict(email.trace_context),
        "template_id": email.template_id,
        "template_version": email.template_version,
        "lease_token": "",
        "claims": 0,
    }


def _from_doc(doc: Document) -> Email:
    content = doc.get("content")
    return Email(
        id=doc["_id"],
        tenant_id=doc["tenant_id"],
        domain_id=doc["domain_id"],
        domain_name=doc["domain_name"],
        from_address=doc["from"],
        envelope_from=doc["envelope_from"],
        to=list(doc["to"]),
        cc=list(doc["cc"]),
        bcc=list(doc["bcc"]),
        reply_to=list(doc["reply_to"]),
        subject=doc["subject"],
        message_id=doc["message_id"],
        size=int(doc["size"]),
        recipients=[_recipient(r) for r in doc["recipients"]],
        status=EmailStatus(doc["status"]),
        created_at=doc["created_at"],
        updated_at=doc["updated_at"],
        next_attempt_at=doc.get("next_attempt_at"),
        expires_at=doc["expires_at"],
        tags=list(doc.get("tags", [])),
        metadata={p["k"]: p["v"] for p in doc.get("metadata", [])},
        attachments=[
            AttachmentInfo(
                a["filename"], a["content_type"], int(a["size"]), a["content_id"], a["inline"]
            )
            for a in doc.get("attachments", [])
        ],
        send_at=doc.get("send_at"),
        attempts=int(doc.get("attempts", 0)),
        events=[_event(e) for e in doc.get("events", [])],
        resent_from_id=doc.get("resent_from_id", ""),
        idempotency_key=doc.get("idempotency_key", ""),
        trace_context=dict(doc.get("trace_context") or {}),
        content=bytes(content) if content is not None else None,
        content_file_id=doc.get("content_file_id", ""),
        template_id=doc.get("template_id", ""),
        template_version=int(doc.get("template_version", 0)),
    )


def _key_docs(doc: Document) -> list[Document]:
    """The ``email_keys`` documents of an email document: one per recipient and per tag."""
    keys = {f"r:{a}" for a in doc.get("recipient_addresses", [])}
    keys.update(f"t:{t}" for t in doc.get("tags", []))
    return [
        {
            "_id": f"{doc['tenant_id']}|{key}|{doc['_id']}",
            "tenant_id": doc["tenant_id"],
            "key": key,
            "email_id": doc["_id"],
            "created_at": doc["created_at"],
        }
        for key in sorted(keys)
    ]


def _transition_id(doc: Document, *, removal: bool) -> str:
    """The claim that decides who makes a change of the email `doc` shows.

    A removal (delete, retention) happens once whatever the timeline says meanwhile (a RESENT
    event may be added to a finished email); other changes are claimed per timeline length.
    """
    return f"{doc['_id']}:gone" if removal else f"{doc['_id']}:v{len(doc.get('events', []))}"


def _matches(doc: Document, filter: EmailFilter) -> bool:
    """Whether an email document passes every ListEmails filter (what the query would check)."""
    created = doc["created_at"]
    return (
        (filter.status is None or doc["status"] == filter.status.value)
        and (not filter.domain_id or doc["domain_id"] == filter.domain_id)
        and (not filter.recipient or filter.recipient in doc.get("recipient_addresses", []))
        and (not filter.tag or filter.tag in doc.get("tags", []))
        and (filter.start is None or created >= filter.start)
        and (filter.end is None or created < filter.end)
    )


# Reads for the API never carry the message bytes. (findAndModify cannot project on FerretDB
# 1.24, "fields is not implemented yet": those return the whole document, content dropped.)
_NO_CONTENT = {"content": 0}


class _GroupCommit(Generic[_Item]):
    """Writes many callers' documents together: one batch per command instead of one each.

    FerretDB (SQLite) pays mostly per command and per transaction: one insertMany of 50
    documents costs about as much as two single inserts. Callers that arrive while a batch is
    being written wait for the next one, so a lone caller is written at once and a burst
    shares commands (group commit, as databases do with their log). A batch never exceeds
    `MAX_WRITE_BATCH` items, so neither does any command written for it.

    With ``keep_while_unreachable`` a batch that fails because the database is away (see
    `is_transient`) is not failed: it stays first in line and is written again, with a capped
    backoff, until the database answers. Its callers simply wait, so memory stays bounded by
    the number of callers (delivery loops), who claim nothing new meanwhile. Other failures
    fail the batch's callers, as without the option.
    """

    # Waits between attempts to write a batch the database did not take (seconds).
    _RETRY_FIRST = 0.1
    _RETRY_MAX = 2.0

    def __init__(
        self,
        write: Callable[[list[_Item]], Awaitable[list[bool]]],
        *,
        keep_while_unreachable: bool = False,
    ) -> None:
        self._write = write
        self._keep = keep_while_unreachable
        self._pending: list[tuple[_Item, asyncio.Future[bool]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._writing = 0  # items of the batch being written
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def pending(self) -> int:
        """Items submitted and not written yet (the batch being written included)."""
        return len(self._pending) + self._writing

    async def submit(self, item: _Item) -> bool:
        """Have `item` written with the next batch; the batch's verdict on it."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((item, done))
        if self._writer is None or self._writer.done():
            # A fresh context: the writer serves many callers, so it must not inherit the
            # first one's request deadline (pymongo.timeout lives in a context variable and
            # would fail every later batch once that request's time is up) or its trace.
            self._idle.clear()
            self._writer = asyncio.create_task(self._write_all(), context=contextvars.Context())
        # Shielded: a caller that gives up (deadline, cancellation) does not cancel the write
        # of the others' items; its own may still be written, as with a single command.
        return await asyncio.shield(done)

    async def drain(self, within: float) -> bool:
        """Wait up to `within` seconds until everything submitted is written (or failed).

        Returns:
            Whether nothing is left to write.
        """
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout=within)
        return self._idle.is_set()

    async def _write_all(self) -> None:
        delay = self._RETRY_FIRST
        try:
            while self._pending:
                batch = self._pending[:MAX_WRITE_BATCH]
                del self._pending[:MAX_WRITE_BATCH]
                self._writing = len(batch)
                try:
                    verdicts = await self._write([item for item, _ in batch])
                except Exception as exc:
                    self._writing = 0
                    if self._keep and is_transient(exc):
                        if delay == self._RETRY_FIRST:
                            log.warning(
                                "database unreachable; keeping writes to retry",
                                extra={"fields": {"kept": len(batch) + len(self._pending)}},
                            )
                        self._pending[:0] = batch  # first in line when the database is back
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, self._RETRY_MAX)
                        continue
                    for _, done in batch:
                        if not done.done():
                            done.set_exception(exc)
                            # Retrieved here so that a caller who gave up meanwhile (deadline)
                            # leaves no "exception never retrieved" noise; others still get it.
                            done.exception()
                    continue
                self._writing = 0
                if delay != self._RETRY_FIRST:
                    log.warning("database back; kept writes written", extra={"fields": {}})
                delay = self._RETRY_FIRST
                for (_, done), ok in zip(batch, verdicts, strict=True):
                    if not done.done():
                        done.set_result(ok)
        finally:
            if not self._pending:
                self._idle.set()


async def _insert_many_unique(
    collection: AsyncCollection[Document], docs: list[Document]
) -> list[bool]:
    """Insert `docs` (in commands of `MAX_WRITE_BATCH`); which went in (False: _id taken)."""
    taken: list[bool] = []
    for part in chunked(docs):
        try:
            await collection.insert_many(part, ordered=False)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if any(int(e.get("code", 0)) != 11000 for e in errors):
                raise
            failed = {int(e["index"]) for e in errors}
            taken.extend(i not in failed for i in range(len(part)))
            continue
        taken.extend([True] * len(part))
    return taken


@dataclass(slots=True)
class _PendingOutcome:
    """An attempt's outcome waiting to be written (see `MongoEmailRepository.finish_attempt`)."""

    email_id: str
    claim_no: int
    attempts: int
    email: UpdateOne
    entry: UpdateOne | DeleteOne
    # A write of it failed before: it may have landed without our hearing the answer.
    retried: bool = False


class MongoEmailRepository:
    """`EmailRepository` on MongoDB/FerretDB, large content in GridFS."""

    def __init__(self, db: AsyncDatabase[Document], *, inline_limit: int) -> None:
        self._emails = db[EMAILS]
        self._claims = db[CLAIMS]
        self._queue = db[QUEUE]
        self._rng = random.Random()  # noqa: S311 - load spreading, not security
        self._bucket = AsyncGridFSBucket(db, bucket_name=CONTENT_BUCKET)
        self._inline_limit = inline_limit
        self._inserts = _GroupCommit(self._write_new)
        # Stats counts of this process (one writer of its own documents; see tallies).
        self.tallies = Tallies(db)
        self._keys = db[KEYS]
        self._migrations = db[MIGRATIONS]
        self._key_inserts = _GroupCommit(self._write_keys)
        # Outcomes are kept while the database is away: the relay has answered, and an
        # outcome dropped now would have the email delivered again after its lease.
        self._outcomes = _GroupCommit(self._write_outcomes, keep_while_unreachable=True)
        # Emails whose outcome waits to be written -> their claim number. Never claimed again
        # by this process meanwhile, even once their lease has expired.
        self._recording: dict[str, int] = {}
        # Emails seen leased (by anyone, this process included) -> when that lease expires.
        # Left out of the next claims' queries: FerretDB returns the first due entries in
        # insertion order, and without this a window full of emails being delivered would
        # hide every email behind them.
        self._leased: dict[str, tuple[datetime, str]] = {}  # email id -> (expiry, claim token)
        # Tokens of claims this process took back (their email was not stored yet): a mark
        # another loop made from reading such a claim must not hide the email for a lease.
        self._returned: dict[str, datetime] = {}  # token -> when it was taken back

    async def insert(self, *, email: Email) -> bool:
        """See `EmailRepository.insert`.

        Concurrent inserts are written together (`_GroupCommit`): one ``insertMany`` per
        collection for every email submitted while the previous batch was being written.
        """
        content = email.content or b""
        file_id: ObjectId | None = None
        if len(content) > self._inline_limit:
            # Content first: an email document never points at missing content. A crash
            # between the two leaves an orphan file, never a broken email.
            file_id = await self._bucket.upload_from_stream(f"{email.id}.eml", content)
            email.content_file_id = str(file_id)
            email.content = None
        entry: Document | None = None
        if email.status in UNFINISHED and email.next_attempt_at is not None:
            entry = {"_id": email.id, "due": email.next_attempt_at, "claims": 0}
            entry["created_at"] = email.created_at
        doc = _to_doc(email)
        # Lookup keys before the email: a crash in between leaves keys without an email
        # (skipped by readers, removed when met and by age), never an email a filter misses.
        await self._key_inserts.submit(_key_docs(doc))
        try:
            stored = await self._inserts.submit((entry, doc))
        except Exception:
            # (Not on cancellation: the shielded write may still store the email.)
            if file_id is not None:
                await self._bucket.delete(file_id)
            raise
        if not stored and file_id is not None:
            await self._bucket.delete(file_id)
        if stored:
            self.tallies.add(
                tenant_id=email.tenant_id,
                created_at=email.created_at,
                domain_id=email.domain_id,
                status=email.status.value,
                n=1,
            )
            await self.tallies.flush()
        return stored

    async def _write_keys(self, batch: list[list[Document]]) -> list[bool]:
        # A taken _id is the same key written by an earlier try: nothing to do.
        await _insert_many_unique(self._keys, [d for keys in batch for d in keys])
        return [True] * len(batch)

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
        claim = {"_id": _transition_id(doc, removal=removal), "created_at": now}
        return (await _insert_many_unique(self._claims, [claim]))[0]

    async def insert_many(self, *, emails: Sequence[Email]) -> list[bool]:
        """See `EmailRepository.insert_many`.

        Written in chunks of `MAX_WRITE_BATCH` documents per command (FerretDB 1.24 can hang on
        a write command of 64 or more statements), queue entries before emails as `insert`
        does; large content goes to GridFS first, one file per email.
        """
        stored: list[bool] = []
        for chunk in chunked(emails):
            items: list[tuple[Document | None, Document]] = []
            files: list[ObjectId | None] = []
            for email in chunk:
                content = email.content or b""
                file_id: ObjectId | None = None
                if len(content) > self._inline_limit:
                    file_id = await self._bucket.upload_from_stream(f"{email.id}.eml", content)
                    email.content_file_id = str(file_id)
                    email.content = None
                files.append(file_id)
                entry: Document | None = None
                if email.status in UNFINISHED and email.next_attempt_at is not None:
                    entry = {"_id": email.id, "due": email.next_attempt_at, "claims": 0}
                    entry["created_at"] = email.created_at
                items.append((entry, _to_doc(email)))
            # Lookup keys before the emails, as `insert` does.
            await self._write_keys([_key_docs(doc) for _, doc in items])
            verdicts = await self._write_new(items)
            for ok, file_id, email in zip(verdicts, files, chunk, strict=True):
                if not ok and file_id is not None:
                    await self._bucket.delete(file_id)
                if ok:
                    self.tallies.add(
                        tenant_id=email.tenant_id,
                        created_at=email.created_at,
                        domain_id=email.domain_id,
                        status=email.status.value,
                        n=1,
                    )
            stored.extend(verdicts)
        await self.tallies.flush()
        return stored

    async def _write_new(self, batch: list[tuple[Document | None, Document]]) -> list[bool]:
        # Entries before emails, as for a single email: a crash in between leaves entries
        # without email (dropped by the claimer after `_ORPHAN_AGE`), never an email nobody
        # will deliver. A taken entry _id is a concurrent duplicate (same idempotency key);
        # whether this email is the one stored is decided by the email's own _id.
        await _insert_many_unique(self._queue, [entry for entry, _ in batch if entry is not None])
        return await _insert_many_unique(self._emails, [doc for _, doc in batch])

    async def get(self, *, tenant_id: str, email_id: str, now: datetime | None = None) -> Email:
        """See `EmailRepository.get`."""
        doc = await self._own(tenant_id, email_id, _NO_CONTENT)
        if doc is None:
            raise NotFound("Email", email_id)
        email = _from_doc(doc)
        if now is not None and email.status in UNFINISHED:
            lease = await self._live_lease(email_id, now)
            if lease is not None:
                # Claims do not write the email (one write less per delivery); the lease is
                # what says a worker is delivering it, and until when it may.
                email.status = EmailStatus.SENDING
                email.next_attempt_at = lease["expires_at"]
        return email

    async def _live_lease(self, email_id: str, now: datetime) -> Document | None:
        """The unexpired newest claim of an unfinished email, if any."""
        entry = await self._queue.find_one({"_id": email_id})
        if entry is None:
            return None
        number = int(entry.get("claims", 0))
        for _ in range(_MAX_ROUNDS):
            claim = await self._claims.find_one({"_id": f"{email_id}:{number}"})
            if claim is None:
                return None
            if claim["expires_at"] > now:
                return claim
            number += 1
        return None

    async def _own(
        self, tenant_id: str, email_id: str, projection: Document | None = None
    ) -> Document | None:
        # By _id alone, tenant checked here: FerretDB 1.24 uses its primary key only for a
        # filter that is exactly {_id: value}; any other field makes it scan the collection
        # (measured: 6 ms against 40-80 ms at 300 emails, growing with every email kept).
        doc = await self._emails.find_one({"_id": email_id}, projection)
        if doc is None or doc.get("tenant_id") != tenant_id:
            return None
        return doc

    async def page(
        self, *, tenant_id: str, filter: EmailFilter, before_id: str | None, limit: int
    ) -> list[Email]:
        """See `EmailRepository.page`.

        A recipient or tag filter is served from ``email_keys`` (`_page_by_key`); the other
        filters query the emails on their ``(tenant_id, ...)`` indexes.
        """
        if filter.recipient or filter.tag:
            return await self._page_by_key(
                tenant_id=tenant_id, filter=filter, before_id=before_id, limit=limit
            )
        query: Document = {"tenant_id": tenant_id}
        if before_id:
            query["_id"] = {"$lt": before_id}
        if filter.status is not None:
            query["status"] = filter.status.value
        if filter.domain_id:
            query["domain_id"] = filter.domain_id
        created: Document = {}
        if filter.start is not None:
            created["$gte"] = filter.start
        if filter.end is not None:
            created["$lt"] = filter.end
        if created:
            query["created_at"] = created
        cursor = self._emails.find(query, _NO_CONTENT).sort("_id", DESCENDING).limit(limit)
        return [_from_doc(d) async for d in cursor]

    async def _page_by_key(
        self, *, tenant_id: str, filter: EmailFilter, before_id: str | None, limit: int
    ) -> list[Email]:
        """A page of the emails holding a recipient (or tag) key, newest first.

        Array fields cannot be indexed by the embedded database's pushdown, so every email has
        one small ``email_keys`` document per recipient address and per tag (scalar fields:
        tenant, key, email id, creation time). Keys are read newest email first through the
        ``keys_lookup`` index, their emails fetched by ``_id``, and the rest of the filter
        (status, domain, the other key, time) checked on the email. A key whose email does
        not exist (a crashed submit or removal) is skipped, and removed once older than a
        crashed submit could still be in flight. Cost: the page plus the keyed emails that
        fail the rest of the filter.
        """
        key = f"r:{filter.recipient}" if filter.recipient else f"t:{filter.tag}"
        out: list[Email] = []
        # With the key as the only filter every keyed email belongs on the page (orphans
        # aside, which the next round makes up for): read exactly the page. Each email is one
        # more lookup, so spares are fetched only when the rest of the filter may reject some.
        alone = (
            filter.status is None
            and not filter.domain_id
            and filter.start is None
            and filter.end is None
            and not (filter.recipient and filter.tag)
        )
        batch = limit if alone else max(limit, MAX_WRITE_BATCH)
        while len(out) < limit:
            query: Document = {"tenant_id": tenant_id, "key": key}
            if before_id:
                query["email_id"] = {"$lt": before_id}
            cursor = self._keys.find(query).sort("email_id", DESCENDING).limit(batch)
            keys = [k async for k in cursor]
            if not keys:
                break
            docs = await asyncio.gather(
                *(self._emails.find_one({"_id": k["email_id"]}, _NO_CONTENT) for k in keys)
            )
            orphans = []
            for k, doc in zip(keys, docs, strict=True):
                if doc is None or doc.get("tenant_id") != tenant_id:
                    if k["created_at"] < datetime.now(UTC) - _ORPHAN_AGE:
                        orphans.append(DeleteOne({"_id": k["_id"]}))
                    continue
                if _matches(doc, filter) and len(out) < limit:
                    out.append(_from_doc(doc))
            if orphans:
                await self._keys.bulk_write(orphans, ordered=False)
            before_id = keys[-1]["email_id"]
            if len(keys) < batch:
                break
        return out

    async def backfill_keys(self, *, batches: int = 25) -> bool:
        """Write the lookup keys of emails stored before keys existed, a bounded part per run.

        Walks the emails in ``_id`` order from where the last run stopped (its position is
        kept in ``email_migrations``); writing a key twice changes nothing, so concurrent or
        repeated runs are harmless. Emails stored since have their keys already.

        Returns:
            Whether every email has been walked.
        """
        state = await self._migrations.find_one({"_id": KEYS})
        if state is not None and state.get("done"):
            return True
        last = state.get("last") if state is not None else None
        fields = {"tenant_id": 1, "recipient_addresses": 1, "tags": 1, "created_at": 1}
        for _ in range(batches):
            query: Document = {"_id": {"$gt": last}} if last else {}
            cursor = self._emails.find(query, fields).sort("_id", ASCENDING)
            docs = [d async for d in cursor.limit(MAX_WRITE_BATCH)]
            if not docs:
                await self._migrations.update_one(
                    {"_id": KEYS}, {"$set": {"done": True}}, upsert=True
                )
                return True
            await self._write_keys([_key_docs(d) for d in docs])
            last = docs[-1]["_id"]
            await self._migrations.update_one({"_id": KEYS}, {"$set": {"last": last}}, upsert=True)
        return False

    async def sweep_keys(self, *, before: datetime) -> int:
        """Remove lookup keys of emails created before `before` (none of them is left)."""
        return await delete_older(self._keys, "created_at", before)

    async def content(self, *, email: Email) -> bytes:
        """See `EmailRepository.content`."""
        if email.content is not None:
            return email.content
        if email.content_file_id:
            stream = await self._bucket.open_download_stream(ObjectId(email.content_file_id))
            return await stream.read()
        doc = await self._emails.find_one({"_id": email.id}, {"content": 1})
        if doc is None or doc.get("content") is None:
            raise NotFound("Email", email.id)
        return bytes(doc["content"])

    async def claim_batch(
        self, *, now: datetime, lease: timedelta, worker_id: str, limit: int
    ) -> list[Claimed]:
        """See `EmailRepository.claim_batch`.

        A claim is one insert, nothing else: claim number n of an email is the document
        ``<email id>:<n>`` in ``email_claims``, and the queue entry says which n is next. Unique
        ``_id``s decide between concurrent claimers (FerretDB 1.24 does not isolate
        find-and-modify or conditional updates, measured: 8 claimers took 50 documents 123-157
        times; unique keys do hold). Neither the entry nor the email is written at claim time:
        each write by ``_id`` costs FerretDB 2-3 ms, and one claim insert per email goes into
        a single ``insertMany`` for the whole batch.

        * Claim n exists and is unexpired: another worker holds the email; skip it.
        * Claim n exists but expired (its worker died or released it): try n+1. The expired
          holder's late record is refused because n+1 exists (`finish_attempt`).
        * The attempt's outcome moves the entry on (``due``, ``claims`` = n+1) or removes it.

        The queue is its own small collection because FerretDB filters by scanning: a query
        over every email ever sent would grow without bound.
        """
        self._returned = {t: at for t, at in self._returned.items() if at > now - lease}
        self._leased = {
            k: (expiry, token)
            for k, (expiry, token) in self._leased.items()
            if expiry > now and token not in self._returned
        }
        query: Document = {"due": {"$lte": now}}
        skip = [*self._leased, *(eid for eid in self._recording if eid not in self._leased)]
        if skip:
            query["_id"] = {"$nin": skip}
        # No sort on the server (FerretDB sorts by scanning everything); a plain filter with a
        # limit stops early. The most overdue of the window go first; the head is shuffled so
        # that concurrent claimers do not all fight over the same few emails.
        size = limit * _CLAIM_WINDOW_FACTOR + _CLAIM_WINDOW_EXTRA
        window = [d async for d in self._queue.find(query).limit(size)]
        window.sort(key=lambda d: d["due"])
        head = window[: limit * 2]
        self._rng.shuffle(head)
        untried = [(d["_id"], int(d.get("claims", 0))) for d in (*head, *window[limit * 2 :])]
        untried.reverse()  # popped from the end
        created = {d["_id"]: d.get("created_at", now) for d in window}
        won, expired = await self._win_claims(
            untried, limit=limit, now=now, lease=lease, worker_id=worker_id
        )
        docs_by_id = await asyncio.gather(*(self._emails.find_one({"_id": eid}) for eid in won))
        out: list[Claimed] = []
        stale: list[str] = []
        unborn: list[str] = []
        for (eid, (number, token)), doc in zip(won.items(), docs_by_id, strict=True):
            if doc is None and created.get(eid, now) > now - _ORPHAN_AGE:
                # Its email is being stored right now (entries go first): take the claim back
                # (ours alone: we just inserted it), or the email would wait for the lease.
                unborn.append(f"{eid}:{number}")
                self._returned[token] = now
                continue
            if doc is None or doc["status"] not in CLAIMABLE:
                # Finished or cancelled meanwhile (its entry outlived a crash), or an entry
                # whose email was never stored (a submit that crashed in between).
                stale.append(eid)
                continue
            self._leased[eid] = (now + lease, token)
            email = _from_doc(doc)
            # The attempt this claim is for; written with its outcome (`finish_attempt`).
            email.attempts += 1
            email.status = EmailStatus.SENDING
            events = (
                *expired.get(eid, ()),
                Event(EventType.CLAIMED, now, detail=worker_id),
            )
            stored = EmailStatus(doc["status"])
            out.append(Claimed(email, token, number, now + lease, events, stored))
        for part in chunked(stale):
            await self._queue.delete_many({"_id": {"$in": list(part)}})
        for part in chunked(unborn):
            await self._claims.bulk_write([DeleteOne({"_id": c}) for c in part])
        return out

    async def _win_claims(
        self,
        untried: list[tuple[str, int]],
        *,
        limit: int,
        now: datetime,
        lease: timedelta,
        worker_id: str,
    ) -> tuple[dict[str, tuple[int, str]], dict[str, list[Event]]]:
        """Insert claims for candidates (popped from the end of `untried`) until `limit` are won.

        Returns:
            email id -> (claim number, token) of the claims won, and the CLAIMED events of
            expired leases that were taken over on the way (written with the attempt).
        """
        expired: dict[str, list[Event]] = {}
        won: dict[str, tuple[int, str]] = {}
        retry: dict[str, int] = {}  # expired leases: their next claim number
        for _ in range(_MAX_ROUNDS):
            wanted = dict(retry)
            while untried and len(won) + len(wanted) < limit:
                eid, number = untried.pop()
                wanted.setdefault(eid, number)
            if not wanted:
                break
            tokens = {eid: f"{worker_id}:{uuid.uuid4().hex}" for eid in wanted}
            docs = [
                {
                    "_id": f"{eid}:{number}",
                    "token": tokens[eid],
                    "worker": worker_id,
                    "created_at": now,
                    "expires_at": now + lease,
                }
                for eid, number in wanted.items()
            ]
            taken = await _insert_many_unique(self._claims, docs)
            lost: dict[str, int] = {}
            for (eid, number), ok in zip(wanted.items(), taken, strict=True):
                if ok:
                    won[eid] = (number, tokens[eid])
                else:
                    lost[eid] = number
            # Whoever holds the ones we lost: live (skip) or expired (take the next number).
            holders = await asyncio.gather(
                *(self._claims.find_one({"_id": f"{eid}:{n}"}) for eid, n in lost.items())
            )
            retry = {}
            for (eid, number), holder in zip(lost.items(), holders, strict=True):
                if holder is None:
                    continue  # swept meanwhile (an hour old): the next round of claims
                if holder["expires_at"] > now:
                    self._leased[eid] = (holder["expires_at"], str(holder.get("token", "")))
                    continue
                expired.setdefault(eid, []).append(
                    Event(
                        EventType.CLAIMED,
                        holder["created_at"],
                        detail=f"{holder.get('worker', '')} (lease expired without a record)",
                    )
                )
                retry[eid] = number + 1
        return won, expired

    async def _holds(self, email_id: str, claim_no: int) -> bool:
        # The fence against a worker whose lease expired and was taken over: the next claim
        # number exists. (Read, then write by _id: FerretDB has no conditional update that is
        # isolated, so a takeover between the two is the remaining, lease-sized, window.)
        later = await self._claims.find_one({"_id": f"{email_id}:{claim_no + 1}"})
        return later is None

    async def queue_health(self, *, now: datetime) -> tuple[int, float]:
        """Entries due now in the whole queue, and how long the oldest has been due (s)."""
        depth = 0
        oldest: datetime | None = None
        async for entry in self._queue.find({"due": {"$lte": now}}, {"due": 1}):
            depth += 1
            oldest = entry["due"] if oldest is None else min(oldest, entry["due"])
        return depth, (now - oldest).total_seconds() if oldest is not None else 0.0

    async def sweep_claims(self, *, before: datetime) -> int:
        """Remove claims older than `before` (far older than any lease: they decide nothing)."""
        return await delete_older(self._claims, "created_at", before)

    async def finish_attempt(
        self,
        *,
        claimed: Claimed,
        recipients: list[Recipient],
        status: EmailStatus,
        next_attempt_at: datetime | None,
        events: Sequence[Event],
        now: datetime,
    ) -> bool:
        """See `EmailRepository.finish_attempt`.

        Written with other outcomes (`_GroupCommit`), and kept while the database is away:
        this waits until the database has taken it. A caller cancelled meanwhile (shutdown)
        leaves it with the group commit, which still writes it if the database returns before
        the process ends (`flush_outcomes`); otherwise the lease, never released, runs out and
        the email is attempted again (the documented duplicate window).
        """
        email_id = claimed.email.id
        update: Document = {
            "$set": {
                "recipients": [_recipient_doc(r) for r in recipients],
                "status": status.value,
                "next_attempt_at": next_attempt_at,
                "attempts": claimed.email.attempts,
                "lease_token": "",
                "updated_at": now,
            },
            "$push": {"events": {"$each": [event_doc(e) for e in (*claimed.events, *events)]}},
        }
        entry: UpdateOne | DeleteOne
        if status in UNFINISHED and next_attempt_at is not None:
            entry = UpdateOne(
                {"_id": email_id},
                {"$set": {"due": next_attempt_at, "claims": claimed.claim_no + 1}},
            )
        else:
            entry = DeleteOne({"_id": email_id})
        self._recording[email_id] = claimed.claim_no
        written = await self._outcomes.submit(
            _PendingOutcome(
                email_id,
                claimed.claim_no,
                claimed.email.attempts,
                UpdateOne({"_id": email_id}, update),
                entry,
            )
        )
        if written and claimed.stored_status is not None:
            self.tallies.move(
                tenant_id=claimed.email.tenant_id,
                created_at=claimed.email.created_at,
                domain_id=claimed.email.domain_id,
                old=claimed.stored_status.value,
                new=status.value,
            )
            await self.tallies.flush()
        return written

    async def flush_outcomes(self, *, within: float) -> int:
        """See `EmailRepository.flush_outcomes`."""
        await self._outcomes.drain(within)
        return self._outcomes.pending

    async def _write_outcomes(self, batch: list[_PendingOutcome]) -> list[bool]:
        try:
            return await self._write_outcome_batch(batch)
        except Exception as exc:
            for outcome in batch:
                outcome.retried = True
                if not is_transient(exc) and self._recording.get(outcome.email_id) == (
                    outcome.claim_no
                ):
                    # Failed for good (not kept): the lease decides as for any failure.
                    del self._recording[outcome.email_id]
            raise

    async def _write_outcome_batch(self, batch: list[_PendingOutcome]) -> list[bool]:
        # The fence, per outcome: the lease is still ours unless the next claim exists.
        held = await asyncio.gather(*(self._holds(o.email_id, o.claim_no) for o in batch))
        mine = [o for o, ok in zip(batch, held, strict=True) if ok]
        # A retry after a failed write: an email whose update did land (the answer was lost)
        # is not updated twice, which would repeat its events.
        landed: set[str] = set()
        retried = [o for o in mine if o.retried]
        if retried:
            docs = await asyncio.gather(
                *(self._emails.find_one({"_id": o.email_id}, {"attempts": 1}) for o in retried)
            )
            landed = {
                o.email_id
                for o, doc in zip(retried, docs, strict=True)
                if doc is not None and int(doc.get("attempts", 0)) >= o.attempts
            }
        # Emails first, entries second: a crash in between leaves entries whose next claim
        # sees the recorded outcome (finished: entry dropped; deferred: retried early), never
        # an unrecorded delivery.
        emails = [o.email for o in mine if o.email_id not in landed]
        if emails:
            await self._emails.bulk_write(emails, ordered=False)
        if mine:
            await self._queue.bulk_write([o.entry for o in mine], ordered=False)
        for o, ok in zip(batch, held, strict=True):
            if self._recording.get(o.email_id) == o.claim_no:
                del self._recording[o.email_id]
            if ok:
                self._leased.pop(o.email_id, None)
        return list(held)

    async def release(self, *, claimed: Claimed, now: datetime) -> None:
        """See `EmailRepository.release`: the lease ends now, nothing else was written."""
        claim_id = f"{claimed.email.id}:{claimed.claim_no}"
        claim = await self._claims.find_one({"_id": claim_id})
        if claim is not None and claim.get("token") == claimed.lease_token:
            await self._claims.update_one({"_id": claim_id}, {"$set": {"expires_at": now}})
        self._leased.pop(claimed.email.id, None)

    async def _waiting(self, tenant_id: str, email_id: str, now: datetime) -> Document | None:
        """The tenant's email if it waits for an attempt and no worker holds it at `now`.

        Queued, scheduled or deferred: what cancel and reschedule may change.
        """
        doc = await self._own(tenant_id, email_id, _NO_CONTENT)
        if doc is None or doc["status"] not in _CANCELLABLE:
            return None
        if await self._live_lease(email_id, now) is not None:
            return None  # a worker is delivering it right now
        return doc

    async def unfinished_ids(self, *, tenant_id: str, domain_id: str) -> list[str]:
        """See `EmailRepository.unfinished_ids`.

        Asked once per deleted domain, never on a request or queue path: served by the
        tenant index on MongoDB; FerretDB 1.24 scans the tenant's emails (DESIGN.md's measured
        facts), which a rare deletion can afford.
        """
        query: Document = {
            "tenant_id": tenant_id,
            "domain_id": domain_id,
            "status": {"$in": list(_CANCELLABLE)},
        }
        return [str(doc["_id"]) async for doc in self._emails.find(query, {"_id": 1})]

    async def cancel(self, *, tenant_id: str, email_id: str, event: Event) -> Email | None:
        """See `EmailRepository.cancel`."""
        doc = await self._waiting(tenant_id, email_id, event.time)
        if doc is None or not await self._transition(doc, event.time):
            return None
        # Queue entry first: no worker takes the email from here on.
        await self._queue.delete_one({"_id": email_id})
        email = _from_doc(doc)
        email.status = EmailStatus.CANCELLED
        email.next_attempt_at = None
        email.events.append(event)
        for r in email.recipients:
            if r.status in (RecipientStatus.PENDING, RecipientStatus.DEFERRED):
                r.status = RecipientStatus.CANCELLED
        await self._emails.update_one(
            {"_id": email_id},
            {
                "$set": {
                    "status": email.status.value,
                    "next_attempt_at": None,
                    "updated_at": event.time,
                    "recipients": [_recipient_doc(r) for r in email.recipients],
                },
                "$push": {"events": event_doc(event)},
            },
        )
        self.tallies.move(
            tenant_id=tenant_id,
            created_at=email.created_at,
            domain_id=email.domain_id,
            old=doc["status"],
            new=email.status.value,
        )
        await self.tallies.flush()
        return email

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
        if doc is None or not await self._transition(doc, event.time):
            return None
        email = _from_doc(doc)
        email.status = EmailStatus.SCHEDULED if scheduled else EmailStatus.QUEUED
        email.next_attempt_at = start
        email.send_at = start if scheduled else None
        email.expires_at = expires_at
        email.updated_at = event.time
        email.events.append(event)
        # Entry first: a crash before the email's update can make the email late by its new
        # time, never early (its document still shows the old time until then).
        await self._queue.update_one(
            {"_id": email_id},
            {"$set": {"due": start}, "$setOnInsert": {"claims": 0, "created_at": event.time}},
            upsert=True,
        )
        await self._emails.update_one(
            {"_id": email_id},
            {
                "$set": {
                    "status": email.status.value,
                    "next_attempt_at": start,
                    "send_at": email.send_at,
                    "expires_at": expires_at,
                    "updated_at": event.time,
                },
                "$push": {"events": event_doc(event)},
            },
        )
        self.tallies.move(
            tenant_id=tenant_id,
            created_at=email.created_at,
            domain_id=email.domain_id,
            old=doc["status"],
            new=email.status.value,
        )
        await self.tallies.flush()
        return email

    async def delete(self, *, tenant_id: str, email_id: str) -> Email | None:
        """See `EmailRepository.delete`."""
        doc = await self._own(tenant_id, email_id, _NO_CONTENT)
        if doc is None or doc["status"] in CLAIMABLE:
            return None
        email = _from_doc(doc)
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

        Email first: a crash after it leaves an orphan content file (swept with the orphans
        of crashed submits), never an email whose content is missing.
        """
        await self._emails.bulk_write([DeleteOne({"_id": d["_id"]}) for d in docs], ordered=False)
        keys = [DeleteOne({"_id": k["_id"]}) for d in docs for k in _key_docs(d)]
        for part in chunked(keys):
            await self._keys.bulk_write(list(part), ordered=False)
        for doc in docs:
            if doc.get("content_file_id"):
                # NoFile: deleted by an earlier attempt of this call.
                with contextlib.suppress(NoFile):
                    await self._bucket.delete(ObjectId(doc["content_file_id"]))
            self._count_doc(doc, -1)
        await self.tallies.flush()

    async def add_event(self, *, tenant_id: str, email_id: str, event: Event) -> None:
        """See `EmailRepository.add_event`."""
        if await self._own(tenant_id, email_id, {"tenant_id": 1}) is not None:
            await self._emails.update_one(
                {"_id": email_id}, {"$push": {"events": event_doc(event)}}
            )

    async def stats(
        self, *, tenant_id: str, start: datetime, end: datetime, domain_id: str | None
    ) -> list[tuple[str, str, int]]:
        """See `EmailRepository.stats`.

        Whole minutes of the window come from the counts kept as mail flows
        (`services.mail.tallies`); the seconds before the first whole minute and after the last
        are counted from the emails created then (``tenant_created`` index range).
        """
        grain = int(FINEST.total_seconds())
        first, last = ceil_to(start, grain), floor_to(end, grain)
        counts: Counter[tuple[str, str]] = Counter()
        edges = [(start, end)]
        if first < last:
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
        cutoff = now - shortest
        for status in sorted(s.value for s in FINISHED):
            after: datetime | None = None
            for _ in range(batches):
                window: Document = {"$lt": cutoff}
                if after is not None:
                    window["$gt"] = after
                cursor = (
                    self._emails.find({"status": status, "updated_at": window}, _NO_CONTENT)
                    .sort("updated_at", ASCENDING)
                    .limit(MAX_WRITE_BATCH)
                )
                docs = [d async for d in cursor]
                if not docs:
                    break
                after = docs[-1]["updated_at"]
                due = [d for d in docs if d["updated_at"] < now - retention(d["tenant_id"])]
                claims = [{"_id": _transition_id(d, removal=True), "created_at": now} for d in due]
                won = await _insert_many_unique(self._claims, claims)
                gone = [d for d, ok in zip(due, won, strict=True) if ok]
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
        self, *, tenant_id: str, now: datetime, domain_id: str | None
    ) -> tuple[int, datetime | None]:
        """See `EmailRepository.queue`.

        One range per waiting status on the ``tenant_due`` index (tenant, status, due time):
        what it reads is the tenant's backlog due now, never the mail it stored.
        """

        async def due(status: str) -> list[Document]:
            query: Document = {
                "tenant_id": tenant_id,
                "status": status,
                "next_attempt_at": {"$lte": now},
            }
            cursor = self._emails.find(query, {"next_attempt_at": 1, "domain_id": 1})
            return [d async for d in cursor]

        found = await asyncio.gather(*(due(status) for status in CLAIMABLE[:3]))
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
