"""gRPC servicer of azora.mail.v1.WebhookService: translates, calls the manager, translates.

`webhook_registrar` is what the mail service's composition root adds to its server; the
collections' indexes are `WEBHOOK_INDEXES` (created at start-up with the mail service's).
"""

from __future__ import annotations

from typing import Any

import grpc
from azora.mail.v1 import webhooks_pb2, webhooks_pb2_grpc
from google.protobuf import empty_pb2
from pymongo.asynchronous.database import AsyncDatabase

from services.core.clock import Clock
from services.core.context import current_principal
from services.core.mongo import Document
from services.core.netguard import host_resolver
from services.core.protobuf import to_timestamp
from services.core.secrets_box import SecretsBox
from services.core.server import Registrar
from services.mail.feedback.webhook_manager import (
    WebhookInput,
    WebhookManager,
    WebhookSecrets,
)
from services.mail.feedback.webhook_models import Attempt, Delivery, DeliveryState, Webhook
from services.mail.feedback.webhook_store import WEBHOOK_INDEXES, WebhookStore
from services.mail.feedback.webhook_transport import WebhookTransport, address_policy
from services.mail.settings import MailSettings

Context = grpc.aio.ServicerContext[Any, Any]
_STATES = {
    DeliveryState.PENDING: webhooks_pb2.WEBHOOK_DELIVERY_STATE_PENDING,
    DeliveryState.SUCCEEDED: webhooks_pb2.WEBHOOK_DELIVERY_STATE_SUCCEEDED,
    DeliveryState.FAILED: webhooks_pb2.WEBHOOK_DELIVERY_STATE_FAILED,
}


def webhook_to_proto(webhook: Webhook, *, now: Any) -> webhooks_pb2.Webhook:
    """The API form of an endpoint; the secret only when the manager just made it."""
    return webhooks_pb2.Webhook(
        id=webhook.id,
        url=webhook.url,
        event_types=webhook.event_types,
        domains=webhook.domains,
        enabled=webhook.enabled,
        description=webhook.description,
        disabled_reason=webhook.disabled_reason,
        failing_since=to_timestamp(webhook.failing_since),
        secret=webhook.secret,
        previous_secret_expire_time=to_timestamp(webhook.previous_secret_expire_time(now)),
        create_time=to_timestamp(webhook.create_time),
        update_time=to_timestamp(webhook.update_time),
    )


def attempt_to_proto(attempt: Attempt, delivery_id: str) -> webhooks_pb2.WebhookAttempt:
    """The API form of an attempt."""
    return webhooks_pb2.WebhookAttempt(
        delivery_id=delivery_id,
        attempt_time=to_timestamp(attempt.time),
        status_code=attempt.status_code,
        latency_ms=attempt.latency_ms,
        response_body=attempt.response_body,
        error=attempt.error,
        success=attempt.success,
    )


def delivery_to_proto(delivery: Delivery) -> webhooks_pb2.WebhookDelivery:
    """The API form of a delivery with its attempt log."""
    return webhooks_pb2.WebhookDelivery(
        id=delivery.id,
        webhook_id=delivery.webhook_id,
        event_id=delivery.event_id,
        event_type=delivery.event_type,
        state=_STATES[delivery.state],
        next_attempt_time=to_timestamp(
            delivery.next_attempt_time if delivery.state is DeliveryState.PENDING else None
        ),
        attempts=[attempt_to_proto(a, delivery.id) for a in delivery.attempts],
        create_time=to_timestamp(delivery.create_time),
    )


def _input(
    request: webhooks_pb2.CreateWebhookRequest | webhooks_pb2.UpdateWebhookRequest,
) -> WebhookInput:
    return WebhookInput(
        url=request.url,
        event_types=list(request.event_types),
        domains=list(request.domains),
        enabled=request.enabled if request.HasField("enabled") else None,
        description=request.description,
    )


class WebhookServicer(webhooks_pb2_grpc.WebhookServiceServicer):
    """WebhookService over a `WebhookManager`."""

    def __init__(self, manager: WebhookManager, clock: Clock) -> None:
        self._manager = manager
        self._clock = clock

    async def CreateWebhook(
        self, request: webhooks_pb2.CreateWebhookRequest, context: Context
    ) -> webhooks_pb2.Webhook:
        """See the proto."""
        webhook = await self._manager.create(
            tenant_id=current_principal().tenant_id, data=_input(request)
        )
        return webhook_to_proto(webhook, now=self._clock.now())

    async def ListWebhooks(
        self, request: webhooks_pb2.ListWebhooksRequest, context: Context
    ) -> webhooks_pb2.ListWebhooksResponse:
        """See the proto."""
        page = await self._manager.list(
            tenant_id=current_principal().tenant_id,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        now = self._clock.now()
        return webhooks_pb2.ListWebhooksResponse(
            webhooks=[webhook_to_proto(w, now=now) for w in page.items],
            next_page_token=page.next_page_token,
        )

    async def GetWebhook(
        self, request: webhooks_pb2.GetWebhookRequest, context: Context
    ) -> webhooks_pb2.Webhook:
        """See the proto."""
        webhook = await self._manager.get(
            tenant_id=current_principal().tenant_id, webhook_id=request.id
        )
        return webhook_to_proto(webhook, now=self._clock.now())

    async def UpdateWebhook(
        self, request: webhooks_pb2.UpdateWebhookRequest, context: Context
    ) -> webhooks_pb2.Webhook:
        """See the proto."""
        webhook = await self._manager.update(
            tenant_id=current_principal().tenant_id, webhook_id=request.id, data=_input(request)
        )
        return webhook_to_proto(webhook, now=self._clock.now())

    async def DeleteWebhook(
        self, request: webhooks_pb2.DeleteWebhookRequest, context: Context
    ) -> empty_pb2.Empty:
        """See the proto."""
        await self._manager.delete(tenant_id=current_principal().tenant_id, webhook_id=request.id)
        return empty_pb2.Empty()

    async def TestWebhook(
        self, request: webhooks_pb2.TestWebhookRequest, context: Context
    ) -> webhooks_pb2.WebhookAttempt:
        """See the proto."""
        delivery, attempt = await self._manager.test(
            tenant_id=current_principal().tenant_id, webhook_id=request.id
        )
        return attempt_to_proto(attempt, delivery.id)

    async def RotateWebhookSecret(
        self, request: webhooks_pb2.RotateWebhookSecretRequest, context: Context
    ) -> webhooks_pb2.Webhook:
        """See the proto."""
        webhook = await self._manager.rotate_secret(
            tenant_id=current_principal().tenant_id, webhook_id=request.id
        )
        return webhook_to_proto(webhook, now=self._clock.now())

    async def ListWebhookDeliveries(
        self, request: webhooks_pb2.ListWebhookDeliveriesRequest, context: Context
    ) -> webhooks_pb2.ListWebhookDeliveriesResponse:
        """See the proto."""
        page = await self._manager.list_deliveries(
            tenant_id=current_principal().tenant_id,
            webhook_id=request.id,
            state=request.state,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return webhooks_pb2.ListWebhookDeliveriesResponse(
            deliveries=[delivery_to_proto(d) for d in page.items],
            next_page_token=page.next_page_token,
        )

    async def ReplayWebhookDelivery(
        self, request: webhooks_pb2.ReplayWebhookDeliveryRequest, context: Context
    ) -> webhooks_pb2.WebhookDelivery:
        """See the proto."""
        delivery = await self._manager.replay(
            tenant_id=current_principal().tenant_id,
            webhook_id=request.id,
            delivery_id=request.delivery_id,
        )
        return delivery_to_proto(delivery)


def webhook_manager(
    settings: MailSettings, db: AsyncDatabase[Document], clock: Clock, *, pooled: bool
) -> tuple[WebhookManager, WebhookTransport]:
    """The manager over a database, with its transport (close it when `pooled`)."""
    hooks = settings.webhooks
    transport = WebhookTransport(
        resolver=host_resolver(settings),
        policy=address_policy(hooks),
        timeout=hooks.timeout,
        pooled=pooled,
    )
    manager = WebhookManager(
        store=WebhookStore(db),
        secrets=WebhookSecrets(SecretsBox.from_settings(settings)),
        transport=transport,
        clock=clock,
        settings=hooks,
        default_page_size=settings.default_page_size,
        max_page_size=settings.max_page_size,
    )
    return manager, transport


def webhook_registrar(
    settings: MailSettings, db: AsyncDatabase[Document], clock: Clock
) -> Registrar:
    """Adds WebhookService to a server (the API process sends only test events itself)."""
    manager, _ = webhook_manager(settings, db, clock, pooled=False)
    servicer = WebhookServicer(manager, clock)
    return lambda server: webhooks_pb2_grpc.add_WebhookServiceServicer_to_server(servicer, server)


WEBHOOK_SERVICE = webhooks_pb2.DESCRIPTOR.services_by_name["WebhookService"].full_name

__all__ = [
    "WEBHOOK_INDEXES",
    "WEBHOOK_SERVICE",
    "WebhookServicer",
    "delivery_to_proto",
    "webhook_manager",
    "webhook_registrar",
    "webhook_to_proto",
]
