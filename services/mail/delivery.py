"""The delivery worker loop: claim due emails, DKIM-sign, hand them to the relay, record outcomes.

A worker runs one claimer and `concurrency` delivery loops. The claimer takes due emails in
batches, as many as there are idle delivery loops (each under a lease: see
`services.mail.queue.MongoDeliveryQueue.claim_batch`), and hands them over; a delivery loop
delivers one (through `services.mail.relay_pool`), lets the outcome rules decide what the
replies mean (`services.mail.outcomes`) and records the outcome with a write fenced by the
lease. A worker that dies holds nothing for longer than the lease: the email becomes due again
when the lease expires and another worker retries it. The only duplicate this allows is a
resend after a crash between the relay's 250 and our record of it (RFC 5321's window).

An outcome the relay gave is never dropped because the database is away: recording it waits,
retrying, until the database answers (`MongoDeliveryQueue.finish_attempt`). The delivery loop
holding it stays busy meanwhile, so the claimer takes no new work for it: what is kept in memory
is bounded by the worker's concurrency. On shutdown (`stop`, then `wait_quiet` for the grace
period) deliveries in progress finish and record; one still unrecorded when the grace period
ends is cancelled without releasing its lease, so nobody attempts it again before the lease
expires (the window above, no wider).

A test email (sent with a test API key) is claimed, signed and recorded exactly like any other,
but never handed to a relay: its replies come from `services.mail.simulation`, and the outcome
rules take them as they would a relay's. No relay is looked up or contacted for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from dataclasses import replace
from datetime import timedelta

from services.core.cancellation import raise_if_cancelling
from services.core.clock import Clock
from services.core.errors import AzoraError, Conflict
from services.core.metrics import (
    DELIVERY_ATTEMPT_DURATION,
    DKIM_SIGNATURES,
    EMAIL_DELIVERIES,
)
from services.core.tracing import delivery_span
from services.mail import simulation
from services.mail.feedback.late_feedback import LateFeedback
from services.mail.feedback.suppression_store import SuppressionList
from services.mail.models import (
    FINISHED,
    OPEN_RECIPIENTS,
    Claimed,
    Email,
    EmailStatus,
    FeedbackKind,
    RecipientStatus,
    SmtpReply,
)
from services.mail.outcomes import Outcome, RetryPolicy, after_attempt, decide
from services.mail.queue import DeliveryQueue
from services.mail.relay_health import RelayHealthStore, RelayOutcome
from services.mail.relay_lookup import RelayEndpoint, RelayLookup
from services.mail.relay_pool import RelayPool
from services.mail.return_paths import ReturnPaths
from services.mail.simulation import replies_for

log = logging.getLogger(__name__)

# How long the claimer waits for more idle delivery loops when there is a backlog (seconds).
_CLAIM_LINGER = 0.05
# How long a cancelled worker waits for a claim in flight, and then for its release (seconds);
# past that the lease decides, as for a worker killed outright.
_HAND_BACK_WAIT = 5.0
# Email status after an attempt -> the outcome label of the delivery metrics.
_METRIC_OUTCOME = {
    EmailStatus.SENT: "sent",
    EmailStatus.PARTIALLY_SENT: "sent",
    EmailStatus.DEFERRED: "deferred",
    EmailStatus.BOUNCED: "bounced",
    EmailStatus.FAILED: "failed",
    EmailStatus.SUPPRESSED: "suppressed",
}


class DeliveryWorker:
    """Claims and delivers emails until stopped."""

    def __init__(
        self,
        *,
        queue: DeliveryQueue,
        relays: RelayLookup,
        pool: RelayPool,
        clock: Clock,
        policy: RetryPolicy,
        lease: timedelta,
        concurrency: int,
        poll_interval: float,
        worker_id: str | None = None,
        rng: random.Random | None = None,
        relay_health: RelayHealthStore | None = None,
        suppressions: SuppressionList | None = None,
        return_paths: ReturnPaths | None = None,
        late_feedback: LateFeedback | None = None,
    ) -> None:
        self._queue = queue
        self._return_paths = return_paths
        # Test mode's complaints (complaint@ of the test domain) arrive through it once the
        # test email is finished, as a real complaint would, after the relay's 250.
        self._late_feedback = late_feedback
        # Checked again at each attempt: an address suppressed after the email was accepted.
        self._suppressions = suppressions
        self._relay_health = relay_health
        self._relays = relays
        self._pool = pool
        self._clock = clock
        self._policy = policy
        self._lease = lease
        self._concurrency = concurrency
        self._poll = poll_interval
        self.worker_id = worker_id or f"w-{uuid.uuid4().hex[:12]}"
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self._stopping = asyncio.Event()
        self._busy = 0  # deliveries in progress (attempt and record)
        self._quiet = asyncio.Event()
        self._quiet.set()

    async def claim(self) -> Claimed | None:
        """Take one due email."""
        batch = await self.claim_batch(1)
        return batch[0] if batch else None

    async def claim_batch(self, limit: int) -> list[Claimed]:
        """Take up to `limit` due emails, with their recipients suppressed meanwhile.

        A worker cancelled while claiming (a hard stop) hands back what the claim won instead
        of leaving it leased, unseen by anyone, until the lease runs out: the claim finishes
        (shielded, for at most `_HAND_BACK_WAIT` s) and its emails are released.
        """
        claiming = asyncio.ensure_future(self._claim_checked(limit))
        try:
            return await asyncio.shield(claiming)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                batch = await asyncio.wait_for(asyncio.shield(claiming), _HAND_BACK_WAIT)
                await asyncio.wait_for(
                    self._queue.release(claimed=batch, now=self._clock.now()), _HAND_BACK_WAIT
                )
            raise

    async def _claim_checked(self, limit: int) -> list[Claimed]:
        batch = await self._queue.claim_batch(
            now=self._clock.now(), lease=self._lease, worker_id=self.worker_id, limit=limit
        )
        return await self._check_suppressions(batch)

    async def _check_suppressions(self, batch: list[Claimed]) -> list[Claimed]:
        """`batch` with each email's open recipients now on the suppression list.

        One lookup per tenant for the whole batch (not one per email): what was accepted
        before an address was suppressed is not delivered to it either.
        """
        if self._suppressions is None or not batch:
            return batch
        wanted: dict[str, set[str]] = {}
        for c in batch:
            wanted.setdefault(c.email.tenant_id, set()).update(
                r.address for r in c.email.recipients if r.status in OPEN_RECIPIENTS
            )
        found: dict[str, dict[str, str]] = {}
        for tenant_id, addresses in wanted.items():
            entries = await self._suppressions.suppressed(tenant_id, sorted(addresses))
            found[tenant_id] = {a: e.reason.value for a, e in entries.items()}
        out = []
        for c in batch:
            hits = found.get(c.email.tenant_id, {})
            mine = {
                r.address: hits[r.address]
                for r in c.email.recipients
                if r.status in OPEN_RECIPIENTS and r.address in hits
            }
            out.append(replace(c, suppressed=mine) if mine else c)
        return out

    async def run_once(self) -> int:
        """Deliver every email due now (concurrently); how many attempts were made."""
        done = 0

        async def loop() -> None:
            nonlocal done
            while not self._stopping.is_set():
                claimed = await self.claim()
                if claimed is None:
                    return
                await self.deliver(claimed)
                done += 1

        await asyncio.gather(*(loop() for _ in range(self._concurrency)))
        return done

    async def run(self) -> None:
        """Deliver until `stop` (or cancellation, which releases held emails)."""
        handed: asyncio.Queue[Claimed | None] = asyncio.Queue()
        idle = asyncio.Semaphore(self._concurrency)
        loops = [
            asyncio.create_task(self._deliver_loop(handed, idle), name=f"{self.worker_id}-{i}")
            for i in range(self._concurrency)
        ]
        try:
            await self._claim_loop(handed, idle)
            for _ in loops:
                handed.put_nowait(None)  # each loop finishes what it holds, then returns
            await asyncio.gather(*loops)
        finally:
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            await self._release_all(handed)
            await self._pool.close()

    def stop(self) -> None:
        """Stop claiming; loops finish the delivery they are in and return."""
        self._stopping.set()

    async def wait_stopping(self) -> None:
        """Return once `stop` was called."""
        await self._stopping.wait()

    async def wait_quiet(self, within: float) -> bool:
        """Wait up to `within` s until no delivery is in progress; whether none is.

        After `stop` this is the graceful shutdown: every delivery started has been recorded
        (or given back) once it returns True.
        """
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._quiet.wait(), timeout=within)
        return self._quiet.is_set()

    async def _claim_loop(
        self, handed: asyncio.Queue[Claimed | None], idle: asyncio.Semaphore
    ) -> None:
        backlog = False  # the last claim got all it asked for: more is probably due
        while not self._stopping.is_set():
            # At least one delivery loop is idle; claim for every idle one (a claim never
            # waits for a loop: its lease runs from the moment it is taken).
            await idle.acquire()
            free = 1
            while not idle.locked():
                await idle.acquire()
                free += 1
            if backlog:
                free += await self._more_idle(idle, free)
            try:
                batch = await self.claim_batch(free)
            except asyncio.CancelledError:
                raise
            except Exception:
                # Python 3.11's wait_for and PyMongo can turn a cancellation into another
                # error: a cancelled worker must still stop, not claim on.
                raise_if_cancelling()
                log.exception("claim failed")
                batch = []
            for claimed in batch:
                handed.put_nowait(claimed)
            backlog = len(batch) == free
            for _ in range(free - len(batch)):
                idle.release()
            if not batch:
                await self._idle_wait()
                raise_if_cancelling()  # a cancellation that met the timeout became TimeoutError
        # Stopping: what was claimed but not started yet goes back at once.
        await self._release_all(handed)

    async def _idle_wait(self) -> None:
        """Nothing was due: wait for the next poll, new mail stored by this process, or stop."""
        stopping = asyncio.ensure_future(self._stopping.wait())
        arrival = asyncio.ensure_future(self._queue.arrival(self._poll))
        try:
            await asyncio.wait({stopping, arrival}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (stopping, arrival):
                waiter.cancel()

    async def _more_idle(self, idle: asyncio.Semaphore, free: int) -> int:
        """With a backlog, wait briefly for more loops to be idle; how many more there are.

        Loops finish one at a time; claiming for each alone would cost the database a queue
        read and a claim insert per email. Waiting up to `_CLAIM_LINGER` for a quarter of the
        loops makes those one read and one insert per group; without a backlog (the queue is
        drained) a claim is made at once, so new mail is not delayed.
        """
        want = max(1, self._concurrency // 4)
        more = 0
        deadline = asyncio.get_running_loop().time() + _CLAIM_LINGER
        while free + more < want and not self._stopping.is_set():
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            try:
                await asyncio.wait_for(idle.acquire(), timeout=left)
            except TimeoutError:
                raise_if_cancelling()
                break
            more += 1
        return more

    async def _deliver_loop(
        self, handed: asyncio.Queue[Claimed | None], idle: asyncio.Semaphore
    ) -> None:
        while True:
            # A cancellation something below turned into an ordinary outcome (a library's
            # timeout meeting it, a driver's "Lock is not acquired") still ends the loop.
            raise_if_cancelling()
            claimed = await handed.get()
            if claimed is None:
                return
            self._busy += 1
            self._quiet.clear()
            try:
                await self.deliver(claimed)
            except asyncio.CancelledError:
                raise
            except Exception:
                # Not recorded: the lease expires and another attempt is made.
                log.exception("delivery failed", extra={"fields": {"email": claimed.email.id}})
            finally:
                self._busy -= 1
                if not self._busy:
                    self._quiet.set()
                idle.release()

    async def _release_all(self, handed: asyncio.Queue[Claimed | None]) -> None:
        held: list[Claimed] = []
        while not handed.empty():
            claimed = handed.get_nowait()
            if claimed is not None:
                held.append(claimed)
        if held:
            await self._queue.release(claimed=held, now=self._clock.now())

    async def deliver(self, claimed: Claimed) -> Outcome | None:
        """One delivery attempt of a claimed email, recorded (None if the lease was lost)."""
        email = claimed.email
        started = time.perf_counter()
        with delivery_span(
            email_id=email.id,
            domain=email.domain_name,
            attempt=email.attempts + 1,
            carrier=email.trace_context,
        ) as span:
            outcome = await self._deliver_in_span(claimed, started)
            if outcome is not None:
                span.set_attribute("azora.delivery.outcome", outcome.status.value)
            return outcome

    async def _deliver_in_span(self, claimed: Claimed, started: float) -> Outcome | None:
        email = claimed.email
        try:
            open_rcpts = [r.address for r in email.recipients if r.status in OPEN_RECIPIENTS]
            suppressed = claimed.suppressed
            open_rcpts = [a for a in open_rcpts if a not in suppressed]
            replies: dict[str, SmtpReply] = {}
            endpoint: RelayEndpoint | None = None
            if open_rcpts:
                replies, endpoint = await self._attempt(claimed, open_rcpts)
        except asyncio.CancelledError:
            # Shutdown mid-delivery: hand the email back so another worker takes it at once.
            # The release must complete even if the shutdown cancels us again meanwhile.
            release = asyncio.ensure_future(
                self._queue.release(claimed=[claimed], now=self._clock.now())
            )
            while not release.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(release)
            raise
        now = self._clock.now()
        outcome = decide(
            claimed, replies, now=now, policy=self._policy, rng=self._rng, suppressed=suppressed
        )
        # Waits while the database is away (the outcome is kept, not dropped). Cancelled here
        # (shutdown after the grace period) the lease is deliberately not released.
        recorded = await self._queue.finish_attempt(
            claimed=claimed, transition=after_attempt(claimed, outcome, now=now)
        )
        if not recorded:
            log.warning("lease lost before recording", extra={"fields": {"email": email.id}})
            return None
        if email.test and outcome.status in FINISHED:
            await self._simulate_complaints(email, outcome)
        label = _METRIC_OUTCOME.get(outcome.status, "failed")
        EMAIL_DELIVERIES.labels(outcome=label, domain=email.domain_name).inc()
        DELIVERY_ATTEMPT_DURATION.labels(outcome=label).observe(time.perf_counter() - started)
        if endpoint is not None and self._relay_health is not None and replies:
            first = next(iter(replies.values()))
            await self._relay_health.note(
                RelayOutcome(
                    f"{endpoint.host}:{endpoint.port}",
                    label,
                    first.code,
                    any(r.code > 0 for r in replies.values()),
                    now,
                )
            )
        return outcome

    async def _attempt(
        self, claimed: Claimed, recipients: list[str]
    ) -> tuple[dict[str, SmtpReply], RelayEndpoint | None]:
        """The replies per recipient, and the relay they came from (None: none was tried)."""
        email = claimed.email
        if not recipients:
            return {}, None
        try:
            content = await self._queue.content(email=email)
            # A test email needs no relay (and must not depend on one being reachable).
            endpoint = (
                None
                if email.test
                else await self._relays.endpoint(
                    tenant_id=email.tenant_id, domain_id=email.domain_id
                )
            )
            signer = await self._relays.signer(tenant_id=email.tenant_id, domain_id=email.domain_id)
        except AzoraError as exc:
            # No relay (removed meanwhile) or its owner unreachable: temporary on our side;
            # the lifetime limit turns it into a failure eventually.
            reply = SmtpReply(0, "", f"relay not available: {exc.message}"[:500])
            return dict.fromkeys(recipients, reply), None
        if signer is not None:
            message = signer.sign(content) + content
            DKIM_SIGNATURES.labels(outcome="signed").inc()
        else:
            message = content
        if endpoint is None:
            # Test mode: signed like any email, then answered by the simulation, not a relay.
            return replies_for(recipients), None
        replies: dict[str, SmtpReply] = {}
        # One transaction per recipient: each carries its own return path (VERP). A relay that
        # cannot be reached (no reply: refused, timed out) is not tried again for the others.
        for rcpt in recipients:
            replies |= await self._pool.send(
                endpoint,
                envelope_from=self._envelope_sender(email, rcpt),
                recipients=[rcpt],
                message=message,
            )
            reply = replies[rcpt]
            if reply.code == 0 and not reply.enhanced_code.startswith("5."):
                return {r: replies.get(r, reply) for r in recipients}, endpoint
        return replies, endpoint

    async def _simulate_complaints(self, email: Email, outcome: Outcome) -> None:
        """Test mode: each delivered complaint@ recipient of a finished test email complains.

        Through `LateFeedback`, like a real complaint report: a ``complained`` event (marked
        test) and a suppression. A test email still waiting for another recipient has nothing
        to complain yet; this runs again with its final attempt (the feedback is idempotent).
        A process killed between recording the outcome and this call loses the simulated
        complaint (the email stays SENT): the one thing test mode may lose, since nothing real
        depends on it.
        """
        if self._late_feedback is None:
            return
        for r in outcome.recipients:
            if r.status is not RecipientStatus.SENT or not simulation.is_complaint(r.address):
                continue
            try:
                await self._late_feedback.apply(
                    email_id=email.id,
                    recipient=r.address,
                    kind=FeedbackKind.COMPLAINT,
                    source="test mode",
                    tenant_id=email.tenant_id,
                )
            except Conflict:
                log.warning(
                    "simulated complaint not applied: the email changed meanwhile",
                    extra={"fields": {"email": email.id}},
                )

    def _envelope_sender(self, email: Email, recipient: str) -> str:
        """MAIL FROM of the transaction to `recipient`: its VERP return path (`ReturnPaths`)."""
        if self._return_paths is None:
            return email.envelope_from
        return self._return_paths.for_email(email, recipient)


__all__ = ["DeliveryWorker"]
