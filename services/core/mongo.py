"""MongoDB access shared by the services: client construction, declared indexes, error mapping.

PyMongo's asyncio API (`AsyncMongoClient`); the client is bound to the event loop that creates
it, so each service builds it inside its composition root. Everything used here works on
MongoDB 7 and on FerretDB 1.24 (the embedded default): no transactions, no change streams.

Every batched write a service issues (``insertMany``, ``bulkWrite``, ``update``/``delete`` with
several statements, ``$in`` lists of a ``delete_many``) carries at most `MAX_WRITE_BATCH`
statements or values: FerretDB 1.24 can hang forever on a write command of 64 statements or more
(each statement's cursor holds a pooled backend connection until the whole command ends; 100 in
one command exhaust the SQLite pool, 64 the PostgreSQL one, measured). `chunked` cuts a batch.
MongoDB 7 accepts far larger commands; the cap only costs it a few more round trips.

`is_transient` says which driver errors mean "the database is away for now" (retry later) as
opposed to "the database refused this" (do not repeat).

Every client carries a `CommandObserver` (PyMongo command monitoring): one CLIENT span per
database command, child of the span active when the command was issued, and the
``azora_db_command_duration_seconds{command,outcome}`` histogram. Neither records the command's
arguments (they hold tenant data), only its name, database and collection.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pymongo
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from pymongo import ASCENDING, AsyncMongoClient, DeleteOne, ReturnDocument, monitoring
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import (
    AutoReconnect,
    ConnectionFailure,
    DuplicateKeyError,
    ExecutionTimeout,
    NetworkTimeout,
    OperationFailure,
    PyMongoError,
    ServerSelectionTimeoutError,
    WTimeoutError,
)

from services.core.errors import AzoraError, DeadlineExceeded, Unavailable
from services.core.metrics import DB_COMMAND_DURATION
from services.core.settings import Settings
from services.core.tracing import tracer

log = logging.getLogger(__name__)

Document = dict[str, Any]
_T = TypeVar("_T")

# The most statements (documents of an insertMany, operations of a bulk_write, values of a
# write's $in list) one write command may carry; below FerretDB 1.24's hang threshold (64).
MAX_WRITE_BATCH = 40
# Server error codes of dropping an index that is not there (or whose collection is not).
_INDEX_NOT_FOUND = 27
_NAMESPACE_NOT_FOUND = 26


def chunked(items: Sequence[_T], size: int = MAX_WRITE_BATCH) -> Iterator[Sequence[_T]]:
    """`items` in consecutive slices of at most `size` (none for an empty sequence)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass(frozen=True, slots=True)
class IndexSpec:
    """An index a repository needs, declared next to the repository that queries it."""

    collection: str
    keys: Sequence[tuple[str, int]]
    name: str
    unique: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    # An index no query needs any more: dropped where an earlier version created it (every
    # index costs each insert and update of its collection; FerretDB recomputes its keys by
    # parsing the whole document).
    retired: bool = False


class CommandObserver(monitoring.CommandListener):
    """A span and a latency sample per database command (PyMongo command monitoring).

    PyMongo calls `started` in the task that issued the command, so the span's parent is that
    task's active span (the rpc's server span); `succeeded`/`failed` end it. Commands issued
    outside any trace (readiness pings, worker polls) only feed the histogram: a root span
    per poll would bury the traces that matter.
    """

    def __init__(self) -> None:
        self._spans: dict[tuple[object, int], Span] = {}
        self._lock = threading.Lock()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        """Open the command's span (only inside a trace: background polls make no root spans)."""
        if not trace.get_current_span().get_span_context().is_valid:
            return
        name = event.command_name
        target = event.command.get(name)
        attributes: dict[str, str] = {
            "db.system": "mongodb",
            "db.operation.name": name,
            "db.namespace": event.database_name,
        }
        if isinstance(target, str):
            attributes["db.collection.name"] = target
        span = tracer().start_span(f"mongodb {name}", kind=SpanKind.CLIENT, attributes=attributes)
        with self._lock:
            self._spans[(event.connection_id, event.request_id)] = span

    def _finish(
        self, event: monitoring.CommandSucceededEvent | monitoring.CommandFailedEvent, outcome: str
    ) -> Span | None:
        DB_COMMAND_DURATION.labels(event.command_name, outcome).observe(
            event.duration_micros / 1_000_000
        )
        with self._lock:
            return self._spans.pop((event.connection_id, event.request_id), None)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        """Close the command's span."""
        span = self._finish(event, "ok")
        if span is not None:
            span.end()

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        """Close the command's span as failed (the error code only, never the message)."""
        span = self._finish(event, "error")
        if span is not None:
            code = event.failure.get("code") if isinstance(event.failure, dict) else None
            span.set_status(Status(StatusCode.ERROR, f"code {code}" if code else "failed"))
            span.end()


def create_client(settings: Settings, **options: Any) -> AsyncMongoClient[Document]:
    """A client for the configured server (call inside the running event loop).

    `options` are further client options (a short-lived client of a health check uses them).
    """
    return AsyncMongoClient(
        settings.mongodb_uri,
        event_listeners=[CommandObserver()],
        serverSelectionTimeoutMS=int(settings.mongodb_server_selection_timeout * 1000),
        connectTimeoutMS=5000,
        tz_aware=True,
        appname=settings.service_name,
        uuidRepresentation="standard",
        **options,
    )


async def ensure_indexes(
    db: AsyncDatabase[Document],
    specs: Sequence[IndexSpec],
    *,
    retired_collections: Sequence[str] = (),
) -> None:
    """Create every declared index and drop the retired ones; a no-op for what is done.

    `retired_collections`: collections an earlier version kept and nothing reads any more,
    dropped whole (absent ones are no-ops).
    """
    for name in retired_collections:
        await db.drop_collection(name)
    for spec in specs:
        if spec.retired:
            try:
                await db[spec.collection].drop_index(spec.name)
            except OperationFailure as exc:
                if exc.code not in (_INDEX_NOT_FOUND, _NAMESPACE_NOT_FOUND):
                    raise
            continue
        await db[spec.collection].create_index(
            list(spec.keys), name=spec.name, unique=spec.unique, **spec.options
        )
    log.info(
        "indexes ready",
        extra={"fields": {"indexes": [s.name for s in specs if not s.retired]}},
    )


async def delete_older(
    collection: AsyncCollection[Document],
    field: str,
    before: Any,
    *,
    batches: int = 25,
    batch_size: int = MAX_WRITE_BATCH,
) -> int:
    """Delete documents whose `field` is below `before`, oldest first, in bounded batches.

    Each batch reads at most `batch_size` ids through the index on `field` (range, sort and
    limit on one indexed field: what an index serves on MongoDB and on the patched FerretDB),
    then deletes them by ``_id`` in one command (``_id`` lookups are what FerretDB 1.24 always
    serves from its primary key; ``delete_many`` with a filter would scan the collection).
    Stops after `batches` batches, so one run's work is bounded; the next run continues.
    Deleting by ``_id`` is idempotent, so concurrent sweepers only repeat each other's work.

    Returns:
        How many documents this run deleted.
    """
    deleted = 0
    for _ in range(batches):
        cursor = (
            collection.find({field: {"$lt": before}}, {"_id": 1})
            .sort(field, ASCENDING)
            .limit(batch_size)
        )
        ids = [doc["_id"] async for doc in cursor]
        if not ids:
            break
        result = await collection.bulk_write([DeleteOne({"_id": i}) for i in ids], ordered=False)
        deleted += result.deleted_count
        if len(ids) < batch_size:
            break
    return deleted


# Read by readiness probes: a lookup by _id in a collection nobody writes (absent is fine).
PROBE_COLLECTION = "readiness_probe"


async def probe(db: AsyncDatabase[Document], *, within: float) -> None:
    """A real round trip within `within` seconds: ``ping``, then a read through the backend.

    A ping alone can be answered by the database's front end while its storage is stuck; the
    read (by ``_id``, served by the primary key) goes through the same path as every query.

    Raises:
        Unavailable: no answer in time, the database refused, or the client itself failed
            (a driver fault such as an internal lock error must read as "not ready", not
            end the caller).
    """
    try:
        # The driver's own timeout bounds the probe. The outer one is only a guard against a
        # client that hangs, and fires well after it: a cancellation landing while PyMongo
        # times out its server selection corrupts its topology lock on Python 3.11 (it uses
        # asyncio.wait_for), which wedges the client for good.
        async with asyncio.timeout(2 * within + 1):
            with pymongo.timeout(within):
                await db.command("ping")
                await db[PROBE_COLLECTION].find_one({"_id": "probe"})
    except TimeoutError:
        raise Unavailable(
            f"the database did not answer within {2 * within + 1:g} s", retry_after_seconds=2
        ) from None
    except PyMongoError as exc:
        raise translate_error(exc) from exc
    except Exception as exc:
        log.warning(
            "database client failed", extra={"fields": {"error": f"{type(exc).__name__}: {exc}"}}
        )
        raise Unavailable("the database client failed", retry_after_seconds=2) from exc


def is_duplicate_key(exc: BaseException) -> bool:
    """Whether a write failed on a unique index (FerretDB and MongoDB report code 11000)."""
    return isinstance(exc, DuplicateKeyError) or (
        isinstance(exc, OperationFailure) and exc.code == 11000
    )


async def reserve_expiring(
    collection: AsyncCollection[Document], doc: Document, *, now: Any
) -> Document:
    """Insert `doc` unless a live document holds its ``_id``; the document that holds it.

    For records that reserve a key for a while (``expires_at``): insert-first, so concurrent
    reservations meet on the unique ``_id`` (FerretDB isolates nothing else). A record whose
    ``expires_at`` has passed but that no sweeper removed yet is taken over, unless another
    caller took it over first.

    Raises:
        PyMongoError: the database failed (anything but the duplicate key).
        RuntimeError: the record kept changing under three tries in a row.
    """
    for _ in range(3):
        try:
            await collection.insert_one(doc)
            return doc
        except PyMongoError as exc:
            if not is_duplicate_key(exc):
                raise
        existing = await collection.find_one({"_id": doc["_id"]})
        if existing is None:
            continue  # swept meanwhile: try again
        if existing["expires_at"] > now:
            return existing
        # Expired but not swept yet: take it over unless someone else just did.
        replaced = await collection.find_one_and_update(
            {"_id": doc["_id"], "expires_at": existing["expires_at"]},
            {"$set": {k: v for k, v in doc.items() if k != "_id"}},
            return_document=ReturnDocument.AFTER,
        )
        if replaced is not None:
            return replaced
    raise RuntimeError("a reservation record kept changing")  # pragma: no cover


def is_transient(exc: BaseException) -> bool:
    """Whether a driver error means the database is unreachable for now (worth retrying).

    Server selection timeouts, refused or dropped connections and network timeouts; not a
    refusal by the server (duplicate key, validation, ...), which would fail again.
    """
    return isinstance(exc, ConnectionFailure) or (
        isinstance(exc, PyMongoError) and exc.has_error_label("RetryableWriteError")
    )


def translate_error(
    exc: PyMongoError, *, deadline_expired: bool = False, time_limit: float | None = None
) -> AzoraError:
    """Map a driver error that no repository handled into a typed error.

    Three different situations, told apart because the client's next move differs:

    * the caller's deadline passed (`deadline_expired`): DEADLINE_EXCEEDED, whatever the driver
      reported, since nobody is waiting for the answer any more;
    * no server could be selected (``ServerSelectionTimeoutError``) or the connection failed:
      UNAVAILABLE "the database is unreachable" (retry later). Server selection gives up after
      AZORA_MONGODB_SERVER_SELECTION_TIMEOUT, so clients with long deadlines hear this rather
      than wait;
    * a reachable server did not finish an operation in time (``NetworkTimeout`` while reading
      the reply, ``ExecutionTimeout`` from the server's maxTimeMS, a wait for a pooled
      connection): DEADLINE_EXCEEDED saying the query ran out of time (`time_limit`: the
      request's database budget, AZORA_MONGODB_REQUEST_TIMEOUT), never "unreachable". PyMongo
      makes ``NetworkTimeout`` a ``ConnectionFailure``, so the timeout test comes first.

    Anything else is UNAVAILABLE too: the database refused an operation we did not expect to
    fail, and the caller may retry.
    """
    if isinstance(exc, ServerSelectionTimeoutError):
        if deadline_expired:
            return DeadlineExceeded("the request deadline expired while waiting for the database")
        return Unavailable("the database is unreachable", retry_after_seconds=2)
    if isinstance(exc, ExecutionTimeout | WTimeoutError | NetworkTimeout) or exc.timeout:
        if deadline_expired:
            return DeadlineExceeded("the request deadline expired during a database call")
        limit = f" of {time_limit:g} s" if time_limit is not None else ""
        return DeadlineExceeded(
            f"the database query ran out of time: it did not finish within the time limit"
            f"{limit} (narrow the query or retry)"
        )
    if isinstance(exc, ConnectionFailure | AutoReconnect):
        return Unavailable("the database is unreachable", retry_after_seconds=2)
    log.warning("unexpected database error", extra={"fields": {"error": str(exc)[:500]}})
    return Unavailable("the database refused the operation", retry_after_seconds=2)
