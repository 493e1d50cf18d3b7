"""Cancellation that a library swallowed, noticed by the loops that must stop on it.

A background loop that logs and retries failures must still end when its task is cancelled.
Some failures are the cancellation itself in disguise: on Python 3.11, `asyncio.timeout` can
turn a cancellation that meets its own expiry into TimeoutError, and PyMongo can turn a
cancelled server selection into "RuntimeError: Lock is not acquired". `raise_if_cancelling`
after such a failure ends the loop as its canceller asked (`Task.cancelling()` stays set until
the task ends or someone uncancels it).
"""

from __future__ import annotations

import asyncio


def raise_if_cancelling() -> None:
    """Raise CancelledError when the current task has been asked to stop.

    Raises:
        asyncio.CancelledError: the current task is being cancelled.
    """
    current = asyncio.current_task()
    if current is not None and current.cancelling():
        raise asyncio.CancelledError


__all__ = ["raise_if_cancelling"]
