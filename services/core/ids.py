"""Identifiers and page tokens shared by the services."""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime

from bson import ObjectId
from ulid import ULID

from services.core.errors import InvalidArgument

_ID_RE = re.compile(r"^[0-9a-f]{24}$")


def new_id() -> str:
    """A new resource id: 24 hex characters, roughly time-ordered (a BSON ObjectId)."""
    return str(ObjectId())


# The earliest time a ULID can carry (its time part is unsigned milliseconds since the epoch).
_ULID_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def new_ulid(at: datetime) -> str:
    """A 26-character ULID whose time part is `at` (to the millisecond), the rest random.

    ULIDs sort as their times do (Crockford base32, most significant first), so a collection
    keyed by them lists newest first with a descending sort on ``_id`` alone. A naive `at` is
    UTC (what the database stores), never the machine's local time.
    """
    return str(ULID.from_datetime(at if at.tzinfo else at.replace(tzinfo=UTC)))


def check_id(value: str, *, field: str = "id") -> str:
    """Validate a resource id from a request.

    Raises:
        InvalidArgument: the value is not an id we could have issued.
    """
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise InvalidArgument.single(field, "must be a resource id (24 lowercase hex characters)")
    return value


def encode_page_token(position: str, query: Mapping[str, str]) -> str:
    """An opaque token for the page after `position`, bound to the query that produced it."""
    raw = json.dumps({"after": position, "q": dict(query)}, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_page_token(token: str, query: Mapping[str, str]) -> str | None:
    """The position a token continues from (None for an empty token).

    Raises:
        InvalidArgument: the token is malformed or was made for a different query.
    """
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        position = data["after"]
        made_for = data["q"]
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise InvalidArgument.single("page_token", "malformed page token") from None
    if not isinstance(position, str) or made_for != dict(query):
        raise InvalidArgument.single("page_token", "the page token belongs to a different query")
    return position


def page_size(requested: int, *, default: int, maximum: int) -> int:
    """Clamp a requested page size: 0 means the default; negative is an error.

    Raises:
        InvalidArgument: the size is negative.
    """
    if requested < 0:
        raise InvalidArgument.single("page_size", "must not be negative")
    if requested == 0:
        return default
    return min(requested, maximum)


def ulid_floor(at: datetime) -> str:
    """The smallest ULID of the millisecond `at`: every ULID made at or after it sorts >= it.

    A naive `at` is UTC. A time before 1970 (which no ULID can carry) floors to the smallest
    ULID there is.
    """
    moment = max(at if at.tzinfo else at.replace(tzinfo=UTC), _ULID_EPOCH)
    return str(ULID.from_datetime(moment))[:10] + "0" * 16


def ulid_time(value: str) -> datetime | None:
    """The millisecond a ULID was made at (its first 10 characters), or None if it is not one."""
    try:
        return ULID.from_str(value[:10].upper() + "0" * 16).datetime
    except ValueError:
        return None
