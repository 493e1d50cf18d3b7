"""Webhook endpoints, deliveries and attempts: plain dataclasses (no bson, no protobuf).

The event types an endpoint may subscribe to are those of the events collection (the events
contract), plus the endpoint events (``webhook.disabled``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

from services.mail.feedback.event_log import EMAIL_EVENT_TYPES, EVENT_TYPES

# Every type an event can have (the events contract, one list in event_log); an endpoint lists
# some of them, or none for all.
DISABLED_EVENT = "webhook.disabled"
# The type of the event TestWebhook sends (never stored in the events collection).
TEST_EVENT = "webhook.test"
# The type of a received message POSTed by a webhook route (never in the events collection:
# the route names its endpoint, whatever the endpoint's filter). An endpoint subscribed to this
# type alone receives routed mail and no events.
INBOUND_EVENT = "inbound.received"
# What an endpoint's event_types may list.
SUBSCRIBABLE_TYPES = EVENT_TYPES | {INBOUND_EVENT}
# The first bytes of an answer (or error) kept per attempt.
RESPONSE_KEEP = 1024
# Attempts kept per delivery (the newest).
ATTEMPTS_KEPT = 50


class DeliveryState(enum.StrEnum):
    """Where a delivery stands."""

    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class SealedSecret:
    """A signing secret as stored: encrypted, and until when it signs (None: the current one)."""

    sealed: str
    expire_time: datetime | None = None


@dataclass(slots=True)
class Webhook:
    """An endpoint of a tenant."""

    id: str
    tenant_id: str
    url: str
    event_types: list[str]
    domains: list[str]
    enabled: bool
    description: str
    create_time: datetime
    update_time: datetime
    secrets: list[SealedSecret] = field(default_factory=list)
    disabled_reason: str = ""
    failing_since: datetime | None = None
    # The plaintext secret, only right after creation or rotation (never stored, never read).
    secret: str = ""

    def previous_secret_expire_time(self, now: datetime) -> datetime | None:
        """Until when a former secret still signs (the latest such time), if one does."""
        times = [s.expire_time for s in self.secrets if s.expire_time and s.expire_time > now]
        return max(times) if times else None

    def wants(self, *, event_type: str, domain: str | None, occurred: datetime) -> bool:
        """Whether an event of this type and sender domain is sent to this endpoint."""
        if not self.enabled or occurred < self.create_time:
            return False
        if self.event_types and event_type not in self.event_types:
            return False
        # Endpoint events concern no sender domain: a domain filter does not hide them.
        if self.domains and not event_type.startswith("webhook."):
            return domain is not None and domain.lower() in self.domains
        return True


@dataclass(frozen=True, slots=True)
class Attempt:
    """One HTTP request of a delivery."""

    time: datetime
    status_code: int
    latency_ms: int
    response_body: str
    error: str

    @property
    def success(self) -> bool:
        """A 2xx answer."""
        return 200 <= self.status_code < 300


@dataclass(slots=True)
class Delivery:
    """One event for one endpoint: the signed body and its attempts."""

    id: str
    tenant_id: str
    webhook_id: str
    event_id: str
    event_type: str
    body: str
    state: DeliveryState
    create_time: datetime
    next_attempt_time: datetime | None = None
    attempts: list[Attempt] = field(default_factory=list)
    # Failed attempts since the delivery was (re)queued: the position in the retry schedule.
    retries: int = 0
    # The number of the next lease claim (see webhook_store).
    claims: int = 0
    # When the event occurred (what the lag metric measures from).
    occurred_time: datetime | None = None


def delivery_id(event_id: str, webhook_id: str) -> str:
    """The one delivery of an event to an endpoint: a second fan-out finds it taken."""
    return f"{event_id}:{webhook_id}"


__all__ = [
    "ATTEMPTS_KEPT",
    "DISABLED_EVENT",
    "EMAIL_EVENT_TYPES",
    "EVENT_TYPES",
    "INBOUND_EVENT",
    "RESPONSE_KEEP",
    "SUBSCRIBABLE_TYPES",
    "TEST_EVENT",
    "Attempt",
    "Delivery",
    "DeliveryState",
    "SealedSecret",
    "Webhook",
    "delivery_id",
]
