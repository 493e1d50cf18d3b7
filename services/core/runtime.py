"""Start-up and shutdown shared by every service process.

Settings, logging, database, server start-up, background loops and the graceful-shutdown main
loop. Each service's `app.py` only wires its own managers and servicers and calls into here.

Processes recover by themselves: readiness follows a real database round trip (`probe`), and
a watchdog (`DatabaseWatch`) tells a database that is down from a client that is wedged (PyMongo
clients have been seen failing every operation after the database came back, while a new
client worked at once). A wedged process exits non-zero (`EXIT_DATABASE_CLIENT_WEDGED`) and its
supervisor restarts it with a new client: Kubernetes, compose (``restart``) or ``make run``
(scripts/run_suite.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from services.core.auth import ApiKeyResolver, Authenticator
from services.core.cancellation import raise_if_cancelling
from services.core.errors import AzoraError
from services.core.event_loop import run_event_loop
from services.core.interceptors import (
    AuthInterceptor,
    ErrorMappingInterceptor,
    RateLimitInterceptor,
)
from services.core.logs import configure_logging
from services.core.metrics import start_exposition
from services.core.mongo import Document, IndexSpec, create_client, ensure_indexes, probe
from services.core.ratelimit import BLOCKS_COLLECTION as RATE_LIMIT_BLOCKS_COLLECTION
from services.core.ratelimit import COLLECTION as RATE_LIMIT_COLLECTION
from services.core.ratelimit import INDEXES as RATE_LIMIT_INDEXES
from services.core.ratelimit import RateLimiter
from services.core.server import Registrar, ServiceServer, create_server, run_until_signalled
from services.core.settings import Settings, SettingsError
from services.core.tracing import configure_tracing

log = logging.getLogger(__name__)

SettingsT = TypeVar("SettingsT", bound=Settings)

# Exit status of a process whose database client stopped working while the database answers
# others (EX_TEMPFAIL: worth restarting).
EXIT_DATABASE_CLIENT_WEDGED = 75


@dataclass
class Database:
    """The process's Mongo client and database (closed on shutdown)."""

    client: AsyncMongoClient[Document]
    db: AsyncDatabase[Document]

    @classmethod
    def connect(cls, settings: Settings) -> Database:
        """Create the client (lazily connecting) inside the running event loop."""
        client = create_client(settings)
        return cls(client, client[settings.mongodb_database])

    async def close(self) -> None:
        """Close the client."""
        await self.client.close()


@dataclass
class RunningService:
    """A started service: its server plus what must be closed when it stops."""

    server: ServiceServer
    database: Database
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    @property
    def port(self) -> int:
        """The bound port."""
        return self.server.port

    async def close_resources(self) -> None:
        """Close outgoing channels and the database client (after the server stopped)."""
        if self.server.rate_limiter is not None:
            # No call is admitted any more: what this process's rate-limit blocks have left
            # goes to the other processes (before the database client closes).
            await self.server.rate_limiter.release()
        for channel in self.channels:
            await channel.close()
        await self.database.close()

    async def stop(self, grace: float | None = None) -> None:
        """Stop serving (health first, then draining calls), then close resources."""
        await self.server.stop(grace)
        await self.close_resources()


async def prepare_database(
    db: AsyncDatabase[Document],
    indexes: Sequence[IndexSpec],
    *,
    retired_collections: Sequence[str] = (),
) -> None:
    """Wait until the database answers, then create the declared indexes (`ensure_indexes`).

    Retries with a capped backoff so a service started before its database (compose, k8s,
    `make run`) becomes ready by itself instead of crashing.
    """
    delay = 0.2
    while True:
        try:
            await ensure_indexes(db, indexes, retired_collections=retired_collections)
            return
        except PyMongoError as exc:
            log.warning(
                "database not ready; retrying",
                extra={"fields": {"error": str(exc)[:200], "retry_in_s": delay}},
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def start_service(
    *,
    settings: Settings,
    database: Database,
    bind: str,
    service_names: Sequence[str],
    registrars: Sequence[Registrar],
    api_keys: ApiKeyResolver,
    indexes: Sequence[IndexSpec],
    retired_collections: Sequence[str] = (),
) -> ServiceServer:
    """Start a server with the shared interceptors; it reports SERVING once indexes exist.

    From then on a background task pings the database every ``readiness_interval`` seconds and
    flips the grpc.health.v1 status to NOT_SERVING while it is unreachable (and back), so
    Kubernetes gRPC probes and ``/health/ready`` agree.
    """
    limiter = RateLimiter.from_settings(
        settings, database.db[RATE_LIMIT_COLLECTION], database.db[RATE_LIMIT_BLOCKS_COLLECTION]
    )
    server = await create_server(
        bind=bind,
        service_names=service_names,
        registrars=registrars,
        interceptors=[
            ErrorMappingInterceptor(database_timeout=settings.mongodb_request_timeout),
            AuthInterceptor(Authenticator(settings, api_keys), limiter=limiter),
            RateLimitInterceptor(limiter),
        ],
        max_message_bytes=settings.grpc_max_message_bytes,
    )
    server.rate_limiter = limiter
    # Every process shares the rate-limit collection (and may sweep it).
    await prepare_database(
        database.db, (*indexes, *RATE_LIMIT_INDEXES), retired_collections=retired_collections
    )
    await server.set_serving(True)
    # Rate-limit counts are exchanged with the other replicas through the database.
    server.background.append(asyncio.create_task(limiter.run(), name="rate-limits"))
    server.background.append(
        asyncio.create_task(
            watch_readiness(
                server,
                database.db,
                settings.readiness_interval,
                watchdog=DatabaseWatch.from_settings(settings),
            ),
            name="readiness",
        )
    )
    log.info(
        "serving",
        extra={"fields": {"port": server.port, "services": list(service_names)}},
    )
    return server


@dataclass
class DatabaseWatch:
    """Tells a database that is down from a client of ours that is wedged.

    Once our client has had no answer for `after` seconds, `fresh_answers` asks the database
    with a client made for the occasion. It answering means ours is broken (nothing else is),
    and only a new process (new client, new connection pools) is sure to recover.
    """

    after: float
    fresh_answers: Callable[[], Awaitable[bool]]

    @classmethod
    def from_settings(cls, settings: Settings) -> DatabaseWatch | None:
        """The watchdog configured by AZORA_DATABASE_WATCHDOG (None when 0)."""
        if settings.database_watchdog <= 0:
            return None

        async def fresh_answers() -> bool:
            # Polling monitoring: no background RTT connection left half-open when this
            # short-lived client closes right after its one probe.
            client = create_client(settings, serverMonitoringMode="poll")
            try:
                await probe(
                    client[settings.mongodb_database],
                    within=settings.mongodb_server_selection_timeout,
                )
            except AzoraError:
                return False
            finally:
                await client.close()
            return True

        return cls(settings.database_watchdog, fresh_answers)


async def watch_database(
    db: AsyncDatabase[Document],
    interval: float,
    *,
    on_change: Callable[[bool], Awaitable[None]] | None = None,
    watchdog: DatabaseWatch | None = None,
    on_wedged: Callable[[], None] | None = None,
) -> None:
    """Probe the database every `interval` s until cancelled, or until our client is wedged.

    Args:
        db: the process's database (its own client).
        interval: seconds between probes; each probe gets as long (at least 1 s).
        on_change: called with the new state when the database starts or stops answering.
        watchdog: when set, a database silent for `watchdog.after` s is tried with a new
            client; if that one gets an answer, `on_wedged` is called and this returns.
        on_wedged: what the process does about a wedged client (exit for a restart).
    """
    loop = asyncio.get_running_loop()
    answering = True
    silent_since: float | None = None
    while True:
        await asyncio.sleep(interval)
        try:
            await probe(db, within=max(interval, 1.0))
            now_answering = True
        except AzoraError:
            now_answering = False
        raise_if_cancelling()  # a cancellation the probe reported as a failure
        if now_answering != answering:
            answering = now_answering
            log.warning(
                "readiness changed",
                extra={"fields": {"serving": answering, "reason": "database probe"}},
            )
            if on_change is not None:
                await on_change(answering)
        if answering:
            silent_since = None
            continue
        if silent_since is None:
            silent_since = loop.time()
        if watchdog is None or loop.time() - silent_since < watchdog.after:
            continue
        if await watchdog.fresh_answers():
            if on_wedged is not None:
                on_wedged()
            return
        # The database itself is away: nothing a restart would fix. Ask again a period later.
        silent_since = loop.time()


async def watch_readiness(
    server: ServiceServer,
    db: AsyncDatabase[Document],
    interval: float,
    *,
    watchdog: DatabaseWatch | None = None,
) -> None:
    """Keep the server's health status equal to "the database answers a probe".

    Indexes exist (start-up waited for them); shutting down is handled by the health servicer,
    which ignores changes once graceful shutdown has begun. With a `watchdog`, a wedged client
    makes the process exit (`ServiceServer.fail`) for its supervisor to restart it.
    """
    await watch_database(
        db,
        interval,
        on_change=server.set_serving,
        watchdog=watchdog,
        on_wedged=lambda: server.fail(
            EXIT_DATABASE_CLIENT_WEDGED,
            "the database answers a new client but not this process's client",
        ),
    )


def run_periodically(
    name: str, interval: float, job: Callable[[], Awaitable[object]]
) -> asyncio.Task[None]:
    """Run `job` every `interval` seconds until cancelled; a failing run is logged, not fatal."""

    async def loop() -> None:
        while True:
            try:
                await job()
            except asyncio.CancelledError:
                raise
            except Exception:
                raise_if_cancelling()  # a cancellation the job reported as a failure
                log.exception("background job failed", extra={"fields": {"job": name}})
            await asyncio.sleep(interval)

    return asyncio.create_task(loop(), name=name)


class StopWatch:
    """How a background process (worker, dispatcher) learns it must stop.

    SIGTERM and SIGINT call `stop`; so does a wedged database client (`watch_database` with
    the configured `DatabaseWatch`), which also makes `status` EXIT_DATABASE_CLIENT_WEDGED so
    that the process exits for a restart. `on_change` hears the database's readiness (a health
    server's serving flag). Start it in the running loop; `close` it when the process is done.
    """

    def __init__(
        self,
        db: AsyncDatabase[Document],
        settings: Settings,
        stop: Callable[[], None],
        *,
        on_change: Callable[[bool], Awaitable[None]] | None = None,
    ) -> None:
        self.status = 0
        self._stop = stop
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        self._watch = asyncio.create_task(
            watch_database(
                db,
                settings.readiness_interval,
                on_change=on_change,
                watchdog=DatabaseWatch.from_settings(settings),
                on_wedged=self._wedged,
            )
        )

    def _wedged(self) -> None:
        self.status = EXIT_DATABASE_CLIENT_WEDGED
        log.error("database client wedged; stopping for a restart")
        self._stop()

    async def close(self) -> None:
        """Stop watching the database."""
        self._watch.cancel()
        await asyncio.gather(self._watch, return_exceptions=True)


def start_process(
    service_name: str, settings_class: type[SettingsT], *, metrics: bool = True
) -> SettingsT:
    """What every process does first: settings, JSON logs, tracing, its metrics endpoint.

    Args:
        service_name: the process's name (logs, traces, metrics port).
        settings_class: the process's settings (shared ones plus its own).
        metrics: False for no scrape endpoint (a supervisor whose children serve their own).

    Exits with status 2 (and the reason on stderr) when the settings are invalid.
    """
    try:
        settings = settings_class.from_env(os.environ, service_name=service_name)
    except SettingsError as exc:
        print(f"{service_name}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(service=service_name, level=settings.log_level)
    configure_tracing(
        service=service_name, version=settings.version, otlp_endpoint=settings.otel_endpoint
    )
    if metrics:
        start_exposition(settings.metrics_host, settings.metrics_port)
    return settings


def main(
    service_name: str,
    build: Callable[[SettingsT], Awaitable[RunningService]],
    settings_class: type[SettingsT],
) -> None:
    """Entry point of a service process: settings, logging, build, serve until SIGTERM.

    Args:
        service_name: the process's name (logs, traces, metrics port).
        build: the service's composition root.
        settings_class: the service's settings (shared ones plus its own).
    """
    settings = start_process(service_name, settings_class)

    async def serve() -> int:
        running = await build(settings)
        return await run_until_signalled(
            running.server, grace=settings.shutdown_grace, on_stop=running.close_resources
        )

    status = run_event_loop(serve(), settings)
    if status:
        raise SystemExit(status)
