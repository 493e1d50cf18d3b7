"""FerretDB processes for tests that compare the local build's changes with upstream's code."""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import Iterator
from typing import Any

from pymongo import MongoClient

from services.core.embedded_db import EmbeddedFerretDB, find_ferretdb_binary

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def start_ferretdb(tmp: pathlib.Path, name: str, environment: dict[str, str]) -> EmbeddedFerretDB:
    """A started bin/ferretdb with its data in `tmp/name` and `environment` (its switches)."""
    data = tmp / name
    data.mkdir()
    db = EmbeddedFerretDB(
        binary=find_ferretdb_binary(REPO_ROOT), data_dir=data, environment=environment
    )
    db.start()
    return db


@contextlib.contextmanager
def ours_and_switched_off(
    tmp: pathlib.Path, switches: dict[str, str], **client_options: Any
) -> Iterator[tuple[MongoClient[Any], MongoClient[Any]]]:
    """Clients of two bin/ferretdb processes: as built (first) and with `switches` set.

    The switches turn local changes off (back to upstream's code); both processes and clients
    end with the block.
    """
    ours = start_ferretdb(tmp, "ours", {})
    switched = start_ferretdb(tmp, "switched-off", switches)
    clients: list[MongoClient[Any]] = [
        MongoClient(db.uri, **client_options) for db in (ours, switched)
    ]
    try:
        yield clients[0], clients[1]
    finally:
        for client in clients:
            client.close()
        ours.stop()
        switched.stop()
