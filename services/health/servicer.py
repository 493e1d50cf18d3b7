"""azora.health.v1.SuiteHealthService: liveness, readiness, per-component health and metrics.

Components: each service's grpc.health.v1 status (asked over gRPC, so the answer is what a
Kubernetes gRPC probe would see) and MongoDB (a ping, with its latency). All are required:
when one is down, GetHealth fails with UNAVAILABLE (HTTP 503) and the HealthReport travels in
the google.rpc.Status details. The queue and the SMTP relays' last outcomes come from the mail
service (`services.health.mail_client`) as optional components: trouble there is ``degraded``.

Readiness is about the answering process only (database reachable and its own grpc.health.v1
SERVING: indexes ready, not shutting down), the same rule each service's grpc.health.v1 status
follows (`services.core.runtime.watch_readiness`), so probes and ``/health/ready`` agree. The
readiness report still lists the other services, as optional components: one being down makes
``/health`` unhealthy (503) and ``/health/ready`` degraded (200), not this process unready.

GetMetrics answers the Prometheus exposition of this process merged with its configured peers'
(`services.core.metrics.render_suite`); GetHealthMetrics derives the key figures from it. Gauges
that another service of this process owns (the domain service's ``azora_domains``) are brought up
to date through the `before_metrics` callables the composition root hands in: this module never
reads another service's collections or imports its code.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import grpc
from azora.health.v1 import health_pb2 as suite_pb2
from azora.health.v1 import health_pb2_grpc as suite_pb2_grpc
from google.api import httpbody_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from pymongo.asynchronous.database import AsyncDatabase

from services.core.clock import Clock
from services.core.errors import AzoraError, Unavailable
from services.core.metrics import CONTENT_TYPE, Peer, render_suite
from services.core.mongo import Document, probe
from services.core.protobuf import to_duration, to_timestamp
from services.health.mail_client import MailDeliveryProbe

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
        local_component: str = "domain-service",
        process: str = "domain-service",
        metrics_peers: Sequence[Peer] = (),
        delivery: MailDeliveryProbe | None = None,
        before_metrics: Sequence[Callable[[], Awaitable[None]]] = (),
    ) -> None:
        """Build the servicer.

        Args:
            services: component name -> (channel to the service, grpc.health.v1 service name).
            db: the database to ping.
            clock: time source.
            version: software version to report.
            probe_timeout: how long each component may take to answer.
            local_component: the component that is this process (readiness looks at it).
            process: this process's name in the ``process`` label of GetMetrics.
            metrics_peers: other processes whose expositions GetMetrics merges.
            delivery: where the queue and relay components come from (None: not reported).
            before_metrics: refreshes of this process's gauges, awaited before each exposition.
        """
        self._services: dict[str, tuple[health_pb2_grpc.HealthStub, str]] = {}
        for name, (channel, service) in services.items():
            self.watch(name, channel, service)
        self._db = db
        self._clock = clock
        self._version = version
        self._timeout = probe_timeout
        self._started = time.monotonic()
        self._local = local_component
        self._process = process
        self._peers = tuple(metrics_peers)
        self._delivery = delivery
        self._before_metrics = tuple(before_metrics)

    def watch(self, name: str, channel: grpc.aio.Channel, service: str) -> None:
        """Add a service component (used for the hosting process once its port is known)."""
        self._services[name] = (health_pb2_grpc.HealthStub(channel), service)

    async def _service_component(
        self, name: str, stub: health_pb2_grpc.HealthStub, service: str, *, required: bool
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
            required=required,
            latency=to_duration(time.perf_counter() - started),
            detail=detail,
        )

    async def _database_component(self) -> suite_pb2.Component:
        started = time.perf_counter()
        try:
            await probe(self._db, within=self._timeout)
            ok, detail = True, "ping ok"
        except AzoraError as exc:
            ok, detail = False, str(exc)
        return suite_pb2.Component(
            name="mongodb",
            status=_UP if ok else _DOWN,
            required=True,
            latency=to_duration(time.perf_counter() - started),
            detail=detail,
        )

    async def _report(self, *, local_only: bool = False) -> suite_pb2.HealthReport:
        # For readiness (local_only) the other services are listed but not required, and the
        # mail service's queue and relays are left out (they say nothing about this process).
        delivery = (
            self._delivery.components(deadline=self._timeout)
            if self._delivery is not None and not local_only
            else _none()
        )
        checked, extra = await asyncio.gather(
            asyncio.gather(
                self._database_component(),
                *(
                    self._service_component(
                        name, stub, service, required=not local_only or name == self._local
                    )
                    for name, (stub, service) in self._services.items()
                ),
            ),
            delivery,
        )
        components = [*checked, *extra]
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
        """See the proto: UNAVAILABLE with the report in the details when unhealthy."""
        report = await self._report()
        if report.status == "unhealthy":
            raise Unavailable(
                f"unhealthy: {_down(report.components)} down",
                reason="UNHEALTHY",
                details=[report],
            )
        return report

    async def GetReadiness(
        self, request: suite_pb2.GetReadinessRequest, context: Context
    ) -> suite_pb2.HealthReport:
        """See the proto: this process's database and grpc.health.v1 status."""
        report = await self._report(local_only=True)
        if report.status == "unhealthy":
            raise Unavailable(
                f"not ready: {_down(report.components)} down",
                reason="NOT_READY",
                details=[report],
            )
        return report

    async def GetHealthMetrics(
        self, request: suite_pb2.GetHealthMetricsRequest, context: Context
    ) -> suite_pb2.HealthMetrics:
        """See the proto: key figures summed over the processes GetMetrics covers."""
        text = await self._exposition()
        values = key_figures(text_string_to_metric_families(text.decode()))
        return suite_pb2.HealthMetrics(values=values, time=to_timestamp(self._clock.now()))

    async def Ping(
        self, request: suite_pb2.PingRequest, context: Context
    ) -> suite_pb2.PingResponse:
        """See the proto."""
        return suite_pb2.PingResponse(message="pong", time=to_timestamp(self._clock.now()))

    async def GetMetrics(
        self, request: suite_pb2.GetMetricsRequest, context: Context
    ) -> httpbody_pb2.HttpBody:
        """See the proto: Prometheus text format 0.0.4."""
        return httpbody_pb2.HttpBody(content_type=CONTENT_TYPE, data=await self._exposition())

    async def _exposition(self) -> bytes:
        for refresh in self._before_metrics:
            await refresh()
        return await render_suite(self._process, self._peers, scrape_timeout=self._timeout)


async def _none() -> list[suite_pb2.Component]:
    return []


def _down(components: Iterable[suite_pb2.Component]) -> str:
    return ", ".join(c.name for c in components if c.status == _DOWN and c.required)


_EMAIL_OUTCOMES = ("sent", "deferred", "bounced", "failed")


def key_figures(families: Iterable[Metric]) -> dict[str, float]:
    """The figures of GET /health/metrics, summed over processes, from parsed families."""
    values: dict[str, float] = {
        "grpc_requests_total": 0.0,
        "grpc_requests_failed_total": 0.0,
        "http_requests_total": 0.0,
        "http_requests_5xx_total": 0.0,
        "emails_accepted_total": 0.0,
        **{f"emails_{o}_total": 0.0 for o in _EMAIL_OUTCOMES},
        "dkim_signatures_total": 0.0,
        "dns_lookups_total": 0.0,
    }

    def add(key: str, value: float) -> None:
        values[key] = values.get(key, 0.0) + value

    for family in families:
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, float(sample.value)
            if name == "azora_grpc_requests_total":
                add("grpc_requests_total", value)
                if labels.get("code") != "OK":
                    add("grpc_requests_failed_total", value)
            elif name == "azora_http_requests_total":
                add("http_requests_total", value)
                if labels.get("status", "").startswith("5"):
                    add("http_requests_5xx_total", value)
            elif name == "azora_emails_accepted_total":
                add("emails_accepted_total", value)
            elif name == "azora_email_deliveries_total":
                add(f"emails_{labels.get('outcome', 'unknown')}_total", value)
            elif name == "azora_email_queue_depth":
                add("queue_depth", value)
            elif name == "azora_email_queue_oldest_due_age_seconds":
                values["queue_oldest_due_age_seconds"] = max(
                    values.get("queue_oldest_due_age_seconds", 0.0), value
                )
            elif name == "azora_domains":
                add(f"domains_{labels.get('status', 'unknown')}", value)
            elif name == "azora_dkim_signatures_total":
                add("dkim_signatures_total", value)
            elif name == "azora_dns_lookups_total":
                add("dns_lookups_total", value)
                add(f"dns_lookups_{labels.get('outcome', 'unknown')}_total", value)
            elif name in ("process_resident_memory_bytes", "process_cpu_seconds_total"):
                add(name, value)
    return values
