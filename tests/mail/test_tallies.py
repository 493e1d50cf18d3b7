"""The stats count documents on a real FerretDB: exact under concurrency, forgetting and failures.

FerretDB does not isolate ``$inc``; each `Tallies` writes only its own documents, one command at
a time, with absolute values. These tests drive one writer's concurrent flushes, its memory
bound (documents forgotten and read back) and two writers on the same buckets, and a stats
read right after a send whose count is not written yet.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from services.core.ids import new_id
from services.core.mongo import ensure_indexes
from services.mail import tallies as tallies_module
from services.mail.app import MAIL_INDEXES
from services.mail.repository import MongoEmailRepository
from services.mail.tallies import TALLIES, Tallies, floor_to
from tests.mail.test_write_batch_cap import new_email

T0 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)


@pytest.fixture
async def db(ferretdb: str) -> AsyncIterator[AsyncDatabase[dict[str, Any]]]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(ferretdb, tz_aware=True)
    name = f"tallies_{secrets.token_hex(4)}"
    yield client[name]
    await client.drop_database(name)
    await client.close()


async def test_concurrent_changes_of_one_writer_are_all_counted(
    db: AsyncDatabase[dict[str, Any]],
) -> None:
    # 300 changes flushed concurrently (as concurrent requests do) add up exactly.
    tally = Tallies(db)

    async def change(i: int) -> None:
        created = T0 + timedelta(minutes=i % 7)
        tally.add(tenant_id="t", created_at=created, domain_id="d", status="queued", n=1)
        await tally.flush()
        if i % 3 == 0:
            tally.move(tenant_id="t", created_at=created, domain_id="d", old="queued", new="sent")
            await tally.flush()

    await asyncio.gather(*(change(i) for i in range(300)))
    got = await Tallies(db).count(tenant_id="t", start=T0, end=T0 + timedelta(days=1))
    assert got == Counter({("d", "queued"): 200, ("d", "sent"): 100})


async def test_forgotten_documents_are_read_back_and_two_writers_add_up(
    db: AsyncDatabase[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A writer that dropped its documents from memory (bound reached) reads them back before
    # writing again, so nothing it wrote earlier is overwritten; a second writer's counts
    # (negative ones included) add to the first's.
    monkeypatch.setattr(tallies_module, "_MAX_CACHED", 0)
    first, second = Tallies(db), Tallies(db)
    first.add(tenant_id="t", created_at=T0, domain_id="d", status="queued", n=5)
    await first.flush()  # written, then forgotten (bound 0)
    first.add(tenant_id="t", created_at=T0, domain_id="d", status="queued", n=2)
    await first.flush()
    second.move(tenant_id="t", created_at=T0, domain_id="d", old="queued", new="bounced")
    await second.flush()
    whole_day = await first.count(
        tenant_id="t", start=T0 - timedelta(hours=10), end=T0 + timedelta(hours=14)
    )
    assert whole_day == Counter({("d", "queued"): 6, ("d", "bounced"): 1})
    one_minute = await first.count(tenant_id="t", start=T0, end=T0 + timedelta(minutes=1))
    assert one_minute == whole_day
    assert (
        await first.count(
            tenant_id="t", start=T0 + timedelta(minutes=1), end=T0 + timedelta(hours=1)
        )
        == Counter()
    )
    writers = {d["writer"] async for d in db[TALLIES].find({})}
    assert writers == {first.writer_id, second.writer_id}


async def test_a_failed_flush_is_kept_and_written_by_the_next(
    db: AsyncDatabase[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The database refuses one write: the counts stay pending (logged, not raised to the
    # caller whose email was stored) and the next flush writes them.
    from pymongo.errors import AutoReconnect

    tally = Tallies(db)
    real = tally._collection.bulk_write
    calls = 0

    async def flaky(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise AutoReconnect("database away")
        return await real(*args, **kwargs)

    monkeypatch.setattr(tally._collection, "bulk_write", flaky)
    tally.add(tenant_id="t", created_at=T0, domain_id="d", status="sent", n=1)
    await tally.flush()
    assert await db[TALLIES].count_documents({}) == 0
    await tally.flush()
    got = await tally.count(tenant_id="t", start=T0, end=T0 + timedelta(hours=1))
    assert got == Counter({("d", "sent"): 1})


async def test_a_write_that_landed_but_failed_is_not_counted_twice(
    db: AsyncDatabase[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The database applies a write, then the connection drops before the answer: the writer
    # cannot tell, reads the documents back before its next write and takes what landed off
    # its pending counts.
    from pymongo.errors import AutoReconnect

    tally = Tallies(db)
    real = tally._collection.bulk_write
    calls = 0

    async def lost_answer(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        result = await real(*args, **kwargs)
        if calls == 1:
            raise AutoReconnect("connection dropped after the write")
        return result

    monkeypatch.setattr(tally._collection, "bulk_write", lost_answer)
    tally.add(tenant_id="t", created_at=T0, domain_id="d", status="sent", n=3)
    await tally.flush()  # applied, reported failed
    tally.add(tenant_id="t", created_at=T0, domain_id="d", status="sent", n=1)
    await tally.flush()
    got = await tally.count(tenant_id="t", start=T0, end=T0 + timedelta(days=1))
    assert got == Counter({("d", "sent"): 4})


async def test_a_flush_writes_only_the_documents_with_new_counts(
    db: AsyncDatabase[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The round after a flush writes exactly the documents touched since (one per grain) and
    # loses none of their counts. (How much a round costs is bench-data's concern: the round
    # no longer scans the whole cache to find these documents.)
    tally = Tallies(db)
    for i in range(200):
        tally.add(
            tenant_id="t", created_at=T0 + timedelta(minutes=i), domain_id="d", status="sent", n=1
        )
    await tally.flush()
    written: list[int] = []
    write = tally._write

    async def counting_write(batch: list[Any]) -> None:
        written.append(len(batch))
        await write(batch)

    monkeypatch.setattr(tally, "_write", counting_write)
    tally.add(tenant_id="t", created_at=T0, domain_id="d", status="bounced", n=1)
    await tally.flush()
    assert sum(written) == len(tallies_module.GRAINS)
    got = await Tallies(db).count(tenant_id="t", start=T0, end=T0 + timedelta(days=1))
    assert got == Counter({("d", "sent"): 200, ("d", "bounced"): 1})


async def test_a_stats_read_counts_the_sends_whose_counts_are_not_written_yet(
    db: AsyncDatabase[dict[str, Any]],
) -> None:
    # A send does not wait for its count to be written (`flush_soon`); a stats read of the
    # same process writes the pending counts first, so a send is counted as soon as it is
    # answered. The window is whole minutes: answered from the counts alone.
    # The count write is slowed down (a busy database), so that it is still in flight when
    # the stats read comes.
    await ensure_indexes(db, MAIL_INDEXES)
    emails = MongoEmailRepository(db, inline_limit=256 * 1024)
    write = emails.tallies._write

    async def slow_write(batch: Any) -> None:
        await asyncio.sleep(0.3)
        await write(batch)

    emails.tallies._write = slow_write  # type: ignore[method-assign]
    email = new_email(new_id(), 0)
    assert await emails.insert(email=email)
    start = floor_to(email.created_at, 60)
    counted = await emails.stats(
        tenant_id=email.tenant_id, start=start, end=start + timedelta(minutes=1), domain_id=None
    )
    assert counted == [(email.domain_id, "queued", 1)]
    assert await db[TALLIES].count_documents({}) == 3  # its minute, hour and day
