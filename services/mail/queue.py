"""The delivery queue engine: due entries, leases (claims), attempt outcomes, on the database.

The queue stays in the shared database so that any worker process of any replica can take
over any email and nothing lives on one machine's disk.

Collections (written only by the mail service):
* ``email_queue``: one tiny entry per unfinished email: ``due`` (when a worker may take it) and
  ``claims`` (the number of the next claim). Removed when the email finishes.
* ``email_claims``: the leases, an append-only log: ``_id`` = email id + claim number, with the
  holder's token and the lease's expiry. A unique insert decides which worker wins a claim; the
  live lease of an email is its newest claim while unexpired (see `MongoDeliveryQueue.claim_batch`).
  The API's transition claims live here too (`win_transitions`). Swept after an hour.

FerretDB 1.24 has no transactions: the writes of one step go in an order where a crash between
them leaves work to redo, never work lost. The guarantees: a lease expires and another worker
takes the email over; each recipient is attempted until it has a verdict, and a verdict is
recorded once (the write of an outcome is fenced by the lease); the one duplicate this allows
is a resend after a crash between the relay's 250 and our record of it (RFC 5321's window).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from bson import ObjectId
from gridfs.asynchronous import AsyncGridFSBucket
from pymongo import ASCENDING, DeleteOne, UpdateOne
from pymongo.asynchronous.database import AsyncDatabase

from services.core.errors import NotFound
from services.core.mongo import Document, IndexSpec, chunked, delete_older, is_transient
from services.mail.documents import (
    CLAIMS,
    CONTENT_BUCKET,
    CONTENTS,
    EMAILS,
    QUEUE,
    email_from_doc,
    feed_events,
    find_by_ids,
    insert_many_unique,
    partition,
    transition_update,
)
from services.mail.feedback.event_log import Change, EventRecorder
from services.mail.feedback.suppression_store import SuppressionList
from services.mail.group_commit import GroupCommit
from services.mail.models import UNFINISHED, Claimed, Email, Event, EventType
from services.mail.outcomes import CLAIMABLE, Transition, claim
from services.mail.tallies import Tallies

log = logging.getLogger(__name__)

INDEXES = (
    IndexSpec(CLAIMS, [("created_at", ASCENDING)], "claim_age"),
    IndexSpec(QUEUE, [("due", ASCENDING)], "queue_due"),
)
# A queue entry whose email does not exist after this long was left by a crashed submit.
ORPHAN_AGE = timedelta(minutes=1)
# Due entries one claim reads: per email it wants, plus a few, as spares for those that other
# workers turn out to hold (this process skips the ones it knows are leased).
_CLAIM_WINDOW_FACTOR = 4
_CLAIM_WINDOW_EXTRA = 32
# Insert rounds of one claim (spares for lost emails, next numbers for expired leases), and
# expired leases followed in a row when reading who holds an email.
_MAX_ROUNDS = 16
_CLAIMABLE = [s.value for s in CLAIMABLE]


class DeliveryQueue(Protocol):
    """What a delivery worker needs: claims under a lease, outcomes, the message bytes."""

    async def claim_batch(
        self, *, now: datetime, lease: timedelta, worker_id: str, limit: int
    ) -> list[Claimed]:
        """Take up to `limit` due emails, the most overdue first, each under a lease."""
        ...

    async def arrival(self, within: float) -> None:
        """Return when this process stored new mail, or after `within` seconds.

        What an idle worker waits on between polls: mail stored by this process is delivered
        at once, mail stored by another process at the next poll.
        """
        ...

    async def finish_attempt(self, *, claimed: Claimed, transition: Transition) -> bool:
        """Record an attempt's outcome if the lease is still ours (False otherwise).

        While the database is unreachable the outcome is kept and written once it answers;
        until then this does not return, and the email is not claimed again by this process.
        """
        ...

    async def flush_outcomes(self, *, within: float) -> int:
        """Wait up to `within` s for kept outcomes to be written; how many are still kept."""
        ...

    async def release(self, *, claimed: Sequence[Claimed], now: datetime) -> None:
        """Give claimed emails back untouched (shutdown): due again at once."""
        ...

    async def content(self, *, email: Email) -> bytes:
        """The built message of an email."""
        ...


@dataclass(slots=True)
class _PendingOutcome:
    """An attempt's outcome waiting to be written (see `MongoDeliveryQueue.finish_attempt`)."""

    email_id: str
    claim_no: int
    attempts: int
    email: UpdateOne
    # The queue entry's move (due again later), or None: the email finished, its entry goes.
    entry: UpdateOne | None
    # Its events (in the email update's outbox push), announced before the update.
    change: Change
    at: datetime
    # A write of it failed before: it may have landed without our hearing the answer.
    retried: bool = False


def queue_entry(email: Email) -> Document | None:
    """The queue entry of a new email (None: nothing to deliver)."""
    if email.status not in UNFINISHED or email.next_attempt_at is None:
        return None
    return {
        "_id": email.id,
        "due": email.next_attempt_at,
        "claims": 0,
        "created_at": email.created_at,
    }


async def read_content(
    db: AsyncDatabase[Document], bucket: AsyncGridFSBucket, email: Email
) -> bytes:
    """The built message of `email`: already read, in GridFS, or read by its id.

    From ``email_contents``, or (an email stored before that collection) its own document.
    """
    if email.content is not None:
        return email.content
    if email.content_file_id:
        stream = await bucket.open_download_stream(ObjectId(email.content_file_id))
        return await stream.read()
    doc = await db[CONTENTS].find_one({"_id": email.id})
    if doc is None:
        doc = await db[EMAILS].find_one({"_id": email.id}, {"content": 1})
    if doc is None or doc.get("content") is None:
        raise NotFound("Email", email.id)
    return bytes(doc["content"])


class MongoDeliveryQueue:
    """`DeliveryQueue` on MongoDB/FerretDB, plus the queue operations the API storage uses."""

    def __init__(
        self,
        db: AsyncDatabase[Document],
        *,
        tallies: Tallies,
        suppressions: SuppressionList | None = None,
    ) -> None:
        self._db = db
        self._recorder = EventRecorder(db)
        # Hard bounces put their address on it (None: suppression not wired, e.g. unit tests).
        self.suppressions = suppressions
        self._emails = db[EMAILS]
        self._contents = db[CONTENTS]
        self._claims = db[CLAIMS]
        self._queue = db[QUEUE]
        self._bucket = AsyncGridFSBucket(db, bucket_name=CONTENT_BUCKET)
        self._rng = random.Random()  # noqa: S311 - load spreading, not security
        self.tallies = tallies
        # Outcomes are kept while the database is away: the relay has answered, and an
        # outcome dropped now would have the email delivered again after its lease.
        self._outcomes = GroupCommit(self._write_outcomes, keep_while_unreachable=True)
        # Emails whose outcome waits to be written -> their claim number. Never claimed again
        # by this process meanwhile, even once their lease has expired.
        self._recording: dict[str, int] = {}
        # Emails seen leased (by anyone, this process included) -> when that lease expires.
        # Left out of the next claims' queries: FerretDB returns the first due entries in
        # insertion order, and without this a window full of emails being delivered would
        # hide every email behind them.
        self._leased: dict[str, tuple[datetime, str]] = {}  # email id -> (expiry, claim token)
        # Tokens of claims this process took back (their email was not stored yet): a mark
        # another loop made from reading such a claim must not hide the email for a lease.
        self._returned: dict[str, datetime] = {}  # token -> when it was taken back
        # Set when this process stored new emails (`announce_arrival`): idle workers of this
        # process claim at once instead of at their next poll.
        self._arrived = asyncio.Event()

    # --- entries, for the API storage -----------------------------------------------------

    async def add_entries(self, entries: Sequence[Document]) -> None:
        """Insert new emails' entries (a taken ``_id``: a concurrent duplicate's, kept)."""
        await insert_many_unique(self._queue, list(entries))

    def announce_arrival(self) -> None:
        """New emails are stored (entries and documents): wake this process's idle workers."""
        self._arrived.set()

    async def arrival(self, within: float) -> None:
        """See `DeliveryQueue.arrival`."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._arrived.wait(), timeout=within)
        self._arrived.clear()

    async def remove_entry(self, email_id: str) -> None:
        """Take an email out of the queue: no worker takes it from here on."""
        await self._queue.delete_one({"_id": email_id})

    async def move_entry(self, email_id: str, *, due: datetime, now: datetime) -> None:
        """Make an email due at `due` (its entry re-created if it was missing)."""
        await self._queue.update_one(
            {"_id": email_id},
            {"$set": {"due": due}, "$setOnInsert": {"claims": 0, "created_at": now}},
            upsert=True,
        )

    async def live_lease(self, email_id: str, now: datetime) -> Document | None:
        """The unexpired newest claim of an unfinished email, if any."""
        entry = await self._queue.find_one({"_id": email_id})
        if entry is None:
            return None
        number = int(entry.get("claims", 0))
        for _ in range(_MAX_ROUNDS):
            lease = await self._claims.find_one({"_id": f"{email_id}:{number}"})
            if lease is None:
                return None
            if lease["expires_at"] > now:
                return lease
            number += 1
        return None

    async def win_transitions(self, claim_ids: Sequence[str], *, now: datetime) -> list[bool]:
        """Insert the unique claims of API changes; which were won (False: someone else's).

        Of two concurrent cancels of one email, or two removals (API delete, retention), the
        one whose claim goes in makes and counts the change. Swept with the leases.
        """
        docs = [{"_id": c, "created_at": now} for c in claim_ids]
        return await insert_many_unique(self._claims, docs)

    # --- workers --------------------------------------------------------------------------

    async def content(self, *, email: Email) -> bytes:
        """See `DeliveryQueue.content`."""
        return await read_content(self._db, self._bucket, email)

    async def claim_batch(
        self, *, now: datetime, lease: timedelta, worker_id: str, limit: int
    ) -> list[Claimed]:
        """See `DeliveryQueue.claim_batch`.

        A claim is one insert, nothing else: claim number n of an email is the document
        ``<email id>:<n>`` in ``email_claims``, and the queue entry says which n is next. Unique
        ``_id``s decide between concurrent claimers (FerretDB 1.24 does not isolate
        find-and-modify or conditional updates, measured: 8 claimers took 50 documents 123-157
        times; unique keys do hold). The email is not written at claim time, and the claims
        of a batch go into a single ``insertMany`` (each write by ``_id`` costs FerretDB
        2-3 ms), the entries' marks into a single update.

        * Claim n exists and is unexpired: another worker holds the email; skip it.
        * Claim n exists but expired (its worker died or released it): try n+1. The expired
          holder's late record is refused because n+1 exists (`finish_attempt`).
        * A won claim marks its entry due at the lease's end, so that polls skip it meanwhile
          and find it again exactly when the lease expires (takeover).
        * The attempt's outcome moves the entry on (``due``, ``claims`` = n+1) or removes it.

        The queue is its own small collection because FerretDB filters by scanning: a query
        over every email ever sent would grow without bound.
        """
        self._returned = {t: at for t, at in self._returned.items() if at > now - lease}
        self._leased = {
            k: (expiry, token)
            for k, (expiry, token) in self._leased.items()
            if expiry > now and token not in self._returned
        }
        query: Document = {"due": {"$lte": now}}
        skip = [*self._leased, *(eid for eid in self._recording if eid not in self._leased)]
        if skip:
            query["_id"] = {"$nin": skip}
        # No sort on the server (FerretDB sorts by scanning everything); a plain filter with a
        # limit stops early. The most overdue of the window go first; the head is shuffled so
        # that concurrent claimers (other processes read the same window) do not all fight
        # over the same few emails: a lost claim costs another insert and a read.
        size = limit * _CLAIM_WINDOW_FACTOR + _CLAIM_WINDOW_EXTRA
        window = [d async for d in self._queue.find(query).limit(size)]
        window.sort(key=lambda d: d["due"])
        spread = max(limit * 4, _CLAIM_WINDOW_EXTRA)
        head = window[:spread]
        self._rng.shuffle(head)
        untried = [(d["_id"], int(d.get("claims", 0))) for d in (*head, *window[spread:])]
        untried.reverse()  # popped from the end
        created = {d["_id"]: d.get("created_at", now) for d in window}
        won, expired = await self._win_claims(
            untried, limit=limit, now=now, lease=lease, worker_id=worker_id
        )
        # The emails won, and their messages, in one read each (not one per email).
        found = await find_by_ids(self._emails, list(won))
        contents = await find_by_ids(
            self._contents,
            [
                eid
                for eid, doc in found.items()
                if doc["status"] in _CLAIMABLE
                and doc.get("content") is None
                and not doc.get("content_file_id")
            ],
        )
        out: list[Claimed] = []
        stale: list[str] = []
        unborn: list[str] = []
        lost: list[str] = []
        for eid, (number, token) in won.items():
            doc = found.get(eid)
            if doc is None and created.get(eid, now) > now - ORPHAN_AGE:
                # Its email is being stored right now (entries go first): take the claim back
                # (ours alone: we just inserted it), or the email would wait for the lease.
                unborn.append(f"{eid}:{number}")
                self._returned[token] = now
                continue
            if doc is None or doc["status"] not in _CLAIMABLE:
                # Finished or cancelled meanwhile (its entry outlived a crash), or an entry
                # whose email was never stored (a submit that crashed in between: its content
                # went in before the email too, and goes with the entry).
                stale.append(eid)
                if doc is None:
                    lost.append(eid)
                continue
            self._leased[eid] = (now + lease, token)
            if eid in contents:
                doc["content"] = contents[eid]["content"]
            out.append(
                claim(
                    email_from_doc(doc),
                    token=token,
                    number=number,
                    now=now,
                    lease=lease,
                    worker_id=worker_id,
                    taken_over=tuple(expired.get(eid, ())),
                )
            )
        # The entries of the emails won become due when their leases end: other workers' polls
        # (`due <= now`) no longer see them, instead of each learning of them by losing a
        # claim insert. Only a hint: the claim decides, and an entry left unmarked (a crash
        # in between) is skipped by whoever meets its live claim, as before.
        # The leases of a batch end together: one statement for the entries, not one each.
        for part in chunked([c.email.id for c in out]):
            await self._queue.update_many(
                {"_id": {"$in": list(part)}}, {"$set": {"due": now + lease}}
            )
        for part in chunked(lost):
            await self._contents.delete_many({"_id": {"$in": list(part)}})
        for part in chunked(stale):
            await self._queue.delete_many({"_id": {"$in": list(part)}})
        for part in chunked(unborn):
            await self._claims.bulk_write([DeleteOne({"_id": c}) for c in part])
        return out

    async def _win_claims(
        self,
        untried: list[tuple[str, int]],
        *,
        limit: int,
        now: datetime,
        lease: timedelta,
        worker_id: str,
    ) -> tuple[dict[str, tuple[int, str]], dict[str, list[Event]]]:
        """Insert claims for candidates (popped from the end of `untried`) until `limit` are won.

        Returns:
            email id -> (claim number, token) of the claims won, and the CLAIMED events of
            expired leases that were taken over on the way (written with the attempt).
        """
        expired: dict[str, list[Event]] = {}
        won: dict[str, tuple[int, str]] = {}
        retry: dict[str, int] = {}  # expired leases: their next claim number
        for _ in range(_MAX_ROUNDS):
            wanted = dict(retry)
            while untried and len(won) + len(wanted) < limit:
                eid, number = untried.pop()
                wanted.setdefault(eid, number)
            if not wanted:
                break
            tokens = {eid: f"{worker_id}:{uuid.uuid4().hex}" for eid in wanted}
            docs = [
                {
                    "_id": f"{eid}:{number}",
                    "token": tokens[eid],
                    "worker": worker_id,
                    "created_at": now,
                    "expires_at": now + lease,
                }
                for eid, number in wanted.items()
            ]
            taken = await insert_many_unique(self._claims, docs)
            lost: dict[str, int] = {}
            for (eid, number), ok in zip(wanted.items(), taken, strict=True):
                if ok:
                    won[eid] = (number, tokens[eid])
                else:
                    lost[eid] = number
            # Whoever holds the ones we lost (one read for all of them): live (skip) or expired
            # (take the next number).
            holders = await find_by_ids(self._claims, [f"{eid}:{n}" for eid, n in lost.items()])
            retry = {}
            for eid, number in lost.items():
                holder = holders.get(f"{eid}:{number}")
                if holder is None:
                    continue  # swept meanwhile (an hour old): the next round of claims
                if holder["expires_at"] > now:
                    self._leased[eid] = (holder["expires_at"], str(holder.get("token", "")))
                    continue
                expired.setdefault(eid, []).append(
                    Event(
                        EventType.CLAIMED,
                        holder["created_at"],
                        detail=f"{holder.get('worker', '')} (lease expired without a record)",
                    )
                )
                retry[eid] = number + 1
        return won, expired

    async def _holding(self, batch: Sequence[_PendingOutcome]) -> list[bool]:
        """Per outcome, whether its lease is still ours, in one read for the whole batch.

        The fence against a worker whose lease expired and was taken over: the next claim
        number exists. (Read, then write by _id: FerretDB has no conditional update that is
        isolated, so a takeover between the two is the remaining, lease-sized, window.)
        """
        later = [f"{o.email_id}:{o.claim_no + 1}" for o in batch]
        taken = await find_by_ids(self._claims, later, {"_id": 1})
        return [claim_id not in taken for claim_id in later]

    async def queue_health(self, *, now: datetime) -> tuple[int, float]:
        """Entries due now in the whole queue, and how long the oldest has been due (s)."""
        depth = 0
        oldest: datetime | None = None
        async for entry in self._queue.find({"due": {"$lte": now}}, {"due": 1}):
            depth += 1
            oldest = entry["due"] if oldest is None else min(oldest, entry["due"])
        return depth, (now - oldest).total_seconds() if oldest is not None else 0.0

    async def sweep_claims(self, *, before: datetime) -> int:
        """Remove claims older than `before` (far older than any lease: they decide nothing)."""
        return await delete_older(self._claims, "created_at", before)

    async def finish_attempt(self, *, claimed: Claimed, transition: Transition) -> bool:
        """See `DeliveryQueue.finish_attempt`.

        Written with other outcomes (`GroupCommit`), and kept while the database is away:
        this waits until the database has taken it. A caller cancelled meanwhile (shutdown)
        leaves it with the group commit, which still writes it if the database returns before
        the process ends (`flush_outcomes`); otherwise the lease, never released, runs out and
        the email is attempted again (the documented duplicate window).
        """
        email_id = claimed.email.id
        entry: UpdateOne | None = None
        if transition.status in UNFINISHED and transition.next_attempt_at is not None:
            entry = UpdateOne(
                {"_id": email_id},
                {"$set": {"due": transition.next_attempt_at, "claims": claimed.claim_no + 1}},
            )
        self._recording[email_id] = claimed.claim_no
        feed = feed_events(claimed.email, transition.events)
        written = await self._outcomes.submit(
            _PendingOutcome(
                email_id,
                claimed.claim_no,
                claimed.email.attempts,
                UpdateOne({"_id": email_id}, transition_update(transition, feed)),
                entry,
                Change(email_id, feed),
                transition.time,
            )
        )
        if written:
            await self._suppress_bounced(feed)
        if written and transition.old_status is not None and transition.status is not None:
            self.tallies.move(
                tenant_id=partition(claimed.email.tenant_id, claimed.email.test),
                created_at=claimed.email.created_at,
                domain_id=claimed.email.domain_id,
                old=transition.old_status.value,
                new=transition.status.value,
            )
            self.tallies.flush_soon()
        return written

    async def _suppress_bounced(self, feed: Sequence[Document]) -> None:
        """Put the hard-bounced recipients of a recorded outcome on the suppression list.

        After the outcome's write, with the bounced event's id as the entry's cause; the
        enhanced code decides (`suppression_rules.bounce_suppresses`). A crash in between
        leaves the bounce recorded without its entry (the address is tried once more later
        and bounces again): never an entry without its event.
        """
        if self.suppressions is None:
            return
        for event in feed:
            smtp = event.get("smtp")
            if event["type"] != "bounced" or not smtp or "recipient" not in event:
                continue
            try:
                await self.suppressions.record_bounce(
                    tenant_id=event["tenantId"],
                    address=event["recipient"],
                    enhanced_code=smtp["enhancedCode"],
                    event_id=event["_id"],
                    detail=f"{smtp['code']} {smtp['enhancedCode']} {smtp['message']}".strip(),
                )
            except Exception:
                # The outcome is recorded: this is not a failed delivery. Logged, left as the
                # crash case above is.
                log.exception(
                    "bounced address not suppressed",
                    extra={"fields": {"email": event["emailId"], "event": event["_id"]}},
                )

    async def flush_outcomes(self, *, within: float) -> int:
        """See `DeliveryQueue.flush_outcomes`."""
        await self._outcomes.drain(within)
        return self._outcomes.pending

    async def _write_outcomes(self, batch: list[_PendingOutcome]) -> list[bool]:
        try:
            return await self._write_outcome_batch(batch)
        except Exception as exc:
            for outcome in batch:
                outcome.retried = True
                if not is_transient(exc) and self._recording.get(outcome.email_id) == (
                    outcome.claim_no
                ):
                    # Failed for good (not kept): the lease decides as for any failure.
                    del self._recording[outcome.email_id]
            raise

    async def _write_outcome_batch(self, batch: list[_PendingOutcome]) -> list[bool]:
        # The fence, per outcome: the lease is still ours unless the next claim exists.
        held = await self._holding(batch)
        mine = [o for o, ok in zip(batch, held, strict=True) if ok]
        # A retry after a failed write: an email whose update did land (the answer was lost)
        # is not updated twice, which would repeat its events.
        landed: set[str] = set()
        retried = [o for o in mine if o.retried]
        if retried:
            docs = await find_by_ids(self._emails, [o.email_id for o in retried], {"attempts": 1})
            landed = {
                o.email_id
                for o in retried
                if o.email_id in docs and int(docs[o.email_id].get("attempts", 0)) >= o.attempts
            }
        # Emails first, entries second: a crash in between leaves entries whose next claim
        # sees the recorded outcome (finished: entry dropped; deferred: retried early), never
        # an unrecorded delivery.
        todo = [o for o in mine if o.email_id not in landed]
        if todo:
            # Their events' hints first, all in one insert (see `event_log`): a crash before
            # the emails' update leaves hints the publisher drops, never a change unannounced.
            await self._recorder.announce([o.change for o in todo], now=max(o.at for o in todo))
            await self._emails.bulk_write([o.email for o in todo], ordered=False)
        moved = [o.entry for o in mine if o.entry is not None]
        if moved:
            await self._queue.bulk_write(moved, ordered=False)
        # The finished ones' entries in one statement: a statement per entry costs the
        # embedded database a query and a delete each; `_id $in` is served by the primary key.
        finished = [o.email_id for o in mine if o.entry is None]
        if finished:
            await self._queue.delete_many({"_id": {"$in": finished}})
        for o, ok in zip(batch, held, strict=True):
            if self._recording.get(o.email_id) == o.claim_no:
                del self._recording[o.email_id]
            if ok:
                self._leased.pop(o.email_id, None)
        return list(held)

    async def release(self, *, claimed: Sequence[Claimed], now: datetime) -> None:
        """See `DeliveryQueue.release`: the leases end now, nothing else was written.

        One read of the claims and one write (per `chunked` slice) for all of them; a claim
        whose token is no longer ours (taken over meanwhile) is left alone.
        """
        ids = {f"{c.email.id}:{c.claim_no}": c.lease_token for c in claimed}
        held = await find_by_ids(self._claims, list(ids), {"token": 1})
        ours = [
            claim_id
            for claim_id, token in ids.items()
            if claim_id in held and held[claim_id].get("token") == token
        ]
        for part in chunked(ours):
            await self._claims.bulk_write(
                [UpdateOne({"_id": c}, {"$set": {"expires_at": now}}) for c in part],
                ordered=False,
            )
            # Due again at once (the claim marked the entry due at the lease's end).
            await self._queue.bulk_write(
                [UpdateOne({"_id": c.rpartition(":")[0]}, {"$set": {"due": now}}) for c in part],
                ordered=False,
            )
        for c in claimed:
            self._leased.pop(c.email.id, None)


__all__ = [
    "INDEXES",
    "ORPHAN_AGE",
    "DeliveryQueue",
    "MongoDeliveryQueue",
    "queue_entry",
    "read_content",
]
