"""Whether a webhook route's endpoint exists: asked of the mail service, which owns endpoints.

A route with the ``webhook`` action names one of the tenant's webhook endpoints (the mail
service's ``webhooks`` collection), so the domain service asks ``WebhookService/GetWebhook``
with a service token minted for the route's tenant: another tenant's endpoint is NOT_FOUND
there exactly like a missing one, so a route can never borrow it.
"""

from __future__ import annotations

import enum
from typing import Protocol

import grpc
from azora.mail.v1 import webhooks_pb2, webhooks_pb2_grpc

from services.core.auth import ServiceTokens
from services.core.errors import Unavailable
from services.core.settings import Settings

SERVICE_SUBJECT = "service:domain"


class EndpointState(enum.Enum):
    """What the mail service says of an endpoint id, for one tenant."""

    MISSING = "missing"
    DISABLED = "disabled"
    ENABLED = "enabled"


class WebhookEndpoints(Protocol):
    """Looks up the tenant's webhook endpoints."""

    async def state(self, *, tenant_id: str, webhook_id: str) -> EndpointState:
        """Whether `webhook_id` is an endpoint of the tenant, and enabled.

        Raises:
            Unavailable: the mail service cannot answer right now.
        """
        ...


class GrpcWebhookEndpoints:
    """`WebhookEndpoints` over WebhookService/GetWebhook."""

    def __init__(
        self, channel: grpc.aio.Channel, *, settings: Settings, timeout: float = 5.0
    ) -> None:
        self._stub = webhooks_pb2_grpc.WebhookServiceStub(channel)
        self._tokens = ServiceTokens.from_settings(
            settings, subject=SERVICE_SUBJECT, scopes=["webhooks:read"]
        )
        self._timeout = timeout

    async def state(self, *, tenant_id: str, webhook_id: str) -> EndpointState:
        """See `WebhookEndpoints.state`."""
        try:
            found = await self._stub.GetWebhook(
                webhooks_pb2.GetWebhookRequest(id=webhook_id),
                metadata=self._tokens.metadata(tenant_id),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                return EndpointState.MISSING
            raise Unavailable(
                f"the mail service did not answer whether the webhook endpoint exists "
                f"({exc.code().name})"
            ) from None
        return EndpointState.ENABLED if found.enabled else EndpointState.DISABLED


__all__ = ["EndpointState", "GrpcWebhookEndpoints", "WebhookEndpoints"]
