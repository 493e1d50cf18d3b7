"""azora.health.v1.SuiteHealthService: liveness, readiness and per-component health.

Components: each service's grpc.health.v1 status (asked over gRPC, so the answer is what a
Kubernetes gRPC probe would see) and MongoDB (a ping, with its latency). Prometheus metrics and
the JSON key figures belong to the observability work and answer UNIMPLEMENTED until then.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import grpc
from azora.health.v1 import health_pb2 as suite_pb2
from azora.health.v1 import health_pb2_grpc as suite_pb2_grpc
from google.api import httpbody_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pymongo.asynchronous.database import AsyncDatabase

from services.core.clock import Clock
from services.core.errors import AzoraError, Unavailable, Unimplemented
from services.core.mongo import Document, ping
from services.core.protobuf import to_duration, to_timestamp

Context = grpc.aio.ServicerContext[Any, Any]
_UP = suite_pb2.COMPONENT_STATUS_UP
_DOWN = suite_pb2.COMPONENT_STATUS_DOWN


class SuiteHealthServicer(suite_pb2_grpc.SuiteHealthServiceServicer):
    """Aggregates the health of the services and the database."""

    def __init__(
        self,
        *,
        services: Mapping[str, tuple[grpc.aio.Channel, str]],
        db: AsyncDatabase[Document],
        clock: Clock,
        version: str,
        probe_timeout: float = 2.0,
    ) -> None:
        """Build the servicer.

        Args:
            services: component name -> (channel to the service, grpc.health.v1 service name).
            db: the database to ping.
            clock: time source.
            version: software version to report.
            probe_timeout: how long each component may take to answer.
        """
        self._services: dict[str, tuple[health_pb2_grpc.HealthStub, str]] = {}
        for name, (channel, service) in services.items():
            self.watch(name, channel, service)
        self._db = db
        self._clock = clock
        self._version = version
        self._timeout = probe_timeout
        self._started = time.monotonic()

    def watch(self, name: str, channel: grpc.aio.Channel, service: str) -> None:
        """Add a service component (used for the hosting process once its port is known)."""
        self._services[name] = (health_pb2_grpc.HealthStub(channel), service)

    async def _service_component(
        self, name: str, stub: health_pb2_grpc.HealthStub, service: str
    ) -> suite_pb2.Component:
        started = time.perf_counter()
        try:
            reply = await stub.Check(  # type: ignore[attr-defined]
                health_pb2.HealthCheckRequest(service=service), timeout=self._timeout
            )
            ok = reply.status == health_pb2.HealthCheckResponse.SERVING
            detail = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.aio.AioRpcError as exc:
            ok, detail = False, f"{exc.code().name}: {exc.details() or ''}"[:200]
        return suite_pb2.Component(
            name=name,
            status=_UP if ok else _DOWN,
            required=True,
            latency=to_duration(time.perf_counter() - started),
            detail=detail,
        )

    async def _database_component(self) -> suite_pb2.Component:
        started = time.perf_counter()
        try:
            await asyncio.wait_for(ping(self._db), self._timeout)
            ok, detail = True, "ping ok"
        except (AzoraError, TimeoutError) as exc:
            ok, detail = False, str(exc) or "ping timed out"
        return suite_pb2.Component(
            name="mongodb",
            status=_UP if ok else _DOWN,
            required=True,
            latency=to_duration(time.perf_counter() - started),
            detail=detail,
        )

    async def _report(self) -> suite_pb2.HealthReport:
        components = await asyncio.gather(
            self._database_component(),
            *(
                self._service_component(name, stub, service)
                for name, (stub, service) in self._services.items()
            ),
        )
        down = [c for c in components if c.status == _DOWN and c.required]
        degraded = [c for c in components if c.status != _UP]
        overall = "unhealthy" if down else "degraded" if degraded else "healthy"
        return suite_pb2.HealthReport(
            status=overall,
            components=components,
            version=self._version,
            uptime=to_duration(timedelta(seconds=time.monotonic() - self._started)),
            time=to_timestamp(self._clock.now()),
        )

    async def GetHealth(
        self, request: suite_pb2.GetHealthRequest, context: Context
    ) -> suite_pb2.HealthReport:
        """See the proto."""
        return await self._report()

    async def GetReadiness(
        self, request: suite_pb2.GetReadinessRequest, context: Context
    ) -> suite_pb2.HealthReport:
        """See the proto."""
        report = await self._report()
        if report.status == "unhealthy":
            down = ", ".join(c.name for c in report.components if c.status == _DOWN)
            raise Unavailable(f"not ready: {down} down", reason="NOT_READY")
        return report

    async def GetHealthMetrics(
        self, request: suite_pb2.GetHealthMetricsRequest, context: Context
    ) -> suite_pb2.HealthMetrics:
        """See the proto."""
        raise Unimplemented("key figures arrive with the observability work (issue 6)")

    async def Ping(
        self, request: suite_pb2.PingRequest, context: Context
    ) -> suite_pb2.PingResponse:
        """See the proto."""
        return suite_pb2.PingResponse(message="pong", time=to_timestamp(self._clock.now()))

    async def GetMetrics(
        self, request: suite_pb2.GetMetricsRequest, context: Context
    ) -> httpbody_pb2.HttpBody:
        """See the proto."""
        raise Unimplemented("Prometheus metrics arrive with the observability work (issue 6)")
