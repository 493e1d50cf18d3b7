"""`python -m services.mail.feedback.webhook_dispatcher`: sends events to webhook endpoints.

Its own process (a process of the mail service: it writes only the mail service's collections),
so sending mail never waits for webhooks. Several replicas may run on the same database;
leases are their only coordination.

Discovery. Writers of the ``events`` collection set no flag and know nothing of webhooks. Event
ids are ``evt_`` + ULID, ordered by creation time, so the dispatcher reads events by ``_id``
range. But an id is made when the change happens and the event becomes visible later, not in
id order: the publisher copies events a second or more afterwards (measured in the benchmark
under load: 8-26 % of the events became visible after a later id had been read, a few seconds
after their id was made). Reading only the ids above the highest one seen would leave those to
a rescan. So every poll (a task of its own, beside delivery) reads three ranges:

* the ids above the highest seen, in full;
* the settle span: the last seconds of ids below the highest, ``_id``s only, and in full just
  the few not seen yet; read again every quarter of its width (at most every poll), so each id
  is read about four times while in it. An event that became visible ``s`` seconds after its
  id was made is found by the next such read (within a quarter of the span) as long as ``s``
  is at most three quarters of the span minus a poll interval. The span is twice the sum of a
  poll interval and the largest lateness (the highest id's time minus the event's, when a
  re-read found it) seen within the look-back window; at least 3 s, at most a tenth of the
  window. It
  widens from events found inside it before they fall outside it;
* a few pages (ids only) of a rescan of the whole look-back window (AZORA_WEBHOOK_LOOKBACK, 5
  minutes), one begun every half window, for events later than the span (a writer or the
  publisher stalled, the database away); what it finds widens the span.

Re-reads cost database time for every id they cover, so the span is only as wide as the
lateness seen needs. Each event becomes one delivery document per matching endpoint, ``_id`` =
``<event id>:<webhook id>``, created by a plain insert: a re-read, another replica or a
restart creating it again hits the unique ``_id`` and creates nothing. The scanned position is
shared in ``webhook_cursor``; a (re)started dispatcher begins a look-back window before it, so
a dispatcher that was down for a day catches up on that day. An event inserted more than the
look-back window after its id was made is not delivered: writers insert events with the change
they report, well within it.

Delivery. Due deliveries are claimed under a lease (webhook_store), sent signed (Standard
Webhooks, webhook_signing) through the SSRF guard (webhook_transport), and their outcome is
recorded with the attempt: 2xx succeeds; anything else (status, timeout, refused connection,
guard) is retried after the next wait of AZORA_WEBHOOK_RETRY_SCHEDULE (5 s, 5 min, 30 min, 2 h,
5 h, 10 h, 10 h, each +-20 % jitter), then the delivery is FAILED. At most
AZORA_WEBHOOK_ENDPOINT_CONCURRENCY requests per endpoint run at once (a request's slot is free
once its answer is in; its outcome is written after), and each endpoint's due
deliveries are also looked up on their own (`dispatch_due`), so a slow endpoint or one with a
large backlog never holds up another's. A process killed mid-request (kill -9) loses nothing:
its lease expires and another dispatcher sends again. Receivers may therefore see an event
twice, with the same webhook-id.

Endpoint health. The first failed attempt after a success starts the endpoint's failure streak
(``failingSince``); a success ends it. A failure when the streak is older than
AZORA_WEBHOOK_DISABLE_AFTER (5 days) disables the endpoint, records why on it, and inserts a
``webhook.disabled`` event (which the tenant's other endpoints receive).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from pymongo import ASCENDING
from pymongo.asynchronous.database import AsyncDatabase

from services.core.clock import Clock, SystemClock
from services.core.ids import new_ulid, ulid_floor, ulid_time
from services.core.metrics import (
    WEBHOOK_ATTEMPT_DURATION,
    WEBHOOK_ATTEMPTS,
    WEBHOOK_LAG,
    start_exposition,
)
from services.core.mongo import Document, chunked
from services.core.netguard import host_resolver
from services.core.runtime import (
    Database,
    StopWatch,
    prepare_database,
    start_process,
)
from services.core.secrets_box import SecretsBox
from services.core.server import create_server
from services.mail.feedback.webhook_manager import WebhookSecrets
from services.mail.feedback.webhook_models import (
    DISABLED_EVENT,
    Attempt,
    Delivery,
    DeliveryState,
    Webhook,
    delivery_id,
)
from services.mail.feedback.webhook_signing import body_of, event_json, rfc3339, signed_headers
from services.mail.feedback.webhook_store import (
    WEBHOOK_INDEXES,
    Lease,
    WebhookStore,
    find_events_after,
)
from services.mail.feedback.webhook_transport import WebhookTransport, address_policy
from services.mail.settings import MailSettings, WebhookSettings

SERVICE_NAME = "webhook-dispatcher"
log = logging.getLogger(__name__)
EVENT_PREFIX = "evt_"
# Events read per page of a scan.
_SCAN_PAGE = 200
# Ids read per page when a span already scanned is read again (ids only: small).
_ID_PAGE = 2000
# Pages of ids the look-back rescan reads per poll: spread over polls, it never holds up
# delivery for long.
_RESCAN_PAGES = 2
# The settle span's least width, seconds: the publisher's usual delay (a second or two) before
# any lateness has been seen.
_MIN_SETTLE = 3.0
# How often delivery logs past their retention and old claims are swept.
_SWEEP_INTERVAL = 600.0
# How long an endpoint read from the database is used before it is read again.
_ENDPOINT_CACHE_S = 1.0


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _below(event_id: str, seconds: float, now: datetime) -> str:
    """The smallest event id made `seconds` before `event_id` was (`now` if not a ULID)."""
    made = ulid_time(event_id[len(EVENT_PREFIX) :]) or now
    return EVENT_PREFIX + ulid_floor(made - timedelta(seconds=seconds))


class WebhookDispatcher:
    """Finds new events, fans them out to endpoints, and delivers due deliveries."""

    def __init__(
        self,
        *,
        store: WebhookStore,
        secrets: WebhookSecrets,
        transport: WebhookTransport,
        clock: Clock,
        settings: WebhookSettings,
        holder: str | None = None,
        rng: random.Random | None = None,
        wall_clock: Clock | None = None,
    ) -> None:
        self._store = store
        self._secrets = secrets
        self._transport = transport
        self._clock = clock
        # webhook-timestamp is compared by receivers with their own clock (within minutes), so
        # it is the real time even where schedules run on a test's manual clock.
        self._wall = wall_clock or SystemClock()
        self._settings = settings
        self.holder = holder or f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security
        # Scanning: the highest event id seen, ids fanned out recently (skipped by re-reads),
        # the lateness of events found below the highest id (time seen, seconds; see
        # `settle`), and the look-back rescan in progress (position) and when it last began.
        self._high: str | None = None
        self._seen: dict[str, datetime] = {}
        self._late: collections.deque[tuple[datetime, float]] = collections.deque()
        self._rescan_from: str | None = None
        self._last_rescan: datetime | None = None
        self._last_reread: datetime | None = None
        # Delivering: tasks by delivery id, and requests in flight per endpoint.
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._per_endpoint: collections.Counter[str] = collections.Counter()
        # Deliveries whose request to the endpoint is open (each holds one of its slots; the
        # slot is free again once the answer is in, before the outcome is written).
        self._requesting: set[str] = set()
        # Endpoints that may have deliveries due from the given time on (see dispatch_due),
        # and how often each was hinted (a hint given during a lookup is not dropped by it).
        self._hints: dict[str, datetime] = {}
        self._hinted: collections.Counter[str] = collections.Counter()
        # Endpoints read recently: id -> (monotonic expiry, endpoint or None when deleted).
        self._endpoint_cache: dict[str, tuple[float, Webhook | None]] = {}
        self._stopping = asyncio.Event()
        # Set when a request finishes (a slot is free again) or on stop: the idle wait ends
        # early, so a busy endpoint is not held to one request per poll interval.
        self._wake = asyncio.Event()
        self._last_sweep = -float("inf")
        self._last_full_round = -float("inf")

    @property
    def lease(self) -> timedelta:
        """How long a claim holds: the setting, but always well beyond one request's timeout."""
        return timedelta(seconds=max(self._settings.lease, 2 * self._settings.timeout + 5))

    def stop(self) -> None:
        """Claim nothing more; `run` returns."""
        self._stopping.set()
        self._wake.set()

    async def run(self) -> None:
        """Poll until stopped; a failing step (database away) is logged and tried again.

        Event scans run in a task of their own, every poll interval: a scan (which may read
        thousands of ids) never holds up starting deliveries, which this loop does.
        """
        scanning = asyncio.create_task(self._scan_events(), name="webhook:scan")
        try:
            await self._deliver_due()
        finally:
            scanning.cancel()
            await asyncio.gather(scanning, return_exceptions=True)

    async def _scan_events(self) -> None:
        while not self._stopping.is_set():
            try:
                if await self.discover():
                    self._wake.set()  # new deliveries: start them now, not at the next poll
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("webhook event scan failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._settings.poll_interval)

    async def _deliver_due(self) -> None:
        while not self._stopping.is_set():
            started = 0
            try:
                # The overdue window every poll interval; in between (woken by a finished
                # request or new deliveries) only the endpoints that may have work are asked.
                full = time.monotonic() - self._last_full_round >= self._settings.poll_interval
                if full:
                    self._last_full_round = time.monotonic()
                started = await self.dispatch_due(window=full)
                if time.monotonic() - self._last_sweep >= _SWEEP_INTERVAL:
                    self._last_sweep = time.monotonic()
                    await self._store.sweep(
                        now=self._clock.now(),
                        delivery_retention=timedelta(days=self._settings.delivery_retention_days),
                    )
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("webhook dispatch step failed")
            if started:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._settings.poll_interval)
            self._wake.clear()

    async def step(self, *, full: bool = True) -> int:
        """One round: discover new events, then start due deliveries; how many were started.

        Args:
            full: also scan for new events and read the window of overdue deliveries (else
                only endpoints known to have work are asked).
        """
        if full:
            await self.discover()
        return await self.dispatch_due(window=full)

    async def drain(self, within: float | None = None) -> None:
        """Wait for the requests in flight (all of them, or for `within` seconds at most)."""
        tasks = list(self._inflight.values())
        if tasks:
            await asyncio.wait(tasks, timeout=within)

    # --- discovery

    async def discover(self) -> int:
        """Fan out events not seen yet; how many deliveries were created (see Discovery)."""
        now = self._clock.now()
        lookback = timedelta(seconds=self._settings.lookback)
        high = self._high
        if high is None:
            # Start: everything from a look-back window before the shared cursor, in full
            # (that read is this window's rescan).
            until = await self._store.scanned_until()
            base = min(until, now) if until else now
            self._last_rescan = now
            created, newest = await self._read_new(EVENT_PREFIX + ulid_floor(base - lookback), now)
        else:
            span = self._settle_span(now)
            settle_from = _below(high, span, now)
            created = 0
            # Each id is read again about four times while it is in the span: enough to find
            # an event as late as the span is wide minus a quarter and a poll (see Discovery).
            last = self._last_reread
            if last is None or (now - last).total_seconds() >= span / 4 or now < last:
                self._last_reread = now
                created += await self._read_again(settle_from, high, high=high, now=now)
            more, newest = await self._read_new(high, now)
            created += more + await self._rescan(settle_from, high=high, now=now)
        self._high = newest
        high_time = ulid_time(newest[len(EVENT_PREFIX) :])
        if high_time is not None and newest != high:
            await self._store.advance_cursor(min(high_time, now))
        return created

    def _settle_span(self, now: datetime) -> float:
        """The settle span now, seconds (see Discovery)."""
        lookback = self._settings.lookback
        horizon = now - timedelta(seconds=lookback)
        while self._late and self._late[0][0] < horizon:
            self._late.popleft()
        worst = max((late for _, late in self._late), default=0.0)
        wanted = max(_MIN_SETTLE, 2 * (worst + self._settings.poll_interval))
        return min(wanted, max(lookback / 10, _MIN_SETTLE))

    async def _read_new(self, after: str, now: datetime) -> tuple[int, str]:
        """Fan out the events after id `after`, in full, page by page.

        Returns:
            How many deliveries were created, and the highest id read (`after` if none).
        """
        created = 0
        while True:
            page = [doc async for doc in find_events_after(self._store, after, _SCAN_PAGE)]
            if page:
                created += await self._take(page, now)
                after = page[-1]["_id"]
            if len(page) < _SCAN_PAGE:
                return created, after

    async def _read_again(self, low: str, upper: str, *, high: str, now: datetime) -> int:
        """Fan out the events in ids (`low`, `upper`] not seen yet: ids first, then those."""
        cursor = self._store.events.find({"_id": {"$gt": low, "$lte": upper}}, {"_id": 1})
        ids = [doc["_id"] async for doc in cursor.sort("_id", ASCENDING)]
        return await self._take_ids(ids, high=high, now=now)

    async def _rescan(self, upper: str, *, high: str, now: datetime) -> int:
        """A few pages of the look-back rescan (ids up to `upper`); one begins every half window."""
        lookback = timedelta(seconds=self._settings.lookback)
        if self._rescan_from is None:
            if self._last_rescan is not None and now - self._last_rescan < lookback / 2:
                return 0
            self._rescan_from = EVENT_PREFIX + ulid_floor(now - lookback)
            self._last_rescan = now
            # Ids seen are kept two windows (a rescan skips them), forgotten here, not per poll.
            horizon = now - 2 * lookback
            self._seen = {k: v for k, v in self._seen.items() if v >= horizon}
        created = 0
        for _ in range(_RESCAN_PAGES):
            cursor = self._store.events.find(
                {"_id": {"$gt": self._rescan_from, "$lte": upper}}, {"_id": 1}
            )
            ids = [d["_id"] async for d in cursor.sort("_id", ASCENDING).limit(_ID_PAGE)]
            created += await self._take_ids(ids, high=high, now=now)
            if len(ids) < _ID_PAGE:
                self._rescan_from = None
                break
            self._rescan_from = ids[-1]
        return created

    async def _take_ids(self, ids: Sequence[str], *, high: str, now: datetime) -> int:
        """Fan out the events among `ids` not seen yet (found below `high`: late ones)."""
        unseen = [i for i in ids if i not in self._seen]
        if not unseen:
            return 0
        created = 0
        for part in chunked(unseen, _SCAN_PAGE):
            docs = [d async for d in self._store.events.find({"_id": {"$in": part}})]
            created += await self._take(docs, now)
        high_time = ulid_time(high[len(EVENT_PREFIX) :])
        times = [ulid_time(i[len(EVENT_PREFIX) :]) for i in unseen]
        lateness = [(high_time - t).total_seconds() for t in times if t and high_time]
        if lateness:
            self._late.append((now, max(lateness)))
            log.info(
                "webhook events found below the highest id",
                extra={"fields": {"events": len(unseen), "late_s": round(max(lateness), 3)}},
            )
        return created

    async def _take(self, docs: Sequence[Document], now: datetime) -> int:
        """Fan out the documents not seen yet, and note them seen."""
        fresh = [doc for doc in docs if doc["_id"] not in self._seen]
        if not fresh:
            return 0
        created = await self._fan_out(fresh, now)
        for doc in fresh:
            self._seen[doc["_id"]] = ulid_time(doc["_id"][len(EVENT_PREFIX) :]) or now
        return created

    async def _fan_out(self, events: Sequence[Document], now: datetime) -> int:
        by_tenant: dict[str, list[Document]] = collections.defaultdict(list)
        for doc in events:
            by_tenant[str(doc.get("tenantId", ""))].append(doc)
        deliveries: list[Delivery] = []
        for tenant_id, docs in by_tenant.items():
            hooks = await self._store.tenant_webhooks(tenant_id)
            if not hooks:
                continue
            for doc in docs:
                occurred = _aware(doc.get("occurredAt") or now)
                payload = event_json(doc)
                body: str | None = None
                for hook in hooks:
                    if not hook.wants(
                        event_type=str(doc.get("type", "")),
                        domain=doc.get("domain"),
                        occurred=occurred,
                    ):
                        continue
                    body = body or body_of(payload)
                    deliveries.append(
                        Delivery(
                            id=delivery_id(doc["_id"], hook.id),
                            tenant_id=tenant_id,
                            webhook_id=hook.id,
                            event_id=doc["_id"],
                            event_type=str(doc.get("type", "")),
                            body=body,
                            state=DeliveryState.PENDING,
                            create_time=now,
                            next_attempt_time=now,
                            occurred_time=occurred,
                        )
                    )
        if not deliveries:
            return 0
        created = await self._store.add_deliveries(deliveries)
        for delivery in deliveries:
            self._hint(delivery.webhook_id, now)
        return created

    # --- delivery

    async def dispatch_due(self, *, window: bool = True) -> int:
        """Claim due deliveries within the concurrency limits and start sending them.

        Two sources, both index-served, neither growing with another endpoint's backlog: the
        most overdue deliveries of all endpoints (a window of bounded size), and, per endpoint
        that may have work (`_hints`: fan-out, retries scheduled here, the window) and a free
        slot, its own due deliveries. So an endpoint with a large backlog that fills the window
        cannot starve the others.
        """
        if self._stopping.is_set():
            return 0
        room = self._settings.concurrency - len(self._inflight)
        if room <= 0:
            return 0
        now = self._clock.now()
        overdue = (
            await self._store.due(now=now, limit=room * 2 + 8, skip_ids=list(self._inflight))
            if window
            else []
        )
        for delivery in overdue:
            self._hint(delivery.webhook_id, delivery.next_attempt_time or now)
        # Within the limits: `room` in all, `endpoint_concurrency` per endpoint.
        limit = self._settings.endpoint_concurrency
        picked: dict[str, Delivery] = {}
        planned = collections.Counter(self._per_endpoint)

        def take(delivery: Delivery) -> None:
            if len(picked) >= room or delivery.id in self._inflight or delivery.id in picked:
                return
            if planned[delivery.webhook_id] >= limit:
                return
            planned[delivery.webhook_id] += 1
            picked[delivery.id] = delivery

        for delivery in overdue:
            take(delivery)
        for webhook_id, at in sorted(self._hints.items(), key=lambda item: item[1]):
            if len(picked) >= room or at > now:
                break
            free = limit - planned[webhook_id]
            if free <= 0:
                continue
            hinted = self._hinted[webhook_id]
            found = await self._store.due_for_webhook(
                webhook_id, now=now, limit=free, skip_ids=[*self._inflight, *picked]
            )
            for delivery in found:
                take(delivery)
            if len(found) < free and self._hinted[webhook_id] == hinted:
                self._hints.pop(webhook_id, None)  # nothing more due now
                self._hinted.pop(webhook_id, None)
        picked_list = list(picked.values())
        leases = await self._store.claim(picked_list, now=now, lease=self.lease, holder=self.holder)
        hooks = await self._endpoints({x.delivery.webhook_id for x in leases})
        for lease in leases:
            delivery = lease.delivery
            self._per_endpoint[delivery.webhook_id] += 1
            self._requesting.add(delivery.id)
            self._inflight[delivery.id] = asyncio.create_task(
                self._deliver(lease, hooks.get(delivery.webhook_id)), name=f"webhook:{delivery.id}"
            )
        return len(leases)

    async def _endpoints(self, ids: set[str]) -> dict[str, Webhook | None]:
        """Endpoints by id, read at most once a second (a change applies within a second)."""
        fresh = {i: self._endpoint_cache[i][1] for i in ids if i in self._endpoint_cache}
        fresh = {
            i: hook for i, hook in fresh.items() if self._endpoint_cache[i][0] > time.monotonic()
        }
        missing = sorted(ids - set(fresh))
        if missing:
            found = await self._store.webhooks_by_id(missing)
            expiry = time.monotonic() + _ENDPOINT_CACHE_S
            for webhook_id in missing:
                self._endpoint_cache[webhook_id] = (expiry, found.get(webhook_id))
                fresh[webhook_id] = found.get(webhook_id)
        if len(self._endpoint_cache) > 10_000:
            self._endpoint_cache.clear()
        return fresh

    def _hint(self, webhook_id: str, at: datetime) -> None:
        self._hinted[webhook_id] += 1
        known = self._hints.get(webhook_id)
        if known is None or at < known:
            self._hints[webhook_id] = at

    async def _deliver(self, lease: Lease, hook: Webhook | None) -> None:
        delivery = lease.delivery
        try:
            await self._attempt(lease, hook)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The lease expires and the delivery is attempted again (by anyone).
            log.exception("webhook delivery failed", extra={"fields": {"delivery": delivery.id}})
        finally:
            self._wake.set()
            self._inflight.pop(delivery.id, None)
            self._free_slot(delivery)

    def _free_slot(self, delivery: Delivery) -> None:
        """The request of `delivery` is over: its endpoint slot may take the next one."""
        if delivery.id not in self._requesting:
            return
        self._requesting.discard(delivery.id)
        self._per_endpoint[delivery.webhook_id] -= 1
        if self._per_endpoint[delivery.webhook_id] <= 0:
            del self._per_endpoint[delivery.webhook_id]
        self._wake.set()

    async def _attempt(self, lease: Lease, hook: Webhook | None) -> None:
        """Send a leased delivery to its endpoint (as read when it was claimed) and record it."""
        delivery = lease.delivery
        now = self._clock.now()
        if hook is None or not hook.enabled:
            # Read again before ending the delivery: the cached view may be a second old.
            hook = await self._store.get_webhook(webhook_id=delivery.webhook_id)
        if hook is None or not hook.enabled:
            why = "the endpoint was deleted" if hook is None else "the endpoint is disabled"
            note = Attempt(now, 0, 0, "", f"not sent: {why}")
            ended = replace(delivery, state=DeliveryState.FAILED, next_attempt_time=None)
            await self._store.record(lease, attempt=note, update=ended)
            return
        headers = signed_headers(
            secrets=self._secrets.active(hook, now),
            message_id=delivery.event_id,
            at=self._wall.now(),
            body=delivery.body,
        )
        attempt = await self._transport.post(
            url=hook.url, headers=headers, body=delivery.body, at=now
        )
        # The endpoint's slot bounds requests to it, not the writes after them: free it now,
        # so an endpoint's throughput is its slots over the request time, not over the
        # request time plus the database's.
        self._free_slot(delivery)
        after = self._clock.now()
        self._measure(delivery, attempt, after)
        update = self._next(delivery, attempt, after)
        recorded = await self._store.record(lease, attempt=attempt, update=update)
        # The endpoint's next work: this retry, or (after a success) more of its backlog.
        self._hint(hook.id, update.next_attempt_time or after)
        log.info(
            "webhook attempt",
            extra={
                "fields": {
                    "delivery": delivery.id,
                    "webhook": hook.id,
                    "status": attempt.status_code,
                    "latency_ms": attempt.latency_ms,
                    "error": attempt.error[:200],
                    "state": update.state.value,
                    "recorded": recorded,
                }
            },
        )
        await self._endpoint_health(hook, attempt)

    @staticmethod
    def _measure(delivery: Delivery, attempt: Attempt, now: datetime) -> None:
        if attempt.success:
            outcome = "success"
        elif attempt.status_code:
            outcome = "http_error"
        else:
            outcome = "no_answer"
        WEBHOOK_ATTEMPTS.labels(outcome=outcome).inc()
        WEBHOOK_ATTEMPT_DURATION.labels(outcome=outcome).observe(attempt.latency_ms / 1000)
        first_success = attempt.success and not any(a.success for a in delivery.attempts)
        if first_success and delivery.occurred_time is not None:
            WEBHOOK_LAG.observe(max((now - delivery.occurred_time).total_seconds(), 0.0))

    def _next(self, delivery: Delivery, attempt: Attempt, now: datetime) -> Delivery:
        """The delivery after an attempt: done, failed for good, or due again later."""
        if attempt.success:
            return replace(delivery, state=DeliveryState.SUCCEEDED, next_attempt_time=None)
        schedule = self._settings.retry_schedule
        if delivery.retries >= len(schedule):
            return replace(
                delivery,
                state=DeliveryState.FAILED,
                next_attempt_time=None,
                retries=delivery.retries + 1,
            )
        jitter = min(max(self._settings.retry_jitter, 0.0), 1.0)
        wait = schedule[delivery.retries] * (1 + jitter * self._rng.uniform(-1.0, 1.0))
        return replace(
            delivery,
            state=DeliveryState.PENDING,
            next_attempt_time=now + timedelta(seconds=wait),
            retries=delivery.retries + 1,
        )

    async def _endpoint_health(self, hook: Webhook, attempt: Attempt) -> None:
        if attempt.success:
            if hook.failing_since is not None:
                await self._store.note_success(webhook_id=hook.id)
            return
        since = await self._store.note_failure(webhook_id=hook.id, now=attempt.time)
        limit = timedelta(seconds=self._settings.disable_after)
        if since is None or attempt.time - since < limit:
            return
        last = attempt.error or f"HTTP {attempt.status_code}"
        reason = f"every attempt failed since {rfc3339(since)}; the last one: {last}"[:500]
        if not await self._store.disable(webhook_id=hook.id, reason=reason, now=attempt.time):
            return
        event: Document = {
            "_id": f"{EVENT_PREFIX}{new_ulid(attempt.time)}",
            "tenantId": hook.tenant_id,
            "type": DISABLED_EVENT,
            "occurredAt": attempt.time,
            "tags": [],
            "metadata": {},
            "reason": reason,
            "webhookId": hook.id,
        }
        await self._store.events.insert_one(event)
        log.warning(
            "webhook endpoint disabled",
            extra={"fields": {"webhook": hook.id, "tenant": hook.tenant_id, "reason": reason}},
        )


def build_dispatcher(
    settings: MailSettings,
    db: AsyncDatabase[Document],
    *,
    clock: Clock | None = None,
    holder: str | None = None,
    rng: random.Random | None = None,
    wall_clock: Clock | None = None,
) -> tuple[WebhookDispatcher, WebhookTransport]:
    """A dispatcher over `db` configured from settings, with its transport (close it)."""
    hooks = settings.webhooks
    transport = WebhookTransport(
        resolver=host_resolver(settings),
        policy=address_policy(hooks),
        timeout=hooks.timeout,
        limit=hooks.concurrency,
    )
    dispatcher = WebhookDispatcher(
        store=WebhookStore(db),
        secrets=WebhookSecrets(SecretsBox.from_settings(settings)),
        transport=transport,
        clock=clock or SystemClock(),
        settings=hooks,
        holder=holder,
        rng=rng,
        wall_clock=wall_clock,
    )
    return dispatcher, transport


async def serve(settings: MailSettings) -> int:
    """Run one dispatcher until SIGTERM/SIGINT (or a wedged database client); the exit status.

    A grpc.health.v1 server on AZORA_WEBHOOK_DISPATCHER_HEALTH_PORT answers the probes:
    SERVING once the indexes exist and while the database answers.
    """
    database = Database.connect(settings)
    health = await create_server(
        bind=f"{settings.host}:{settings.webhooks.dispatcher_health_port}",
        service_names=(),
        registrars=(),
    )
    dispatcher, transport = build_dispatcher(settings, database.db)
    try:
        await prepare_database(database.db, WEBHOOK_INDEXES)
        await health.set_serving(True)
        stops = StopWatch(database.db, settings, dispatcher.stop, on_change=health.set_serving)
        log.info(
            "webhook dispatcher started",
            extra={"fields": {"holder": dispatcher.holder, "health": health.port}},
        )
        await dispatcher.run()
        await health.health.enter_graceful_shutdown()
        # Requests in flight get the grace period; one cut off keeps its lease and is sent
        # again after it expires (a duplicate the receiver can recognise by webhook-id).
        await dispatcher.drain(settings.shutdown_grace)
        await stops.close()
        log.info("webhook dispatcher stopped", extra={"fields": {"holder": dispatcher.holder}})
        return stops.status
    finally:
        await transport.close()
        await health.server.stop(0)
        await database.close()


def main() -> None:
    """Entry point."""
    # Its own metrics port setting (AZORA_WEBHOOK_DISPATCHER_METRICS_PORT), not the
    # AZORA_METRICS_PORT_* of the services.
    settings = start_process(SERVICE_NAME, MailSettings, metrics=False)
    start_exposition(settings.metrics_host, settings.webhooks.dispatcher_metrics_port)
    status = asyncio.run(serve(settings))
    if status:
        raise SystemExit(status)


if __name__ == "__main__":
    main()
