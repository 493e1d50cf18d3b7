"""Storage of relay configs, DKIM keyrings and generated SPF/DMARC records: Protocols + MongoDB.

Collections (written only by the SMTP service; every read also filters by tenant):
* ``smtp_configs``: ``_id`` = domain id; the relay, the password sealed (never plaintext).
* ``dkim_keyrings``: ``_id`` = domain id; every DKIM key of the domain in one document, private
  keys sealed. One document per domain makes a rotation step one atomic, version-checked write.
  ``next_check_at`` schedules the lifecycle loop (DNS checks, auto-activation, retirement).
* ``auth_records``: ``_id`` = domain id; the SPF and DMARC values last generated, which the DNS
  check compares the published records with.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Protocol

from pymongo import ASCENDING, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from services.core.errors import Conflict, NotFound
from services.core.mongo import Document, IndexSpec, is_duplicate_key
from services.smtp.models import (
    AuthRecords,
    CheckStatus,
    DkimAlgorithm,
    DkimKey,
    DkimKeyring,
    DkimKeyStatus,
    ExternalAuthorization,
    RecordCheck,
    RelaySettings,
    SecurityMode,
    SmtpConfig,
)

CONFIGS = "smtp_configs"
KEYRINGS = "dkim_keyrings"
AUTH_RECORDS = "auth_records"

INDEXES = (
    IndexSpec(CONFIGS, [("tenant_id", ASCENDING)], "smtp_config_tenant"),
    IndexSpec(KEYRINGS, [("tenant_id", ASCENDING)], "dkim_keyring_tenant"),
    IndexSpec(KEYRINGS, [("next_check_at", ASCENDING)], "dkim_keyring_due"),
    IndexSpec(AUTH_RECORDS, [("tenant_id", ASCENDING)], "auth_records_tenant"),
)


class SmtpConfigRepository(Protocol):
    """Tenant-scoped storage of relay configurations."""

    async def find(self, *, tenant_id: str, domain_id: str) -> SmtpConfig | None:
        """The domain's relay, or None when none is configured."""
        ...

    async def save(self, *, config: SmtpConfig) -> SmtpConfig:
        """Insert (version 0) or replace the relay if nobody changed it since it was read.

        Returns:
            The config with its version incremented.

        Raises:
            Conflict: another writer stored or changed it first.
        """
        ...

    async def delete(self, *, tenant_id: str, domain_id: str) -> bool:
        """Remove the relay; whether there was one."""
        ...


class DkimKeyringRepository(Protocol):
    """Tenant-scoped storage of DKIM keyrings."""

    async def find(self, *, tenant_id: str, domain_id: str) -> DkimKeyring | None:
        """The domain's keyring, or None when it never had a key."""
        ...

    async def save(self, *, ring: DkimKeyring) -> DkimKeyring:
        """Insert (version 0) or replace the ring if nobody changed it since it was read.

        Returns:
            The ring with its version incremented.

        Raises:
            Conflict: another writer stored or changed it first.
        """
        ...

    async def claim_due(self, *, now: datetime, lease: timedelta) -> DkimKeyring | None:
        """Atomically take one ring whose check is due, moving its next check `lease` ahead.

        So no other replica takes the same ring meanwhile; the caller sets the real next
        check time when it saves its result.
        """
        ...

    async def delete(self, *, tenant_id: str, domain_id: str) -> bool:
        """Remove the ring; whether there was one."""
        ...


class AuthRecordRepository(Protocol):
    """The SPF/DMARC values last generated per domain."""

    async def find(self, *, tenant_id: str, domain_id: str) -> AuthRecords | None:
        """What was generated for the domain, if anything."""
        ...

    async def save_spf(self, *, tenant_id: str, domain_id: str, value: str, now: datetime) -> None:
        """Remember the SPF value generated last."""
        ...

    async def save_dmarc(
        self,
        *,
        tenant_id: str,
        domain_id: str,
        value: str,
        authorizations: Sequence[ExternalAuthorization],
        now: datetime,
    ) -> None:
        """Remember the DMARC value (and its external authorisations) generated last."""
        ...

    async def delete(self, *, tenant_id: str, domain_id: str) -> None:
        """Forget the domain's generated records."""
        ...


# --- documents -------------------------------------------------------------------------------


def _config_to_doc(config: SmtpConfig) -> Document:
    relay = config.relay
    return {
        "_id": config.domain_id,
        "tenant_id": config.tenant_id,
        "host": relay.host,
        "port": relay.port,
        "security": relay.security.value,
        "username": relay.username,
        "password": config.sealed_password,
        "client_hostname": relay.client_hostname,
        "timeout_ms": int(relay.timeout.total_seconds() * 1000),
        "tls_skip_verify": relay.tls_skip_verify,
        "created_at": config.created_at,
        "updated_at": config.updated_at,
    }


def _config_from_doc(doc: Document) -> SmtpConfig:
    return SmtpConfig(
        domain_id=doc["_id"],
        tenant_id=doc["tenant_id"],
        relay=RelaySettings(
            host=doc["host"],
            port=doc["port"],
            security=SecurityMode(doc["security"]),
            username=doc.get("username", ""),
            client_hostname=doc.get("client_hostname", ""),
            timeout=timedelta(milliseconds=doc["timeout_ms"]),
            tls_skip_verify=doc.get("tls_skip_verify", False),
        ),
        sealed_password=doc.get("password"),
        created_at=doc["created_at"],
        updated_at=doc["updated_at"],
        version=doc.get("version", 0),
    )


def _check_to_doc(check: RecordCheck | None) -> Document | None:
    if check is None:
        return None
    return {
        "purpose": check.purpose,
        "type": check.type,
        "record_name": check.record_name,
        "expected": check.expected,
        "found": list(check.found),
        "status": check.status.value,
        "checked_at": check.checked_at,
        "detail": check.detail,
    }


def _check_from_doc(doc: Document | None) -> RecordCheck | None:
    if not doc:
        return None
    return RecordCheck(
        purpose=doc["purpose"],
        type=doc["type"],
        record_name=doc["record_name"],
        expected=doc["expected"],
        found=tuple(doc.get("found", ())),
        status=CheckStatus(doc["status"]),
        checked_at=doc["checked_at"],
        detail=doc.get("detail", ""),
    )


def _key_to_doc(key: DkimKey) -> Document:
    return {
        "selector": key.selector,
        "algorithm": key.algorithm.value,
        "key_bits": key.key_bits,
        "public_key": key.public_key,
        "private_key": key.sealed_private_key,
        "status": key.status.value,
        "created_at": key.created_at,
        "auto_activate": key.auto_activate,
        "activated_at": key.activated_at,
        "replaced_at": key.replaced_at,
        "retire_at": key.retire_at,
        "retired_at": key.retired_at,
        "dns_check": _check_to_doc(key.dns_check),
    }


def _key_from_doc(doc: Document) -> DkimKey:
    return DkimKey(
        selector=doc["selector"],
        algorithm=DkimAlgorithm(doc["algorithm"]),
        key_bits=doc["key_bits"],
        public_key=doc["public_key"],
        sealed_private_key=doc["private_key"],
        status=DkimKeyStatus(doc["status"]),
        created_at=doc["created_at"],
        auto_activate=doc.get("auto_activate", False),
        activated_at=doc.get("activated_at"),
        replaced_at=doc.get("replaced_at"),
        retire_at=doc.get("retire_at"),
        retired_at=doc.get("retired_at"),
        dns_check=_check_from_doc(doc.get("dns_check")),
    )


def _ring_fields(ring: DkimKeyring) -> Document:
    return {
        "tenant_id": ring.tenant_id,
        "domain_name": ring.domain_name,
        "keys": [_key_to_doc(k) for k in ring.keys],
        "next_check_at": ring.next_check_at,
    }


def _ring_from_doc(doc: Document) -> DkimKeyring:
    return DkimKeyring(
        domain_id=doc["_id"],
        tenant_id=doc["tenant_id"],
        domain_name=doc["domain_name"],
        keys=[_key_from_doc(k) for k in doc.get("keys") or ()],
        next_check_at=doc.get("next_check_at"),
        version=doc.get("version", 0),
    )


# --- MongoDB ---------------------------------------------------------------------------------


class MongoSmtpConfigRepository:
    """`SmtpConfigRepository` on MongoDB / FerretDB."""

    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self._configs = db[CONFIGS]

    async def find(self, *, tenant_id: str, domain_id: str) -> SmtpConfig | None:
        """See `SmtpConfigRepository.find`."""
        doc = await self._configs.find_one({"_id": domain_id, "tenant_id": tenant_id})
        return _config_from_doc(doc) if doc else None

    async def save(self, *, config: SmtpConfig) -> SmtpConfig:
        """See `SmtpConfigRepository.save`."""
        return _config_from_doc(
            await _versioned_save(self._configs, _config_to_doc(config), config.version)
        )

    async def delete(self, *, tenant_id: str, domain_id: str) -> bool:
        """See `SmtpConfigRepository.delete`."""
        result = await self._configs.delete_one({"_id": domain_id, "tenant_id": tenant_id})
        return result.deleted_count > 0


class MongoDkimKeyringRepository:
    """`DkimKeyringRepository` on MongoDB / FerretDB."""

    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self._rings = db[KEYRINGS]

    async def find(self, *, tenant_id: str, domain_id: str) -> DkimKeyring | None:
        """See `DkimKeyringRepository.find`."""
        doc = await self._rings.find_one({"_id": domain_id, "tenant_id": tenant_id})
        return _ring_from_doc(doc) if doc else None

    async def save(self, *, ring: DkimKeyring) -> DkimKeyring:
        """See `DkimKeyringRepository.save`."""
        doc = {"_id": ring.domain_id, **_ring_fields(ring)}
        return _ring_from_doc(await _versioned_save(self._rings, doc, ring.version))

    async def claim_due(self, *, now: datetime, lease: timedelta) -> DkimKeyring | None:
        """See `DkimKeyringRepository.claim_due`."""
        doc = await self._rings.find_one_and_update(
            {"next_check_at": {"$lte": now}},
            {"$set": {"next_check_at": now + lease}, "$inc": {"version": 1}},
            sort=[("next_check_at", ASCENDING)],
            return_document=ReturnDocument.AFTER,
        )
        return _ring_from_doc(doc) if doc else None

    async def delete(self, *, tenant_id: str, domain_id: str) -> bool:
        """See `DkimKeyringRepository.delete`."""
        result = await self._rings.delete_one({"_id": domain_id, "tenant_id": tenant_id})
        return result.deleted_count > 0


class MongoAuthRecordRepository:
    """`AuthRecordRepository` on MongoDB / FerretDB."""

    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self._records = db[AUTH_RECORDS]

    async def find(self, *, tenant_id: str, domain_id: str) -> AuthRecords | None:
        """See `AuthRecordRepository.find`."""
        doc = await self._records.find_one({"_id": domain_id, "tenant_id": tenant_id})
        if doc is None:
            return None
        return AuthRecords(
            domain_id=doc["_id"],
            tenant_id=doc["tenant_id"],
            spf=doc.get("spf"),
            dmarc=doc.get("dmarc"),
            dmarc_authorizations=tuple(
                ExternalAuthorization(a["record_name"], a["value"], a["report_domain"])
                for a in doc.get("dmarc_authorizations") or ()
            ),
            updated_at=doc.get("updated_at"),
        )

    async def save_spf(self, *, tenant_id: str, domain_id: str, value: str, now: datetime) -> None:
        """See `AuthRecordRepository.save_spf`."""
        await self._upsert(tenant_id, domain_id, {"spf": value, "updated_at": now})

    async def save_dmarc(
        self,
        *,
        tenant_id: str,
        domain_id: str,
        value: str,
        authorizations: Sequence[ExternalAuthorization],
        now: datetime,
    ) -> None:
        """See `AuthRecordRepository.save_dmarc`."""
        await self._upsert(
            tenant_id,
            domain_id,
            {
                "dmarc": value,
                "dmarc_authorizations": [
                    {
                        "record_name": a.record_name,
                        "value": a.value,
                        "report_domain": a.report_domain,
                    }
                    for a in authorizations
                ],
                "updated_at": now,
            },
        )

    async def delete(self, *, tenant_id: str, domain_id: str) -> None:
        """See `AuthRecordRepository.delete`."""
        await self._records.delete_one({"_id": domain_id, "tenant_id": tenant_id})

    async def _upsert(self, tenant_id: str, domain_id: str, fields: Document) -> None:
        try:
            await self._records.update_one(
                {"_id": domain_id, "tenant_id": tenant_id},
                {"$set": fields},
                upsert=True,
            )
        except PyMongoError as exc:
            # The id exists under another tenant: impossible for ids the domain service
            # confirmed, so treat it like any other missing domain.
            if is_duplicate_key(exc):
                raise NotFound("Domain", domain_id) from None
            raise


async def _versioned_save(
    collection: AsyncCollection[Document], doc: Document, version: int
) -> Document:
    """Insert `doc` when `version` is 0, else replace it if still at `version`.

    Raises:
        Conflict: a concurrent writer inserted or changed the document first.
    """
    if version == 0:
        try:
            await collection.insert_one({**doc, "version": 1})
        except PyMongoError as exc:
            if is_duplicate_key(exc):
                raise Conflict("the resource was created concurrently; retry") from None
            raise
        return {**doc, "version": 1}
    fields = {k: v for k, v in doc.items() if k not in ("_id", "tenant_id", "created_at")}
    updated = await collection.find_one_and_update(
        {"_id": doc["_id"], "tenant_id": doc["tenant_id"], "version": version},
        {"$set": fields, "$inc": {"version": 1}},
        return_document=ReturnDocument.AFTER,
    )
    if updated is None:
        raise Conflict("the resource changed while this request was processed; retry")
    return dict(updated)


__all__ = [
    "AUTH_RECORDS",
    "CONFIGS",
    "INDEXES",
    "KEYRINGS",
    "AuthRecordRepository",
    "DkimKeyringRepository",
    "MongoAuthRecordRepository",
    "MongoDkimKeyringRepository",
    "MongoSmtpConfigRepository",
    "SmtpConfigRepository",
]
