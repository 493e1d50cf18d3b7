"""Fixtures of the observability tests: the REST stack of the gateway tests, span capture.

The suite runs in this process (gateway and services on loopback), so one in-memory span
exporter sees the spans of every hop and one Prometheus registry holds every process's metrics.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from aiohttp import web
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.app import create_app
from services.core import tracing
from services.core.settings import Settings
from tests.gateway.conftest import RestStack, http, rest_base_url, rest_stack
from tests.support import ports

__all__ = ["RestStack", "http", "rest_base_url", "rest_stack"]


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Every span finished during the test, kept in memory; tracing is off again afterwards."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.set_provider(provider)
    yield exporter
    tracing.set_provider(trace.NoOpTracerProvider())
    provider.shutdown()


async def serve_gateway(settings: Settings) -> tuple[web.AppRunner, str]:
    """A gateway for `settings` on a free loopback port; returns its runner and base URL."""
    app = await create_app(settings)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    return ports.closed_port()
