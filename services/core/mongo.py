"""MongoDB access shared by the services: client construction, declared indexes, error mapping.

PyMongo's asyncio API (`AsyncMongoClient`); the client is bound to the event loop that creates
it, so each service builds it inside its composition root. Everything used here works on
MongoDB 7 and on FerretDB 1.24 (the embedded default): no transactions, no change streams.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pymongo import AsyncMongoClient
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
from services.core.settings import Settings

log = logging.getLogger(__name__)

Document = dict[str, Any]


@dataclass(frozen=True, slots=True)
class IndexSpec:
    """An index a repository needs, declared next to the repository that queries it."""

    collection: str
    keys: Sequence[tuple[str, int]]
    name: str
    unique: bool = False
    options: dict[str, Any] = field(default_factory=dict)


def create_client(settings: Settings) -> AsyncMongoClient[Document]:
    """A client for the configured server (call inside the running event loop)."""
    return AsyncMongoClient(
        settings.mongodb_uri,
        serverSelectionTimeoutMS=int(settings.mongodb_server_selection_timeout * 1000),
        connectTimeoutMS=5000,
        tz_aware=True,
        appname=settings.service_name,
        uuidRepresentation="standard",
    )


async def ensure_indexes(db: AsyncDatabase[Document], specs: Sequence[IndexSpec]) -> None:
    """Create every declared index; a no-op for those that already exist."""
    for spec in specs:
        await db[spec.collection].create_index(
            list(spec.keys), name=spec.name, unique=spec.unique, **spec.options
        )
    log.info("indexes ready", extra={"fields": {"indexes": [s.name for s in specs]}})


async def ping(db: AsyncDatabase[Document]) -> None:
    """Round-trip to the server.

    Raises:
        Unavailable: the server cannot be reached.
    """
    try:
        await db.command("ping")
    except PyMongoError as exc:
        raise translate_error(exc) from exc


def is_duplicate_key(exc: BaseException) -> bool:
    """Whether a write failed on a unique index (FerretDB and MongoDB report code 11000)."""
    return isinstance(exc, DuplicateKeyError) or (
        isinstance(exc, OperationFailure) and exc.code == 11000
    )


def translate_error(exc: PyMongoError, *, deadline_active: bool = False) -> AzoraError:
    """Map a driver error that no repository handled into a typed error.

    Timeouts caused by the request deadline (`pymongo.timeout`) are DEADLINE_EXCEEDED; an
    unreachable server is UNAVAILABLE. Anything else is UNAVAILABLE too: the database refused
    an operation we did not expect to fail, and the caller may retry.
    """
    if deadline_active and (isinstance(exc, ExecutionTimeout | WTimeoutError) or exc.timeout):
        return DeadlineExceeded("the request deadline expired during a database call")
    if isinstance(exc, ServerSelectionTimeoutError | ConnectionFailure | AutoReconnect):
        return Unavailable("the database is unreachable", retry_after_seconds=2)
    if isinstance(exc, NetworkTimeout):
        return Unavailable("the database did not answer in time", retry_after_seconds=2)
    log.warning("unexpected database error", extra={"fields": {"error": str(exc)[:500]}})
    return Unavailable("the database refused the operation", retry_after_seconds=2)
