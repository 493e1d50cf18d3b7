"""Small protobuf conversions shared by every service's mapping module."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor

# One step of a field path: a name, then any number of [index] or [key] parts.
_PATH_STEP = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)((?:\[[^\]]*\])*)")


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def to_timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """A protobuf Timestamp for an aware datetime (None stays None, i.e. the field is unset).

    The same value as ``Timestamp.FromDatetime`` (seconds floored, nanos from the
    microseconds), computed with datetime arithmetic: 0.6 against 1.6 microseconds, and a page
    of 20 emails converts about 130 of them.
    """
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.astimezone(UTC)  # a naive value is local time, as astimezone reads it
    seconds, micros = divmod((value - _EPOCH) // _MICROSECOND, 1_000_000)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=micros * 1000)


def from_timestamp(value: timestamp_pb2.Timestamp) -> datetime:
    """An aware UTC datetime from a Timestamp."""
    return value.ToDatetime(tzinfo=UTC)


def to_duration(value: timedelta | float) -> duration_pb2.Duration:
    """A protobuf Duration from a timedelta or seconds."""
    duration = duration_pb2.Duration()
    if isinstance(value, timedelta):
        duration.FromTimedelta(value)
    else:
        duration.FromNanoseconds(round(value * 1e9))
    return duration


def json_field_path(message: Descriptor, path: str) -> str:
    """A field path of `message` in JSON names (``from_address`` -> ``from``).

    ``attachments[0].content_type`` becomes ``attachments[0].contentType``. Steps already in
    JSON spelling stay as they are; from the first step that names no field (or a path that is
    no field path, such as ``body``) the rest is returned unchanged.
    """
    steps: list[tuple[str, str]] = []
    position = 0
    while position < len(path):
        found = _PATH_STEP.match(path, position)
        if found is None:
            return path
        steps.append((found.group(1), found.group(2)))
        position = found.end()
        if position < len(path):
            if path[position] != ".":
                return path
            position += 1
    renamed: list[str] = []
    current: Descriptor | None = message
    for index, (name, subscripts) in enumerate(steps):
        field = None
        if current is not None:
            field = current.fields_by_name.get(name) or current.fields_by_camelcase_name.get(name)
        if field is None:
            rest = ".".join(n + s for n, s in steps[index:])
            return ".".join([*renamed, rest])
        renamed.append(field.json_name + subscripts)
        current = _value_message(field)
    return ".".join(renamed)


def _value_message(field: FieldDescriptor) -> Descriptor | None:
    """The message a step into `field` leads to (a map's value type), or None."""
    target = field.message_type
    if target is not None and target.GetOptions().map_entry:
        target = target.fields_by_name["value"].message_type
    return target
