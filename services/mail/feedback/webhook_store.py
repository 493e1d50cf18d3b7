"""MongoDB storage of webhook endpoints, deliveries (with their attempt log) and leases.

Collections (written by the mail service only: its API process and its webhook dispatchers):

* ``webhooks``: one document per endpoint; the signing secrets sealed with the master key
  (`services.core.secrets_box`, context ``webhook-secret:<id>``), never in plaintext.
* ``webhook_deliveries``: one document per (event, endpoint), ``_id`` = ``<event id>:<webhook
  id>``. Fan-out creates it with a plain insert: a second dispatcher (or a rescan of the same
  events) hits the unique ``_id`` and creates nothing, which is what makes discovery safe to
  repeat. A pending delivery has ``due``, the time of its next attempt.
* ``webhook_claims``: leases, one insert per claim, ``_id`` = ``<delivery id>:<n>``, as the
  mail queue does (FerretDB 1.24 does not isolate find-and-modify or conditional updates;
  unique ``_id``s do hold). Claim n of a delivery exists and is unexpired: someone holds it.
  Expired: its holder died (kill -9) or is late; the next claimer takes n+1. A record is
  conditional on the delivery's ``claims`` being what the holder read when it won, and moves
  it past the holder's claim, so a late holder whose successor has recorded changes nothing.
  Swept after a day.
* ``webhook_cursor``: how far the events collection has been scanned (a restart resumes there,
  minus the look-back window).

Every query is by ``_id`` or served by a declared index on both databases (docs/data-layer.md
shapes: equality prefix, then one range or sort column).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import ASCENDING, DESCENDING, DeleteOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

from services.core.mongo import Document, IndexSpec, chunked, delete_older
from services.mail.feedback.webhook_models import (
    ATTEMPTS_KEPT,
    Attempt,
    Delivery,
    DeliveryState,
    SealedSecret,
    Webhook,
)

WEBHOOKS = "webhooks"
DELIVERIES = "webhook_deliveries"
CLAIMS = "webhook_claims"
CURSOR = "webhook_cursor"
EVENTS = "events"

WEBHOOK_INDEXES = (
    IndexSpec(WEBHOOKS, [("tenantId", ASCENDING), ("_id", ASCENDING)], "webhook_tenant_list"),
    IndexSpec(DELIVERIES, [("state", ASCENDING), ("due", ASCENDING)], "webhook_due"),
    IndexSpec(
        DELIVERIES, [("webhookId", ASCENDING), ("_id", DESCENDING)], "webhook_deliveries_newest"
    ),
    IndexSpec(
        DELIVERIES,
        [("webhookId", ASCENDING), ("state", ASCENDING), ("_id", DESCENDING)],
        "webhook_deliveries_state_newest",
    ),
    IndexSpec(
        DELIVERIES,
        [("webhookId", ASCENDING), ("state", ASCENDING), ("due", ASCENDING)],
        "webhook_endpoint_due",
    ),
    IndexSpec(DELIVERIES, [("createTime", ASCENDING)], "webhook_delivery_age"),
    IndexSpec(CLAIMS, [("createdAt", ASCENDING)], "webhook_claim_age"),
    # The dispatcher's scan of new events (`_id` range, in `_id` order). MongoDB would use
    # `_id_`; the embedded FerretDB pushes ranges down only on non-unique indexes.
    IndexSpec(EVENTS, [("_id", ASCENDING), ("type", ASCENDING)], "webhook_event_scan"),
)
# Claims of one delivery followed in a row when earlier ones expired.
_MAX_CLAIM_STEPS = 5
# Claim documents outlive their lease by this long (then they are swept).
CLAIM_RETENTION = timedelta(days=1)


def _utc(value: datetime | None) -> datetime | None:
    """PyMongo returns naive UTC datetimes; the domain uses aware ones."""
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def webhook_from_doc(doc: Document) -> Webhook:
    """An endpoint from its document."""
    return Webhook(
        id=doc["_id"],
        tenant_id=doc["tenantId"],
        url=doc["url"],
        event_types=list(doc.get("eventTypes", [])),
        domains=list(doc.get("domains", [])),
        enabled=bool(doc.get("enabled", True)),
        description=doc.get("description", ""),
        create_time=_aware(doc["createTime"]),
        update_time=_aware(doc["updateTime"]),
        secrets=[
            SealedSecret(s["sealed"], _utc(s.get("expireTime"))) for s in doc.get("secrets", [])
        ],
        disabled_reason=doc.get("disabledReason", ""),
        failing_since=_utc(doc.get("failingSince")),
    )


def webhook_to_doc(webhook: Webhook) -> Document:
    """The stored form of an endpoint (the plaintext secret is never part of it)."""
    return {
        "_id": webhook.id,
        "tenantId": webhook.tenant_id,
        "url": webhook.url,
        "eventTypes": list(webhook.event_types),
        "domains": list(webhook.domains),
        "enabled": webhook.enabled,
        "description": webhook.description,
        "createTime": webhook.create_time,
        "updateTime": webhook.update_time,
        "secrets": [{"sealed": s.sealed, "expireTime": s.expire_time} for s in webhook.secrets],
        "disabledReason": webhook.disabled_reason,
        "failingSince": webhook.failing_since,
    }


def _attempt_to_doc(attempt: Attempt) -> Document:
    return {
        "time": attempt.time,
        "status": attempt.status_code,
        "latencyMs": attempt.latency_ms,
        "response": attempt.response_body,
        "error": attempt.error,
    }


def _attempt_from_doc(doc: Document) -> Attempt:
    return Attempt(
        time=_aware(doc["time"]),
        status_code=int(doc.get("status", 0)),
        latency_ms=int(doc.get("latencyMs", 0)),
        response_body=doc.get("response", ""),
        error=doc.get("error", ""),
    )


def delivery_from_doc(doc: Document) -> Delivery:
    """A delivery from its document."""
    return Delivery(
        id=doc["_id"],
        tenant_id=doc["tenantId"],
        webhook_id=doc["webhookId"],
        event_id=doc["eventId"],
        event_type=doc["eventType"],
        body=doc["body"],
        state=DeliveryState(doc["state"]),
        create_time=_aware(doc["createTime"]),
        next_attempt_time=_utc(doc.get("due")),
        attempts=[_attempt_from_doc(a) for a in doc.get("attempts", [])],
        retries=int(doc.get("retries", 0)),
        claims=int(doc.get("claims", 0)),
        occurred_time=_utc(doc.get("occurredAt")),
    )


def delivery_to_doc(delivery: Delivery) -> Document:
    """The stored form of a delivery (``due`` only while pending)."""
    doc: Document = {
        "_id": delivery.id,
        "tenantId": delivery.tenant_id,
        "webhookId": delivery.webhook_id,
        "eventId": delivery.event_id,
        "eventType": delivery.event_type,
        "body": delivery.body,
        "state": delivery.state.value,
        "createTime": delivery.create_time,
        "attempts": [_attempt_to_doc(a) for a in delivery.attempts[-ATTEMPTS_KEPT:]],
        "retries": delivery.retries,
        "claims": delivery.claims,
    }
    if delivery.occurred_time is not None:
        doc["occurredAt"] = delivery.occurred_time
    if delivery.state is DeliveryState.PENDING and delivery.next_attempt_time is not None:
        doc["due"] = delivery.next_attempt_time
    return doc


@dataclass(frozen=True, slots=True)
class Lease:
    """A won claim: the delivery as read right after winning, its claim number and expiry."""

    delivery: Delivery
    number: int
    token: str
    expires: datetime


class WebhookStore:
    """The webhook collections of one database."""

    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self._webhooks = db[WEBHOOKS]
        self._deliveries = db[DELIVERIES]
        self._claims = db[CLAIMS]
        self._cursor = db[CURSOR]
        self.events = db[EVENTS]

    # --- endpoints

    async def insert_webhook(self, webhook: Webhook) -> None:
        """Store a new endpoint."""
        await self._webhooks.insert_one(webhook_to_doc(webhook))

    async def get_webhook(self, *, webhook_id: str, tenant_id: str | None = None) -> Webhook | None:
        """The endpoint, if it exists (and belongs to `tenant_id` when one is given)."""
        query: Document = {"_id": webhook_id}
        if tenant_id is not None:
            query["tenantId"] = tenant_id
        doc = await self._webhooks.find_one(query)
        return webhook_from_doc(doc) if doc else None

    async def list_webhooks(
        self, *, tenant_id: str, after: str | None, limit: int
    ) -> list[Webhook]:
        """The tenant's endpoints in id order (creation order), after `after`."""
        query: Document = {"tenantId": tenant_id}
        if after:
            query["_id"] = {"$gt": after}
        cursor = self._webhooks.find(query).sort("_id", ASCENDING).limit(limit)
        return [webhook_from_doc(d) async for d in cursor]

    async def count_webhooks(self, *, tenant_id: str) -> int:
        """How many endpoints the tenant has."""
        return await self._webhooks.count_documents({"tenantId": tenant_id})

    async def save_webhook(self, webhook: Webhook) -> bool:
        """Replace the endpoint's document; False when it no longer exists."""
        result = await self._webhooks.replace_one(
            {"_id": webhook.id, "tenantId": webhook.tenant_id}, webhook_to_doc(webhook)
        )
        return result.matched_count == 1

    async def delete_webhook(self, *, webhook_id: str, tenant_id: str) -> bool:
        """Delete the endpoint and its deliveries; False when it did not exist."""
        result = await self._webhooks.delete_one({"_id": webhook_id, "tenantId": tenant_id})
        if result.deleted_count != 1:
            return False
        while True:
            ids = [
                d["_id"]
                async for d in self._deliveries.find({"webhookId": webhook_id}, {"_id": 1}).limit(
                    200
                )
            ]
            if not ids:
                return True
            for part in chunked(ids):
                await self._deliveries.delete_many({"_id": {"$in": list(part)}})

    async def tenant_webhooks(self, tenant_id: str) -> list[Webhook]:
        """Every endpoint of a tenant (what fan-out matches events against)."""
        cursor = self._webhooks.find({"tenantId": tenant_id}).sort("_id", ASCENDING)
        return [webhook_from_doc(d) async for d in cursor]

    async def note_failure(self, *, webhook_id: str, now: datetime) -> datetime | None:
        """Start the endpoint's failure streak if none runs; the streak's start (None: gone)."""
        doc = await self._webhooks.find_one({"_id": webhook_id}, {"failingSince": 1})
        if doc is None:
            return None
        since = _utc(doc.get("failingSince"))
        if since is None:
            await self._webhooks.update_one({"_id": webhook_id}, {"$set": {"failingSince": now}})
            return now
        return since

    async def note_success(self, *, webhook_id: str) -> None:
        """End the endpoint's failure streak."""
        await self._webhooks.update_one(
            {"_id": webhook_id, "failingSince": {"$ne": None}}, {"$set": {"failingSince": None}}
        )

    async def disable(self, *, webhook_id: str, reason: str, now: datetime) -> bool:
        """Disable an enabled endpoint; False when it was not enabled (or is gone)."""
        result = await self._webhooks.update_one(
            {"_id": webhook_id, "enabled": True},
            {"$set": {"enabled": False, "disabledReason": reason, "updateTime": now}},
        )
        return result.modified_count == 1

    # --- deliveries

    async def add_deliveries(self, deliveries: Sequence[Delivery]) -> int:
        """Create deliveries that do not exist yet (unique ``_id``); how many were new."""
        created = 0
        for part in chunked(list(deliveries)):
            try:
                result = await self._deliveries.insert_many(
                    [delivery_to_doc(d) for d in part], ordered=False
                )
                created += len(result.inserted_ids)
            except BulkWriteError as exc:
                errors = exc.details.get("writeErrors", [])
                if any(e.get("code") != 11000 for e in errors):
                    raise
                created += int(exc.details.get("nInserted", 0))
        return created

    async def get_delivery(self, *, webhook_id: str, delivery_id: str) -> Delivery | None:
        """A delivery of the endpoint."""
        doc = await self._deliveries.find_one({"_id": delivery_id, "webhookId": webhook_id})
        return delivery_from_doc(doc) if doc else None

    async def deliveries_by_id(self, ids: Sequence[str]) -> dict[str, Delivery]:
        """Deliveries by id, any endpoint (missing ones: swept or their endpoint deleted)."""
        found: dict[str, Delivery] = {}
        for part in chunked(list(ids)):
            cursor = self._deliveries.find({"_id": {"$in": list(part)}})
            found.update({d["_id"]: delivery_from_doc(d) async for d in cursor})
        return found

    async def list_deliveries(
        self, *, webhook_id: str, state: DeliveryState | None, before: str | None, limit: int
    ) -> list[Delivery]:
        """The endpoint's deliveries, newest event first, before `before`."""
        query: Document = {"webhookId": webhook_id}
        if state is not None:
            query["state"] = state.value
        if before:
            query["_id"] = {"$lt": before}
        cursor = self._deliveries.find(query).sort("_id", DESCENDING).limit(limit)
        return [delivery_from_doc(d) async for d in cursor]

    async def requeue(self, *, delivery_id: str, now: datetime) -> Delivery | None:
        """Make a delivery pending again, due now, from the start of the retry schedule."""
        await self._deliveries.update_one(
            {"_id": delivery_id},
            {"$set": {"state": DeliveryState.PENDING.value, "due": now, "retries": 0}},
        )
        doc = await self._deliveries.find_one({"_id": delivery_id})
        return delivery_from_doc(doc) if doc else None

    async def due(
        self, *, now: datetime, limit: int, skip_ids: Sequence[str] = ()
    ) -> list[Delivery]:
        """The most overdue pending deliveries of all endpoints (at most `limit`).

        Deliveries this process is sending are left out (a set bounded by its concurrency).
        """
        query: Document = {"state": DeliveryState.PENDING.value, "due": {"$lte": now}}
        if skip_ids:
            query["_id"] = {"$nin": list(skip_ids)}
        cursor = self._deliveries.find(query).limit(limit)
        found = [delivery_from_doc(d) async for d in cursor]
        found.sort(key=lambda d: d.next_attempt_time or now)
        return found

    async def due_for_webhook(
        self, webhook_id: str, *, now: datetime, limit: int, skip_ids: Sequence[str] = ()
    ) -> list[Delivery]:
        """Pending deliveries of one endpoint that are due (at most `limit`)."""
        query: Document = {
            "webhookId": webhook_id,
            "state": DeliveryState.PENDING.value,
            "due": {"$lte": now},
        }
        if skip_ids:
            query["_id"] = {"$nin": list(skip_ids)}
        cursor = self._deliveries.find(query).limit(limit)
        found = [delivery_from_doc(d) async for d in cursor]
        found.sort(key=lambda d: d.next_attempt_time or now)
        return found

    async def claim(
        self, deliveries: Sequence[Delivery], *, now: datetime, lease: timedelta, holder: str
    ) -> list[Lease]:
        """Take leases on due deliveries; those someone else holds (or that moved on) are left.

        One ``insertMany`` of claims decides between concurrent claimers (see the module
        docstring); a claim that exists but expired is followed by the next number. The won
        deliveries are then read again in one query: one may have finished since the poll.
        """
        wanted = {d.id: d.claims for d in deliveries}
        won: dict[str, tuple[int, str]] = {}
        for _ in range(_MAX_CLAIM_STEPS):
            if not wanted:
                break
            tokens = {i: f"{holder}:{uuid.uuid4().hex}" for i in wanted}
            docs = [
                {"_id": f"{i}:{n}", "token": tokens[i], "createdAt": now, "expiresAt": now + lease}
                for i, n in wanted.items()
            ]
            taken = await self._insert_unique(self._claims, docs)
            lost: dict[str, int] = {}
            for (delivery_id, number), ok in zip(wanted.items(), taken, strict=True):
                if ok:
                    won[delivery_id] = (number, tokens[delivery_id])
                else:
                    lost[delivery_id] = number
            wanted = {}
            if lost:
                names = [f"{i}:{n}" for i, n in lost.items()]
                existing = {d["_id"]: d async for d in self._claims.find({"_id": {"$in": names}})}
                for delivery_id, number in lost.items():
                    claim = existing.get(f"{delivery_id}:{number}")
                    # Expired: its holder died (kill -9) or is late; take the next number.
                    if claim is None or _aware(claim["expiresAt"]) <= now:
                        wanted[delivery_id] = number + 1
        if not won:
            return []
        fresh = {
            d["_id"]: delivery_from_doc(d)
            async for d in self._deliveries.find({"_id": {"$in": list(won)}})
        }
        leases: list[Lease] = []
        give_back: list[tuple[str, str]] = []
        for delivery_id, (number, token) in won.items():
            current = fresh.get(delivery_id)
            if (
                current is None
                or current.state is not DeliveryState.PENDING
                or current.claims > number
                or (current.next_attempt_time is not None and current.next_attempt_time > now)
            ):
                give_back.append((f"{delivery_id}:{number}", token))
                continue
            leases.append(Lease(current, number, token, now + lease))
        for part in chunked(give_back):
            await self._claims.bulk_write(
                [DeleteOne({"_id": name, "token": token}) for name, token in part]
            )
        return leases

    @staticmethod
    async def _insert_unique(collection: Any, docs: Sequence[Document]) -> list[bool]:
        """Insert documents; for each, whether it was inserted (False: its ``_id`` existed)."""
        taken: list[bool] = []
        for part in chunked(list(docs)):
            ok = [True] * len(part)
            try:
                await collection.insert_many(list(part), ordered=False)
            except BulkWriteError as exc:
                for error in exc.details.get("writeErrors", []):
                    if error.get("code") != 11000:
                        raise
                    ok[int(error["index"])] = False
            taken.extend(ok)
        return taken

    async def webhooks_by_id(self, ids: Sequence[str]) -> dict[str, Webhook]:
        """Endpoints by id (missing ones: deleted)."""
        if not ids:
            return {}
        cursor = self._webhooks.find({"_id": {"$in": list(ids)}})
        return {d["_id"]: webhook_from_doc(d) async for d in cursor}

    async def record(self, lease: Lease, *, attempt: Attempt | None, update: Delivery) -> bool:
        """Write the outcome of a leased attempt; False when another holder recorded since.

        The write is conditional on ``claims`` being what it was when the lease was won, and
        moves it past the lease's claim number; a holder whose lease expired and whose
        successor already recorded changes nothing but adds its attempt to the log, so the log
        shows every request that was made. FerretDB does not isolate conditional updates, so
        two holders may both record: both made a request, and the later record stands (at
        least once either way).
        """
        delivery = lease.delivery
        attempts = [*delivery.attempts, *([attempt] if attempt else [])][-ATTEMPTS_KEPT:]
        doc = delivery_to_doc(update)
        doc["attempts"] = [_attempt_to_doc(a) for a in attempts]
        doc["claims"] = lease.number + 1
        unset = {} if "due" in doc else {"$unset": {"due": ""}}
        body = {k: v for k, v in doc.items() if k != "_id"}
        result = await self._deliveries.update_one(
            {"_id": delivery.id, "claims": delivery.claims}, {"$set": body, **unset}
        )
        if result.matched_count == 1:
            return True
        if attempt is not None:
            await self._deliveries.update_one(
                {"_id": delivery.id}, {"$push": {"attempts": _attempt_to_doc(attempt)}}
            )
        return False

    async def insert_delivery(self, delivery: Delivery) -> None:
        """Store a finished delivery (a test event's, which is never retried)."""
        await self._deliveries.insert_one(delivery_to_doc(delivery))

    # --- events cursor and sweeping

    async def scanned_until(self) -> datetime | None:
        """The time up to which events were fanned out, per the shared cursor."""
        doc = await self._cursor.find_one({"_id": "events"})
        return _utc(doc.get("until")) if doc else None

    async def advance_cursor(self, until: datetime) -> None:
        """Move the shared cursor forward (never back)."""
        await self._cursor.update_one({"_id": "events"}, {"$max": {"until": until}}, upsert=True)

    async def sweep(self, *, now: datetime, delivery_retention: timedelta) -> int:
        """Delete deliveries past their retention and old claims (bounded work per run)."""
        removed = await delete_older(self._deliveries, "createTime", now - delivery_retention)
        removed += await delete_older(self._claims, "createdAt", now - CLAIM_RETENTION)
        return removed


def find_events_after(store: WebhookStore, start: str, limit: int) -> Any:
    """Events whose id sorts after `start`, in id order (a cursor; see WEBHOOK_INDEXES)."""
    return store.events.find({"_id": {"$gt": start}}).sort("_id", ASCENDING).limit(limit)


__all__ = [
    "CLAIMS",
    "CURSOR",
    "DELIVERIES",
    "EVENTS",
    "WEBHOOKS",
    "WEBHOOK_INDEXES",
    "Lease",
    "WebhookStore",
    "delivery_from_doc",
    "find_events_after",
    "webhook_from_doc",
]
