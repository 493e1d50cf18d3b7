"""services.core.protobuf: timestamps as the protobuf library itself converts them."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone

from google.protobuf import timestamp_pb2

from services.core.protobuf import from_timestamp, to_timestamp


def _library(value: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value.astimezone(UTC))
    return stamp


def test_timestamps_equal_the_librarys_conversion_across_the_whole_range() -> None:
    # to_timestamp computes with datetime arithmetic instead of FromDatetime (faster on pages of
    # emails); both must give the same seconds and nanos, before 1970 (seconds floored, nanos
    # never negative), at the edges of the range and in other time zones.
    rng = random.Random(5)  # noqa: S311 - test data
    span = (datetime(9999, 12, 31, tzinfo=UTC) - datetime(1, 1, 2, tzinfo=UTC)) // timedelta(
        microseconds=1
    )
    values = [
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        datetime(1, 1, 2, tzinfo=UTC),
        datetime(9999, 12, 31, tzinfo=UTC),
        datetime(2026, 12, 5, 15, 0, 0, 123_456, tzinfo=timezone(timedelta(hours=-7))),
    ]
    for _ in range(20_000):
        value = datetime(1, 1, 2, tzinfo=UTC) + timedelta(microseconds=rng.randrange(span))
        offset = timezone(timedelta(minutes=rng.randrange(-720, 721, 15)))
        values.append(value.astimezone(offset) if 2 <= value.year <= 9998 else value)
    for value in values:
        assert to_timestamp(value) == _library(value), value
        assert from_timestamp(_library(value)) == value
    assert to_timestamp(None) is None
