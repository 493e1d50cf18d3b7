"""Storage of emails (the delivery queue itself), idempotency keys and large message content.

Collections (written only by the mail service):
* ``emails``: one document per email: envelope, content (or its GridFS id), recipients,
  timeline. Writes after a claim filter on the claim's lease token, which fences out a worker
  whose lease was taken over.
* ``email_queue``: one tiny entry per unfinished email, ``due`` = when a worker may take it.
  A claim moves ``due`` to the lease's expiry, so one field finds both due emails and expired
  leases (SQS-style "visible at"); the entry is removed when the email finishes.
* ``email_idempotency``: ``_id`` = tenant + key; insert-first, so concurrent duplicates meet on
  the unique ``_id``. Expired records are removed by our sweeper (no TTL index: FerretDB).
* ``email_claims``: ``_id`` = email id + claim number; the unique insert that decides which
  worker wins a claim (see `MongoEmailRepository.claim`). Swept after an hour.
FerretDB 1.24 has no transactions: the writes of one step go entry-then-email in an order
where a crash between them leaves work to redo, never work lost.
* GridFS bucket ``email_content``: built messages above the inline limit (FerretDB 1.24 serves
  GridFS: it is two ordinary collections, ``files`` and ``chunks`` of 255 KiB).
Timeline events are an array of flat documents (no nested arrays: FerretDB).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from bson import Binary, ObjectId
from gridfs.asynchronous import AsyncGridFSBucket
from gridfs.errors import NoFile
from pymongo import ASCENDING, DESCENDING, ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase

from services.core.errors import NotFound
from services.core.mongo import Document, IndexSpec, is_duplicate_key
from services.mail.models import (
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

EMAILS = "emails"
IDEMPOTENCY = "email_idempotency"
CLAIMS = "email_claims"
QUEUE = "email_queue"
_CANCELLABLE = (
    EmailStatus.QUEUED.value,
    EmailStatus.SCHEDULED.value,
    EmailStatus.DEFERRED.value,
)
# A queue entry whose email does not exist after this long was left by a crashed submit.
_ORPHAN_AGE = timedelta(minutes=1)
# How many due emails a claimer looks at (and tries in random order).
_CLAIM_CANDIDATES = 8
_CLAIM_WINDOW = 64
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
    IndexSpec(IDEMPOTENCY, [("expires_at", ASCENDING)], "idempotency_expiry"),
    IndexSpec(CLAIMS, [("created_at", ASCENDING)], "claim_age"),
    IndexSpec(QUEUE, [("due", ASCENDING)], "queue_due"),
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

    async def get(self, *, tenant_id: str, email_id: str) -> Email:
        """The tenant's email, without content.

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

    async def claim(
        self, *, now: datetime, lease: timedelta, token: str, event: Event
    ) -> Claimed | None:
        """Atomically take the most overdue claimable email, if any."""
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
        """Record an attempt's outcome if the lease is still ours (False otherwise)."""
        ...

    async def release(self, *, claimed: Claimed, now: datetime) -> None:
        """Give a claimed email back untouched (shutdown): due again at once."""
        ...

    async def sweep_claims(self, *, before: datetime) -> int:
        """Forget claim bookkeeping older than `before`."""
        ...

    async def cancel(self, *, tenant_id: str, email_id: str, event: Event) -> Email | None:
        """Cancel an email that is queued, scheduled or deferred; None if it is not."""
        ...

    async def delete(self, *, tenant_id: str, email_id: str) -> Email | None:
        """Remove a finished email and its content; None if it is not finished."""
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


class IdempotencyRepository(Protocol):
    """Idempotency keys per tenant."""

    async def reserve(self, *, record: IdempotencyRecord, now: datetime) -> IdempotencyRecord:
        """Store `record` unless a live record holds the key; return the record that holds it.

        An expired record is replaced (the key is free again after its window).
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
    )


# Reads for the API never carry the message bytes. (findAndModify cannot project on FerretDB
# 1.24, "fields is not implemented yet": those return the whole document, content dropped.)
_NO_CONTENT = {"content": 0}


class MongoEmailRepository:
    """`EmailRepository` on MongoDB/FerretDB, large content in GridFS."""

    def __init__(self, db: AsyncDatabase[Document], *, inline_limit: int) -> None:
        self._emails = db[EMAILS]
        self._claims = db[CLAIMS]
        self._queue = db[QUEUE]
        self._rng = random.Random()  # noqa: S311 - load spreading, not security
        self._bucket = AsyncGridFSBucket(db, bucket_name=CONTENT_BUCKET)
        self._inline_limit = inline_limit

    async def insert(self, *, email: Email) -> bool:
        """See `EmailRepository.insert`."""
        content = email.content or b""
        file_id: ObjectId | None = None
        if len(content) > self._inline_limit:
            # Content first: an email document never points at missing content. A crash
            # between the two leaves an orphan file, never a broken email.
            file_id = await self._bucket.upload_from_stream(f"{email.id}.eml", content)
            email.content_file_id = str(file_id)
            email.content = None
        try:
            if email.status in UNFINISHED and email.next_attempt_at is not None:
                # Queue entry before the email: a crash in between leaves an entry without
                # email (dropped by `claim`), never an email nobody will deliver.
                try:
                    await self._queue.update_one(
                        {"_id": email.id},
                        {
                            "$setOnInsert": {
                                "due": email.next_attempt_at,
                                "claims": 0,
                                "created_at": email.created_at,
                            }
                        },
                        upsert=True,
                    )
                except Exception as exc:
                    # A concurrent duplicate (same idempotency key) upserted it first; whether
                    # this email is the one stored is decided by the email's own _id below.
                    if not is_duplicate_key(exc):
                        raise
            await self._emails.insert_one(_to_doc(email))
        except Exception as exc:
            if file_id is not None:
                await self._bucket.delete(file_id)
            if is_duplicate_key(exc):
                return False
            raise
        return True

    async def get(self, *, tenant_id: str, email_id: str) -> Email:
        """See `EmailRepository.get`."""
        doc = await self._own(tenant_id, email_id, _NO_CONTENT)
        if doc is None:
            raise NotFound("Email", email_id)
        return _from_doc(doc)

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
        """See `EmailRepository.page`."""
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
        cursor = self._emails.find(query, _NO_CONTENT).sort("_id", DESCENDING).limit(limit)
        return [_from_doc(d) async for d in cursor]

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

    async def claim(
        self, *, now: datetime, lease: timedelta, token: str, event: Event
    ) -> Claimed | None:
        """See `EmailRepository.claim`.

        Two FerretDB 1.24 (SQLite) facts shape this, both measured here:
        * it does not isolate ``findAndModify`` or conditional updates (8 concurrent claimers
          took 50 documents 123-157 times), but it does enforce unique keys. So the claim is
          an insert of ``<email id>:<claim number>`` into ``email_claims``; only its winner
          moves the entry and bumps ``claims``, so each claim number is won once. (On
          MongoDB find-and-modify alone would do; this stays correct there.)
        * it filters and sorts by scanning every document of a collection. So the queue is
          its own collection of tiny entries that exist only while an email is unfinished,
          instead of a filter over every email ever sent.
        """
        # No sort on the server: FerretDB sorts by scanning every entry (20 ms at 300), while
        # a plain filter with a limit stops early. The oldest of a wider window go first.
        cursor = self._queue.find({"due": {"$lte": now}}).limit(_CLAIM_WINDOW)
        window = sorted([d async for d in cursor], key=lambda d: d["due"])
        candidates = window[:_CLAIM_CANDIDATES]
        # Concurrent workers would all fight over the head of the queue; spread them out.
        self._rng.shuffle(candidates)
        for entry in candidates:
            email_id, number = entry["_id"], int(entry.get("claims", 0))
            claim_id = f"{email_id}:{number}"
            try:
                await self._claims.insert_one({"_id": claim_id, "token": token, "created_at": now})
            except Exception as exc:
                if not is_duplicate_key(exc):
                    raise
                await self._drop_stale_claim(claim_id, now=now, lease=lease)
                continue  # another worker won this claim
            await self._queue.update_one(
                {"_id": email_id}, {"$set": {"due": now + lease, "claims": number + 1}}
            )
            # Read, check, write by _id (see `_own`): the claim record above already made this
            # worker the only one writing this claim; a concurrent cancel is the one race left.
            doc = await self._emails.find_one({"_id": email_id})
            if doc is not None and doc["status"] in CLAIMABLE:
                doc["status"] = EmailStatus.SENDING.value
                doc["lease_token"] = token
                doc["next_attempt_at"] = now + lease
                doc["updated_at"] = now
                doc["attempts"] = int(doc.get("attempts", 0)) + 1
                await self._emails.update_one(
                    {"_id": email_id},
                    {
                        "$set": {
                            "status": doc["status"],
                            "lease_token": token,
                            "next_attempt_at": now + lease,
                            "updated_at": now,
                            "attempts": doc["attempts"],
                        },
                        "$push": {"events": event_doc(event)},
                    },
                )
                doc["events"] = [*doc.get("events", []), event_doc(event)]
                return Claimed(_from_doc(doc), token)
            # Finished or cancelled meanwhile, or an entry whose email was never stored.
            if doc is not None or entry.get("created_at", now) <= now - _ORPHAN_AGE:
                await self._queue.delete_one({"_id": email_id})
        return None

    async def _holds(self, claimed: Claimed) -> bool:
        # The fence against a worker whose lease was taken over (read, then write by _id).
        doc = await self._emails.find_one({"_id": claimed.email.id}, {"lease_token": 1})
        return doc is not None and doc.get("lease_token") == claimed.lease_token

    async def _drop_stale_claim(self, claim_id: str, *, now: datetime, lease: timedelta) -> None:
        # A claimer that died between its insert and moving the entry would block that claim
        # number forever; once a lease has passed its record is removed so it can be won again.
        existing = await self._claims.find_one({"_id": claim_id})
        if existing is not None and existing["created_at"] <= now - lease:
            await self._claims.delete_one({"_id": claim_id, "token": existing["token"]})

    async def queue_health(self, *, now: datetime) -> tuple[int, float]:
        """Entries due now in the whole queue, and how long the oldest has been due (s)."""
        depth = 0
        oldest: datetime | None = None
        async for entry in self._queue.find({"due": {"$lte": now}}, {"due": 1}):
            depth += 1
            oldest = entry["due"] if oldest is None else min(oldest, entry["due"])
        return depth, (now - oldest).total_seconds() if oldest is not None else 0.0

    async def sweep_claims(self, *, before: datetime) -> int:
        """Remove claim records older than `before` (only needed for a moment after a claim)."""
        result = await self._claims.delete_many({"created_at": {"$lt": before}})
        return int(result.deleted_count)

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
        """See `EmailRepository.finish_attempt`."""
        if not await self._holds(claimed):
            return False
        result = await self._emails.update_one(
            {"_id": claimed.email.id},
            {
                "$set": {
                    "recipients": [_recipient_doc(r) for r in recipients],
                    "status": status.value,
                    "next_attempt_at": next_attempt_at,
                    "lease_token": "",
                    "updated_at": now,
                },
                "$push": {"events": {"$each": [event_doc(e) for e in events]}},
            },
        )
        if result.modified_count != 1:
            return False
        if status in UNFINISHED and next_attempt_at is not None:
            await self._queue.update_one(
                {"_id": claimed.email.id}, {"$set": {"due": next_attempt_at}}
            )
        else:
            await self._queue.delete_one({"_id": claimed.email.id})
        return True

    async def release(self, *, claimed: Claimed, now: datetime) -> None:
        """See `EmailRepository.release`."""
        if not await self._holds(claimed):
            return
        await self._emails.update_one(
            {"_id": claimed.email.id},
            {
                "$set": {
                    "status": EmailStatus.QUEUED.value,
                    "next_attempt_at": now,
                    "lease_token": "",
                    "updated_at": now,
                },
                # The claim did not turn into an attempt.
                "$inc": {"attempts": -1},
            },
        )
        await self._queue.update_one({"_id": claimed.email.id}, {"$set": {"due": now}})

    async def cancel(self, *, tenant_id: str, email_id: str, event: Event) -> Email | None:
        """See `EmailRepository.cancel`."""
        doc = await self._own(tenant_id, email_id, _NO_CONTENT)
        if doc is None or doc["status"] not in _CANCELLABLE:
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
        return email

    async def delete(self, *, tenant_id: str, email_id: str) -> Email | None:
        """See `EmailRepository.delete`."""
        doc = await self._own(tenant_id, email_id, _NO_CONTENT)
        if doc is None or doc["status"] in CLAIMABLE:
            return None
        await self._emails.delete_one({"_id": email_id})
        email = _from_doc(doc)
        if email.content_file_id:
            # NoFile: deleted by an earlier attempt of this call.
            with contextlib.suppress(NoFile):
                await self._bucket.delete(ObjectId(email.content_file_id))
        return email

    async def add_event(self, *, tenant_id: str, email_id: str, event: Event) -> None:
        """See `EmailRepository.add_event`."""
        if await self._own(tenant_id, email_id, {"tenant_id": 1}) is not None:
            await self._emails.update_one(
                {"_id": email_id}, {"$push": {"events": event_doc(event)}}
            )

    async def stats(
        self, *, tenant_id: str, start: datetime, end: datetime, domain_id: str | None
    ) -> list[tuple[str, str, int]]:
        """See `EmailRepository.stats`."""
        match: Document = {"tenant_id": tenant_id, "created_at": {"$gte": start, "$lt": end}}
        if domain_id:
            match["domain_id"] = domain_id
        pipeline: list[Document] = [
            {"$match": match},
            {"$group": {"_id": {"d": "$domain_id", "s": "$status"}, "n": {"$sum": 1}}},
        ]
        out: list[tuple[str, str, int]] = []
        async for row in await self._emails.aggregate(pipeline):
            out.append((row["_id"]["d"], row["_id"]["s"], int(row["n"])))
        return out

    async def queue(
        self, *, tenant_id: str, now: datetime, domain_id: str | None
    ) -> tuple[int, datetime | None]:
        """See `EmailRepository.queue`."""
        query: Document = {
            "tenant_id": tenant_id,
            "status": {"$in": CLAIMABLE[:3]},
            "next_attempt_at": {"$lte": now},
        }
        if domain_id:
            query["domain_id"] = domain_id
        depth = await self._emails.count_documents(query)
        oldest = await self._emails.find_one(
            query, {"next_attempt_at": 1}, sort=[("next_attempt_at", ASCENDING)]
        )
        return depth, (oldest["next_attempt_at"] if oldest else None)


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
        for _ in range(3):
            try:
                await self._records.insert_one(doc)
                return record
            except Exception as exc:
                if not is_duplicate_key(exc):
                    raise
            existing = await self._records.find_one({"_id": doc_id})
            if existing is None:
                continue  # swept meanwhile: try again
            if existing["expires_at"] > now:
                return _record(existing)
            # Expired but not swept yet: take it over unless someone else just did.
            replaced = await self._records.find_one_and_update(
                {"_id": doc_id, "expires_at": existing["expires_at"]},
                {"$set": {k: v for k, v in doc.items() if k != "_id"}},
                return_document=ReturnDocument.AFTER,
            )
            if replaced is not None:
                return _record(replaced)
        raise RuntimeError("idempotency record kept changing")  # pragma: no cover

    async def sweep(self, *, now: datetime) -> int:
        """See `IdempotencyRepository.sweep`."""
        result = await self._records.delete_many({"expires_at": {"$lte": now}})
        return int(result.deleted_count)


def _record(doc: dict[str, Any]) -> IdempotencyRecord:
    return IdempotencyRecord(
        doc["tenant_id"], doc["key"], doc["fingerprint"], doc["email_id"], doc["expires_at"]
    )
