"""JSON logging: one object per line with timestamp, level, service, request id and message.

When a span is active (see `services.core.tracing`) the line also carries ``trace_id`` and
``span_id``, so a log line leads to its trace and back.

Configured once per process by `configure_logging`. Extra fields are passed with
``logger.info("...", extra={"fields": {...}})``. Secrets never reach a log call: principals have
a redacting repr and credentials are never put into `fields`.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from datetime import UTC, datetime
from typing import Any, TextIO

from opentelemetry import trace

from services.core.context import principal_var, request_id_var

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        """Render the record with the request context of the task that logged it."""
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            entry["trace_id"] = trace.format_trace_id(span_context.trace_id)
            entry["span_id"] = trace.format_span_id(span_context.span_id)
        principal = principal_var.get()
        if principal is not None:
            entry["tenant_id"] = principal.tenant_id
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = "".join(traceback.format_exception(*record.exc_info))
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(*, service: str, level: str, stream: TextIO | None = None) -> None:
    """Send every log record of the process, as JSON, to `stream` (stderr by default)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS.get(level.lower(), logging.INFO))
    # Driver chatter at INFO would drown our lines; its warnings still come through.
    for noisy in ("pymongo", "asyncio", "grpc"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
