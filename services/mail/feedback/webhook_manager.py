"""Use cases of the webhook API: endpoints, secrets, the delivery log, test and replay.

Validation names the request field that is wrong (INVALID_ARGUMENT); another tenant's endpoint
is NOT_FOUND exactly like one that does not exist. Secrets are generated here, returned once
(in the Webhook of CreateWebhook and RotateWebhookSecret) and stored sealed.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Generic, TypeVar

from yarl import URL

from services.core.clock import Clock, SystemClock
from services.core.dns_names import normalize_domain_name
from services.core.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PreconditionViolation,
)
from services.core.ids import check_id, decode_page_token, encode_page_token, new_id, new_ulid
from services.core.ids import page_size as clamp_page_size
from services.core.netguard import classify
from services.core.secrets_box import SecretsBox
from services.mail.feedback.webhook_models import (
    SUBSCRIBABLE_TYPES,
    TEST_EVENT,
    Attempt,
    Delivery,
    DeliveryState,
    SealedSecret,
    Webhook,
    delivery_id,
)
from services.mail.feedback.webhook_signing import (
    body_of,
    new_secret,
    rfc3339,
    signed_headers,
)
from services.mail.feedback.webhook_store import WebhookStore
from services.mail.feedback.webhook_transport import WebhookTransport
from services.mail.settings import WebhookSettings

MAX_URL_LENGTH = 2048
MAX_DESCRIPTION = 500
MAX_DOMAINS = 100
# Endpoints per tenant: every event is matched against all of its tenant's endpoints.
MAX_WEBHOOKS_PER_TENANT = 20


@dataclass(frozen=True, slots=True)
class WebhookInput:
    """What a create or update request says about an endpoint."""

    url: str
    event_types: list[str]
    domains: list[str]
    enabled: bool | None
    description: str


_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Page(Generic[_T]):
    """One page of a listing."""

    items: list[_T]
    next_page_token: str


def secret_context(webhook_id: str) -> bytes:
    """Associated data of an endpoint's sealed secrets (a sealed value moved elsewhere fails)."""
    return f"webhook-secret:{webhook_id}".encode()


class WebhookSecrets:
    """Seals new secrets and opens the active ones of an endpoint."""

    def __init__(self, box: SecretsBox) -> None:
        self._box = box

    def seal(self, webhook_id: str, secret: str) -> str:
        """The stored form of a secret."""
        return self._box.seal(secret.encode(), context=secret_context(webhook_id))

    def active(self, webhook: Webhook, now: datetime) -> list[str]:
        """The secrets that sign now: the current one first, then unexpired former ones."""
        return [
            self._box.open(s.sealed, context=secret_context(webhook.id)).decode()
            for s in webhook.secrets
            if s.expire_time is None or s.expire_time > now
        ]


def check_input(data: WebhookInput, settings: WebhookSettings) -> WebhookInput:
    """The request's endpoint settings, validated; domains in their A-label form.

    Raises:
        InvalidArgument: naming every wrong field (``url``, ``event_types[i]``, ...).
    """
    violations: list[FieldViolation] = []
    url_problem = _url_problem(data.url, settings)
    if url_problem:
        violations.append(FieldViolation("url", url_problem))
    seen: set[str] = set()
    for index, value in enumerate(data.event_types):
        if value not in SUBSCRIBABLE_TYPES:
            known = ", ".join(sorted(SUBSCRIBABLE_TYPES))
            violations.append(
                FieldViolation(f"event_types[{index}]", f"unknown event type {value!r} ({known})")
            )
        elif value in seen:
            violations.append(FieldViolation(f"event_types[{index}]", f"{value!r} is repeated"))
        seen.add(value)
    domains: list[str] = []
    if len(data.domains) > MAX_DOMAINS:
        violations.append(FieldViolation("domains", f"at most {MAX_DOMAINS} domains"))
    for index, value in enumerate(data.domains[:MAX_DOMAINS]):
        try:
            name, _ = normalize_domain_name(value, field=f"domains[{index}]")
        except InvalidArgument as exc:
            violations.extend(exc.violations)
            continue
        if name in domains:
            violations.append(FieldViolation(f"domains[{index}]", f"{value!r} is repeated"))
        domains.append(name)
    if len(data.description) > MAX_DESCRIPTION:
        violations.append(FieldViolation("description", f"at most {MAX_DESCRIPTION} characters"))
    if violations:
        raise InvalidArgument(violations)
    return replace(data, domains=domains)


def _url_problem(raw: str, settings: WebhookSettings) -> str:
    """Why `raw` cannot be an endpoint URL, or "" when it can."""
    if not raw.strip():
        return "required"
    if len(raw) > MAX_URL_LENGTH:
        return f"at most {MAX_URL_LENGTH} characters"
    if raw != raw.strip() or any(c.isspace() or ord(c) < 32 for c in raw):
        return "must not contain spaces or control characters"
    try:
        url = URL(raw)
        port = url.port
    except ValueError:
        return "not a valid URL"
    schemes = ("https", "http") if settings.allow_http else ("https",)
    if url.scheme not in schemes:
        return "must be an https URL" if not settings.allow_http else "must be an http(s) URL"
    if not url.host:
        return "must name a host"
    if url.user or url.password:
        return "must not carry credentials (user:password@)"
    if url.fragment:
        return "must not have a fragment (#...)"
    if port is None or not 0 < port < 65536:
        return "has an invalid port"
    if not settings.allow_private_hosts:
        host = url.host.strip("[]")
        try:
            reason = classify(ipaddress.ip_address(host))
        except ValueError:
            reason = "a loopback name" if host.rstrip(".").lower().endswith("localhost") else None
        if reason:
            return f"{host} is {reason}; endpoints must be public hosts"
    return ""


class WebhookManager:
    """The webhook API's use cases."""

    def __init__(
        self,
        *,
        store: WebhookStore,
        secrets: WebhookSecrets,
        transport: WebhookTransport,
        clock: Clock,
        settings: WebhookSettings,
        default_page_size: int,
        max_page_size: int,
    ) -> None:
        self._store = store
        self._secrets = secrets
        self._transport = transport
        self._clock = clock
        self._settings = settings
        self._default_page_size = default_page_size
        self._max_page_size = max_page_size

    async def create(self, *, tenant_id: str, data: WebhookInput) -> Webhook:
        """Create an endpoint with a new secret (in the answer, once)."""
        data = check_input(data, self._settings)
        if await self._store.count_webhooks(tenant_id=tenant_id) >= MAX_WEBHOOKS_PER_TENANT:
            raise FailedPrecondition(
                f"a tenant has at most {MAX_WEBHOOKS_PER_TENANT} webhook endpoints; "
                "delete one first",
                reason="TOO_MANY_WEBHOOKS",
                violations=[
                    PreconditionViolation(
                        "WEBHOOK_LIMIT", "webhooks", f"at most {MAX_WEBHOOKS_PER_TENANT}"
                    )
                ],
            )
        now = self._clock.now()
        webhook_id = new_id()
        secret = new_secret()
        webhook = Webhook(
            id=webhook_id,
            tenant_id=tenant_id,
            url=data.url,
            event_types=data.event_types,
            domains=data.domains,
            enabled=True if data.enabled is None else data.enabled,
            description=data.description,
            create_time=now,
            update_time=now,
            secrets=[SealedSecret(self._secrets.seal(webhook_id, secret))],
        )
        await self._store.insert_webhook(webhook)
        webhook.secret = secret
        return webhook

    async def get(self, *, tenant_id: str, webhook_id: str) -> Webhook:
        """The tenant's endpoint.

        Raises:
            NotFound: no such endpoint in the tenant (WEBHOOK_NOT_FOUND).
        """
        check_id(webhook_id)
        webhook = await self._store.get_webhook(webhook_id=webhook_id, tenant_id=tenant_id)
        if webhook is None:
            raise NotFound("Webhook", webhook_id)
        return webhook

    async def list(self, *, tenant_id: str, page_size: int, page_token: str) -> Page[Webhook]:
        """A page of the tenant's endpoints, oldest first."""
        size = clamp_page_size(
            page_size, default=self._default_page_size, maximum=self._max_page_size
        )
        after = decode_page_token(page_token, {"list": "webhooks"})
        found = await self._store.list_webhooks(tenant_id=tenant_id, after=after, limit=size + 1)
        token = (
            encode_page_token(found[size - 1].id, {"list": "webhooks"}) if len(found) > size else ""
        )
        return Page(found[:size], token)

    async def update(self, *, tenant_id: str, webhook_id: str, data: WebhookInput) -> Webhook:
        """Replace an endpoint's settings (enabling it clears the automatic-disable state)."""
        webhook = await self.get(tenant_id=tenant_id, webhook_id=webhook_id)
        data = check_input(data, self._settings)
        webhook.url = data.url
        webhook.event_types = data.event_types
        webhook.domains = data.domains
        webhook.description = data.description
        if data.enabled is not None:
            if data.enabled and not webhook.enabled:
                webhook.disabled_reason = ""
                webhook.failing_since = None
            webhook.enabled = data.enabled
        webhook.update_time = self._clock.now()
        if not await self._store.save_webhook(webhook):
            raise NotFound("Webhook", webhook_id)
        return webhook

    async def delete(self, *, tenant_id: str, webhook_id: str) -> None:
        """Delete an endpoint and its delivery log."""
        check_id(webhook_id)
        if not await self._store.delete_webhook(webhook_id=webhook_id, tenant_id=tenant_id):
            raise NotFound("Webhook", webhook_id)

    async def rotate_secret(self, *, tenant_id: str, webhook_id: str) -> Webhook:
        """A new secret (returned once); the former one signs too until the overlap ends."""
        webhook = await self.get(tenant_id=tenant_id, webhook_id=webhook_id)
        now = self._clock.now()
        overlap_end = now + timedelta(seconds=self._settings.secret_overlap)
        former = [
            SealedSecret(s.sealed, s.expire_time or overlap_end)
            for s in webhook.secrets
            if s.expire_time is None or s.expire_time > now
        ]
        secret = new_secret()
        webhook.secrets = [SealedSecret(self._secrets.seal(webhook.id, secret)), *former]
        webhook.update_time = now
        if not await self._store.save_webhook(webhook):
            raise NotFound("Webhook", webhook_id)
        webhook.secret = secret
        return webhook

    async def test(self, *, tenant_id: str, webhook_id: str) -> tuple[Delivery, Attempt]:
        """Send a signed ``webhook.test`` event now, once; recorded in the delivery log."""
        webhook = await self.get(tenant_id=tenant_id, webhook_id=webhook_id)
        now = self._clock.now()
        event_id = f"evt_{new_ulid(now)}"
        payload = {
            "id": event_id,
            "type": TEST_EVENT,
            "occurredAt": rfc3339(now),
            "tenantId": tenant_id,
            "webhookId": webhook.id,
        }
        body = body_of(payload)
        # Receivers compare webhook-timestamp with their own clock: the real time.
        headers = signed_headers(
            secrets=self._secrets.active(webhook, now),
            message_id=event_id,
            at=SystemClock().now(),
            body=body,
        )
        attempt = await self._transport.post(url=webhook.url, headers=headers, body=body, at=now)
        delivery = Delivery(
            id=delivery_id(event_id, webhook.id),
            tenant_id=tenant_id,
            webhook_id=webhook.id,
            event_id=event_id,
            event_type=TEST_EVENT,
            body=body,
            state=DeliveryState.SUCCEEDED if attempt.success else DeliveryState.FAILED,
            create_time=now,
            attempts=[attempt],
        )
        await self._store.insert_delivery(delivery)
        return delivery, attempt

    async def list_deliveries(
        self,
        *,
        tenant_id: str,
        webhook_id: str,
        state: str,
        page_size: int,
        page_token: str,
    ) -> Page[Delivery]:
        """A page of an endpoint's deliveries, newest event first."""
        webhook = await self.get(tenant_id=tenant_id, webhook_id=webhook_id)
        wanted: DeliveryState | None = None
        if state:
            try:
                wanted = DeliveryState(state.lower())
            except ValueError:
                choices = ", ".join(s.value for s in DeliveryState)
                raise InvalidArgument.single("state", f"must be one of {choices}") from None
        size = clamp_page_size(
            page_size, default=self._default_page_size, maximum=self._max_page_size
        )
        query = {"webhook": webhook.id, "state": state}
        before = decode_page_token(page_token, query)
        found = await self._store.list_deliveries(
            webhook_id=webhook.id, state=wanted, before=before, limit=size + 1
        )
        token = encode_page_token(found[size - 1].id, query) if len(found) > size else ""
        return Page(found[:size], token)

    async def replay(self, *, tenant_id: str, webhook_id: str, delivery_id: str) -> Delivery:
        """Queue a delivery again, due now, from the start of the retry schedule.

        Raises:
            NotFound: no such endpoint or delivery.
            FailedPrecondition: the endpoint is disabled (WEBHOOK_DISABLED).
        """
        webhook = await self.get(tenant_id=tenant_id, webhook_id=webhook_id)
        delivery = await self._store.get_delivery(webhook_id=webhook.id, delivery_id=delivery_id)
        if delivery is None:
            raise NotFound("WebhookDelivery", delivery_id)
        if not webhook.enabled:
            raise FailedPrecondition(
                "the endpoint is disabled; enable it before replaying deliveries",
                reason="WEBHOOK_DISABLED",
                metadata={"webhookId": webhook.id},
            )
        requeued = await self._store.requeue(delivery_id=delivery.id, now=self._clock.now())
        if requeued is None:
            raise NotFound("WebhookDelivery", delivery_id)
        return requeued


__all__ = [
    "Page",
    "WebhookInput",
    "WebhookManager",
    "WebhookSecrets",
    "check_input",
    "secret_context",
]
