"""Storage of domains and of ownership claims: a Protocol each, MongoDB implementations.

Collections (written only by the domain service):
* ``domains``: one document per tenant domain, DNS records embedded (a record set is replaced
  as a whole, atomically). ``version`` is an optimistic-concurrency counter.
* ``domain_claims``: ``_id`` = domain name; which tenant's domain has proven ownership. The
  unique ``_id`` is what stops two tenants activating the same name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from pymongo import ASCENDING, ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from services.core.dns_names import split_txt
from services.core.errors import AlreadyExists, Conflict, NotFound
from services.core.mongo import Document, IndexSpec, is_duplicate_key
from services.domain.models import (
    DnsRecord,
    DnsRecordType,
    Domain,
    DomainStatus,
    VerificationCheck,
    VerificationOutcome,
)

DOMAINS = "domains"
CLAIMS = "domain_claims"

INDEXES = (
    IndexSpec(DOMAINS, [("tenant_id", ASCENDING), ("name", ASCENDING)], "tenant_name", True),
    IndexSpec(DOMAINS, [("tenant_id", ASCENDING), ("status", ASCENDING)], "tenant_status"),
    # ListDomains pages by _id within a tenant (and status): served in order from the index.
    IndexSpec(DOMAINS, [("tenant_id", ASCENDING), ("_id", ASCENDING)], "tenant_list"),
    IndexSpec(
        DOMAINS,
        [("tenant_id", ASCENDING), ("status", ASCENDING), ("_id", ASCENDING)],
        "tenant_status_list",
    ),
    IndexSpec(DOMAINS, [("status", ASCENDING), ("next_check_at", ASCENDING)], "due_checks"),
    IndexSpec(DOMAINS, [("status", ASCENDING), ("verification_expires_at", ASCENDING)], "expiry"),
    IndexSpec(CLAIMS, [("tenant_id", ASCENDING)], "claim_tenant"),
)


@dataclass(frozen=True, slots=True)
class Claim:
    """Proof that one tenant's domain owns a name."""

    name: str
    tenant_id: str
    domain_id: str
    claimed_at: datetime


class DomainRepository(Protocol):
    """Tenant-scoped storage of domains. Every read filters by tenant."""

    async def insert(self, *, domain: Domain) -> None:
        """Store a new domain.

        Raises:
            AlreadyExists: the tenant already has a domain with this name.
        """
        ...

    async def get(self, *, tenant_id: str, domain_id: str) -> Domain:
        """Load a domain of the tenant.

        Raises:
            NotFound: no such domain in this tenant.
        """
        ...

    async def get_any(self, *, domain_id: str) -> Domain | None:
        """Load a domain of any tenant (lifecycle jobs and claim checks only)."""
        ...

    async def list(
        self, *, tenant_id: str, status: DomainStatus | None, after_id: str | None, limit: int
    ) -> list[Domain]:
        """A page of the tenant's domains ordered by id (= creation order)."""
        ...

    async def count(self, *, tenant_id: str, status: DomainStatus | None) -> int:
        """How many domains of the tenant match."""
        ...

    async def record_count(self, *, tenant_id: str, except_domain_id: str) -> int:
        """How many DNS records the tenant's domains hold, not counting one domain's."""
        ...

    async def save(self, *, domain: Domain) -> Domain:
        """Write the mutable state of `domain` if nobody changed it since it was read.

        Returns:
            The domain with its version incremented.

        Raises:
            NotFound: the domain was deleted meanwhile.
            Conflict: another writer changed it first (version mismatch).
        """
        ...

    async def delete(self, *, tenant_id: str, domain_id: str) -> Domain:
        """Remove a domain and return what was removed.

        Raises:
            NotFound: no such domain in this tenant.
        """
        ...

    async def claim_due_check(self, *, now: datetime, next_check_at: datetime) -> Domain | None:
        """Atomically take one active or suspended domain whose re-check is due.

        Its next check moves to `next_check_at` in the same update, so no other replica
        takes it too.
        """
        ...

    async def expire_pending(self, *, now: datetime, reason: str) -> int:
        """Mark pending domains whose verification window has passed as expired."""
        ...


class ClaimRepository(Protocol):
    """Which tenant's domain owns each name."""

    async def try_claim(self, *, claim: Claim) -> Claim | None:
        """Record `claim` unless the name is already claimed.

        Returns:
            None when the claim was recorded (or already held by this domain), otherwise the
            claim that holds the name.
        """
        ...

    async def take_over(self, *, claim: Claim, from_domain_id: str) -> bool:
        """Move a claim to `claim.domain_id` if it is still held by `from_domain_id`."""
        ...

    async def release(self, *, name: str, domain_id: str) -> None:
        """Drop the claim on `name` if `domain_id` holds it."""
        ...


def _record_to_doc(record: DnsRecord) -> Document:
    return {
        "type": record.type.value,
        "name": record.name,
        "value": record.value,
        "ttl": record.ttl,
        "priority": record.priority,
        "weight": record.weight,
        "port": record.port,
    }


def _record_from_doc(doc: Document) -> DnsRecord:
    rtype = DnsRecordType(doc["type"])
    value = doc["value"]
    return DnsRecord(
        type=rtype,
        name=doc["name"],
        value=value,
        ttl=doc["ttl"],
        priority=doc.get("priority", 0),
        weight=doc.get("weight", 0),
        port=doc.get("port", 0),
        # Derived, so not stored: the split is a pure function of the value.
        txt_strings=split_txt(value) if rtype is DnsRecordType.TXT else (),
    )


def _check_to_doc(check: VerificationCheck | None) -> Document | None:
    if check is None:
        return None
    return {
        "outcome": check.outcome.value,
        "checked_at": check.checked_at,
        "record_name": check.record_name,
        "found": list(check.found),
        "detail": check.detail,
    }


def _check_from_doc(doc: Document | None) -> VerificationCheck | None:
    if not doc:
        return None
    return VerificationCheck(
        outcome=VerificationOutcome(doc["outcome"]),
        checked_at=doc["checked_at"],
        record_name=doc["record_name"],
        found=tuple(doc.get("found", ())),
        detail=doc.get("detail", ""),
    )


def _mutable_fields(domain: Domain) -> Document:
    return {
        "status": domain.status.value,
        "status_reason": domain.status_reason,
        "verification_token": domain.verification_token,
        "updated_at": domain.updated_at,
        "verification_expires_at": domain.verification_expires_at,
        "verified_at": domain.verified_at,
        "suspended_at": domain.suspended_at,
        "dns_records": [_record_to_doc(r) for r in domain.dns_records],
        "last_check": _check_to_doc(domain.last_check),
        "token_missing_since": domain.token_missing_since,
        "next_check_at": domain.next_check_at,
    }


def domain_to_doc(domain: Domain) -> Document:
    """The stored form of a domain."""
    return {
        "_id": domain.id,
        "tenant_id": domain.tenant_id,
        "name": domain.name,
        "unicode_name": domain.unicode_name,
        "created_at": domain.created_at,
        "version": domain.version,
        **_mutable_fields(domain),
    }


def domain_from_doc(doc: Document) -> Domain:
    """A domain from its stored form."""
    return Domain(
        id=doc["_id"],
        tenant_id=doc["tenant_id"],
        name=doc["name"],
        unicode_name=doc.get("unicode_name") or doc["name"],
        status=DomainStatus(doc["status"]),
        verification_token=doc["verification_token"],
        created_at=doc["created_at"],
        updated_at=doc["updated_at"],
        verification_expires_at=doc.get("verification_expires_at"),
        verified_at=doc.get("verified_at"),
        suspended_at=doc.get("suspended_at"),
        status_reason=doc.get("status_reason", ""),
        dns_records=[_record_from_doc(r) for r in doc.get("dns_records") or ()],
        last_check=_check_from_doc(doc.get("last_check")),
        token_missing_since=doc.get("token_missing_since"),
        next_check_at=doc.get("next_check_at"),
        version=doc.get("version", 0),
    )


class MongoDomainRepository:
    """`DomainRepository` on MongoDB / FerretDB."""

    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self._domains = db[DOMAINS]

    async def insert(self, *, domain: Domain) -> None:
        """See `DomainRepository.insert`."""
        try:
            await self._domains.insert_one(domain_to_doc(domain))
        except PyMongoError as exc:
            if is_duplicate_key(exc):
                raise AlreadyExists(
                    "Domain", domain.name, message=f"domain {domain.name!r} is already registered"
                ) from None
            raise

    async def get(self, *, tenant_id: str, domain_id: str) -> Domain:
        """See `DomainRepository.get`."""
        doc = await self._domains.find_one({"_id": domain_id, "tenant_id": tenant_id})
        if doc is None:
            raise NotFound("Domain", domain_id)
        return domain_from_doc(doc)

    async def get_any(self, *, domain_id: str) -> Domain | None:
        """See `DomainRepository.get_any`."""
        doc = await self._domains.find_one({"_id": domain_id})
        return domain_from_doc(doc) if doc else None

    async def list(
        self, *, tenant_id: str, status: DomainStatus | None, after_id: str | None, limit: int
    ) -> list[Domain]:
        """See `DomainRepository.list`."""
        query: dict[str, Any] = {"tenant_id": tenant_id}
        if status is not None:
            query["status"] = status.value
        if after_id is not None:
            query["_id"] = {"$gt": after_id}
        cursor = self._domains.find(query).sort("_id", ASCENDING).limit(limit)
        return [domain_from_doc(doc) async for doc in cursor]

    async def count(self, *, tenant_id: str, status: DomainStatus | None) -> int:
        """See `DomainRepository.count`."""
        query: dict[str, Any] = {"tenant_id": tenant_id}
        if status is not None:
            query["status"] = status.value
        return await self._domains.count_documents(query)

    async def record_count(self, *, tenant_id: str, except_domain_id: str) -> int:
        """See `DomainRepository.record_count`."""
        cursor = self._domains.find({"tenant_id": tenant_id}, {"dns_records": 1})
        total = 0
        async for doc in cursor:
            if doc["_id"] != except_domain_id:
                total += len(doc.get("dns_records") or ())
        return total

    async def save(self, *, domain: Domain) -> Domain:
        """See `DomainRepository.save`."""
        doc = await self._domains.find_one_and_update(
            {"_id": domain.id, "tenant_id": domain.tenant_id, "version": domain.version},
            {"$set": _mutable_fields(domain), "$inc": {"version": 1}},
            return_document=ReturnDocument.AFTER,
        )
        if doc is None:
            if await self._domains.count_documents({"_id": domain.id}) == 0:
                raise NotFound("Domain", domain.id)
            raise Conflict("the domain changed while this request was processed; retry")
        return domain_from_doc(doc)

    async def delete(self, *, tenant_id: str, domain_id: str) -> Domain:
        """See `DomainRepository.delete`."""
        doc = await self._domains.find_one_and_delete({"_id": domain_id, "tenant_id": tenant_id})
        if doc is None:
            raise NotFound("Domain", domain_id)
        return domain_from_doc(doc)

    async def claim_due_check(self, *, now: datetime, next_check_at: datetime) -> Domain | None:
        """See `DomainRepository.claim_due_check`."""
        doc = await self._domains.find_one_and_update(
            {
                "status": {"$in": [DomainStatus.ACTIVE.value, DomainStatus.SUSPENDED.value]},
                "next_check_at": {"$lte": now},
            },
            {"$set": {"next_check_at": next_check_at}, "$inc": {"version": 1}},
            sort=[("next_check_at", ASCENDING)],
            return_document=ReturnDocument.AFTER,
        )
        return domain_from_doc(doc) if doc else None

    async def expire_pending(self, *, now: datetime, reason: str) -> int:
        """See `DomainRepository.expire_pending`."""
        result = await self._domains.update_many(
            {"status": DomainStatus.PENDING.value, "verification_expires_at": {"$lte": now}},
            {
                "$set": {
                    "status": DomainStatus.EXPIRED.value,
                    "status_reason": reason,
                    "updated_at": now,
                },
                "$inc": {"version": 1},
            },
        )
        return result.modified_count


class MongoClaimRepository:
    """`ClaimRepository` on MongoDB / FerretDB."""

    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self._claims = db[CLAIMS]

    async def try_claim(self, *, claim: Claim) -> Claim | None:
        """See `ClaimRepository.try_claim`."""
        try:
            await self._claims.insert_one(
                {
                    "_id": claim.name,
                    "tenant_id": claim.tenant_id,
                    "domain_id": claim.domain_id,
                    "claimed_at": claim.claimed_at,
                }
            )
            return None
        except PyMongoError as exc:
            if not is_duplicate_key(exc):
                raise
        doc = await self._claims.find_one({"_id": claim.name})
        if doc is None:  # released between our insert and read: try once more
            return await self.try_claim(claim=claim)
        holder = Claim(doc["_id"], doc["tenant_id"], doc["domain_id"], doc["claimed_at"])
        return None if holder.domain_id == claim.domain_id else holder

    async def take_over(self, *, claim: Claim, from_domain_id: str) -> bool:
        """See `ClaimRepository.take_over`."""
        doc = await self._claims.find_one_and_update(
            {"_id": claim.name, "domain_id": from_domain_id},
            {
                "$set": {
                    "tenant_id": claim.tenant_id,
                    "domain_id": claim.domain_id,
                    "claimed_at": claim.claimed_at,
                }
            },
        )
        return doc is not None

    async def release(self, *, name: str, domain_id: str) -> None:
        """See `ClaimRepository.release`."""
        await self._claims.delete_one({"_id": name, "domain_id": domain_id})


__all__: Sequence[str] = [
    "INDEXES",
    "Claim",
    "ClaimRepository",
    "DomainRepository",
    "MongoClaimRepository",
    "MongoDomainRepository",
]
