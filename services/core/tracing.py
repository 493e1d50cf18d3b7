"""OpenTelemetry tracing: one tracer provider per process, W3C trace context over gRPC metadata.

`configure_tracing` is called once by each process entry point. With
``OTEL_EXPORTER_OTLP_ENDPOINT`` set, spans are batched to ``<endpoint>/v1/traces`` over
OTLP/HTTP; otherwise the provider is OpenTelemetry's no-op one and tracing costs next to
nothing (incoming trace context is still passed on, so a traced caller keeps one trace).

Spans made here: a SERVER span per azora rpc (`server_span`, used by the interceptor), a
CLIENT span per outgoing rpc (`TracingClientInterceptor`), one per MongoDB command
(`services.core.mongo`), one per DNS lookup (`services.core.dns`) and one per REST request
(`gateway.observability`). Attributes never carry secrets or message contents.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

INSTRUMENTATION = "azora"
_PROPAGATOR = TraceContextTextMapPropagator()
_provider: trace.TracerProvider = trace.NoOpTracerProvider()


def configure_tracing(*, service: str, version: str, otlp_endpoint: str) -> None:
    """Install the process's tracer provider: OTLP/HTTP when an endpoint is set, else no-op."""
    if not otlp_endpoint:
        set_provider(trace.NoOpTracerProvider())
        return
    # Imported here so a process without an endpoint never loads the exporter.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(
        resource=Resource.create({"service.name": service, "service.version": version})
    )
    exporter = OTLPSpanExporter(endpoint=otlp_endpoint.rstrip("/") + "/v1/traces")
    provider.add_span_processor(BatchSpanProcessor(exporter))
    set_provider(provider)
    log.info("tracing to OTLP", extra={"fields": {"endpoint": otlp_endpoint}})


def set_provider(provider: trace.TracerProvider) -> None:
    """Use `provider` for every span of this process (tests install an in-memory one)."""
    global _provider
    _provider = provider


def tracer() -> trace.Tracer:
    """The suite's tracer from the current provider."""
    return _provider.get_tracer(INSTRUMENTATION)


def extract(carrier: Mapping[str, str]) -> otel_context.Context:
    """The trace context a caller sent (``traceparent``/``tracestate``), as a parent context."""
    return _PROPAGATOR.extract(carrier=dict(carrier))


def inject(carrier: MutableMapping[str, str]) -> None:
    """Write the current trace context into `carrier` (``traceparent``/``tracestate``)."""
    _PROPAGATOR.inject(carrier)


def outgoing_metadata(metadata: Sequence[tuple[str, str]] | None) -> list[tuple[str, str]]:
    """`metadata` with any trace headers replaced by the current context's."""
    carrier: dict[str, str] = {}
    inject(carrier)
    kept = [(k, v) for k, v in (metadata or ()) if k.lower() not in ("traceparent", "tracestate")]
    return [*kept, *carrier.items()]


def _split_method(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return service, name


@contextmanager
def server_span(method: str, incoming: Mapping[str, str]) -> Iterator[Span]:
    """A SERVER span for an incoming rpc, child of the caller's trace context (if any)."""
    service, name = _split_method(method)
    with tracer().start_as_current_span(
        method.lstrip("/"),
        context=extract(incoming),
        kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        yield span


def trace_carrier() -> dict[str, str]:
    """The current trace context as ``{"traceparent": ..., "tracestate": ...}`` (maybe empty).

    For work that continues later in another task or process (an email stored now and
    delivered by a worker): store this with the work and pass it to `delivery_span`.
    """
    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier


@contextmanager
def delivery_span(
    *, email_id: str, domain: str, attempt: int, carrier: Mapping[str, str] | None = None
) -> Iterator[Span]:
    """A CLIENT span for one SMTP delivery attempt, in the trace of `carrier` when given.

    Attributes: ``azora.email.id``, ``azora.email.domain`` (the sender domain) and
    ``azora.delivery.attempt``; the caller adds ``smtp.reply_code`` and ``azora.delivery.outcome``
    (sent, deferred, bounced, failed). Never addresses, message contents or credentials.
    """
    with tracer().start_as_current_span(
        "smtp deliver",
        context=extract(carrier) if carrier else None,
        kind=SpanKind.CLIENT,
        attributes={
            "azora.email.id": email_id,
            "azora.email.domain": domain,
            "azora.delivery.attempt": attempt,
        },
    ) as span:
        yield span


def set_rpc_code(span: Span, code: grpc.StatusCode) -> None:
    """Record the gRPC status code on a span; server-side errors mark the span as failed."""
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code in _SERVER_FAULTS:
        span.set_status(Status(StatusCode.ERROR, code.name))


# Codes that mean the server failed (OTel's rule for server spans); client mistakes do not.
_SERVER_FAULTS = {
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DATA_LOSS,
}


class TracingClientInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """A CLIENT span per outgoing unary rpc, with its context sent as ``traceparent``.

    Put it on every channel a service opens to another service::

        grpc.aio.insecure_channel(target, interceptors=[TracingClientInterceptor()])

    or use `traced_channel`.
    """

    async def intercept_unary_unary(
        self,
        continuation: Any,
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        """Start the span, inject its context, make the call and record the status code."""
        raw: Any = client_call_details.method
        method = raw.decode() if isinstance(raw, bytes) else str(raw)
        service, name = _split_method(method)
        span = tracer().start_span(
            method.lstrip("/"),
            kind=SpanKind.CLIENT,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        )
        carrier: dict[str, str] = {}
        with trace.use_span(span, end_on_exit=False):
            inject(carrier)
        sent: Any = client_call_details.metadata or ()
        kept = [(k, v) for k, v in sent if str(k).lower() not in ("traceparent", "tracestate")]
        details = grpc.aio.ClientCallDetails(
            client_call_details.method,
            client_call_details.timeout,
            grpc.aio.Metadata(*kept, *carrier.items()),
            client_call_details.credentials,
            client_call_details.wait_for_ready,
        )
        try:
            call = await continuation(details, request)
            try:
                await call
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
            set_rpc_code(span, code)
            return call
        finally:
            span.end()


def traced_channel(target: str, **kwargs: Any) -> grpc.aio.Channel:
    """`grpc.aio.insecure_channel` with `TracingClientInterceptor` added."""
    interceptors = [*kwargs.pop("interceptors", ()), TracingClientInterceptor()]
    return grpc.aio.insecure_channel(target, interceptors=interceptors, **kwargs)


__all__ = [
    "TracingClientInterceptor",
    "configure_tracing",
    "delivery_span",
    "extract",
    "inject",
    "outgoing_metadata",
    "server_span",
    "set_provider",
    "set_rpc_code",
    "traced_channel",
    "trace_carrier",
    "tracer",
]
