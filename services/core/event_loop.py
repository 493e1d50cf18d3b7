"""The event loop a process runs on, and its garbage collector's settings.

uvloop by default, the standard library's on request; the collector is set before the loop
starts.

Kept apart from `services.core.runtime` so that a process that needs nothing else of the
runtime (the REST gateway) does not import the database and gRPC server machinery just to
start its loop.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

from services.core.settings import Settings

T = TypeVar("T")

# Allocations (minus deallocations) between two young-generation collections; CPython's
# default is 700. A busy service allocates and frees many short-lived objects per request
# (protobuf messages, BSON documents, futures); collecting every 700 of them ran the collector
# thousands of times a second under load, and each collection that reaches the old generations
# walks every object the process holds.
_YOUNG_COLLECTION_THRESHOLD = 5000
# How many young (then middle) collections before the next older one (CPython: 10 and 10).
_OLDER_COLLECTION_THRESHOLDS = (10, 10)


def settle_garbage_collector() -> None:
    """Collect what start-up left, then keep the rest out of every later collection.

    Everything alive once the modules are imported (classes, functions, descriptors, the
    settings) lives as long as the process: `gc.freeze` moves it to the permanent generation, so
    that full collections no longer walk it (a full collection of the mail service took 35-75
    ms, a stall of its event loop). Then the thresholds above. Measured on the mail benchmark
    (alternated, docs/benchmarks.md): more delivered per second for less CPU per message.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(_YOUNG_COLLECTION_THRESHOLD, *_OLDER_COLLECTION_THRESHOLDS)


def run_event_loop(main: Coroutine[Any, Any, T], settings: Settings) -> T:
    """Run a process's main coroutine on the event loop its settings name (`event_loop`).

    uvloop by default: the mail service's event loop is its busiest part under load, and on
    uvloop the suite delivered 2 % more with 2-4 % less CPU per message (alternated runs,
    docs/benchmarks.md); ``AZORA_EVENT_LOOP=asyncio`` runs the standard library's loop
    instead, same behaviour. The garbage collector is settled first (`settle_garbage_collector`).
    """
    settle_garbage_collector()
    if settings.event_loop == "uvloop":
        return uvloop.run(main)
    return asyncio.run(main)


__all__ = ["run_event_loop", "settle_garbage_collector"]
