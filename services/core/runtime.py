"""Start-up and shutdown shared by every service process.

Settings, logging, database, server start-up, background loops and the graceful-shutdown main
loop. Each service's `app.py` only wires its own managers and servicers and calls into here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import grpc
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from services.core.auth import ApiKeyResolver, Authenticator
from services.core.errors import AzoraError
from services.core.interceptors import (
    AuthInterceptor,
    ErrorMappingInterceptor,
    RateLimitInterceptor,
)
from services.core.logs import configure_logging
from services.core.metrics import start_exposition
from services.core.mongo import Document, IndexSpec, create_client, ensure_indexes, ping
from services.core.ratelimit import BLOCKS_COLLECTION as RATE_LIMIT_BLOCKS_COLLECTION
from services.core.ratelimit import COLLECTION as RATE_LIMIT_COLLECTION
from services.core.ratelimit import INDEXES as RATE_LIMIT_INDEXES
from services.core.ratelimit import RateLimiter
from services.core.server import Registrar, ServiceServer, create_server, run_until_signalled
from services.core.settings import Settings, SettingsError
from services.core.tracing import configure_tracing

log = logging.getLogger(__name__)


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
        for channel in self.channels:
            await channel.close()
        await self.database.close()

    async def stop(self, grace: float | None = None) -> None:
        """Stop serving (health first, then draining calls), then close resources."""
        await self.server.stop(grace)
        await self.close_resources()


async def prepare_database(db: AsyncDatabase[Document], indexes: Sequence[IndexSpec]) -> None:
    """Wait until the database answers, then create the declared indexes.

    Retries with a capped backoff so a service started before its database (compose, k8s,
    `make run`) becomes ready by itself instead of crashing.
    """
    delay = 0.2
    while True:
        try:
            await ensure_indexes(db, indexes)
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
    await prepare_database(database.db, (*indexes, *RATE_LIMIT_INDEXES))
    await server.set_serving(True)
    # Rate-limit counts are exchanged with the other replicas through the database.
    server.background.append(asyncio.create_task(limiter.run(), name="rate-limits"))
    server.background.append(
        asyncio.create_task(
            watch_readiness(server, database.db, settings.readiness_interval),
            name="readiness",
        )
    )
    log.info(
        "serving",
        extra={"fields": {"port": server.port, "services": list(service_names)}},
    )
    return server


async def watch_readiness(
    server: ServiceServer, db: AsyncDatabase[Document], interval: float
) -> None:
    """Keep the server's health status equal to "the database answers a ping" until cancelled.

    Indexes exist (start-up waited for them); shutting down is handled by the health servicer,
    which ignores changes once graceful shutdown has begun.
    """
    serving = True
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.wait_for(ping(db), timeout=max(interval, 1.0))
            reachable = True
        except (AzoraError, TimeoutError, PyMongoError):
            reachable = False
        if reachable != serving:
            serving = reachable
            await server.set_serving(serving)
            log.warning(
                "readiness changed",
                extra={"fields": {"serving": serving, "reason": "database ping"}},
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
                log.exception("background job failed", extra={"fields": {"job": name}})
            await asyncio.sleep(interval)

    return asyncio.create_task(loop(), name=name)


def main(service_name: str, build: Callable[[Settings], Awaitable[RunningService]]) -> None:
    """Entry point of a service process: settings, logging, build, serve until SIGTERM."""
    try:
        settings = Settings.from_env(os.environ, service_name=service_name)
    except SettingsError as exc:
        print(f"{service_name}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(service=service_name, level=settings.log_level)
    configure_tracing(
        service=service_name, version=settings.version, otlp_endpoint=settings.otel_endpoint
    )
    start_exposition(settings.metrics_host, settings.metrics_port)

    async def serve() -> None:
        running = await build(settings)
        await run_until_signalled(
            running.server, grace=settings.shutdown_grace, on_stop=running.close_resources
        )

    asyncio.run(serve())
