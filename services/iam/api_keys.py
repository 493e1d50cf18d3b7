"""API keys: creation (secret shown once), listing, revocation, and resolution to a principal.

Only a SHA-256 hash of each secret is stored (the secret has 256 random bits, so a slow hash
adds nothing). Resolution looks the hash up through a unique index and compares it again in
constant time. ``last_used_at`` is written at most once a minute per key, so authentication does
not turn every read request into a database write.

A key is live or a test key (``test``, fixed at creation; its secret starts ``azk_test_``): a
test key's principal is marked test, and the mail service simulates the emails it sends
instead of relaying them. A test key may create test keys only, so it never leads to a live
send.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Protocol

from pymongo import ASCENDING, DESCENDING, ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase

from services.core.auth import ALL_SCOPES, constant_time_equal, hash_api_key, new_api_key_secret
from services.core.clock import Clock
from services.core.context import Principal
from services.core.errors import FieldViolation, InvalidArgument, NotFound, PermissionDenied
from services.core.ids import check_id, decode_page_token, encode_page_token, new_id, page_size
from services.core.mongo import Document, IndexSpec

API_KEYS = "api_keys"
INDEXES = (
    IndexSpec(API_KEYS, [("key_hash", ASCENDING)], "key_hash", True),
    # Lookups by key hash on the embedded FerretDB: it pushes filters only onto non-unique
    # indexes (unique ones keep its upstream form; docs/data-layer.md). A second key makes the
    # pattern differ from the unique index's, which MongoDB requires of two indexes.
    IndexSpec(API_KEYS, [("key_hash", ASCENDING), ("tenant_id", ASCENDING)], "key_hash_lookup"),
    IndexSpec(API_KEYS, [("tenant_id", ASCENDING), ("_id", DESCENDING)], "tenant_keys"),
)
_TOUCH_INTERVAL = timedelta(minutes=1)


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A stored API key (never holds the secret)."""

    id: str
    tenant_id: str
    name: str
    scopes: frozenset[str]
    prefix: str
    key_hash: str
    created_at: datetime
    revoked_at: datetime | None = None
    expires_at: datetime | None = None
    last_used_at: datetime | None = None
    test: bool = False

    def usable_at(self, now: datetime) -> bool:
        """Whether the key authenticates at `now`."""
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


class ApiKeyRepository(Protocol):
    """Storage of API keys."""

    async def insert(self, *, key: ApiKey) -> None:
        """Store a new key."""
        ...

    async def list(self, *, tenant_id: str, before_id: str | None, limit: int) -> list[ApiKey]:
        """A page of the tenant's keys, newest first."""
        ...

    async def revoke(self, *, tenant_id: str, key_id: str, now: datetime) -> ApiKey:
        """Revoke a key (keeping the first revocation time).

        Raises:
            NotFound: no such key in this tenant.
        """
        ...

    async def find_by_hash(self, *, key_hash: str) -> ApiKey | None:
        """The key with this secret hash, if any."""
        ...

    async def touch(self, *, key_id: str, now: datetime) -> None:
        """Record a use of the key."""
        ...


def _to_doc(key: ApiKey) -> Document:
    return {
        "_id": key.id,
        "tenant_id": key.tenant_id,
        "name": key.name,
        "scopes": sorted(key.scopes),
        "prefix": key.prefix,
        "key_hash": key.key_hash,
        "created_at": key.created_at,
        "revoked_at": key.revoked_at,
        "expires_at": key.expires_at,
        "last_used_at": key.last_used_at,
        "test": key.test,
    }


def _from_doc(doc: Document) -> ApiKey:
    return ApiKey(
        id=doc["_id"],
        tenant_id=doc["tenant_id"],
        name=doc["name"],
        scopes=frozenset(doc.get("scopes", ())),
        prefix=doc["prefix"],
        key_hash=doc["key_hash"],
        created_at=doc["created_at"],
        revoked_at=doc.get("revoked_at"),
        expires_at=doc.get("expires_at"),
        last_used_at=doc.get("last_used_at"),
        test=bool(doc.get("test", False)),
    )


class MongoApiKeyRepository:
    """`ApiKeyRepository` on MongoDB / FerretDB."""

    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self._keys = db[API_KEYS]

    async def insert(self, *, key: ApiKey) -> None:
        """See `ApiKeyRepository.insert`."""
        await self._keys.insert_one(_to_doc(key))

    async def list(self, *, tenant_id: str, before_id: str | None, limit: int) -> list[ApiKey]:
        """See `ApiKeyRepository.list`."""
        query: dict[str, Any] = {"tenant_id": tenant_id}
        if before_id is not None:
            query["_id"] = {"$lt": before_id}
        cursor = self._keys.find(query).sort("_id", DESCENDING).limit(limit)
        return [_from_doc(doc) async for doc in cursor]

    async def revoke(self, *, tenant_id: str, key_id: str, now: datetime) -> ApiKey:
        """See `ApiKeyRepository.revoke`."""
        await self._keys.update_one(
            {"_id": key_id, "tenant_id": tenant_id, "revoked_at": None},
            {"$set": {"revoked_at": now}},
        )
        doc = await self._keys.find_one({"_id": key_id, "tenant_id": tenant_id})
        if doc is None:
            raise NotFound("ApiKey", key_id)
        return _from_doc(doc)

    async def find_by_hash(self, *, key_hash: str) -> ApiKey | None:
        """See `ApiKeyRepository.find_by_hash`."""
        doc = await self._keys.find_one({"key_hash": key_hash})
        return _from_doc(doc) if doc else None

    async def touch(self, *, key_id: str, now: datetime) -> None:
        """See `ApiKeyRepository.touch`."""
        await self._keys.find_one_and_update(
            {"_id": key_id}, {"$set": {"last_used_at": now}}, return_document=ReturnDocument.AFTER
        )


@dataclass(frozen=True, slots=True)
class ApiKeyPage:
    """One page of keys."""

    keys: list[ApiKey]
    next_page_token: str


class ApiKeyManager:
    """API key use cases; also the local `ApiKeyResolver` of the domain service's process."""

    def __init__(
        self,
        *,
        keys: ApiKeyRepository,
        clock: Clock,
        default_page_size: int = 50,
        max_page_size: int = 200,
    ) -> None:
        self._keys = keys
        self._clock = clock
        self._default_page_size = default_page_size
        self._max_page_size = max_page_size

    async def create(
        self,
        *,
        creator: Principal,
        name: str,
        scopes: Iterable[str],
        expires_at: datetime | None,
        test: bool = False,
    ) -> tuple[ApiKey, str]:
        """Create a key for the creator's tenant (a test key with `test`).

        Returns:
            The key and its secret (the only time the secret exists outside the client).

        Raises:
            InvalidArgument: bad name, unknown scope or an expiry in the past.
            PermissionDenied: a requested scope is not held by the creator, or the creator is a
                test key asking for a live key.
        """
        now = self._clock.now()
        requested = frozenset(s.strip() for s in scopes)
        violations: list[FieldViolation] = []
        clean_name = name.strip()
        if not 1 <= len(clean_name) <= 100 or any(ord(c) < 32 for c in clean_name):
            violations.append(FieldViolation("name", "must be 1-100 printable characters"))
        for index, scope in enumerate(sorted(requested)):
            if scope != "*" and scope not in ALL_SCOPES:
                violations.append(
                    FieldViolation(
                        f"scopes[{index}]",
                        f"unknown scope {scope[:40]!r}; known: {', '.join(sorted(ALL_SCOPES))}",
                    )
                )
        if expires_at is not None and expires_at <= now:
            violations.append(FieldViolation("expire_time", "must be in the future"))
        if violations:
            raise InvalidArgument(violations)
        if creator.test and not test:
            raise PermissionDenied(
                "a test key can create test keys only (set test)",
                reason="TEST_KEY_CANNOT_CREATE_LIVE_KEY",
            )
        granted = requested or creator.scopes
        missing = sorted(s for s in granted if not creator.has_scope(s))
        if missing:
            raise PermissionDenied(
                f"cannot grant scopes the creator does not hold: {', '.join(missing)}",
                reason="SCOPE_ESCALATION",
            )
        secret = new_api_key_secret(test=test)
        key = ApiKey(
            id=new_id(),
            tenant_id=creator.tenant_id,
            name=clean_name,
            scopes=granted,
            prefix=secret[:10],
            key_hash=hash_api_key(secret),
            created_at=now,
            expires_at=expires_at,
            test=test,
        )
        await self._keys.insert(key=key)
        return key, secret

    async def list(self, *, tenant_id: str, size: int, page_token: str) -> ApiKeyPage:
        """A page of the tenant's keys, newest first.

        Raises:
            InvalidArgument: bad page size or token.
        """
        limit = page_size(size, default=self._default_page_size, maximum=self._max_page_size)
        before = decode_page_token(page_token, {})
        rows = await self._keys.list(tenant_id=tenant_id, before_id=before, limit=limit + 1)
        page = rows[:limit]
        token = encode_page_token(page[-1].id, {}) if len(rows) > limit and page else ""
        return ApiKeyPage(page, token)

    async def revoke(self, *, tenant_id: str, key_id: str) -> ApiKey:
        """Revoke a key; revoking twice keeps the first time.

        Raises:
            InvalidArgument: malformed id.
            NotFound: no such key in this tenant.
        """
        return await self._keys.revoke(
            tenant_id=tenant_id, key_id=check_id(key_id), now=self._clock.now()
        )

    async def resolve(self, *, secret: str) -> Principal | None:
        """The principal of a usable key, or None (unknown, revoked, expired)."""
        key_hash = hash_api_key(secret)
        key = await self._keys.find_by_hash(key_hash=key_hash)
        now = self._clock.now()
        if key is None or not constant_time_equal(key.key_hash, key_hash):
            return None
        if not key.usable_at(now):
            return None
        if key.last_used_at is None or now - key.last_used_at >= _TOUCH_INTERVAL:
            await self._keys.touch(key_id=key.id, now=now)
            key = replace(key, last_used_at=now)
        return Principal(key.tenant_id, f"apikey:{key.id}", key.scopes, test=key.test)
