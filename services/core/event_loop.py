"""The event loop a process runs on: uvloop by default, the standard library's on request.

Kept apart from `services.core.runtime` so that a process that needs nothing else of the
runtime (the REST gateway) does not import the database and gRPC server machinery just to
start its loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

from services.core.settings import Settings

T = TypeVar("T")


def run_event_loop(main: Coroutine[Any, Any, T], settings: Settings) -> T:
    """Run a process's main coroutine on the event loop its settings name (`event_loop`).

    uvloop by default: the mail service's event loop is its busiest part under load, and on
    uvloop the suite delivered 2 % more with 2-4 % less CPU per message (alternated runs,
    docs/benchmarks.md); ``AZORA_EVENT_LOOP=asyncio`` runs the standard library's loop
    instead, same behaviour.
    """
    if settings.event_loop == "uvloop":
        return uvloop.run(main)
    return asyncio.run(main)


__all__ = ["run_event_loop"]
