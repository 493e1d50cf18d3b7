"""OTLP export: with OTEL_EXPORTER_OTLP_ENDPOINT set, spans are POSTed to <endpoint>/v1/traces."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.sdk.trace import TracerProvider

from services.core import tracing


@pytest.fixture
async def collector() -> AsyncIterator[tuple[str, list[bytes]]]:
    """A loopback HTTP server standing in for an OTLP/HTTP collector; yields URL and bodies."""
    received: list[bytes] = []

    async def traces(request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        received.append(await request.read())
        return web.Response(
            body=trace_service_pb2.ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}", received
    await runner.cleanup()


# A span made after configure_tracing reaches the collector with the process's service name.
async def test_spans_are_exported_over_otlp_http(collector: tuple[str, list[bytes]]) -> None:
    url, received = collector
    tracing.configure_tracing(service="svc-under-test", version="1.2.3", otlp_endpoint=url)
    provider = tracing._provider
    assert isinstance(provider, TracerProvider)
    try:
        with tracing.tracer().start_as_current_span("exported-span"):
            pass
        # The exporter is synchronous: flush from a thread so this loop can answer it.
        assert await asyncio.to_thread(provider.force_flush, 10_000)
    finally:
        tracing.set_provider(trace.NoOpTracerProvider())
        await asyncio.to_thread(provider.shutdown)
    # Other work of this process (background database pings) may be exported too.
    exported: dict[str, str] = {}
    for body in received:
        request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    exported[span.name] = resource["service.name"]
    assert exported["exported-span"] == "svc-under-test"


# Without an endpoint the provider is the no-op one: spans are not recorded at all.
def test_no_endpoint_means_no_recording() -> None:
    tracing.configure_tracing(service="svc", version="1", otlp_endpoint="")
    with tracing.tracer().start_as_current_span("nothing") as span:
        assert not span.is_recording()
