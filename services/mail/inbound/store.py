"""Received messages: the ``inbound_messages`` collection and its use cases.

The inbound SMTP server answers 250 only once `InboundStore.store` returned: the record (with
the raw message) is written with one insert. A record's id is a digest of the tenant,
recipient, route, envelope sender and the message bytes as the client sent them, so a client
that retries after losing our 250 finds its message stored once (the insert meets the unique
``_id`` and the stored record is the answer). Our own trace headers (Received,
Authentication-Results) differ between attempts and are therefore kept beside the message.

Every action keeps the message here; ``webhook`` and ``forward`` also create their own record
(a webhook delivery, a queued email) through an `ActionRunner` before the answer, the record
being ``pending`` until that is done (the argument is in `services.mail.inbound.actions`).

Listing is newest first through ``seq`` (a ULID of the receive time, then the id), served by
the (tenant_id, seq) index; retention is ``expire_at``, swept in bounded batches. Records
still pending after `PENDING_GRACE` are found through the (action_state, received_at) index.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from pymongo import ASCENDING, DESCENDING
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from services.core.clock import Clock
from services.core.errors import FieldViolation, InvalidArgument, NotFound
from services.core.ids import decode_page_token, encode_page_token, new_id, new_ulid, page_size
from services.core.mongo import MAX_WRITE_BATCH, IndexSpec, is_duplicate_key

log = logging.getLogger(__name__)
Document = dict[str, Any]
MESSAGES = "inbound_messages"
INDEXES = (
    IndexSpec(MESSAGES, [("tenant_id", ASCENDING), ("seq", DESCENDING)], "inbound_tenant_seq"),
    IndexSpec(MESSAGES, [("expire_at", ASCENDING)], "inbound_expiry"),
    IndexSpec(
        MESSAGES, [("action_state", ASCENDING), ("received_at", ASCENDING)], "inbound_pending"
    ),
)
_ID_LENGTH = 24
SWEEP_BATCHES = 25
ACTIONS = ("store", "webhook", "forward")
# A record whose action is still pending this long after it arrived was left by a process that
# died mid-store (its client may never retry): `InboundStore.finish_pending` carries it out.
PENDING_GRACE = timedelta(minutes=2)
# Pending records finished per run.
PENDING_BATCH = 50


@dataclass(frozen=True, slots=True)
class Authentication:
    """What the inbound server found checking a message (RFC 8601 result words)."""

    spf: str = "none"
    spf_domain: str = ""
    dkim: str = "none"
    dkim_domains: tuple[str, ...] = ()
    dmarc: str = "none"
    from_domain: str = ""
    header: str = ""


@dataclass(frozen=True, slots=True)
class Received:
    """One received message for one recipient, as the inbound server hands it over."""

    raw: bytes
    added_headers: bytes
    envelope_from: str
    recipient: str
    domain_id: str
    route_id: str
    action: str
    client_address: str
    helo: str
    authentication: Authentication = field(default_factory=Authentication)
    # The route's target: its webhook endpoint ("webhook") or addresses ("forward").
    webhook_id: str = ""
    forward_to: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class InboundRecord:
    """A stored received message."""

    id: str
    tenant_id: str
    received: Received
    outcome: str
    received_at: datetime
    expire_at: datetime
    # Bytes as stored (trace headers and message); kept because lists leave the bytes out.
    size: int
    # The listing position: a ULID of the receive time, "-", the id.
    seq: str = ""
    # "pending" until the action's own record exists, then "done"; "failed" (with the
    # detail) when it can never be created.
    action_state: str = "done"
    action_detail: str = ""
    # What the action created: the webhook delivery, or the forwarded email.
    webhook_delivery_id: str = ""
    forward_email_id: str = ""

    @property
    def content(self) -> bytes:
        """The message as stored: our trace headers on top of what the client sent."""
        return self.received.added_headers + self.received.raw


@dataclass(frozen=True, slots=True)
class ActionResult:
    """What carrying out an action left: done (with its references) or failed (with why)."""

    state: str
    detail: str = ""
    webhook_delivery_id: str = ""
    forward_email_id: str = ""


@dataclass(frozen=True, slots=True)
class Outcome:
    """Where a message's action stands now (see InboundMessage.outcome in the proto)."""

    outcome: str
    detail: str = ""


class ActionRunner(Protocol):
    """Carries out route actions (`services.mail.inbound.actions.InboundActions`)."""

    async def carry_out(self, record: InboundRecord) -> ActionResult:
        """Create the action's own record, idempotently (raises when it should be retried)."""
        ...

    async def outcomes(self, records: Sequence[InboundRecord]) -> dict[str, Outcome]:
        """The current outcome of each record's action, by record id."""
        ...


@dataclass(frozen=True, slots=True)
class InboundPage:
    """One page of records (with their outcomes) and the token of the next."""

    records: list[InboundRecord]
    next_page_token: str
    outcomes: dict[str, Outcome] = field(default_factory=dict)


class InboundRepository(Protocol):
    """Storage of received messages."""

    async def insert(self, *, record: InboundRecord, seq: str) -> InboundRecord:
        """Store `record`; if its id is stored already, return the stored one instead."""
        ...

    async def get(self, *, tenant_id: str, record_id: str) -> InboundRecord | None:
        """The tenant's record, or None."""
        ...

    async def list(self, *, tenant_id: str, before_seq: str | None, limit: int) -> list[Document]:
        """Newest first, with their ``seq``; raw bytes left out."""
        ...

    async def sweep(self, *, now: datetime) -> int:
        """Delete up to one batch of expired records; return how many."""
        ...

    async def finish_action(self, *, record_id: str, result: ActionResult) -> None:
        """Record what carrying out the record's action left."""
        ...

    async def pending(self, *, before: datetime, limit: int) -> Sequence[InboundRecord]:
        """Records whose action is still pending, received before `before`."""
        ...


class MongoInboundRepository:
    """`InboundRepository` on MongoDB."""

    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self._messages = db[MESSAGES]

    async def insert(self, *, record: InboundRecord, seq: str) -> InboundRecord:
        """See `InboundRepository.insert`."""
        try:
            await self._messages.insert_one({**_to_doc(record), "seq": seq})
        except PyMongoError as exc:
            if not is_duplicate_key(exc):
                raise
            stored = await self._messages.find_one({"_id": record.id})
            if stored is not None:
                return _from_doc(stored)
        return record

    async def get(self, *, tenant_id: str, record_id: str) -> InboundRecord | None:
        """See `InboundRepository.get`."""
        doc = await self._messages.find_one({"_id": record_id})
        if doc is None or doc["tenant_id"] != tenant_id:
            return None
        return _from_doc(doc)

    async def list(self, *, tenant_id: str, before_seq: str | None, limit: int) -> list[Document]:
        """See `InboundRepository.list`."""
        query: Document = {"tenant_id": tenant_id}
        if before_seq is not None:
            query["seq"] = {"$lt": before_seq}
        cursor = (
            self._messages.find(query, {"raw": False, "added_headers": False})
            .sort("seq", DESCENDING)
            .limit(limit)
        )
        return [doc async for doc in cursor]

    async def sweep(self, *, now: datetime) -> int:
        """See `InboundRepository.sweep`."""
        cursor = self._messages.find({"expire_at": {"$lt": now}}, {"_id": True}).limit(
            MAX_WRITE_BATCH
        )
        ids = [doc["_id"] async for doc in cursor]
        if not ids:
            return 0
        result = await self._messages.delete_many({"_id": {"$in": ids}})
        return result.deleted_count

    async def finish_action(self, *, record_id: str, result: ActionResult) -> None:
        """See `InboundRepository.finish_action`."""
        await self._messages.update_one(
            {"_id": record_id},
            {
                "$set": {
                    "action_state": result.state,
                    "action_detail": result.detail,
                    "webhook_delivery_id": result.webhook_delivery_id,
                    "forward_email_id": result.forward_email_id,
                }
            },
        )

    async def pending(self, *, before: datetime, limit: int) -> Sequence[InboundRecord]:
        """See `InboundRepository.pending`."""
        cursor = self._messages.find(
            {"action_state": "pending", "received_at": {"$lt": before}}
        ).limit(limit)
        return [_from_doc(doc) async for doc in cursor]


class InboundStore:
    """Use cases of received messages."""

    def __init__(
        self,
        *,
        repository: InboundRepository,
        clock: Clock,
        retention: timedelta,
        max_message_size: int,
        default_page_size: int,
        max_page_size: int,
        actions: ActionRunner | None = None,
    ) -> None:
        self._repository = repository
        self._actions = actions
        self._clock = clock
        self._retention = retention
        self._max_size = max_message_size
        self._default_page_size = default_page_size
        self._max_page_size = max_page_size

    async def store(self, *, tenant_id: str, received: Received) -> InboundRecord:
        """Keep a received message durably (idempotent, see the module docstring).

        Raises:
            InvalidArgument: no message, one over the size limit, no recipient, route or domain,
                an unknown action, a webhook without its endpoint, a forward without addresses.
        """
        problems = []
        if not received.raw:
            problems.append(FieldViolation("raw_message", "is required"))
        elif len(received.raw) > self._max_size:
            problems.append(FieldViolation("raw_message", f"exceeds {self._max_size} bytes"))
        for name in ("recipient", "domain_id", "route_id", "action"):
            if not getattr(received, name):
                problems.append(FieldViolation(name, "is required"))
        if received.action and received.action not in ACTIONS:
            problems.append(FieldViolation("action", f"must be one of {', '.join(ACTIONS)}"))
        if received.action == "webhook" and not received.webhook_id:
            problems.append(FieldViolation("webhook_id", "is required for the webhook action"))
        if received.action == "forward" and not received.forward_to:
            problems.append(FieldViolation("forward_to", "is required for the forward action"))
        if received.action in ("webhook", "forward") and self._actions is None:
            problems.append(FieldViolation("action", "not configured in this process"))
        if problems:
            raise InvalidArgument(problems)
        now = self._clock.now()
        rid = record_id(tenant_id, received)
        seq = f"{new_ulid(now)}-{rid}"
        record = InboundRecord(
            id=rid,
            tenant_id=tenant_id,
            received=received,
            outcome="stored",
            received_at=now,
            expire_at=now + self._retention,
            size=len(received.added_headers) + len(received.raw),
            seq=seq,
            action_state="done" if received.action == "store" else "pending",
            # Chosen now and stored with the record, so a retry queues the same email; an
            # ordinary time-ordered id, as the email listing's order needs.
            forward_email_id=new_id() if received.action == "forward" else "",
        )
        stored = await self._repository.insert(record=record, seq=seq)
        if stored.action_state == "pending":
            stored = await self._carry_out(stored)
        return stored

    async def _carry_out(self, record: InboundRecord) -> InboundRecord:
        """Carry out a pending record's action and record what it left (raises to retry)."""
        assert self._actions is not None  # checked before a pending record is stored
        result = await self._actions.carry_out(record)
        await self._repository.finish_action(record_id=record.id, result=result)
        if result.state == "failed":
            log.warning(
                "inbound action failed",
                extra={
                    "fields": {
                        "id": record.id,
                        "action": record.received.action,
                        "detail": result.detail,
                    }
                },
            )
        return replace(
            record,
            action_state=result.state,
            action_detail=result.detail,
            webhook_delivery_id=result.webhook_delivery_id,
            forward_email_id=result.forward_email_id,
        )

    async def finish_pending(self) -> None:
        """Carry out the actions of records left pending (see `PENDING_GRACE`); one batch."""
        if self._actions is None:
            return
        before = self._clock.now() - PENDING_GRACE
        for record in await self._repository.pending(before=before, limit=PENDING_BATCH):
            try:
                await self._carry_out(record)
            except Exception:
                log.exception(
                    "pending inbound action not carried out", extra={"fields": {"id": record.id}}
                )

    async def outcomes(self, records: Sequence[InboundRecord]) -> dict[str, Outcome]:
        """The current outcome of each record's action, by id."""
        if self._actions is None:
            return {r.id: Outcome(r.outcome) for r in records}
        return await self._actions.outcomes(records)

    async def keep_report(
        self, *, tenant_id: str, received: Received, outcome: str
    ) -> InboundRecord:
        """Keep a message to a bounce address with what was done with it (the bounce mailbox).

        Idempotent like `store`: a retried message keeps the outcome of its first record.

        Raises:
            InvalidArgument: no message, one over the size limit, no recipient.
        """
        problems = []
        if not received.raw:
            problems.append(FieldViolation("raw_message", "is required"))
        elif len(received.raw) > self._max_size:
            problems.append(FieldViolation("raw_message", f"exceeds {self._max_size} bytes"))
        if not received.recipient:
            problems.append(FieldViolation("recipient", "is required"))
        if problems:
            raise InvalidArgument(problems)
        now = self._clock.now()
        record = InboundRecord(
            id=record_id(tenant_id, received),
            tenant_id=tenant_id,
            received=received,
            outcome=outcome,
            received_at=now,
            expire_at=now + self._retention,
            size=len(received.added_headers) + len(received.raw),
        )
        return await self._repository.insert(record=record, seq=f"{new_ulid(now)}-{record.id}")

    async def get(self, *, tenant_id: str, record_id: str) -> InboundRecord:
        """One of the tenant's records.

        Raises:
            InvalidArgument: malformed id.
            NotFound: INBOUND_MESSAGE_NOT_FOUND (none, expired, or another tenant's).
        """
        if len(record_id) != _ID_LENGTH or any(c not in "0123456789abcdef" for c in record_id):
            raise InvalidArgument.single("id", "must be a message id (24 lowercase hex characters)")
        record = await self._repository.get(tenant_id=tenant_id, record_id=record_id)
        if record is None:
            raise NotFound("InboundMessage", record_id)
        return record

    async def list(self, *, tenant_id: str, size: int, page_token: str) -> InboundPage:
        """A page of the tenant's records, newest first.

        Raises:
            InvalidArgument: negative page size or a bad page token.
        """
        limit = page_size(size, default=self._default_page_size, maximum=self._max_page_size)
        before = decode_page_token(page_token, {})
        docs = await self._repository.list(tenant_id=tenant_id, before_seq=before, limit=limit + 1)
        token = encode_page_token(docs[limit - 1]["seq"], {}) if len(docs) > limit else ""
        records = [_from_doc(doc) for doc in docs[:limit]]
        return InboundPage(records, token, await self.outcomes(records))

    async def sweep(self) -> None:
        """Delete expired records: up to `SWEEP_BATCHES` bounded batches (the next run goes on)."""
        for _ in range(SWEEP_BATCHES):
            if not await self._repository.sweep(now=self._clock.now()):
                return


def record_id(tenant_id: str, received: Received) -> str:
    """The id of a received message: the same message, recipient and route give the same id."""
    digest = hashlib.sha256()
    for part in (tenant_id, received.recipient.lower(), received.route_id, received.envelope_from):
        digest.update(part.encode("utf-8", "surrogateescape") + b"\0")
    digest.update(received.raw)
    return digest.hexdigest()[:_ID_LENGTH]


def _to_doc(record: InboundRecord) -> Document:
    r, auth = record.received, record.received.authentication
    return {
        "_id": record.id,
        "tenant_id": record.tenant_id,
        "raw": r.raw,
        "added_headers": r.added_headers,
        "size": record.size,
        "envelope_from": r.envelope_from,
        "recipient": r.recipient,
        "domain_id": r.domain_id,
        "route_id": r.route_id,
        "action": r.action,
        "client_address": r.client_address,
        "helo": r.helo,
        "webhook_id": r.webhook_id,
        "forward_to": list(r.forward_to),
        "auth": {
            "spf": auth.spf,
            "spf_domain": auth.spf_domain,
            "dkim": auth.dkim,
            "dkim_domains": list(auth.dkim_domains),
            "dmarc": auth.dmarc,
            "from_domain": auth.from_domain,
            "header": auth.header,
        },
        "outcome": record.outcome,
        "received_at": record.received_at,
        "expire_at": record.expire_at,
        "action_state": record.action_state,
        "action_detail": record.action_detail,
        "webhook_delivery_id": record.webhook_delivery_id,
        "forward_email_id": record.forward_email_id,
    }


def _from_doc(doc: Document) -> InboundRecord:
    auth = doc.get("auth") or {}
    return InboundRecord(
        id=doc["_id"],
        tenant_id=doc["tenant_id"],
        received=Received(
            raw=bytes(doc.get("raw", b"")),
            added_headers=bytes(doc.get("added_headers", b"")),
            envelope_from=doc["envelope_from"],
            recipient=doc["recipient"],
            domain_id=doc["domain_id"],
            route_id=doc["route_id"],
            action=doc["action"],
            client_address=doc.get("client_address", ""),
            helo=doc.get("helo", ""),
            authentication=Authentication(
                spf=auth.get("spf", "none"),
                spf_domain=auth.get("spf_domain", ""),
                dkim=auth.get("dkim", "none"),
                dkim_domains=tuple(auth.get("dkim_domains") or ()),
                dmarc=auth.get("dmarc", "none"),
                from_domain=auth.get("from_domain", ""),
                header=auth.get("header", ""),
            ),
            webhook_id=doc.get("webhook_id", ""),
            forward_to=tuple(doc.get("forward_to") or ()),
        ),
        outcome=doc["outcome"],
        received_at=_aware(doc["received_at"]),
        expire_at=_aware(doc["expire_at"]),
        size=int(doc.get("size", 0)),
        seq=doc.get("seq", ""),
        action_state=doc.get("action_state", "done"),
        action_detail=doc.get("action_detail", ""),
        webhook_delivery_id=doc.get("webhook_delivery_id", ""),
        forward_email_id=doc.get("forward_email_id", ""),
    )


def _aware(value: datetime) -> datetime:
    """PyMongo returns naive UTC datetimes."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


__all__ = [
    "INDEXES",
    "ActionResult",
    "ActionRunner",
    "Authentication",
    "InboundPage",
    "InboundRecord",
    "InboundStore",
    "MongoInboundRepository",
    "Outcome",
    "Received",
    "record_id",
]
