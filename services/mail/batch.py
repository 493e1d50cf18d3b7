"""Batch sending: per-message results, request fingerprints, and the batch idempotency store.

A batch is up to `MAX_BATCH` send requests answered one result each, in order. Its idempotency
record (collection ``email_batches``, written only by the mail service) is insert-first like a
single send's: ``_id`` = tenant + key, holding the batch's fingerprint and the email ids chosen
for its messages before anything is stored, so a retry after a crash stores the same emails
under the same ids (duplicates meet on the unique ``_id``); once the batch is stored its answer
is written into the record and a retry gets exactly that answer. Expired records are removed by
the idempotency sweeper.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from pymongo import ASCENDING
from pymongo.asynchronous.database import AsyncDatabase

from services.core.errors import (
    AzoraError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
)
from services.core.mongo import Document, IndexSpec, reserve_expiring
from services.mail.compose import SendInput
from services.mail.models import EmailStatus
from services.mail.template_manager import TemplateUse

BATCHES = "email_batches"
# Messages per batch request.
MAX_BATCH = 500

INDEXES = (IndexSpec(BATCHES, [("expires_at", ASCENDING)], "batch_expiry"),)

# A batch message: the request and its template, or why it could not even be read.
BatchMessage = tuple[SendInput, TemplateUse | None] | AzoraError


@dataclass(frozen=True, slots=True)
class BatchError:
    """Why one message was refused, with fields named by their path in the batch."""

    code: str
    reason: str
    message: str
    violations: list[FieldViolation]


@dataclass(frozen=True, slots=True)
class BatchResult:
    """One message's outcome: its email id and status, or its error."""

    index: int
    email_id: str = ""
    status: EmailStatus | None = None
    error: BatchError | None = None


@dataclass(frozen=True, slots=True)
class BatchRecord:
    """The first request made with a batch idempotency key, and its answer once stored."""

    tenant_id: str
    key: str
    fingerprint: str
    email_ids: list[str]
    expires_at: datetime
    results: list[BatchResult] | None = None


def batch_error(
    exc: InvalidArgument | NotFound | FailedPrecondition,
    prefix: str,
    field_name: Callable[[str], str] = str,
) -> BatchError:
    """A per-message error, every field named from the batch request (``messages[3].to[0]``).

    `field_name` turns a send request's field path into the spelling clients use (JSON names,
    ``send_at`` -> ``sendAt``): these errors travel inside a successful answer, where the error
    interceptor that renames a failed call's fields never sees them.
    """
    violations: list[FieldViolation] = []
    message = exc.message
    if isinstance(exc, InvalidArgument):
        exc = exc.renamed(field_name)
        message = exc.message
        violations = [FieldViolation(f"{prefix}.{v.field}", v.description) for v in exc.violations]
    elif isinstance(exc, FailedPrecondition):
        subjects = [v.subject for v in exc.violations] or [exc.metadata.get("field", "")]
        violations = [
            FieldViolation(f"{prefix}.{field_name(s)}" if s else prefix, exc.message)
            for s in subjects
        ]
    else:
        field = {"Template": "template", "TemplateVersion": "template_version"}.get(
            exc.resource_type, ""
        )
        violations = [
            FieldViolation(f"{prefix}.{field_name(field)}" if field else prefix, exc.message)
        ]
    return BatchError(exc.kind.value, exc.reason, message, violations)


def send_fingerprint(request: SendInput, template: TemplateUse | None) -> str:
    """What identifies a send request for idempotency: the request plus its template use."""
    base = request.fingerprint()
    if template is None:
        return base
    extra = json.dumps(
        [base, template.ref, template.version, template.variables],
        separators=(",", ":"),
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(extra.encode()).hexdigest()


def batch_fingerprint(messages: list[BatchMessage] | Any, all_or_nothing: bool) -> str:
    """SHA-256 over every message's fingerprint (or error) and the batch's options."""
    parts: list[str] = []
    for message in messages:
        if isinstance(message, AzoraError):
            parts.append("!" + message.message)
        else:
            request, template = message
            parts.append(send_fingerprint(request, template) + request.idempotency_key)
    raw = json.dumps([parts, all_or_nothing], separators=(",", ":"))
    return hashlib.sha256(raw.encode()).hexdigest()


class BatchRepository(Protocol):
    """Batch idempotency records per tenant."""

    async def reserve(self, *, record: BatchRecord, now: datetime) -> BatchRecord:
        """Store `record` unless a live record holds the key; return the record that holds it."""
        ...

    async def finish(self, *, tenant_id: str, key: str, results: list[BatchResult]) -> None:
        """Keep the batch's answer with its record."""
        ...

    async def sweep(self, *, now: datetime) -> int:
        """Remove expired records."""
        ...


def _result_doc(r: BatchResult) -> Document:
    return {
        "i": r.index,
        "id": r.email_id,
        "status": r.status.value if r.status else "",
        "error": None
        if r.error is None
        else {
            "code": r.error.code,
            "reason": r.error.reason,
            "message": r.error.message,
            "violations": [{"f": v.field, "d": v.description} for v in r.error.violations],
        },
    }


def _result(doc: Document) -> BatchResult:
    error = doc.get("error")
    return BatchResult(
        int(doc["i"]),
        doc.get("id", ""),
        EmailStatus(doc["status"]) if doc.get("status") else None,
        None
        if not error
        else BatchError(
            error["code"],
            error["reason"],
            error["message"],
            [FieldViolation(v["f"], v["d"]) for v in error.get("violations", [])],
        ),
    )


def _record(doc: Document) -> BatchRecord:
    results = doc.get("results")
    return BatchRecord(
        doc["tenant_id"],
        doc["key"],
        doc["fingerprint"],
        list(doc["email_ids"]),
        doc["expires_at"],
        None if results is None else [_result(r) for r in results],
    )


class MongoBatchRepository:
    """`BatchRepository` on MongoDB/FerretDB."""

    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self._records = db[BATCHES]

    async def reserve(self, *, record: BatchRecord, now: datetime) -> BatchRecord:
        """See `BatchRepository.reserve` (an expired record is replaced)."""
        doc_id = f"{record.tenant_id}\x1f{record.key}"
        doc: Document = {
            "_id": doc_id,
            "tenant_id": record.tenant_id,
            "key": record.key,
            "fingerprint": record.fingerprint,
            "email_ids": record.email_ids,
            "expires_at": record.expires_at,
            "results": None,
        }
        held = await reserve_expiring(self._records, doc, now=now)
        return record if held is doc else _record(held)

    async def finish(self, *, tenant_id: str, key: str, results: list[BatchResult]) -> None:
        """See `BatchRepository.finish`."""
        await self._records.update_one(
            {"_id": f"{tenant_id}\x1f{key}"},
            {"$set": {"results": [_result_doc(r) for r in results]}},
        )

    async def sweep(self, *, now: datetime) -> int:
        """See `BatchRepository.sweep`."""
        result = await self._records.delete_many({"expires_at": {"$lte": now}})
        return int(result.deleted_count)


__all__ = [
    "BATCHES",
    "INDEXES",
    "MAX_BATCH",
    "BatchError",
    "BatchMessage",
    "BatchRecord",
    "BatchRepository",
    "BatchResult",
    "MongoBatchRepository",
    "batch_error",
    "batch_fingerprint",
    "send_fingerprint",
]
