"""How the mail service's emails are stored: collection names and BSON forms, one place.

The API storage (`services.mail.repository`) and the queue engine (`services.mail.queue`)
write the same email documents; both build them here. `transition_update` is the only place
a change of an email's state (status, recipients, timeline) becomes a database write: every
transition the outcome rules decide (`services.mail.outcomes`) is applied through it, as one
update of the email's document, so whatever must be recorded with a change (its timeline
entries, and its events for the events API: `feed_events`, pushed onto the email's event
outbox, see `services.mail.feedback.event_log`) goes into that same write. A new email's
first events (accepted, scheduled, suppressed) go into its insert (`email_doc`) the same way.

Collections (written only by the mail service):
* ``emails``: one document per email: envelope, recipients, timeline (an array of flat
  documents: no nested arrays on FerretDB), the GridFS id of its content when large. Not the
  message itself: every state change rewrites the whole document on FerretDB 1.24 (read,
  modify, write back), and every read of it decodes it whole, so the bytes live apart.
* ``email_contents``: the built message of each email under the inline limit, ``_id`` = the
  email's id (`content_doc`): written once before its email, read by ``_id`` (the worker's
  claim reads them for a whole batch), removed after its email. Emails stored before it
  existed keep their ``content`` field, which is still read.
* ``email_queue``: one tiny entry per unfinished email (`services.mail.queue`).
* ``email_claims``: leases and transition claims, an append-only log (`services.mail.queue`).
* ``email_idempotency``: ``_id`` = tenant + key, insert-first (`services.mail.repository`).
* GridFS bucket ``email_content``: built messages above the inline limit.

Test emails (sent with a test API key: simulated, never relayed) are stored in their tenant's
test partition: the document's ``tenant_id`` is `partition` (the tenant, a unit separator
character, ``test``) and
``test`` is true. Every tenant-scoped index and query (ListEmails, stats
counts, queue depth) thereby keeps live and test mail apart without another index, and a
listing or count of one never reads the other. `email_from_doc` gives the tenant back; a
document is read by ``_id`` and checked against either partition of the caller's tenant
(`belongs_to`). Events, suppressions and relays use the tenant itself (tenants hold no control
characters: `services.core.auth` refuses them).
"""

from __future__ import annotations

from collections.abc import Sequence

from bson import Binary
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError

from services.core.mongo import Document, chunked
from services.mail.feedback.event_log import OUTBOX_FIELD, SmtpFacts, build_event, with_events
from services.mail.models import (
    AttachmentInfo,
    Email,
    EmailStatus,
    Event,
    EventType,
    Recipient,
    RecipientKind,
    RecipientStatus,
    SmtpReply,
)
from services.mail.outcomes import Transition

EMAILS = "emails"
IDEMPOTENCY = "email_idempotency"
CLAIMS = "email_claims"
QUEUE = "email_queue"
CONTENTS = "email_contents"
CONTENT_BUCKET = "email_content"
# Appended to a tenant id: the partition of its test emails (see the module docstring).
TEST_PARTITION_SUFFIX = "\x1ftest"
# Reads for the API never carry the message bytes of emails stored with them inline (before
# ``email_contents``). (findAndModify cannot project on FerretDB 1.24, "fields is not
# implemented yet": those return the whole document, content dropped.)
NO_CONTENT = {"content": 0}
# What an API read of an email needs: neither the content nor the event outbox (the events API
# and webhooks read ``events``; the outbox is for the publisher and for whoever removes the
# email, and is about a third of a delivered email's bytes). Read-only paths only.
API_VIEW = {"content": 0, OUTBOX_FIELD: 0}


def partition(tenant_id: str, test: bool) -> str:
    """The ``tenant_id`` stored on a tenant's live (or, with `test`, test) emails."""
    return tenant_id + TEST_PARTITION_SUFFIX if test else tenant_id


def belongs_to(doc: Document, tenant_id: str) -> bool:
    """Whether an email document is the tenant's (live or test)."""
    return doc.get("tenant_id") in (tenant_id, tenant_id + TEST_PARTITION_SUFFIX)


def _reply_doc(reply: SmtpReply | None) -> Document | None:
    if reply is None:
        return None
    return {"code": reply.code, "enhanced": reply.enhanced_code, "text": reply.text}


def _reply(doc: Document | None) -> SmtpReply | None:
    if not doc:
        return None
    return SmtpReply(int(doc["code"]), str(doc.get("enhanced", "")), str(doc.get("text", "")))


def event_doc(event: Event) -> Document:
    """BSON form of a timeline entry (empty fields left out, as `_event` reads them)."""
    doc: Document = {"type": event.type.value, "time": event.time}
    if event.recipient:
        doc["recipient"] = event.recipient
    if event.reply is not None:
        doc["reply"] = _reply_doc(event.reply)
    if event.detail:
        doc["detail"] = event.detail
    return doc


def _event(doc: Document) -> Event:
    return Event(
        EventType(doc["type"]),
        doc["time"],
        doc.get("recipient", ""),
        _reply(doc.get("reply")),
        doc.get("detail", ""),
    )


def recipient_doc(r: Recipient) -> Document:
    """BSON form of a recipient's state (empty fields left out, as `_recipient` reads them)."""
    doc: Document = {"address": r.address, "kind": r.kind.value, "status": r.status.value}
    if r.last_reply is not None:
        doc["last_reply"] = _reply_doc(r.last_reply)
    if r.attempts:
        doc["attempts"] = r.attempts
    if r.updated_at is not None:
        doc["updated_at"] = r.updated_at
    return doc


def _recipient(doc: Document) -> Recipient:
    return Recipient(
        doc["address"],
        RecipientKind(doc["kind"]),
        RecipientStatus(doc["status"]),
        _reply(doc.get("last_reply")),
        int(doc.get("attempts", 0)),
        doc.get("updated_at"),
    )


# Timeline entries that are a worker's bookkeeping, not a change an application hears of.
_UNPUBLISHED = frozenset({EventType.CLAIMED})


def feed_events(email: Email, events: Sequence[Event]) -> list[Document]:
    """The events-API documents (events contract) of these timeline entries of `email`.

    One per entry except a worker's claims: type, time, recipient, the relay's reply and the
    entry's detail as the reason, with the email's tenant, sender domain, tags and metadata.
    Pure (each call makes new event ids): build once per write, announce and write the same.
    """
    return [
        build_event(
            type=e.type.value,
            occurred_at=e.time,
            tenant_id=email.tenant_id,
            domain=email.domain_name,
            email_id=email.id,
            recipient=e.recipient or None,
            tags=email.tags,
            metadata=email.metadata,
            smtp=(
                SmtpFacts(e.reply.code, e.reply.enhanced_code, e.reply.text)
                if e.reply is not None and e.reply.code
                else None
            ),
            reason=e.detail or None,
            test=email.test,
        )
        for e in events
        if e.type not in _UNPUBLISHED
    ]


# Fields a new email's document leaves out while they hold these values (`email_doc`), which
# are what `email_from_doc` reads for a missing field. No query filters on them. Why: the
# embedded database stores a type schema next to every field and re-parses the whole document
# for each index key on every insert and update; most emails leave these empty.
_LEFT_OUT_WHEN = {
    "test": False,
    "cc": [],
    "bcc": [],
    "reply_to": [],
    "tags": [],
    "metadata": [],
    "attachments": [],
    "send_at": None,
    "resent_from_id": "",
    "idempotency_key": "",
    "content_file_id": "",
    "trace_context": {},
    "template_id": "",
    "template_version": 0,
}


def email_doc(email: Email) -> Document:
    """BSON form of a new email (its first state: the insert, not a transition).

    Its first events (`feed_events` of its timeline) are in its outbox: the insert records
    them with the email (announce ``doc[OUTBOX_FIELD]`` before inserting). Fields at their
    empty value are left out (`_LEFT_OUT_WHEN`).
    """
    doc = _full_email_doc(email)
    return {k: v for k, v in doc.items() if k not in _LEFT_OUT_WHEN or v != _LEFT_OUT_WHEN[k]}


def _full_email_doc(email: Email) -> Document:
    return {
        "_id": email.id,
        "tenant_id": partition(email.tenant_id, email.test),
        "test": email.test,
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
        "recipients": [recipient_doc(r) for r in email.recipients],
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
        "content_file_id": email.content_file_id,
        "trace_context": dict(email.trace_context),
        "template_id": email.template_id,
        "template_version": email.template_version,
        OUTBOX_FIELD: feed_events(email, email.events),
    }


def content_doc(email: Email) -> Document | None:
    """The ``email_contents`` document of a new email (None: its content is in GridFS)."""
    if email.content is None or email.content_file_id:
        return None
    return {"_id": email.id, "content": Binary(email.content), "created_at": email.created_at}


def email_from_doc(doc: Document) -> Email:
    """The email a stored document holds."""
    content = doc.get("content")
    test = bool(doc.get("test", False))
    tenant_id = str(doc["tenant_id"])
    return Email(
        id=doc["_id"],
        tenant_id=tenant_id.removesuffix(TEST_PARTITION_SUFFIX) if test else tenant_id,
        domain_id=doc["domain_id"],
        domain_name=doc["domain_name"],
        from_address=doc["from"],
        envelope_from=doc["envelope_from"],
        to=list(doc["to"]),
        cc=list(doc.get("cc", [])),
        bcc=list(doc.get("bcc", [])),
        reply_to=list(doc.get("reply_to", [])),
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
        test=test,
    )


def transition_update(transition: Transition, feed: Sequence[Document] = ()) -> Document:
    """The update of an email's document that records `transition`: the one place it is built.

    State and timeline in one write: the fields the transition sets, and its events appended
    (``$push``, never read back and rewritten), with `feed` (its `feed_events`, announced
    before) pushed onto the event outbox. A write of this update by ``_id`` is the whole
    record of the change.
    """
    fields: Document = {}
    if transition.status is not None:
        fields["status"] = transition.status.value
        fields["next_attempt_at"] = transition.next_attempt_at
        fields["updated_at"] = transition.time
    if transition.recipients is not None:
        fields["recipients"] = [recipient_doc(r) for r in transition.recipients]
    if transition.attempts is not None:
        fields["attempts"] = transition.attempts
    if transition.schedule is not None:
        fields["send_at"] = transition.schedule.send_at
        fields["expires_at"] = transition.schedule.expires_at
    update: Document = {"$push": {"events": {"$each": [event_doc(e) for e in transition.events]}}}
    if fields:
        update["$set"] = fields
    return with_events(update, feed) if feed else update


async def find_by_ids(
    collection: AsyncCollection[Document],
    ids: Sequence[str],
    projection: Document | None = None,
) -> dict[str, Document]:
    """The documents of `ids` that exist, by id: one ``_id $in`` read per `chunked` slice.

    ``_id`` with ``$in`` is served by the primary key on MongoDB and on the embedded database
    (its local build pushes ``_id`` ``$in`` down to the ``_id_`` index).
    """
    found: dict[str, Document] = {}
    for part in chunked(list(dict.fromkeys(ids))):
        async for doc in collection.find({"_id": {"$in": list(part)}}, projection):
            found[str(doc["_id"])] = doc
    return found


async def insert_many_unique(
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


__all__ = [
    "CLAIMS",
    "CONTENTS",
    "CONTENT_BUCKET",
    "EMAILS",
    "IDEMPOTENCY",
    "NO_CONTENT",
    "API_VIEW",
    "QUEUE",
    "TEST_PARTITION_SUFFIX",
    "belongs_to",
    "content_doc",
    "email_doc",
    "email_from_doc",
    "event_doc",
    "feed_events",
    "find_by_ids",
    "insert_many_unique",
    "partition",
    "recipient_doc",
    "transition_update",
]
