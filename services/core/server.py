"""The grpc.aio server factory and process lifecycle shared by every service.

`create_server` registers the service's servicers plus grpc.health.v1 (one status per service
name and the overall "") and server reflection, binds, and returns `(server, port)` so tests can
bind port 0. `run_until_signalled` implements graceful shutdown: on SIGTERM/SIGINT health turns
NOT_SERVING first (load balancers stop sending), then in-flight calls get `shutdown_grace`
seconds to finish.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

if TYPE_CHECKING:
    from services.core.ratelimit import RateLimiter

log = logging.getLogger(__name__)

Registrar = Callable[[grpc.aio.Server], None]
# Default of the largest message a service accepts (AZORA_GRPC_MAX_MESSAGE_BYTES); a bigger
# request fails with RESOURCE_EXHAUSTED before any of our code sees it.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass
class ServiceServer:
    """A started server with its health servicer and the names it reports on."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: Sequence[str]
    background: list[asyncio.Task[None]] = field(default_factory=list)
    # The rate limiter of the service's interceptors (tests sync it explicitly).
    rate_limiter: RateLimiter | None = None

    async def set_serving(self, serving: bool) -> None:
        """Report every service (and the overall server) as SERVING or NOT_SERVING."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in (*self.service_names, ""):
            await self.health.set(name, status)

    async def stop(self, grace: float | None) -> None:
        """Flip health to NOT_SERVING, stop background tasks, then drain calls for `grace` s."""
        await self.health.enter_graceful_shutdown()
        for task in self.background:
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        await self.server.stop(grace)


async def create_server(
    *,
    bind: str,
    service_names: Sequence[str],
    registrars: Sequence[Registrar],
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    max_message_bytes: int = MAX_MESSAGE_BYTES,
) -> ServiceServer:
    """Build, bind and start a server.

    Args:
        bind: "host:port"; port 0 picks a free port (tests).
        service_names: fully-qualified names of the services registered, for health and
            reflection (e.g. "azora.domain.v1.DomainService").
        registrars: functions adding servicers to the server (the generated add_*_to_server).
        interceptors: server interceptors, outermost first.
        max_message_bytes: largest request (and answer) message in bytes.

    Returns:
        The started server with its bound port.
    """
    server = grpc.aio.server(
        interceptors=list(interceptors),
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    for register in registrars:
        register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(bind)
    if port == 0:
        raise OSError(f"could not bind {bind}")
    await server.start()
    started = ServiceServer(server, port, health_servicer, service_names)
    # NOT_SERVING until the caller has finished start-up work (indexes, dependencies).
    await started.set_serving(False)
    return started


async def run_until_signalled(
    server: ServiceServer, *, grace: float, on_stop: Callable[[], Awaitable[None]] | None = None
) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down", extra={"fields": {"grace_seconds": grace}})
    await server.stop(grace)
    if on_stop is not None:
        await on_stop()
    log.info("stopped")
