"""Time as a dependency, so lifecycle rules (expiry, re-checks, grace periods) are testable."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    """Source of the current time."""

    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...


class SystemClock:
    """The real clock, truncated to milliseconds (what BSON dates store)."""

    def now(self) -> datetime:
        """The current UTC time at millisecond precision."""
        current = datetime.now(UTC)
        return current.replace(microsecond=current.microsecond // 1000 * 1000)


class ManualClock:
    """A clock tests move by hand."""

    def __init__(self, start: datetime) -> None:
        self._now = start

    def now(self) -> datetime:
        """The time last set."""
        return self._now

    def advance(self, delta: timedelta) -> None:
        """Move the clock forward."""
        self._now += delta
