"""Email counts per tenant, creation time, domain and status, kept up to date as mail flows.

GetEmailStats answers "how many of the tenant's emails accepted in [start, end) are in each
status, per domain" without reading the emails: every change of an email's stored status moves
one unit between two (domain, status) counts of the time bucket the email was *created* in
(insert: +1; attempt outcome, cancel, reschedule: -1 old, +1 new; delete or retention: -1).

Documents (collection ``email_tallies``, written only by the mail service): one per tenant,
grain, bucket and **writer**, ``_id`` = ``tenant|grain|bucket|writer``, holding a flat list of
``{d: domain id, s: status, n: count}``. Three grains: days, hours and minutes (UTC,
epoch-aligned); a change updates the three buckets that contain the email's creation time.

Why one writer per document: FerretDB 1.24 applies ``$inc`` and conditional updates as
read-modify-write without isolation (concurrent increments are lost, measured for the rate
limiter), while a document only one process ever writes needs no isolation. The writer is a
`Tallies` instance (one per repository, i.e. per process), named by a fresh id at start, so no
two processes share a document and a restart never continues an old one. It keeps the absolute
values of its documents: a new document is inserted, a known one gets its new values with
``$set``. After a write whose outcome is unknown (the connection dropped: applied or not?) the
documents are read back before their next write and what landed is taken off the pending
counts; a document the writer forgot (memory bound) reveals itself by its insert failing on the
duplicate ``_id`` and is read back too. Writes from one writer are serialized (one round in
flight), so its own updates cannot interleave either. Counts may go negative in one writer's
document (a writer that finishes an email another writer created); only the sum over writers
means anything.

Reading a window (`Tallies.count`): the window is cut into whole days, then whole hours, then
whole minutes at its two ends (at most 30 + 46 + 118 buckets for 30 days, times the writers
active in them), each range read with one query on the ``(tenant_id, g, bucket)`` index; the
seconds before the first whole minute and after the last are counted from the emails
themselves by the caller (an index range on ``(tenant_id, created_at)`` of under two minutes of
one tenant's mail). The answer is exact for any window, and its cost depends on the window's
length and the number of writers, not on how much mail is stored.

Exactness holds because each count is changed right after (and only after) the email write it
mirrors succeeded, and every transition is made by exactly one caller: attempt outcomes are
fenced by the lease (`finish_attempt` records only for the current claim), deletes, cancels,
reschedules and retention win a unique claim on the transition first. Known windows where a
count can drift, all documented in docs/operations.md:

* a process killed between an email's write and the flush of its counts (the flush starts
  right after the write, so the window is one database round trip; neither the send path nor
  the delivery loop waits for it, `flush_soon`, and a stats read flushes its own process's
  counts first); the email is right, the stats miss that one change;
* a flush that fails (database down) is kept in memory and retried by the next flush and by
  the periodic flush; a process that dies before the database comes back loses those counts;
* the lease fence itself has a lease-sized window on FerretDB (see
  `MongoDeliveryQueue._holds`): a worker whose expired lease was taken over between its
  check and its write records twice.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pymongo
from pymongo import ASCENDING, InsertOne, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, PyMongoError

from services.core.mongo import Document, IndexSpec, chunked, delete_older

log = logging.getLogger(__name__)

TALLIES = "email_tallies"
# Grains from coarsest to finest, in seconds; the finest decides what callers count directly.
GRAINS: tuple[tuple[str, int], ...] = (("d", 86400), ("h", 3600), ("m", 60))
FINEST = timedelta(seconds=GRAINS[-1][1])
INDEXES = (
    IndexSpec(
        TALLIES, [("tenant_id", ASCENDING), ("g", ASCENDING), ("bucket", ASCENDING)], "tally_window"
    ),
    IndexSpec(TALLIES, [("bucket", ASCENDING)], "tally_age"),
)
# Documents whose values this process keeps in memory; beyond it, clean ones are forgotten
# (touched again, their insert fails on the duplicate _id and they are read back: exact, as
# nobody else writes them).
_MAX_CACHED = 20_000
# The most seconds one flush round may spend on the database.
_ROUND_TIMEOUT = 30.0

Key = tuple[str, str]  # (domain id, status)


def floor_to(when: datetime, seconds: int) -> datetime:
    """The start of the epoch-aligned bucket of `seconds` that contains `when` (UTC)."""
    ts = int(when.timestamp() // seconds * seconds)
    return datetime.fromtimestamp(ts, UTC)


def ceil_to(when: datetime, seconds: int) -> datetime:
    """The first bucket boundary at or after `when`."""
    start = floor_to(when, seconds)
    return start if start == when else start + timedelta(seconds=seconds)


def cover(start: datetime, end: datetime) -> list[tuple[str, datetime, datetime]]:
    """Cut a window whose ends are whole minutes into ranges of whole buckets.

    Returns:
        (grain, first bucket, end) ranges, coarsest grains in the middle, in time order.
    """

    def split(a: datetime, b: datetime, level: int) -> list[tuple[str, datetime, datetime]]:
        if a >= b:
            return []
        grain, seconds = GRAINS[level]
        if level == len(GRAINS) - 1:
            return [(grain, a, b)]
        lo, hi = ceil_to(a, seconds), floor_to(b, seconds)
        if lo >= hi:
            return split(a, b, level + 1)
        return [*split(a, lo, level + 1), (grain, lo, hi), *split(hi, b, level + 1)]

    return split(start, end, 0)


@dataclass
class _Doc:
    """One tally document of this writer: what is stored (None: not read yet) and what is not.

    `exists`: the document is known to be in the database (write with an update, else an
    insert). `base`: after a write whose outcome is unknown (it failed, perhaps after it was
    applied), what was stored before it; the next write reads the document back and takes
    what landed off `pending`, so a write that did land is not counted twice.
    """

    tenant_id: str
    grain: str
    bucket: datetime
    stored: Counter[Key] | None = None
    pending: Counter[Key] = field(default_factory=Counter)
    exists: bool = False
    base: Counter[Key] | None = None


class Tallies:
    """This process's tally documents (one writer) and the window reads over every writer's."""

    def __init__(self, db: AsyncDatabase[Document], *, writer_id: str | None = None) -> None:
        self._collection: AsyncCollection[Document] = db[TALLIES]
        self.writer_id = writer_id or uuid.uuid4().hex
        self._docs: dict[str, _Doc] = {}
        # Ids of documents with counts added since their last write: a round visits only these
        # (walking every cached document per flush cost a quarter of delivery's CPU).
        self._dirty: set[str] = set()
        self._flusher: asyncio.Task[None] | None = None
        self._next_round: asyncio.Future[None] | None = None

    def add(
        self, *, tenant_id: str, created_at: datetime, domain_id: str, status: str, n: int
    ) -> None:
        """Count `n` (+1/-1) emails of a tenant created at `created_at` in (domain, status).

        Memory only: `flush` writes it. Call after the email write it mirrors succeeded.
        """
        for grain, seconds in GRAINS:
            bucket = floor_to(created_at, seconds)
            doc_id = f"{tenant_id}|{grain}|{bucket.isoformat()}|{self.writer_id}"
            doc = self._docs.get(doc_id)
            if doc is None:
                # Assumed new (values zero, inserted): a document this writer forgot exists
                # already, which its insert reveals (duplicate key); it is then read back.
                doc = self._docs[doc_id] = _Doc(tenant_id, grain, bucket, Counter())
            doc.pending[(domain_id, status)] += n
            self._dirty.add(doc_id)

    def move(
        self, *, tenant_id: str, created_at: datetime, domain_id: str, old: str, new: str
    ) -> None:
        """Count one email's change of status from `old` to `new` (nothing if they are equal)."""
        if old == new:
            return
        self.add(tenant_id=tenant_id, created_at=created_at, domain_id=domain_id, status=old, n=-1)
        self.add(tenant_id=tenant_id, created_at=created_at, domain_id=domain_id, status=new, n=1)

    async def flush(self) -> None:
        """Write the counts added so far; failures are logged and retried by the next flush.

        Flushes run one round at a time, in a task of their own (a fresh context: it serves
        every caller, so it must not inherit one request's deadline). A caller waits, shielded,
        for the next round to start after its call, which takes everything pending then: never
        longer than the round in progress plus its own, however busy the writer is.
        """
        await asyncio.shield(self._start_round())

    def flush_soon(self) -> None:
        """Have the counts added so far written by the next round, without waiting for it.

        For the send path and the delivery loops: the email (or its outcome) is stored, its
        count follows within a round trip, and nobody waits for it (a stats read of this
        process flushes first, see `MongoEmailRepository.stats`). A process killed before that
        round lands misses the counts, the same window as when the caller waited.
        """
        _ = self._start_round()

    def _start_round(self) -> asyncio.Future[None]:
        """The next round's completion (a round task is started if none runs)."""
        if self._next_round is None:
            self._next_round = asyncio.get_running_loop().create_future()
        round_done = self._next_round
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._rounds(), context=contextvars.Context())
        return round_done

    async def _rounds(self) -> None:
        while self._next_round is not None:
            round_done, self._next_round = self._next_round, None
            try:
                # Bounded: a database that stops answering fails the round (counts kept for
                # the next) instead of holding every later caller.
                with pymongo.timeout(_ROUND_TIMEOUT):
                    await self._round()
            finally:
                round_done.set_result(None)

    async def _round(self) -> None:
        ids, self._dirty = self._dirty, set()
        dirty = [
            (i, d) for i in ids if (d := self._docs.get(i)) is not None and any(d.pending.values())
        ]
        try:
            for part in chunked(dirty):
                await self._write(list(part))
            # Documents this writer had forgotten, found by their insert: read back, written.
            again = [(i, d) for i, d in dirty if d.stored is None and any(d.pending.values())]
            for part in chunked(again):
                await self._write(list(part))
        except PyMongoError as exc:
            log.warning(
                "email tallies not written; kept for the next flush",
                extra={"fields": {"error": str(exc)[:200], "documents": len(dirty)}},
            )
            return
        finally:
            # What this round did not write (a failure, a partial landing) stays for the next.
            self._dirty.update(i for i, d in dirty if any(d.pending.values()))
        if len(self._docs) > _MAX_CACHED:
            self._docs = {i: d for i, d in self._docs.items() if any(d.pending.values())}

    async def _write(self, batch: list[tuple[str, _Doc]]) -> None:
        unread = [(i, d) for i, d in batch if d.stored is None]
        if unread:
            # By _id, one each: the filter FerretDB serves from its primary key ($in scans).
            found = await asyncio.gather(
                *(self._collection.find_one({"_id": i}) for i, _ in unread)
            )
            for (_, doc), stored in zip(unread, found, strict=True):
                doc.stored = _counts(stored)
                doc.exists = stored is not None
                if doc.base is not None:
                    landed = Counter(doc.stored)
                    landed.subtract(doc.base)
                    doc.pending.subtract(landed)
                    doc.base = None
        taken = [(i, d, Counter(d.pending)) for i, d in batch]
        writes: list[InsertOne[Document] | UpdateOne] = []
        for doc_id, doc, delta in taken:
            assert doc.stored is not None
            values = Counter(doc.stored)
            values.update(delta)
            fields: Document = {
                "tenant_id": doc.tenant_id,
                "g": doc.grain,
                "bucket": doc.bucket,
                "writer": self.writer_id,
                "counts": [{"d": d, "s": s, "n": n} for (d, s), n in sorted(values.items()) if n],
            }
            # A new document is inserted (cheaper than an upsert on FerretDB, which looks
            # the _id up first); one this writer wrote before gets its new values.
            if doc.exists:
                writes.append(UpdateOne({"_id": doc_id}, {"$set": fields}, upsert=True))
            else:
                writes.append(InsertOne({"_id": doc_id, **fields}))
        failed: dict[int, int] = {}  # index of a write the server refused -> error code
        try:
            await self._collection.bulk_write(writes, ordered=False)
        except BulkWriteError as exc:
            failed = {int(e["index"]): int(e.get("code", 0)) for e in exc.details["writeErrors"]}
        except PyMongoError:
            # Applied or not, we cannot tell: read each back before its next write.
            for _, doc, _ in taken:
                doc.base, doc.stored = doc.stored, None
            raise
        for index, (_, doc, delta) in enumerate(taken):
            if index in failed:
                if failed[index] == 11000:
                    # The document exists already (this writer forgot it, see `_round`):
                    # read it back; the counts stay pending for the next write.
                    doc.stored = None
                continue
            assert doc.stored is not None
            doc.stored.update(delta)
            doc.pending.subtract(delta)
            doc.exists = True
        refused = [code for code in failed.values() if code != 11000]
        if refused:
            log.warning(
                "email tallies refused by the database; kept for the next flush",
                extra={"fields": {"codes": sorted(set(refused))}},
            )

    async def count(self, *, tenant_id: str, start: datetime, end: datetime) -> Counter[Key]:
        """Sums over every writer of the whole buckets in [start, end) (ends: whole minutes)."""
        ranges = cover(start, end)
        results = await asyncio.gather(
            *(self._read(tenant_id, grain, lo, hi) for grain, lo, hi in ranges)
        )
        total: Counter[Key] = Counter()
        for part in results:
            total.update(part)
        return total

    async def _read(self, tenant_id: str, grain: str, lo: datetime, hi: datetime) -> Counter[Key]:
        total: Counter[Key] = Counter()
        query = {"tenant_id": tenant_id, "g": grain, "bucket": {"$gte": lo, "$lt": hi}}
        async for doc in self._collection.find(query, {"counts": 1}):
            total.update(_counts(doc))
        return total

    async def sweep(self, *, before: datetime) -> int:
        """Remove documents of buckets that start before `before` (no email of theirs is left)."""
        self._docs = {
            i: d for i, d in self._docs.items() if d.bucket >= before or any(d.pending.values())
        }
        return await delete_older(self._collection, "bucket", before)


def _counts(doc: Document | None) -> Counter[Key]:
    out: Counter[Key] = Counter()
    for row in (doc or {}).get("counts", []):
        out[(str(row["d"]), str(row["s"]))] += int(row["n"])
    return out
