"""Rate limits, sending quotas and failed-authentication limits, shared by every process.

Budgets are fixed windows aligned to the epoch (a 15-minute window starts at :00, :15, ...; the
daily quota at 00:00 UTC).

The request budgets (API and send, per client address and per principal) are one budget for
the whole suite, whichever process answers: a key's window is cut into at most
``AZORA_RATE_LIMIT_BLOCKS`` blocks, and a process admits requests only from blocks it claimed
(`SharedBlocks`), each with one unique insert (``_id`` = budget:window:key:block number), which
only one process can win. A process gives back what it did not use of a block (it stops
admitting from it, then writes the final count on the block's document) when it stops
gracefully, when it has not admitted from the block for ``AZORA_RATE_LIMIT_BLOCK_IDLE``
seconds, and when another process says, through the shared counts below, that it refuses the
key for want of a block. Once every block number is taken, processes claim halves of what
given-back blocks left, again each with a unique insert. So no more than the budget is ever
admitted across processes, and a database write sits on a request's path once per block or
half claimed, not per request.

The price, exactly. (1) Delay: a process that finds no block free refuses the key until holders
give back, about a second (its re-check, ``_RECHECK_MS``) plus two sync intervals while the
holders are alive (plus clock skew between replicas); each round of give-backs doubles the
blocks in use, so with B blocks, N > B processes busy with one key at once wait about log2(N /
B) such rounds. (2) Loss until the window ends: what a process held and had not used when it
died without a graceful stop (SIGKILL, OOM kill, lost host) — at most the one block or half per
key it was admitting from, and blocks given back but not written yet — and what a stopping
process could not write back within ``_RELEASE_ON_STOP_S`` (database away); an event taken for
one key of a request that the other key then refused, if its block was given back meanwhile. (3)
Writes: a process serving a key less often than once per idle period claims and gives back a
block per request (the give-back off the request's path), and a want makes every holder of that
key give back and claim again (one write, one read and one insert each). If the database cannot
be reached, each process falls back to the counts below (fail open across processes, never
within one).

Counts (`SharedCounters`) are kept in memory per process and shared in the background: they
decide the sending quotas and the failed-authentication limit, feed the RateLimit headers, and
stand in for blocks while the database is away. A background task (`SharedCounters.run`)
publishes this process's counts every ``AZORA_RATE_LIMIT_SYNC_INTERVAL`` seconds and reads the
other replicas' counts back; a key's total is "mine, exactly" plus "the others', as last read".

Why one document per process and window, and not one per key with ``$inc``: FerretDB 1.24
applies ``$inc`` as read-modify-write without isolation. Measured (4 clients x 8 tasks x 50
``$inc`` upserts on one ``_id``, three runs): 38, 75 and 85 of 1600 increments survived with
``update_one``; 90-108 with ``find_one_and_update``, which also failed with duplicate-key errors
on the upsert. So every document here has exactly one writer — the process named in its
``_id`` — which ``$set``s its own cumulative counts (idempotent, so a failed write is simply
repeated by the next sync). A read fetches the documents of the current windows of every budget:
a scan, but of a collection holding (replicas x budgets x live windows) documents.

Tolerance of counts: a replica learns what the others counted one to two sync intervals late,
so with R replicas a key can get at most the limit plus what the other R-1 replicas counted for
it during the last two sync intervals (one replica alone is exact). Counts of a replica that
stops stay in force until their window ends (the unused part of its blocks is given back).
Documents of ended windows are removed by `sweep` (FerretDB has no TTL indexes).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import PyMongoError

from services.core.cancellation import raise_if_cancelling
from services.core.context import Principal
from services.core.errors import ResourceExhausted
from services.core.metrics import RATE_LIMIT_REFUSALS, RATE_LIMIT_SYNCS
from services.core.mongo import IndexSpec, chunked, delete_older, is_duplicate_key
from services.core.settings import Settings

log = logging.getLogger(__name__)

COLLECTION = "rate_limit_counters"
BLOCKS_COLLECTION = "rate_limit_blocks"
# The sweeper's range query (`delete_older`), and the read of one key's blocks.
INDEXES = (
    IndexSpec(COLLECTION, [("expiresAt", 1)], "rate_limit_expiry"),
    IndexSpec(BLOCKS_COLLECTION, [("expiresAt", 1)], "rate_limit_block_expiry"),
    IndexSpec(BLOCKS_COLLECTION, [("slot", 1)], "rate_limit_block_slot"),
)
# Ended windows stay this long before the sweeper removes them (clock skew between replicas).
_KEEP_AFTER_END = timedelta(minutes=1)
# A process that found no block of a key's window free looks again (a read) and renews its want
# at most this often; the client is refused from memory in between.
_RECHECK_MS = 1000
# How long a stopping process waits for the database to take back its unused blocks.
_RELEASE_ON_STOP_S = 2.0
HOUR_MS = 3600 * 1000
DAY_MS = 24 * HOUR_MS


@dataclass(frozen=True, slots=True)
class Budget:
    """A number of events allowed per fixed window, per key.

    Attributes:
        name: short id, part of the stored documents' ids ("api", "send", ...).
        limit: events allowed per window; 0 = unlimited.
        window_ms: window length in milliseconds.
        reason: ErrorInfo.reason of a refusal.
        what: how a refusal names the budget ("requests", "emails per hour", ...).
    """

    name: str
    limit: int
    window_ms: int
    reason: str
    what: str

    def window_start(self, now_ms: int) -> int:
        """Start (epoch ms) of the window `now_ms` falls in."""
        return now_ms - now_ms % self.window_ms


@dataclass
class _Window:
    """What one process knows about one window of one budget."""

    end_ms: int
    mine: dict[str, int] = field(default_factory=dict)
    others: dict[str, int] = field(default_factory=dict)
    dirty: set[str] = field(default_factory=set)
    # Keys this process refuses for want of a block: since when (epoch ms; 0 = no longer).
    wants: dict[str, int] = field(default_factory=dict)
    wants_dirty: set[str] = field(default_factory=set)
    # The other replicas' wants, as last read: key -> the latest.
    wanted: dict[str, int] = field(default_factory=dict)


def _hash_key(key: str) -> str:
    # Stored keys are field names: no "." or "$", bounded length, and no client data verbatim.
    return hashlib.sha256(key.encode()).hexdigest()[:32]


class SharedCounters:
    """Fixed-window counters kept in memory and shared through one collection."""

    def __init__(
        self,
        collection: AsyncCollection[dict[str, Any]] | None,
        budgets: Iterable[Budget],
        *,
        sync_interval: float,
        clock: Callable[[], float] = time.time,
        instance: str | None = None,
    ) -> None:
        """Create the counters.

        Args:
            collection: where replicas meet; None keeps counts local (unit tests).
            budgets: every budget counted here (their current windows are read on each sync).
            sync_interval: seconds between two syncs in `run`.
            clock: wall-clock seconds (windows are aligned to the epoch, so all replicas agree).
            instance: this process's id in document ids; random by default.
        """
        self._collection = collection
        self._budgets = {budget.name: budget for budget in budgets}
        self._interval = max(sync_interval, 0.01)
        self._clock = clock
        self.instance = instance or secrets.token_hex(6)
        self._windows: dict[tuple[str, int], _Window] = {}
        self._lock = asyncio.Lock()

    def now_ms(self) -> int:
        """The clock in epoch milliseconds."""
        return int(self._clock() * 1000)

    def _window(self, budget: Budget, now_ms: int) -> _Window:
        start = budget.window_start(now_ms)
        window = self._windows.get((budget.name, start))
        if window is None:
            # A new window: forget those that ended (also where no sync runs, which would).
            for key in [k for k, w in self._windows.items() if w.end_ms <= now_ms]:
                del self._windows[key]
            window = self._windows[(budget.name, start)] = _Window(end_ms=start + budget.window_ms)
        return window

    def total(self, budget: Budget, key: str, now_ms: int) -> tuple[int, int]:
        """(events counted for `key` in the current window, window end in epoch ms)."""
        window = self._window(budget, now_ms)
        hashed = _hash_key(key)
        return window.mine.get(hashed, 0) + window.others.get(hashed, 0), window.end_ms

    def add(self, budget: Budget, key: str, now_ms: int, count: int = 1) -> None:
        """Count `count` events for `key` (published by the next sync)."""
        window = self._window(budget, now_ms)
        hashed = _hash_key(key)
        window.mine[hashed] = window.mine.get(hashed, 0) + count
        window.dirty.add(hashed)

    def want(self, budget: Budget, key: str, now_ms: int, *, wanting: bool) -> None:
        """Say whether this process refuses `key` for want of a block (published by the next sync).

        A want is renewed at most every `_RECHECK_MS`: the holders give back the blocks they
        claimed before it (`SharedBlocks.release_idle`), not those claimed since.
        """
        window = self._window(budget, now_ms)
        hashed = _hash_key(key)
        since = window.wants.get(hashed, 0)
        if wanting and now_ms - since >= _RECHECK_MS:
            window.wants[hashed] = now_ms
        elif not wanting and since:
            window.wants[hashed] = 0
        else:
            return
        window.wants_dirty.add(hashed)

    def wanted(self, budget_name: str, start: int, hashed_key: str) -> int:
        """When another replica last said it wants a block of that key's window (0: never)."""
        window = self._windows.get((budget_name, start))
        return 0 if window is None else window.wanted.get(hashed_key, 0)

    def _doc_id(self, name: str, start: int) -> str:
        return f"{name}:{start}:{self.instance}"

    async def sync(self) -> None:
        """Publish this process's changed counts, then read every replica's current windows.

        Raises:
            PyMongoError: the database failed; unpublished counts stay marked for the next sync.
        """
        if self._collection is None:
            return
        async with self._lock:  # one writer per document also means one sync at a time
            now = self.now_ms()
            for key in [k for k, w in self._windows.items() if w.end_ms <= now]:
                del self._windows[key]
            await self._publish()
            await self._read(now)

    async def _publish(self) -> None:
        assert self._collection is not None
        for (name, start), window in list(self._windows.items()):
            if not window.dirty and not window.wants_dirty:
                continue
            changed = {k: window.mine[k] for k in window.dirty}
            wants = {k: window.wants[k] for k in window.wants_dirty}
            window.dirty.clear()
            window.wants_dirty.clear()
            expires = datetime.fromtimestamp(window.end_ms / 1000, UTC) + _KEEP_AFTER_END
            try:
                await self._collection.update_one(
                    {"_id": self._doc_id(name, start)},
                    {
                        # Cumulative counts, not increments: repeating a write changes nothing.
                        "$set": {
                            **{f"counts.{k}": v for k, v in changed.items()},
                            **{f"wants.{k}": v for k, v in wants.items()},
                        },
                        "$setOnInsert": {
                            "window": f"{name}:{start}",
                            "instance": self.instance,
                            "expiresAt": expires,
                        },
                    },
                    upsert=True,
                )
            except PyMongoError:
                window.dirty.update(changed)
                window.wants_dirty.update(wants)
                raise

    async def _read(self, now: int) -> None:
        assert self._collection is not None
        current = {
            f"{budget.name}:{budget.window_start(now)}": budget
            for budget in self._budgets.values()
            if budget.limit
        }
        others: dict[str, dict[str, int]] = {name: {} for name in current}
        wanted: dict[str, dict[str, int]] = {name: {} for name in current}
        async for doc in self._collection.find(
            {"window": {"$in": sorted(current)}},
            {"window": 1, "instance": 1, "counts": 1, "wants": 1},
        ):
            if doc.get("instance") == self.instance or doc.get("window") not in others:
                continue
            totals = others[doc["window"]]
            counts = doc.get("counts")
            for key, value in (counts if isinstance(counts, dict) else {}).items():
                if isinstance(value, int | float):
                    totals[key] = totals.get(key, 0) + int(value)
            latest = wanted[doc["window"]]
            wants = doc.get("wants")
            for key, value in (wants if isinstance(wants, dict) else {}).items():
                if isinstance(value, int) and value > latest.get(key, 0):
                    latest[key] = value
        for window_name, totals in others.items():
            window = self._window(current[window_name], now)
            window.others = totals
            window.wanted = wanted[window_name]

    async def sweep(self) -> int:
        """Delete documents of windows that ended; returns how many."""
        if self._collection is None:
            return 0
        cutoff = datetime.fromtimestamp(self._clock(), UTC)
        return await delete_older(self._collection, "expiresAt", cutoff)

    async def run(
        self,
        *,
        sweep_every: float = 60.0,
        extra_sweep: Callable[[], Awaitable[None]] | None = None,
        each_round: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Sync every interval (and sweep now and then) until cancelled; failures are logged.

        Args:
            sweep_every: seconds between sweeps.
            extra_sweep: also run at every sweep (the blocks of `SharedBlocks`).
            each_round: also run after every sync (idle blocks given back).
        """
        last_sweep = 0.0
        while True:
            try:
                await self.sync()
                RATE_LIMIT_SYNCS.labels("ok").inc()
            except PyMongoError as exc:
                RATE_LIMIT_SYNCS.labels("error").inc()
                log.warning("rate-limit sync failed", extra={"fields": {"error": str(exc)[:200]}})
            if each_round is not None:
                try:
                    await each_round()
                except PyMongoError as exc:
                    log.warning(
                        "rate-limit blocks not given back",
                        extra={"fields": {"error": str(exc)[:200]}},
                    )
            if self._clock() - last_sweep >= sweep_every:
                last_sweep = self._clock()
                try:
                    await self.sweep()
                    if extra_sweep is not None:
                        await extra_sweep()
                except PyMongoError as exc:
                    log.warning(
                        "rate-limit sweep failed", extra={"fields": {"error": str(exc)[:200]}}
                    )
            raise_if_cancelling()  # a cancellation a database call reported as a failure
            await asyncio.sleep(self._interval)


@dataclass
class _Held:
    """This process's share of one key's window: the block it admits from, where to look next."""

    end_ms: int
    block: str | None = None  # _id of the block this process admits from (None: none now)
    size: int = 0  # events in that block
    free: int = 0  # events of it not used yet
    claimed_ms: int = 0  # when this process claimed it
    last_take_ms: int = 0  # when this process last admitted from it
    next_block: int = 0  # no block number below this one is free
    recheck_ms: int = 0  # every block was taken: look for released ones from then (0: not so)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def _halves(block: str, left: int) -> list[tuple[str, int]]:
    """The blocks that share what `block` left unused: two halves (one when 1 is left).

    Halves, not one successor, so that a remainder can serve two processes (more processes may
    want a key's budget than it has blocks); each half, given back, is halved again, so ids
    grow by at most one level per halving of the block size.
    """
    halves = [(f"{block}.0", (left + 1) // 2), (f"{block}.1", left // 2)]
    return [(half, size) for half, size in halves if size > 0]


class SharedBlocks:
    """Hands out each key's window of a budget in blocks, each claimed by one process.

    A block is claimed by inserting ``{_id: budget:window:key:n}``; the unique ``_id`` lets one
    process win it (unique inserts hold on FerretDB under concurrency; ``$inc`` does not).
    Processes claim block numbers from the lowest up, so the numbers claimed in a window are
    always 0..k-1 and no process skips a free one: a process starts from the higher of the last
    number it saw taken and (events counted anywhere) // block size (every counted event was
    admitted from a claimed block, so at least that many blocks' worth are claimed).

    A process gives back what it did not use of a block when it stops (`release_all`), when it
    has not admitted from the block for ``idle_ms``, and when another process wants a block of
    that key (`release_idle`): it stops admitting from the block, then ``$set``s ``used`` on the
    block's document, once, so that count is final.
    When every number is taken, a process reads the key's blocks (index ``slot``) and claims
    half of what a given-back block left, with a unique insert of ``<its _id>.0`` (the larger
    half) or ``<its _id>.1`` holding ``size`` = that half: each half goes to one process, every
    document keeps one writer (the process that inserted it), and the blocks descending from
    block n together admit no more than block n's size.
    """

    def __init__(
        self,
        collection: AsyncCollection[dict[str, Any]],
        *,
        blocks_per_window: int,
        instance: str,
        idle_ms: int = 30_000,
    ) -> None:
        """Create the allocator.

        Args:
            collection: where blocks are claimed (shared by every process).
            blocks_per_window: how many blocks a key's window is cut into (at most).
            instance: this process's id, recorded in the blocks it claims.
            idle_ms: a block not admitted from for this long is given back by `release_idle`.
        """
        self._collection = collection
        self._blocks = max(1, blocks_per_window)
        self._instance = instance
        self._idle_ms = idle_ms
        self._held: dict[tuple[str, int, str], _Held] = {}
        # Blocks given back whose final count is not written yet: _id -> (used, window end).
        self._unwritten: dict[str, tuple[int, int]] = {}
        self._next_purge = 0

    def block_size(self, budget: Budget) -> int:
        """Events per block of `budget`."""
        return math.ceil(budget.limit / min(self._blocks, budget.limit))

    async def take(self, budget: Budget, key: str, now_ms: int, *, counted: int) -> str | None:
        """Take one event of `key`'s current window of `budget`.

        Args:
            budget: a budget with a limit.
            key: the client or principal key.
            now_ms: the clock.
            counted: events of this window counted for `key` so far (any process).

        Returns:
            The block the event was taken from (for `give_back`), or None if this process can
            have none: every block number is claimed and no released block has events left.

        Raises:
            PyMongoError: a block was needed and the database did not answer.
        """
        if now_ms >= self._next_purge:
            self._purge(now_ms)
        start = budget.window_start(now_ms)
        slot = (budget.name, start, _hash_key(key))
        held = self._held.get(slot)
        if held is None:
            held = self._held[slot] = _Held(end_ms=start + budget.window_ms)
        taken = _take_from(held, now_ms)
        if taken is not None or now_ms < held.recheck_ms:
            return taken
        async with held.lock:  # one claim at a time per key; the others wait for its block
            taken = _take_from(held, now_ms)
            if taken is not None or now_ms < held.recheck_ms:
                return taken
            claimed = await self._claim(budget, slot, held, counted)
            if claimed is None:
                held.recheck_ms = now_ms + _RECHECK_MS
                return None
            held.recheck_ms = 0
            held.block, held.size = claimed
            held.free = held.size
            held.claimed_ms = now_ms
            return _take_from(held, now_ms)

    async def _claim(
        self, budget: Budget, slot: tuple[str, int, str], held: _Held, counted: int
    ) -> tuple[str, int] | None:
        """Claim a free block number, else a half of what a given-back block left; (_id, size)."""
        prefix = f"{slot[0]}:{slot[1]}:{slot[2]}"
        size = self.block_size(budget)
        blocks = math.ceil(budget.limit / size)
        number = max(held.next_block, counted // size)
        present: set[str] | None = None
        left: list[tuple[str, int]] = []
        while number < blocks:
            held.next_block = number
            block = f"{prefix}:{number}"
            events = min(size, budget.limit - number * size)
            if present is None or block not in present:
                if await self._insert(block, prefix, events, held.end_ms):
                    held.next_block = number + 1
                    return block, events
                if present is None:
                    # Taken: one read tells which numbers are, rather than an insert each.
                    present, left = await self._blocks_of(prefix)
            number += 1
        held.next_block = number
        if present is None:
            present, left = await self._blocks_of(prefix)
        # The largest halves first (fewer claims), from a random place among equals: processes
        # claiming at once mostly try different ones.
        left = [half for half in left if half[0] not in present]
        turn = secrets.randbelow(len(left)) if left else 0
        for block, events in sorted(left[turn:] + left[:turn], key=lambda half: -half[1]):
            if await self._insert(block, prefix, events, held.end_ms):
                return block, events
        return None

    async def _blocks_of(self, prefix: str) -> tuple[set[str], list[tuple[str, int]]]:
        """The blocks of a key's window: the ids taken, and the halves given-back ones offer."""
        present: set[str] = set()
        left: list[tuple[str, int]] = []
        async for doc in self._collection.find({"slot": prefix}, {"size": 1, "used": 1}):
            present.add(doc["_id"])
            size, used = doc.get("size"), doc.get("used")
            if isinstance(size, int) and isinstance(used, int) and used < size:
                left.extend(_halves(doc["_id"], size - used))
        return present, left

    async def _insert(self, block: str, prefix: str, size: int, end_ms: int) -> bool:
        """Claim `block` of `size` events (True), unless another process has it (False)."""
        try:
            await self._collection.insert_one(
                {
                    "_id": block,
                    "slot": prefix,
                    "size": size,
                    "instance": self._instance,
                    "expiresAt": datetime.fromtimestamp(end_ms / 1000, UTC) + _KEEP_AFTER_END,
                }
            )
        except PyMongoError as exc:
            if is_duplicate_key(exc):
                return False
            raise
        return True

    def give_back(self, budget: Budget, key: str, now_ms: int, block: str) -> None:
        """Return an event `take` took from `block` (the request was refused by another budget).

        Dropped when this process no longer admits from that block (it was given back: its
        count may already be written).
        """
        held = self._held.get((budget.name, budget.window_start(now_ms), _hash_key(key)))
        if held is not None and held.block == block:
            held.free += 1

    async def release_idle(
        self, now_ms: int, wanted: Callable[[str, int, str], int] | None = None
    ) -> int:
        """Give back what is left of blocks not admitted from for ``idle_ms``, or wanted.

        Args:
            now_ms: the clock.
            wanted: (budget name, window start, hashed key) -> when another process last said
                it refuses that key for want of a block (`SharedCounters.wanted`); a block
                claimed before that is given back, so that both can have half of what it left.

        Returns:
            How many blocks' counts were written.

        Raises:
            PyMongoError: a write failed; the blocks not written are tried again next time.
        """
        return await self._release(now_ms, idle_before=now_ms - self._idle_ms, wanted=wanted)

    async def release_all(self, now_ms: int) -> int:
        """Give back what is left of every block held (the process stops admitting).

        Returns:
            How many blocks' counts were written.

        Raises:
            PyMongoError: a write failed (what was not written stays lost until its window ends).
        """
        return await self._release(now_ms, idle_before=None)

    async def _release(
        self,
        now_ms: int,
        *,
        idle_before: int | None,
        wanted: Callable[[str, int, str], int] | None = None,
    ) -> int:
        for slot, held in self._held.items():
            if held.block is None or held.end_ms <= now_ms or held.lock.locked():
                continue
            if (
                idle_before is not None
                and held.last_take_ms > idle_before
                # A want as old as the block came after its claim (it found the block taken).
                and (wanted is None or wanted(*slot) < held.claimed_ms)
            ):
                continue
            if held.free > 0:
                # Nothing is admitted from the block from here on, so the count written is final.
                self._unwritten[held.block] = (held.size - held.free, held.end_ms)
            held.block, held.size, held.free = None, 0, 0
        for block in [b for b, (_, end_ms) in self._unwritten.items() if end_ms <= now_ms]:
            del self._unwritten[block]
        pending = list(self._unwritten.items())
        # One round trip per batch: a stopping process may hold a block for thousands of keys.
        for part in chunked(pending):
            await self._collection.bulk_write(
                [UpdateOne({"_id": block}, {"$set": {"used": used}}) for block, (used, _) in part],
                ordered=False,
            )
            for block, _ in part:
                self._unwritten.pop(block, None)
        return len(pending)

    def _purge(self, now_ms: int) -> None:
        for slot in [s for s, held in self._held.items() if held.end_ms <= now_ms]:
            del self._held[slot]
        ends = [held.end_ms for held in self._held.values()]
        self._next_purge = min(ends, default=now_ms + 60_000)

    async def sweep(self, now: datetime) -> int:
        """Delete blocks of windows that ended (bounded, index-served); returns how many."""
        return await delete_older(self._collection, "expiresAt", now)


def _take_from(held: _Held, now_ms: int) -> str | None:
    """One event of the block `held` admits from (its _id), or None when it has none left."""
    if held.block is None or held.free <= 0:
        return None
    held.free -= 1
    held.last_take_ms = now_ms
    return held.block


@dataclass(frozen=True, slots=True)
class Decision:
    """The state of the tightest budget a request was checked against (for RateLimit headers).

    Attributes:
        limit: that budget's limit.
        remaining: events still allowed in its window after this one.
        reset_seconds: whole seconds until its window ends.
        window_seconds: its window length in seconds.
    """

    limit: int
    remaining: int
    reset_seconds: int
    window_seconds: int

    def headers(self) -> tuple[tuple[str, str], ...]:
        """The RateLimit headers of express-rate-limit's ``standardHeaders`` (draft 6)."""
        return (
            ("ratelimit-policy", f"{self.limit};w={self.window_seconds}"),
            ("ratelimit-limit", str(self.limit)),
            ("ratelimit-remaining", str(self.remaining)),
            ("ratelimit-reset", str(self.reset_seconds)),
        )


class RateLimitExceeded(ResourceExhausted):
    """A rate limit or sending quota is used up; `decision` says which and until when."""

    def __init__(self, message: str, *, reason: str, decision: Decision, scope: str) -> None:
        super().__init__(message, retry_after_seconds=decision.reset_seconds, reason=reason)
        self.decision = decision
        self.metadata.update(
            {
                "scope": scope,
                "limit": str(decision.limit),
                "windowSeconds": str(decision.window_seconds),
            }
        )


@dataclass(frozen=True, slots=True)
class RateLimitPolicy:
    """The budgets, from settings."""

    api: Budget
    send: Budget
    hourly: Budget
    daily: Budget
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    # Failed authentications per client address (limit 0 = not limited).
    auth_failures: Budget = Budget(
        "auth-fail",
        0,
        15 * 60 * 1000,
        reason="TOO_MANY_FAILED_AUTHENTICATIONS",
        what="failed authentications",
    )
    # How many blocks a key's window of a request budget is cut into (`SharedBlocks`).
    blocks_per_window: int = 32
    # A block not admitted from for this long goes back to the other processes.
    block_idle_ms: int = 30_000

    @classmethod
    def from_settings(cls, settings: Settings) -> RateLimitPolicy:
        """RATE_LIMIT_WINDOW/RATE_LIMIT_MAX, the send budget, the quotas, trusted proxies."""
        return cls(
            api=Budget(
                "api",
                settings.rate_limit_max,
                settings.rate_limit_window_ms,
                reason="RATE_LIMIT_EXCEEDED",
                what="requests",
            ),
            send=Budget(
                "send",
                settings.send_rate_limit_max,
                settings.send_rate_limit_window_ms,
                reason="SEND_RATE_LIMIT_EXCEEDED",
                what="send requests",
            ),
            hourly=Budget(
                "quota-hour",
                settings.quota_emails_per_hour,
                HOUR_MS,
                reason="SENDING_QUOTA_EXCEEDED",
                what="emails per hour",
            ),
            daily=Budget(
                "quota-day",
                settings.quota_emails_per_day,
                DAY_MS,
                reason="SENDING_QUOTA_EXCEEDED",
                what="emails per day",
            ),
            trusted_proxies=tuple(
                ipaddress.ip_network(n, strict=False) for n in settings.trusted_proxies
            ),
            auth_failures=Budget(
                "auth-fail",
                settings.auth_failure_max,
                settings.auth_failure_window_ms,
                reason="TOO_MANY_FAILED_AUTHENTICATIONS",
                what="failed authentications",
            ),
            blocks_per_window=settings.rate_limit_blocks,
            block_idle_ms=round(settings.rate_limit_block_idle * 1000),
        )

    @property
    def budgets(self) -> tuple[Budget, ...]:
        """Every budget."""
        return (self.api, self.send, self.hourly, self.daily, self.auth_failures)


class RateLimiter:
    """Admits requests against the per-IP and per-principal budgets and the tenant quotas."""

    def __init__(
        self,
        policy: RateLimitPolicy,
        counters: SharedCounters,
        blocks: SharedBlocks | None = None,
    ) -> None:
        """Create the limiter.

        Args:
            policy: the budgets.
            counters: the counts, shared in the background.
            blocks: where request budgets are claimed block by block (None: from the counts
                alone, exact for one process only).
        """
        self.policy = policy
        self.counters = counters
        self.blocks = blocks

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        collection: AsyncCollection[dict[str, Any]] | None,
        blocks_collection: AsyncCollection[dict[str, Any]] | None = None,
        *,
        instance: str | None = None,
    ) -> RateLimiter:
        """A limiter sharing its counts through `collection` and its budgets through blocks.

        Args:
            settings: the budgets.
            collection: where counts are shared (None: kept in this process).
            blocks_collection: where request budgets' blocks are claimed (None: not at all).
            instance: this process's id in shared documents; random by default.
        """
        policy = RateLimitPolicy.from_settings(settings)
        counters = SharedCounters(
            collection,
            policy.budgets,
            sync_interval=settings.rate_limit_sync_interval,
            instance=instance,
        )
        blocks = None
        if blocks_collection is not None:
            blocks = SharedBlocks(
                blocks_collection,
                blocks_per_window=policy.blocks_per_window,
                instance=counters.instance,
                idle_ms=policy.block_idle_ms,
            )
        return cls(policy, counters, blocks)

    @classmethod
    def for_failed_authentications(
        cls, *, limit: int, window_ms: int, clock: Callable[[], float] = time.time
    ) -> RateLimiter:
        """A limiter of failed authentications alone, counted in this process.

        For a front door that is not a gRPC service (the SMTP submission server): the requests
        it passes on meet the request budgets and quotas of the service behind it, so here only
        wrong credentials per client address are counted, with limits of its own.

        Args:
            limit: failures per client address and window; the address is refused from there
                until the window ends.
            window_ms: window length in milliseconds (fixed windows aligned to the epoch).
            clock: wall-clock seconds.
        """

        def unlimited(name: str) -> Budget:
            return Budget(name, 0, HOUR_MS, reason="", what="")

        policy = RateLimitPolicy(
            api=unlimited("api"),
            send=unlimited("send"),
            hourly=unlimited("quota-hour"),
            daily=unlimited("quota-day"),
            trusted_proxies=(),
            auth_failures=Budget(
                "auth-fail",
                limit,
                window_ms,
                reason="TOO_MANY_FAILED_AUTHENTICATIONS",
                what="failed authentications",
            ),
        )
        counters = SharedCounters(None, policy.budgets, sync_interval=60.0, clock=clock)
        return cls(policy, counters)

    async def run(self) -> None:
        """Share counts, give back idle blocks (and sweep ended windows) until cancelled."""
        await self.counters.run(extra_sweep=self._sweep_blocks, each_round=self.release_spare)

    async def _sweep_blocks(self) -> None:
        if self.blocks is not None:
            await self.blocks.sweep(datetime.fromtimestamp(self.counters.now_ms() / 1000, UTC))

    async def release_spare(self) -> None:
        """Give back what is left of blocks idle for a while or wanted by another process.

        Run after each sync (which reads the other processes' wants).

        Raises:
            PyMongoError: the database failed (tried again at the next call).
        """
        if self.blocks is not None:
            await self.blocks.release_idle(self.counters.now_ms(), self.counters.wanted)

    async def release(self) -> None:
        """Give back what is left of every block this process holds (it stops admitting).

        For a process that stops: called once its calls are drained. Bounded; a failure is
        logged (the blocks not written stay out of use until their window ends).
        """
        if self.blocks is None:
            return
        try:
            async with asyncio.timeout(_RELEASE_ON_STOP_S):
                await self.blocks.release_all(self.counters.now_ms())
        except (PyMongoError, TimeoutError) as exc:
            log.warning(
                "rate-limit blocks not given back at stop",
                extra={"fields": {"error": str(exc)[:200] or type(exc).__name__}},
            )

    def client_ip(self, peer: str, forwarded_for: str) -> str | None:
        """The client address of a call.

        The peer itself, unless it is a trusted proxy (the gateway): then x-forwarded-for is
        walked from the right, over trusted hops, to the first address that is not one (the
        left part of the header is whatever the client chose to send and proves nothing).
        """
        address = _peer_address(peer)
        if address is None:
            return None
        client = address
        if forwarded_for and self._trusted(client):
            for hop in reversed([h.strip() for h in forwarded_for.split(",")]):
                parsed = _parse_ip(hop)
                if parsed is None:
                    break
                client = parsed
                if not self._trusted(parsed):
                    break
        return str(client)

    def _trusted(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return any(address in network for network in self.policy.trusted_proxies)

    async def admit(
        self, *, send: bool, ip: str | None, principal: Principal | None, count: int = 1
    ) -> Decision:
        """Count one request against its budgets, or refuse it without counting.

        The counts this process knows refuse first (no database); then the request takes one
        event of each key's shared budget from this process's block (claiming a new block
        when it has none left: one database insert).

        Args:
            send: whether the rpc sends email (send budget and tenant quotas) or not (api).
            count: how many sends the request makes (a batch counts each of its messages).
            ip: the client address (None: a unix socket; only the principal is counted).
            principal: the authenticated caller (None: anonymous).

        Returns:
            The tightest budget's state after counting.

        Raises:
            RateLimitExceeded: a budget or quota is used up (nothing was counted).
        """
        decision, checks = self._check(send=send, ip=ip, principal=principal, count=count)
        budget = self.policy.send if send else self.policy.api
        now = self.counters.now_ms()
        limited = [(key, scope) for checked, key, scope in checks if checked is budget]
        if self.blocks is not None:
            taken: list[tuple[str, str]] = []
            try:
                for key, scope in limited:
                    counted, _ = self.counters.total(budget, key, now)
                    for _ in range(count):
                        block = await self.blocks.take(budget, key, now, counted=counted)
                        # None: other processes hold what is left of the budget. They give it
                        # back once they read that this one wants some (`release_spare`).
                        self.counters.want(budget, key, now, wanting=block is None)
                        if block is None:
                            for earlier, of in taken:
                                self.blocks.give_back(budget, earlier, now, of)
                            raise self._refusal(budget, scope, now)
                        taken.append((key, block))
            except PyMongoError as exc:
                # Without the database each process enforces the counts it knows (the check
                # above): fail open across processes, never within one.
                for earlier, of in taken:
                    self.blocks.give_back(budget, earlier, now, of)
                RATE_LIMIT_SYNCS.labels("error").inc()
                log.warning(
                    "rate-limit blocks unavailable", extra={"fields": {"error": str(exc)[:200]}}
                )
        # Quotas count accepted emails (`record_send`), rate limits count admitted requests.
        for key, _ in limited:
            self.counters.add(budget, key, now, count)
        return decision

    def _refusal(self, budget: Budget, scope: str, now_ms: int) -> RateLimitExceeded:
        """The refusal for a used-up `budget` (and its metric)."""
        end_ms = budget.window_start(now_ms) + budget.window_ms
        refused = Decision(
            budget.limit,
            0,
            max(1, math.ceil((end_ms - now_ms) / 1000)),
            budget.window_ms // 1000,
        )
        RATE_LIMIT_REFUSALS.labels(budget.name, scope).inc()
        return RateLimitExceeded(
            _refusal_message(budget, scope, refused),
            reason=budget.reason,
            decision=refused,
            scope=scope,
        )

    def _check(
        self, *, send: bool, ip: str | None, principal: Principal | None, count: int = 1
    ) -> tuple[Decision, list[tuple[Budget, str, str]]]:
        """Refuse from the counts alone (no database); returns the tightest state and checks."""
        budget = self.policy.send if send else self.policy.api
        checks: list[tuple[Budget, str, str]] = []
        if ip is not None:
            checks.append((budget, f"ip:{ip}", "ip"))
        if principal is not None:
            checks.append((budget, f"principal:{principal.tenant_id}/{principal.subject}", "user"))
        # Test keys' emails never leave the building: they count against no sending quota
        # (the send rate budget above still applies to them).
        if send and principal is not None and not principal.test:
            for quota in (self.policy.hourly, self.policy.daily):
                if quota.limit:
                    checks.append((quota, _tenant_key(principal), "tenant"))
        now = self.counters.now_ms()
        tightest: Decision | None = None
        for checked, key, scope in checks:
            used, end_ms = self.counters.total(checked, key, now)
            decision = Decision(
                limit=checked.limit,
                remaining=max(0, checked.limit - used - count),
                reset_seconds=max(1, math.ceil((end_ms - now) / 1000)),
                window_seconds=checked.window_ms // 1000,
            )
            if used + count > checked.limit:
                raise self._refusal(checked, scope, now)
            if tightest is None or decision.remaining < tightest.remaining:
                tightest = decision
        decision = tightest or Decision(budget.limit, budget.limit, 0, budget.window_ms // 1000)
        return decision, checks

    def check_failed_authentications(self, ip: str | None) -> None:
        """Refuse a client address that failed to authenticate too often in this window.

        Checked before credentials are looked at, so a refused client learns nothing about
        the credentials it sends.

        Raises:
            RateLimitExceeded: the address reached the limit (reason
                TOO_MANY_FAILED_AUTHENTICATIONS).
        """
        budget = self.policy.auth_failures
        if ip is None or not budget.limit:
            return
        now = self.counters.now_ms()
        used, _ = self.counters.total(budget, f"ip:{ip}", now)
        if used >= budget.limit:
            raise self._refusal(budget, "ip", now)

    def record_failed_authentication(self, ip: str | None) -> int:
        """Count a failed authentication of a client address.

        Returns:
            The address's failures in the current window, this one included (0 when not
            counted), for callers that slow down repeated failures.
        """
        budget = self.policy.auth_failures
        if ip is None or not budget.limit:
            return 0
        now = self.counters.now_ms()
        self.counters.add(budget, f"ip:{ip}", now)
        return self.counters.total(budget, f"ip:{ip}", now)[0]

    def record_send(self, principal: Principal, emails: int = 1) -> None:
        """Count accepted emails against the tenant's hourly and daily quotas (not a test key's)."""
        if principal.test:
            return
        now = self.counters.now_ms()
        for quota in (self.policy.hourly, self.policy.daily):
            if quota.limit:
                self.counters.add(quota, _tenant_key(principal), now, emails)


def _tenant_key(principal: Principal) -> str:
    return f"tenant:{principal.tenant_id}"


def _refusal_message(budget: Budget, scope: str, decision: Decision) -> str:
    who = {"ip": "this client address", "user": "this caller", "tenant": "this tenant"}[scope]
    if budget.name == "auth-fail":
        return (
            f"{who} failed to authenticate {budget.limit} times "
            f"(per {_duration(budget.window_ms)}); retry in {decision.reset_seconds} s"
        )
    return (
        f"{who} has used its {budget.limit} {budget.what} "
        f"(per {_duration(budget.window_ms)}); retry in {decision.reset_seconds} s"
    )


def _duration(window_ms: int) -> str:
    seconds = window_ms / 1000
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = int(seconds // size)
            return unit if count == 1 else f"{count} {unit}s"
    return f"{seconds:g} seconds"


def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # one client, one key, whichever socket family it used
    return address


def _peer_address(peer: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address in grpc's peer string ("ipv4:1.2.3.4:5", "ipv6:[::1]:5", "unix:...")."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return _parse_ip(rest.rpartition(":")[0])
    if kind == "ipv6":
        return _parse_ip(rest.rpartition(":")[0].strip("[]").split("%")[0])
    return None


__all__ = [
    "BLOCKS_COLLECTION",
    "COLLECTION",
    "SharedBlocks",
    "Budget",
    "Decision",
    "RateLimitExceeded",
    "RateLimitPolicy",
    "RateLimiter",
    "SharedCounters",
]
