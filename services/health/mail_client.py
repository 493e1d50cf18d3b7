"""The queue and SMTP relay components of the suite health report, asked of the mail service.

The mail service owns the queue and the relays' recorded outcomes, so the report asks it
(`MailService.GetDeliveryHealth`, internal, with a service token) rather than reading its
collections. Both components are optional: a backlog or unreachable relays make the suite
``degraded``, not down — the mail service component itself says whether mail can be accepted.

* ``queue``: DOWN when the oldest due email has waited longer than
  AZORA_HEALTH_QUEUE_MAX_AGE (workers missing or stuck), or when the mail service cannot say.
* ``smtp-relays``: DOWN when relays have recorded attempts and none answered at its last one
  (which points at our side: network or DNS), UP otherwise; the detail counts them. Relay
  names stay out of the report: ``/health`` is unauthenticated and they belong to tenants.
"""

from __future__ import annotations

import time

import grpc
from azora.health.v1 import health_pb2 as suite_pb2
from azora.mail.v1 import mail_pb2, mail_pb2_grpc
from google.protobuf import duration_pb2

from services.core.auth import ServiceTokens
from services.core.protobuf import to_duration
from services.health.settings import HealthSettings

SERVICE_SUBJECT = "service:health"
# The tenant claim of the probe's token; the rpc reports on every tenant.
_SYSTEM_TENANT = "system"
_UP = suite_pb2.COMPONENT_STATUS_UP
_DOWN = suite_pb2.COMPONENT_STATUS_DOWN


class MailDeliveryProbe:
    """Asks the mail service for the queue and relay components."""

    def __init__(self, channel: grpc.aio.Channel, *, settings: HealthSettings) -> None:
        self._stub = mail_pb2_grpc.MailServiceStub(channel)
        self._tokens = ServiceTokens.from_settings(
            settings, subject=SERVICE_SUBJECT, scopes=["emails:read"]
        )
        self._max_age = settings.health_queue_max_age

    async def components(self, *, deadline: float) -> list[suite_pb2.Component]:
        """The ``queue`` and ``smtp-relays`` components (both optional); `deadline` in s."""
        started = time.perf_counter()
        try:
            health = await self._stub.GetDeliveryHealth(
                mail_pb2.GetDeliveryHealthRequest(),
                metadata=self._tokens.metadata(_SYSTEM_TENANT),
                timeout=deadline,
            )
        except grpc.aio.AioRpcError as exc:
            detail = f"mail service did not answer: {exc.code().name}"
            latency = to_duration(time.perf_counter() - started)
            return [
                suite_pb2.Component(
                    name=name, status=_DOWN, required=False, latency=latency, detail=detail
                )
                for name in ("queue", "smtp-relays")
            ]
        latency = to_duration(time.perf_counter() - started)
        return [
            self._queue(health, latency),
            self._relays(health, latency),
        ]

    def _queue(
        self, health: mail_pb2.DeliveryHealth, latency: duration_pb2.Duration
    ) -> suite_pb2.Component:
        age = health.oldest_due_age_seconds
        late = age > self._max_age
        return suite_pb2.Component(
            name="queue",
            status=_DOWN if late else _UP,
            required=False,
            latency=latency,
            detail=f"depth {health.queue_depth}, oldest due {age:.0f} s"
            + (f" (over {self._max_age:.0f} s)" if late else ""),
        )

    @staticmethod
    def _relays(
        health: mail_pb2.DeliveryHealth, latency: duration_pb2.Duration
    ) -> suite_pb2.Component:
        total = len(health.relays)
        unreachable = sum(1 for r in health.relays if not r.reachable)
        failing = sum(1 for r in health.relays if r.last_outcome != "sent")
        down = total > 0 and unreachable == total
        return suite_pb2.Component(
            name="smtp-relays",
            status=_DOWN if down else _UP,
            required=False,
            latency=latency,
            detail=(
                f"{total} relays with recorded attempts; last attempt unreachable: "
                f"{unreachable}, not sent: {failing}"
                if total
                else "no delivery attempts recorded yet"
            ),
        )


__all__ = ["SERVICE_SUBJECT", "MailDeliveryProbe"]
