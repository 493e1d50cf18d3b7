"""Metrics and tracing of REST requests at the local gateway.

`observe_request` wraps one request: a SERVER span (child of the client's W3C ``traceparent``,
if it sent one) that is current while the request is transcoded, so `upstream_metadata` sends
the span's context to the service as ``traceparent``; and, when the answer is known, the
``azora_http_requests_total{route,method,status}`` counter and the
``azora_http_request_duration_seconds{route,method}`` histogram. The route label is the
http-rule template (``/api/v1/emails/{id}``), never the raw path, which carries ids.

The gateway has no hand-written ``/metrics``: that path is transcoded to
SuiteHealthService.GetMetrics like every other one (see docs/operations.md).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from aiohttp import web
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from gateway.keys import ROUTE_KEY, RPC_KEY
from services.core.metrics import HTTP_REQUEST_DURATION, HTTP_REQUESTS, start_exposition
from services.core.settings import Settings
from services.core.tracing import configure_tracing, extract, outgoing_metadata, tracer

# Route label of requests no route matched (unknown paths), so they stay one series.
UNMATCHED_ROUTE = "unmatched"
# HTTP methods kept as a label value; anything else is counted as "OTHER" (bounded).
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@dataclass
class RequestObservation:
    """What `observe_request` yields: call `finish` with the status once it is known."""

    request: web.Request
    span: Span
    started: float
    status: int = 499

    def finish(self, status: int) -> None:
        """Remember the answer's HTTP status (499 if never called: the client went away)."""
        self.status = status


def route_of(request: web.Request) -> str:
    """The template that answered: the http rule's, else aiohttp's for /api-docs routes."""
    route: str | None = request.get(ROUTE_KEY)
    if route:
        return route
    info = request.match_info
    resource = info.route.resource if info is not None and info.route is not None else None
    canonical: str = resource.canonical if resource is not None else ""
    # The catch-all transcoding route matched but no http rule did: an unknown path.
    return canonical if canonical and "{path" not in canonical else UNMATCHED_ROUTE


@contextmanager
def observe_request(request: web.Request) -> Iterator[RequestObservation]:
    """Span + metrics around one REST request (the span is current inside the block)."""
    method = request.method if request.method in _METHODS else "OTHER"
    parent = extract({k.lower(): v for k, v in request.headers.items()})
    with tracer().start_as_current_span(
        f"HTTP {method}",
        context=parent,
        kind=SpanKind.SERVER,
        attributes={"http.request.method": method},
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        observation = RequestObservation(request, span, time.perf_counter())
        try:
            yield observation
        finally:
            route = route_of(request)
            status = observation.status
            span.update_name(f"{method} {route}")
            span.set_attribute("http.route", route)
            span.set_attribute("http.response.status_code", status)
            rpc = request.get(RPC_KEY)
            if rpc:
                span.set_attribute("rpc.method", rpc)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            HTTP_REQUESTS.labels(route, method, str(status)).inc()
            HTTP_REQUEST_DURATION.labels(route, method).observe(
                time.perf_counter() - observation.started
            )


def configure_process(settings: Settings) -> None:
    """Process-wide set-up of `python -m gateway`: OTLP export and the metrics endpoint.

    Both are off unless configured: tracing needs ``OTEL_EXPORTER_OTLP_ENDPOINT``, and the
    metrics port is only non-zero for settings read with the gateway's service name
    (``AZORA_METRICS_PORT_GATEWAY``, 9104), so in-process tests never bind it.
    """
    if settings.otel_endpoint:
        configure_tracing(
            service="gateway", version=settings.version, otlp_endpoint=settings.otel_endpoint
        )
    start_exposition(settings.metrics_host, settings.metrics_port)


def upstream_metadata(metadata: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Metadata for the upstream call, carrying the current span's trace context."""
    return outgoing_metadata(metadata)


__all__ = [
    "RequestObservation",
    "configure_process",
    "observe_request",
    "route_of",
    "upstream_metadata",
]
