"""A small time-bounded cache for answers one service gets from another.

Services cache what they ask their peers for a few seconds (domains, API keys, service
tokens) so a busy process does not make a call per request. Bounded in size: when full it is
simply emptied, which is cheap and enough for caches whose entries live seconds.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    """Values kept for `ttl` seconds (monotonic clock); at most `max_entries` of them."""

    def __init__(self, *, ttl: float, max_entries: int = 10_000) -> None:
        self._ttl = ttl
        self._max = max_entries
        self._entries: dict[K, tuple[float, V]] = {}

    def get(self, key: K) -> V | None:
        """The value stored for `key` if it is still fresh, else None."""
        entry = self._entries.get(key)
        if entry is None or entry[0] <= time.monotonic():
            return None
        return entry[1]

    def put(self, key: K, value: V) -> V:
        """Store `value` for the TTL and return it."""
        if len(self._entries) >= self._max:
            self._entries.clear()
        self._entries[key] = (time.monotonic() + self._ttl, value)
        return value

    def forget(self, key: K) -> None:
        """Drop `key` (e.g. after learning the value is gone)."""
        self._entries.pop(key, None)
