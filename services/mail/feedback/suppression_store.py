"""The suppression list: storage, the API's use cases, and the lookup the send path calls.

Collection ``suppressions`` (written only by the mail service), one document per (tenant,
address): ``_id`` = ``<tenant>|<address>`` with the address in its stored spelling
(`suppression_rules.normalize_address`: local part as typed, domain as lower-case A-label), so
the send path's lookup is one ``_id`` ``$in`` query (the primary key, on both databases) and
adding the same address twice meets on the unique ``_id``.

Fields: ``tenantId``, ``address``, ``domain``, ``reason`` (`Reason`), ``eventId`` (the event
that caused it; absent for manual entries), ``createdAt``, ``expiresAt`` (absent: never),
``detail`` (the relay's reply or complaint summary). An entry past its expiry no longer
applies (the lookup and Get ignore it) and is removed by `SuppressionList.sweep`.

Queries and their indexes (docs/events.md): list ``{tenantId[, reason | domain], _id range}``
sorted by ``_id`` (address order) on (tenantId[, reason | domain], _id); the address prefix is
an ``_id`` range; the expiry sweep is a range on ``expiresAt``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pymongo import ASCENDING
from pymongo.asynchronous.database import AsyncDatabase

from services.core.clock import Clock
from services.core.errors import FieldViolation, InvalidArgument, NotFound
from services.core.ids import decode_page_token, encode_page_token, page_size
from services.core.mongo import Document, IndexSpec, chunked, delete_older
from services.mail.feedback.event_log import insert_new
from services.mail.feedback.suppression_rules import (
    MAX_ADD,
    Reason,
    bounce_suppresses,
    normalize_address,
    normalize_domain,
    normalize_prefix,
)

SUPPRESSIONS = "suppressions"
# Above every character an address can hold: the end of a prefix's _id range.
_TOP = "\U0010ffff"
# Ids one lookup read carries.
_READ_CHUNK = 200

INDEXES = (
    IndexSpec(SUPPRESSIONS, [("tenantId", ASCENDING), ("_id", ASCENDING)], "suppressions_tenant"),
    IndexSpec(
        SUPPRESSIONS,
        [("tenantId", ASCENDING), ("reason", ASCENDING), ("_id", ASCENDING)],
        "suppressions_tenant_reason",
    ),
    IndexSpec(
        SUPPRESSIONS,
        [("tenantId", ASCENDING), ("domain", ASCENDING), ("_id", ASCENDING)],
        "suppressions_tenant_domain",
    ),
    IndexSpec(SUPPRESSIONS, [("expiresAt", ASCENDING)], "suppressions_expiry"),
)


@dataclass(frozen=True, slots=True)
class Suppression:
    """One suppressed address of a tenant."""

    tenant_id: str
    address: str
    domain: str
    reason: Reason
    created_at: datetime
    event_id: str = ""
    expires_at: datetime | None = None
    detail: str = ""

    def applies(self, now: datetime) -> bool:
        """Whether the entry is in force at `now` (not expired)."""
        return self.expires_at is None or _aware(self.expires_at) > _aware(now)


@dataclass(frozen=True, slots=True)
class SuppressionPage:
    """One page of entries, in address order."""

    suppressions: list[Suppression]
    next_page_token: str


def _key(tenant_id: str, address: str) -> str:
    return f"{tenant_id}|{address}"


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def _doc(entry: Suppression) -> Document:
    doc: Document = {
        "_id": _key(entry.tenant_id, entry.address),
        "tenantId": entry.tenant_id,
        "address": entry.address,
        "domain": entry.domain,
        "reason": entry.reason.value,
        "createdAt": entry.created_at,
    }
    if entry.event_id:
        doc["eventId"] = entry.event_id
    if entry.expires_at is not None:
        doc["expiresAt"] = entry.expires_at
    if entry.detail:
        doc["detail"] = entry.detail
    return doc


def _entry(doc: Document) -> Suppression:
    return Suppression(
        tenant_id=doc["tenantId"],
        address=doc["address"],
        domain=doc["domain"],
        reason=Reason(doc["reason"]),
        created_at=doc["createdAt"],
        event_id=doc.get("eventId", ""),
        expires_at=doc.get("expiresAt"),
        detail=doc.get("detail", ""),
    )


def _lenient(address: str) -> str:
    """The stored spelling of an address the mail service already validated (no errors)."""
    local, at, domain = address.rpartition("@")
    return f"{local}{at}{domain.lower()}" if at else address


class SuppressionList:
    """The tenant suppression lists: API use cases, automatic entries, the send-path lookup."""

    def __init__(
        self,
        db: AsyncDatabase[Document],
        *,
        clock: Clock,
        default_page_size: int,
        max_page_size: int,
    ) -> None:
        self._coll = db[SUPPRESSIONS]
        self._clock = clock
        self._default = default_page_size
        self._max = max_page_size

    # --- the send path -------------------------------------------------------------------

    async def suppressed(self, tenant_id: str, addresses: Sequence[str]) -> dict[str, Suppression]:
        """The entries in force for these addresses, keyed by the address as given.

        One ``_id`` ``$in`` query (per 200 addresses). Addresses are expected as the mail
        service stores recipients (validated addr-specs); the domain part is compared in lower
        case, the local part exactly.
        """
        by_key: dict[str, list[str]] = {}
        for address in addresses:
            by_key.setdefault(_key(tenant_id, _lenient(address)), []).append(address)
        now = self._clock.now()
        found: dict[str, Suppression] = {}
        keys = list(by_key)
        for part in chunked(keys, _READ_CHUNK):
            async for doc in self._coll.find({"_id": {"$in": list(part)}}):
                entry = _entry(doc)
                if entry.applies(now):
                    for address in by_key[doc["_id"]]:
                        found[address] = entry
        return found

    async def record_bounce(
        self,
        *,
        tenant_id: str,
        address: str,
        enhanced_code: str,
        event_id: str,
        detail: str,
    ) -> Suppression | None:
        """Suppress `address` if this bounce's code says so (`bounce_suppresses`).

        Returns:
            The entry in force (possibly an older one), or None when the bounce does not
            suppress.
        """
        if not bounce_suppresses(enhanced_code):
            return None
        return await self.add_automatic(
            tenant_id=tenant_id,
            address=address,
            reason=Reason.HARD_BOUNCE,
            event_id=event_id,
            detail=detail,
        )

    async def add_automatic(
        self,
        *,
        tenant_id: str,
        address: str,
        reason: Reason,
        event_id: str,
        detail: str = "",
    ) -> Suppression:
        """Put an address on the list for a bounce or complaint; an entry in force is kept.

        Idempotent: a repeat of the same event finds the entry it made.
        """
        stored = _lenient(address)
        entry = Suppression(
            tenant_id=tenant_id,
            address=stored,
            domain=stored.rpartition("@")[2],
            reason=reason,
            created_at=self._clock.now(),
            event_id=event_id,
            detail=detail[:1000],
        )
        (kept,), _ = await self._put([entry])
        return kept

    # --- the API -------------------------------------------------------------------------

    async def add(
        self, *, tenant_id: str, addresses: Sequence[str], expires_at: datetime | None
    ) -> tuple[list[Suppression], int]:
        """Add addresses by hand (reason manual); an entry in force is kept as it is.

        Returns:
            The entry of every address, in the order sent (a repeated address once), and how
            many were new.

        Raises:
            InvalidArgument: no address, more than `MAX_ADD`, a malformed address (each one
                named, ``addresses[i]``), an expiry not in the future.
        """
        if not addresses:
            raise InvalidArgument.single("addresses", "give at least one address")
        if len(addresses) > MAX_ADD:
            raise InvalidArgument.single(
                "addresses", f"at most {MAX_ADD} addresses per request, got {len(addresses)}"
            )
        now = self._clock.now()
        if expires_at is not None and _aware(expires_at) <= _aware(now):
            raise InvalidArgument.single("expire_time", "must be in the future")
        violations: list[FieldViolation] = []
        stored: list[str] = []
        for i, address in enumerate(addresses):
            try:
                stored.append(normalize_address(address, field=f"addresses[{i}]"))
            except InvalidArgument as exc:
                violations.extend(exc.violations)
        if violations:
            raise InvalidArgument(violations)
        unique = list(dict.fromkeys(stored))
        entries = [
            Suppression(
                tenant_id=tenant_id,
                address=a,
                domain=a.rpartition("@")[2],
                reason=Reason.MANUAL,
                created_at=now,
                expires_at=expires_at,
            )
            for a in unique
        ]
        return await self._put(entries)

    async def _put(self, entries: list[Suppression]) -> tuple[list[Suppression], int]:
        """Insert the entries whose address has none in force.

        Returns:
            The entry in force for each, and how many of them are the new ones.
        """
        docs = [_doc(e) for e in entries]
        added = 0
        for part in chunked(docs):
            added += await insert_new(self._coll, part)
        now = self._clock.now()
        current: dict[str, Suppression] = {}
        for part in chunked([d["_id"] for d in docs], _READ_CHUNK):
            async for doc in self._coll.find({"_id": {"$in": list(part)}}):
                current[doc["_id"]] = _entry(doc)
        result = []
        for entry, doc in zip(entries, docs, strict=True):
            existing = current.get(doc["_id"])
            if existing is None or not existing.applies(now):
                # Expired (not swept yet) or swept meanwhile: the new entry replaces it.
                await self._coll.replace_one({"_id": doc["_id"]}, doc, upsert=True)
                existing = entry
                added += 1
            result.append(existing)
        return result, added

    async def get(self, *, tenant_id: str, address: str) -> Suppression:
        """The entry in force for one address.

        Raises:
            InvalidArgument: a malformed address.
            NotFound: the address is not on the tenant's list (or its entry expired).
        """
        stored = normalize_address(address, field="address")
        doc = await self._coll.find_one({"_id": _key(tenant_id, stored)})
        if doc is None or not _entry(doc).applies(self._clock.now()):
            raise NotFound("Suppression", address)
        return _entry(doc)

    async def delete(self, *, tenant_id: str, address: str) -> None:
        """Remove an address from the list.

        Raises:
            InvalidArgument: a malformed address.
            NotFound: the address is not on the tenant's list.
        """
        stored = normalize_address(address, field="address")
        result = await self._coll.delete_one({"_id": _key(tenant_id, stored)})
        if result.deleted_count == 0:
            raise NotFound("Suppression", address)

    async def page(
        self,
        *,
        tenant_id: str,
        reason: str,
        domain: str,
        address_prefix: str,
        size: int,
        page_token: str,
    ) -> SuppressionPage:
        """A page of the tenant's entries in force, in address order.

        Raises:
            InvalidArgument: an unknown reason, a malformed domain, a bad page size or token.
        """
        limit = page_size(size, default=self._default, maximum=self._max)
        selector: Document = {"tenantId": tenant_id}
        if reason:
            try:
                selector["reason"] = Reason(reason).value
            except ValueError:
                raise InvalidArgument.single(
                    "reason", f"unknown reason {reason!r}; one of {[r.value for r in Reason]}"
                ) from None
        if domain:
            selector["domain"] = normalize_domain(domain, field="domain")
        prefix = normalize_prefix(address_prefix)
        query = {"reason": reason, "domain": domain, "address_prefix": address_prefix}
        after = decode_page_token(page_token, query)
        id_range: Document = {}
        if prefix:
            id_range = {"$gte": _key(tenant_id, prefix), "$lt": _key(tenant_id, prefix + _TOP)}
        if after is not None:
            id_range["$gt"] = _key(tenant_id, after)
        if id_range:
            selector["_id"] = id_range
        cursor = self._coll.find(selector).sort("_id", ASCENDING).limit(limit + 1)
        docs = [doc async for doc in cursor]
        next_token = ""
        if len(docs) > limit:
            docs = docs[:limit]
            next_token = encode_page_token(docs[-1]["address"], query)
        now = self._clock.now()
        entries = [e for e in map(_entry, docs) if e.applies(now)]
        return SuppressionPage(entries, next_token)

    async def sweep(self) -> int:
        """Remove entries past their expiry, in bounded batches; how many."""
        # An entry stops applying at its expiry (`applies`), so the sweep takes expiry <= now.
        return await delete_older(
            self._coll, "expiresAt", self._clock.now() + timedelta(milliseconds=1)
        )
