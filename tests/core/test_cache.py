"""TtlCache: fresh values are returned, stale ones are not, and the size stays bounded."""

from __future__ import annotations

import time

from services.core.cache import TtlCache


def test_values_expire_after_the_ttl() -> None:
    # A value is served while fresh and forgotten once its TTL has passed.
    cache: TtlCache[str, int] = TtlCache(ttl=0.05)
    assert cache.put("a", 1) == 1
    assert cache.get("a") == 1
    time.sleep(0.06)
    assert cache.get("a") is None


def test_forget_and_size_bound() -> None:
    # forget drops one key; reaching max_entries empties the cache before the new entry.
    cache: TtlCache[int, str] = TtlCache(ttl=60, max_entries=2)
    cache.put(1, "one")
    cache.put(2, "two")
    cache.forget(1)
    assert cache.get(1) is None
    cache.put(3, "three")
    cache.put(4, "four")  # two entries stored: full, so emptied first
    assert cache.get(2) is None
    assert cache.get(3) is None
    assert cache.get(4) == "four"
