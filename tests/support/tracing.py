"""Span capture for tests: an in-memory exporter installed as the tracer provider.

The services of a test run in the test's process, so one exporter sees the spans of every hop,
database commands included (`services/core/mongo.CommandObserver` makes a span per command
issued inside a trace; background loops make none).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.core import tracing


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
