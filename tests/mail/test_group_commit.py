"""The queue's group commit (`services.mail.group_commit.GroupCommit`): batching and isolation.

No database: the write function is ours, so what each batch contains and which context it runs
in are observed directly.
"""

from __future__ import annotations

import asyncio

import pymongo
import pymongo._csot as csot  # private, read-only: the deadline a database call would get
import pytest

from services.mail.group_commit import GroupCommit


async def test_callers_arriving_during_a_write_share_the_next_batch() -> None:
    gate = asyncio.Event()
    batches: list[list[str]] = []

    async def write(items: list[str]) -> list[bool]:
        batches.append(list(items))
        await gate.wait()
        return [item != "taken" for item in items]

    group = GroupCommit(write)
    first = asyncio.create_task(group.submit("a"))
    await asyncio.sleep(0)  # the writer starts on "a" and waits at the gate
    await asyncio.sleep(0)
    rest = [asyncio.create_task(group.submit(x)) for x in ("b", "taken", "c")]
    await asyncio.sleep(0)
    gate.set()
    assert await first is True
    assert [await r for r in rest] == [True, False, True]
    assert batches == [["a"], ["b", "taken", "c"]]


async def test_the_writer_does_not_inherit_its_first_callers_deadline() -> None:
    # The writer serves every caller: a request deadline (pymongo.timeout, a context variable)
    # of whoever started it must not bound later batches of other requests.
    seen: list[float | None] = []

    async def write(items: list[str]) -> list[bool]:
        seen.append(csot.get_timeout())
        return [True] * len(items)

    group = GroupCommit(write)
    with pymongo.timeout(0.25):
        assert await group.submit("a") is True
    assert seen == [None]


async def test_a_failed_batch_fails_each_of_its_callers() -> None:
    async def write(items: list[str]) -> list[bool]:
        raise ConnectionError("database unreachable")

    group = GroupCommit(write)
    results = await asyncio.gather(group.submit("a"), group.submit("b"), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    with pytest.raises(ConnectionError):
        await group.submit("c")  # a later batch is written (and fails) on its own
