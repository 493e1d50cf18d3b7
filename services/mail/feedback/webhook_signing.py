"""Standard Webhooks signatures: secrets, the signed headers, the JSON body of an event.

Signing uses the `standardwebhooks` package (the specification's reference library), so what
receivers verify with it (or with svix) is by construction what we send. During a secret's
overlap after a rotation each request carries one ``v1,<signature>`` per active secret,
space-separated, which the specification allows: a receiver holding either secret verifies.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from standardwebhooks import Webhook as Signer

from services.mail.feedback.event_log import metadata_of

SECRET_PREFIX = "whsec_"  # noqa: S105 - the specification's prefix, not a secret
_SECRET_BYTES = 32
# The event's fields in the order and spelling of the events API (the events contract).
_EVENT_FIELDS = (
    ("_id", "id"),
    ("type", "type"),
    ("occurredAt", "occurredAt"),
    ("tenantId", "tenantId"),
    ("emailId", "emailId"),
    ("recipient", "recipient"),
    ("domain", "domain"),
    ("tags", "tags"),
    ("metadata", "metadata"),
    ("smtp", "smtp"),
    ("reason", "reason"),
    ("webhookId", "webhookId"),
    # Only on events of test emails (``true``): live events carry no such field.
    ("test", "test"),
)


def new_secret() -> str:
    """A fresh signing secret: ``whsec_`` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(os.urandom(_SECRET_BYTES)).decode()


def rfc3339(value: datetime) -> str:
    """UTC time with milliseconds and a Z (naive values are UTC, as PyMongo returns them)."""
    aware = value if value.tzinfo else value.replace(tzinfo=UTC)
    return aware.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event_json(doc: Mapping[str, Any]) -> dict[str, Any]:
    """An event document of the events collection as the events API shows it."""
    out: dict[str, Any] = {}
    for stored, shown in _EVENT_FIELDS:
        if stored not in doc or doc[stored] is None:
            continue
        value = doc[stored]
        if stored == "metadata":
            value = metadata_of(doc)  # stored as [{k, v}] pairs (keys may hold "$" or ".")
        out[shown] = rfc3339(value) if isinstance(value, datetime) else value
    return out


def body_of(payload: Mapping[str, Any]) -> str:
    """The exact text sent (and signed): compact JSON, UTF-8."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


def signed_headers(
    *, secrets: Sequence[str], message_id: str, at: datetime, body: str
) -> dict[str, str]:
    """The Standard Webhooks headers for one request.

    Args:
        secrets: the active secrets (``whsec_...``), current first.
        message_id: the event id, the same on every attempt and replay (receivers dedupe on it).
        at: the request time (its whole seconds are signed).
        body: the exact body.
    """
    payload = body.encode()
    signatures = " ".join(Signer(s).sign(message_id, at, payload) for s in secrets)
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signatures,
        "content-type": "application/json",
    }


__all__ = [
    "SECRET_PREFIX",
    "body_of",
    "event_json",
    "new_secret",
    "rfc3339",
    "signed_headers",
]
