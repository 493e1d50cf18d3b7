"""The grpc.aio server factory and process lifecycle shared by every service.

`create_server` registers the service's servicers plus grpc.health.v1 (one status per service
name and the overall "") and server reflection, binds, and returns `(server, port)` so tests can
bind port 0. `run_until_signalled` implements graceful shutdown: on SIGTERM/SIGINT health turns
NOT_SERVING first (load balancers stop sending), background work registered as a shutdown hook
finishes what it is in (delivery workers), then in-flight calls get `shutdown_grace` seconds to
finish. A process that finds itself broken beyond repair (a wedged database client, see
`services.core.runtime.watch_readiness`) calls `ServiceServer.fail`: it then shuts down the same
way and exits non-zero, so that its supervisor (Kubernetes, compose, `make run`) restarts it.
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
# How long `ServiceServer.stop` waits for cancelled background tasks to end.
_BACKGROUND_STOP_S = 10.0

Registrar = Callable[[grpc.aio.Server], None]
# Work to finish on shutdown, given the grace period in seconds (0 when there is none).
ShutdownHook = Callable[[float], Awaitable[None]]
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
    # Run on stop, before background tasks are cancelled (e.g. deliveries finishing).
    shutdown_hooks: list[ShutdownHook] = field(default_factory=list)
    # Set by `fail`: the process must exit (non-zero) so that its supervisor restarts it.
    failed: asyncio.Event = field(default_factory=asyncio.Event)
    exit_code: int = 0

    def fail(self, exit_code: int, reason: str) -> None:
        """Ask the process to shut down gracefully and exit with `exit_code` (non-zero)."""
        log.error("process cannot recover; exiting", extra={"fields": {"reason": reason}})
        self.exit_code = exit_code
        self.failed.set()

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
        """Flip health to NOT_SERVING, run shutdown hooks, stop background tasks, drain calls.

        Hooks and the draining of calls each get up to `grace` seconds.
        """
        await self.health.enter_graceful_shutdown()
        if self.shutdown_hooks:
            await asyncio.gather(*(hook(grace or 0.0) for hook in self.shutdown_hooks))
        for task in self.background:
            task.cancel()
        if self.background:
            # Bounded: a task that swallowed its cancellation (Python 3.11's asyncio.timeout can
            # turn a cancellation that meets its own expiry into TimeoutError, and a loop that
            # catches errors then carries on) must not hold the shutdown forever.
            done, pending = await asyncio.wait(self.background, timeout=_BACKGROUND_STOP_S)
            for task in done:
                if not task.cancelled():
                    task.exception()  # retrieved: a failure at shutdown is no news
            for task in pending:
                log.warning(
                    "background task did not stop", extra={"fields": {"task": task.get_name()}}
                )
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
) -> int:
    """Serve until SIGTERM or SIGINT (or `ServiceServer.fail`), then shut down gracefully.

    Returns:
        The exit status the process should end with: 0, or the one given to `fail`.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waits = [asyncio.create_task(stop.wait()), asyncio.create_task(server.failed.wait())]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in waits:
        task.cancel()
    log.info("shutting down", extra={"fields": {"grace_seconds": grace}})
    await server.stop(grace)
    if on_stop is not None:
        await on_stop()
    log.info("stopped", extra={"fields": {"exit_code": server.exit_code}})
    return server.exit_code
