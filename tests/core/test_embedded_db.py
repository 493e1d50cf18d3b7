"""EmbeddedFerretDB: a real FerretDB (bin/ferretdb, built by `make deps`) in a temp directory."""

from __future__ import annotations

import os
import pathlib
import socket
import sqlite3
import stat
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pymongo
import pytest
from pymongo import ASCENDING, AsyncMongoClient, ReturnDocument
from pymongo.errors import DuplicateKeyError

from services.core.embedded_db import EmbeddedFerretDB, find_ferretdb_binary

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def _binary() -> pathlib.Path:
    try:
        return find_ferretdb_binary(REPO_ROOT)
    except FileNotFoundError as err:
        pytest.fail(f"{err} (run make deps)")


@pytest.fixture(scope="module")
def ferretdb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedFerretDB]:
    db = EmbeddedFerretDB(binary=_binary(), data_dir=tmp_path_factory.mktemp("ferretdb"))
    db.start()
    try:
        yield db
    finally:
        db.stop()


@pytest.fixture
async def client(ferretdb: EmbeddedFerretDB) -> AsyncIterator[AsyncMongoClient[dict[str, Any]]]:
    mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        ferretdb.uri, serverSelectionTimeoutMS=5000
    )
    try:
        yield mongo
    finally:
        await mongo.close()


async def test_insert_and_read_back(client: AsyncMongoClient[dict[str, Any]]) -> None:
    # A document written through the wire protocol comes back unchanged.
    coll = client["embedded_test"]["roundtrip"]
    doc = {"_id": "d1", "name": "example.com", "records": [{"type": "TXT", "value": "v=1"}]}
    await coll.insert_one(doc)
    assert await coll.find_one({"_id": "d1"}) == doc


async def test_a_nan_sent_is_refused_and_nothing_is_stored(
    client: AsyncMongoClient[dict[str, Any]],
) -> None:
    # FerretDB 1.24 refuses NaN (it cannot store it) by decoding every received message; the
    # local build stopped re-decoding the messages it builds (replies), not the ones it receives
    # (tools/ferretdb/patches/README.md). Upstream's answer to a NaN is to close the connection.
    coll = client["embedded_test"]["nan"]
    with pytest.raises(pymongo.errors.AutoReconnect):
        await coll.insert_one({"_id": "n1", "x": float("nan")})
    assert await coll.find_one({"_id": "n1"}) is None


async def test_unique_compound_index_rejects_duplicate(
    client: AsyncMongoClient[dict[str, Any]],
) -> None:
    # A unique compound index (tenant, name) is enforced: same pair fails, other tenant does not.
    coll = client["embedded_test"]["unique"]
    await coll.create_index([("tenant_id", ASCENDING), ("name", ASCENDING)], unique=True)
    await coll.insert_one({"tenant_id": "t1", "name": "example.com"})
    await coll.insert_one({"tenant_id": "t2", "name": "example.com"})
    with pytest.raises(DuplicateKeyError) as excinfo:
        await coll.insert_one({"tenant_id": "t1", "name": "example.com"})
    assert excinfo.value.code == 11000


async def test_find_one_and_update_returns_new_document(
    client: AsyncMongoClient[dict[str, Any]],
) -> None:
    # The atomic claim primitive (DESIGN.md: leases) returns the document after the update.
    coll = client["embedded_test"]["claims"]
    await coll.insert_one({"_id": "m1", "state": "queued", "attempts": 0})
    updated = await coll.find_one_and_update(
        {"_id": "m1", "state": "queued"},
        {"$set": {"state": "sending"}, "$inc": {"attempts": 1}},
        return_document=ReturnDocument.AFTER,
    )
    assert updated == {"_id": "m1", "state": "sending", "attempts": 1}
    # The filter no longer matches, so a second claim gets nothing.
    again = await coll.find_one_and_update(
        {"_id": "m1", "state": "queued"},
        {"$set": {"state": "sending"}},
        return_document=ReturnDocument.AFTER,
    )
    assert again is None


def test_a_write_waits_for_a_held_write_lock_and_then_lands(ferretdb: EmbeddedFerretDB) -> None:
    # The local build's busy handler waits for the write lock in short, doubling steps for
    # 25 ms, then as SQLite does (tools/ferretdb/patches/README.md); either way a write that
    # meets a lock held for 0.4 s (here by another SQLite connection to the same file) waits
    # and lands, within FerretDB's busy timeout, instead of failing.
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(ferretdb.uri)
    try:
        coll = client["locks"]["docs"]
        coll.insert_one({"_id": "first"})
        holder = sqlite3.connect(
            ferretdb.data_dir / "locks.sqlite", timeout=5, check_same_thread=False
        )
        holder.execute("BEGIN IMMEDIATE")
        released = threading.Timer(0.4, holder.rollback)
        released.start()
        started = time.monotonic()
        coll.insert_one({"_id": "second"})
        waited = time.monotonic() - started
        released.join()
        holder.close()
        assert waited >= 0.3, waited  # it did meet the held lock
        assert sorted(d["_id"] for d in coll.find({})) == ["first", "second"]
    finally:
        client.close()


def test_stop_ends_the_process(tmp_path: pathlib.Path) -> None:
    # stop() leaves no process and no listener behind, and is safe to call twice.
    db = EmbeddedFerretDB(binary=_binary(), data_dir=tmp_path / "data")
    db.start()
    pid, port = db.pid, db.port
    assert pid is not None
    assert db.poll() is None
    db.stop()
    db.stop()
    assert not db.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_files_are_private_to_the_owner(tmp_path: pathlib.Path) -> None:
    # Whatever the umask, the data directory is 0700 and every file in it 0600 (the SQLite
    # files hold the sealed secrets and all tenants' data), also for a directory left by an
    # older run with looser modes.
    old = tmp_path / "old"
    old.mkdir(mode=0o755)
    (old / "ferretdb.log").write_bytes(b"{}\n")  # an older run's log, world-readable
    (old / "ferretdb.log").chmod(0o644)
    previous_umask = os.umask(0o022)
    try:
        for data_dir in (tmp_path / "var" / "ferretdb", old):
            db = EmbeddedFerretDB(binary=_binary(), data_dir=data_dir)
            db.start()
            try:
                client: pymongo.MongoClient[dict[str, Any]]
                with pymongo.MongoClient(
                    db.uri, document_class=dict, directConnection=True
                ) as client:
                    client["private_test"]["docs"].insert_one({"_id": "d1", "secret": "x"})
            finally:
                db.stop()
            paths = [data_dir, *data_dir.rglob("*")]
            assert any(p.suffix == ".sqlite" for p in paths)
            for path in paths:
                mode = stat.S_IMODE(path.stat().st_mode)
                assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))
    finally:
        os.umask(previous_umask)


def _environment_of(pid: int) -> dict[str, str]:
    raw = pathlib.Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.decode().partition("=") for item in raw.split(b"\0") if item)
    return {name: value for name, _, value in pairs}


def test_ferretdb_collects_garbage_less_often_unless_told_otherwise(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Go's default collector pace took a tenth of FerretDB's CPU under load (docs/benchmarks.md).
    monkeypatch.delenv("GOGC", raising=False)
    with EmbeddedFerretDB(binary=_binary(), data_dir=tmp_path / "default") as default:
        assert default.pid is not None
        assert _environment_of(default.pid)["GOGC"] == "400"
    # An operator's own GOGC is passed on unchanged.
    monkeypatch.setenv("GOGC", "150")
    with EmbeddedFerretDB(binary=_binary(), data_dir=tmp_path / "own") as own:
        assert own.pid is not None
        assert _environment_of(own.pid)["GOGC"] == "150"
