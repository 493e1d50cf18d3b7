"""Structured logs: JSON lines with trace ids while a span is active; LOG_LEVEL honoured."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from services.core.logs import configure_logging
from services.core.settings import Settings
from services.core.tracing import set_provider, tracer


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure_logging replaces the root handlers: put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    noisy = {name: logging.getLogger(name).level for name in ("pymongo", "asyncio", "grpc")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, previous in noisy.items():
        logging.getLogger(name).setLevel(previous)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


# LOG_LEVEL=warn drops info lines and keeps warnings; LOG_LEVEL=debug keeps debug lines.
@pytest.mark.usefixtures("restore_logging")
def test_log_level_is_honoured() -> None:
    stream = io.StringIO()
    settings = Settings.from_env({"LOG_LEVEL": "warn"}, service_name="svc")
    configure_logging(service=settings.service_name, level=settings.log_level, stream=stream)
    log = logging.getLogger("azora.test")
    log.info("quiet")
    log.warning("loud")
    assert [line["msg"] for line in lines(stream)] == ["loud"]
    stream = io.StringIO()
    settings = Settings.from_env({"LOG_LEVEL": "debug"}, service_name="svc")
    configure_logging(service=settings.service_name, level=settings.log_level, stream=stream)
    log.debug("detail")
    assert [line["msg"] for line in lines(stream)] == ["detail"]


# Every line is JSON with ts, level and service; trace_id/span_id appear only inside a span.
@pytest.mark.usefixtures("restore_logging")
def test_lines_carry_trace_id_inside_a_span() -> None:
    stream = io.StringIO()
    configure_logging(service="svc", level="info", stream=stream)
    log = logging.getLogger("azora.test")
    provider = TracerProvider()
    set_provider(provider)
    try:
        log.info("outside")
        with tracer().start_as_current_span("work") as span:
            log.info("inside")
        trace_id = format(span.get_span_context().trace_id, "032x")
    finally:
        set_provider(trace.NoOpTracerProvider())
        provider.shutdown()
    outside, inside = lines(stream)
    for line in (outside, inside):
        assert {"ts", "level", "service", "msg"} <= line.keys()
        assert line["service"] == "svc"
    assert "trace_id" not in outside
    assert inside["trace_id"] == trace_id
    assert len(str(inside["span_id"])) == 16
