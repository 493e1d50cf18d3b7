"""Rate limits and sending quotas, counted per process and shared between replicas.

Budgets are fixed windows aligned to the epoch (a 15-minute window starts at :00, :15, ...; the
daily quota at 00:00 UTC). Every request is admitted or refused from this process's memory, so
no database call sits on a request's path. A background task (`SharedCounters.run`) publishes
this process's counts every ``AZORA_RATE_LIMIT_SYNC_INTERVAL`` seconds and reads the other
replicas' counts back; a key's total is "mine, exactly" plus "the others', as last read".

Why one document per process and window, and not one per key with ``$inc``: FerretDB 1.24
applies ``$inc`` as read-modify-write without isolation. Measured (4 clients x 8 tasks x 50
``$inc`` upserts on one ``_id``, three runs): 38, 75 and 85 of 1600 increments survived with
``update_one``; 90-108 with ``find_one_and_update``, which also failed with duplicate-key errors
on the upsert. So every document here has exactly one writer — the process named in its
``_id`` — which ``$set``s its own cumulative counts (idempotent, so a failed write is simply
repeated by the next sync). A read fetches the documents of the current windows of every budget:
a scan, but of a collection holding (replicas x budgets x live windows) documents.

Tolerance: a replica learns what the others admitted one to two sync intervals late, so with
R replicas a key can get at most the budget plus what the other R-1 replicas admitted for it
during the last two sync intervals (one replica alone is exact). Counts of a replica that stops
stay in force until their window ends. Documents of ended windows are removed by `sweep`
(FerretDB has no TTL indexes).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import math
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import PyMongoError

from services.core.context import Principal
from services.core.errors import ResourceExhausted
from services.core.metrics import RATE_LIMIT_REFUSALS, RATE_LIMIT_SYNCS
from services.core.settings import Settings

log = logging.getLogger(__name__)

COLLECTION = "rate_limit_counters"
# Ended windows stay this long before the sweeper removes them (clock skew between replicas).
_KEEP_AFTER_END = timedelta(minutes=1)
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
            if not window.dirty:
                continue
            changed = {k: window.mine[k] for k in window.dirty}
            window.dirty.clear()
            expires = datetime.fromtimestamp(window.end_ms / 1000, UTC) + _KEEP_AFTER_END
            try:
                await self._collection.update_one(
                    {"_id": self._doc_id(name, start)},
                    {
                        # Cumulative counts, not increments: repeating a write changes nothing.
                        "$set": {f"counts.{k}": v for k, v in changed.items()},
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
                raise

    async def _read(self, now: int) -> None:
        assert self._collection is not None
        current = {
            f"{budget.name}:{budget.window_start(now)}": budget
            for budget in self._budgets.values()
            if budget.limit
        }
        others: dict[str, dict[str, int]] = {name: {} for name in current}
        async for doc in self._collection.find(
            {"window": {"$in": sorted(current)}}, {"window": 1, "instance": 1, "counts": 1}
        ):
            if doc.get("instance") == self.instance or doc.get("window") not in others:
                continue
            totals = others[doc["window"]]
            counts = doc.get("counts")
            for key, value in (counts if isinstance(counts, dict) else {}).items():
                if isinstance(value, int | float):
                    totals[key] = totals.get(key, 0) + int(value)
        for window_name, totals in others.items():
            budget = current[window_name]
            self._window(budget, now).others = totals

    async def sweep(self) -> int:
        """Delete documents of windows that ended; returns how many."""
        if self._collection is None:
            return 0
        cutoff = datetime.fromtimestamp(self._clock(), UTC)
        result = await self._collection.delete_many({"expiresAt": {"$lt": cutoff}})
        return int(result.deleted_count)

    async def run(self, *, sweep_every: float = 60.0) -> None:
        """Sync every interval (and sweep now and then) until cancelled; failures are logged."""
        last_sweep = 0.0
        while True:
            try:
                await self.sync()
                RATE_LIMIT_SYNCS.labels("ok").inc()
            except PyMongoError as exc:
                RATE_LIMIT_SYNCS.labels("error").inc()
                log.warning("rate-limit sync failed", extra={"fields": {"error": str(exc)[:200]}})
            if self._clock() - last_sweep >= sweep_every:
                last_sweep = self._clock()
                try:
                    await self.sweep()
                except PyMongoError as exc:
                    log.warning(
                        "rate-limit sweep failed", extra={"fields": {"error": str(exc)[:200]}}
                    )
            await asyncio.sleep(self._interval)


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
        )

    @property
    def budgets(self) -> tuple[Budget, ...]:
        """Every budget."""
        return (self.api, self.send, self.hourly, self.daily)


class RateLimiter:
    """Admits requests against the per-IP and per-principal budgets and the tenant quotas."""

    def __init__(self, policy: RateLimitPolicy, counters: SharedCounters) -> None:
        self.policy = policy
        self.counters = counters

    @classmethod
    def from_settings(
        cls, settings: Settings, collection: AsyncCollection[dict[str, Any]] | None
    ) -> RateLimiter:
        """A limiter sharing its counts through `collection`."""
        policy = RateLimitPolicy.from_settings(settings)
        return cls(
            policy,
            SharedCounters(
                collection, policy.budgets, sync_interval=settings.rate_limit_sync_interval
            ),
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

    def admit(
        self, *, send: bool, ip: str | None, principal: Principal | None, count: int = 1
    ) -> Decision:
        """Count one request against its budgets, or refuse it without counting.

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
        budget = self.policy.send if send else self.policy.api
        checks: list[tuple[Budget, str, str]] = []
        if ip is not None:
            checks.append((budget, f"ip:{ip}", "ip"))
        if principal is not None:
            checks.append((budget, f"principal:{principal.tenant_id}/{principal.subject}", "user"))
        if send and principal is not None:
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
                refused = Decision(
                    decision.limit, 0, decision.reset_seconds, decision.window_seconds
                )
                RATE_LIMIT_REFUSALS.labels(checked.name, scope).inc()
                raise RateLimitExceeded(
                    _refusal_message(checked, scope, refused),
                    reason=checked.reason,
                    decision=refused,
                    scope=scope,
                )
            if tightest is None or decision.remaining < tightest.remaining:
                tightest = decision
        # Quotas count accepted emails (`record_send`), rate limits count admitted requests.
        for checked, key, _ in checks:
            if checked is budget:
                self.counters.add(checked, key, now, count)
        return tightest or Decision(budget.limit, budget.limit, 0, budget.window_ms // 1000)

    def record_send(self, principal: Principal, emails: int = 1) -> None:
        """Count accepted emails against the tenant's hourly and daily quotas."""
        now = self.counters.now_ms()
        for quota in (self.policy.hourly, self.policy.daily):
            if quota.limit:
                self.counters.add(quota, _tenant_key(principal), now, emails)


def _tenant_key(principal: Principal) -> str:
    return f"tenant:{principal.tenant_id}"


def _refusal_message(budget: Budget, scope: str, decision: Decision) -> str:
    who = {"ip": "this client address", "user": "this caller", "tenant": "this tenant"}[scope]
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
    "COLLECTION",
    "Budget",
    "Decision",
    "RateLimitExceeded",
    "RateLimitPolicy",
    "RateLimiter",
    "SharedCounters",
]
