"""Settings of the mail service, its delivery workers and its webhook dispatcher.

The shared ones (limits of one email, relay egress policy, rate limits) come from
`services.core.settings.Settings`. Webhook delivery's own settings (AZORA_WEBHOOK_*) are a
group of their own, `MailSettings.webhooks`, so the webhook code depends on nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Self

from pydantic import BeforeValidator, Field

from services.core.settings import (
    Environment,
    Port,
    Seconds,
    Settings,
    SettingsModel,
    TenantDays,
    setting,
)


def _seconds_list(value: object) -> object:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


# Comma-separated seconds, at least one, none negative.
SecondsList = Annotated[
    tuple[Annotated[float, Field(ge=0)], ...], BeforeValidator(_seconds_list), Field(min_length=1)
]

# Standard Webhooks' suggested schedule: the waits before attempts 2, 3, ... (over a day).
DEFAULT_WEBHOOK_SCHEDULE = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)


class WebhookSettings(SettingsModel):
    """Webhook endpoints and their dispatcher. Durations are seconds."""

    retry_schedule: SecondsList = setting(
        DEFAULT_WEBHOOK_SCHEDULE,
        "AZORA_WEBHOOK_RETRY_SCHEDULE",
        "waits before each retry of a webhook delivery, comma-separated; after the last one "
        "fails the delivery is FAILED",
        shown="5,300,1800,7200,18000,36000,36000",
    )
    retry_jitter: float = setting(
        0.2,
        "AZORA_WEBHOOK_RETRY_JITTER",
        "random spread of each retry wait, as a fraction of it",
        ge=0,
        le=1,
    )
    timeout: Seconds = setting(
        15.0,
        "AZORA_WEBHOOK_TIMEOUT",
        "how long one webhook request may take (connection, TLS, answer) before it failed",
    )
    secret_overlap: Seconds = setting(
        24 * 3600.0,
        "AZORA_WEBHOOK_SECRET_OVERLAP",
        "how long the previous signing secret keeps signing after a rotation",
    )
    disable_after: Seconds = setting(
        5 * 24 * 3600.0,
        "AZORA_WEBHOOK_DISABLE_AFTER",
        "an endpoint whose every attempt failed for this long is disabled automatically",
    )
    allow_private_hosts: bool = setting(
        True,
        "AZORA_WEBHOOK_ALLOW_PRIVATE_HOSTS",
        "whether endpoints may resolve to loopback, private, link-local or metadata addresses",
        production=False,
        shown="false in production, true otherwise",
    )
    allow_http: bool = setting(
        True,
        "AZORA_WEBHOOK_ALLOW_HTTP",
        "whether plain-http endpoint URLs are accepted",
        production=False,
        shown="false in production, true otherwise",
    )
    lease: Seconds = setting(
        60.0,
        "AZORA_WEBHOOK_LEASE",
        "lease of a delivery a dispatcher claimed (longer than the timeout)",
    )
    poll_interval: Seconds = setting(
        0.5, "AZORA_WEBHOOK_POLL_INTERVAL", "how often an idle dispatcher looks for work"
    )
    lookback: Seconds = setting(
        300.0,
        "AZORA_WEBHOOK_LOOKBACK",
        "how far back the dispatcher's safety-net rescan of the events collection reaches "
        "(begun every half of it); events published out of id order are normally caught "
        "sooner by the re-read of the last few seconds below the newest id; keep it above the "
        "event publisher's longest delay",
    )
    concurrency: int = setting(
        64, "AZORA_WEBHOOK_CONCURRENCY", "webhook requests one dispatcher runs at once", ge=1
    )
    endpoint_concurrency: int = setting(
        4, "AZORA_WEBHOOK_ENDPOINT_CONCURRENCY", "requests at once to one endpoint", ge=1
    )
    delivery_retention_days: float = setting(
        30.0,
        "AZORA_WEBHOOK_DELIVERY_RETENTION_DAYS",
        "days a webhook delivery and its attempt log are kept",
        ge=0,
    )
    dispatcher_health_port: Port = setting(
        50055,
        "AZORA_WEBHOOK_DISPATCHER_HEALTH_PORT",
        "grpc.health.v1 port of the webhook dispatcher (its probes' target)",
    )
    dispatcher_metrics_port: Port = setting(
        9107,
        "AZORA_WEBHOOK_DISPATCHER_METRICS_PORT",
        "the webhook dispatcher's Prometheus scrape port; 0 = off",
    )


class MailSettings(Settings):
    """The mail service's settings: shared ones plus its own. Durations are seconds."""

    mail_schedule_horizon: Seconds = setting(
        30 * 24 * 3600.0, "AZORA_MAIL_SCHEDULE_HORIZON", "how far ahead `sendAt` may be"
    )
    mail_idempotency_ttl: Seconds = setting(
        24 * 3600.0, "AZORA_MAIL_IDEMPOTENCY_TTL", "how long an idempotency key is remembered"
    )
    retention_days: float = setting(
        30.0,
        "AZORA_RETENTION_DAYS",
        "days a finished email (sent, partially sent, bounced, failed, cancelled) is kept after "
        'it finished, with its content and timeline (see "Retention")',
        ge=0,
    )
    retention_tenant_days: TenantDays = setting(
        (),
        "AZORA_RETENTION_TENANT_DAYS",
        "per-tenant exceptions, `tenant-id=days,...` (e.g. `t-42=90,t-7=7`); a malformed entry "
        "stops the process at start",
    )
    test_retention_hours: float = setting(
        24.0,
        "AZORA_TEST_RETENTION_HOURS",
        "hours a finished test email (sent with a test API key, simulated) is kept after it "
        "finished, whatever its tenant's retention",
        ge=0,
    )
    # Retry schedule after a temporary failure (Postfix defaults: 300 s doubling to 4000 s,
    # give up after 5 days; RFC 5321 4.5.4.1 wants these configurable).
    mail_retry_min_backoff: Seconds = setting(
        300.0, "AZORA_MAIL_RETRY_MIN_BACKOFF", "first wait after a temporary failure"
    )
    mail_retry_max_backoff: Seconds = setting(
        4000.0, "AZORA_MAIL_RETRY_MAX_BACKOFF", "longest wait between attempts (doubling)"
    )
    mail_retry_jitter: float = setting(
        0.2,
        "AZORA_MAIL_RETRY_JITTER",
        "random spread of each wait, as a fraction of it",
        ge=0,
    )
    mail_max_lifetime: Seconds = setting(
        5 * 24 * 3600.0,
        "AZORA_MAIL_MAX_LIFETIME",
        "seconds after which an undelivered email is given up",
    )
    mail_lease: Seconds = setting(
        120.0,
        "AZORA_MAIL_LEASE",
        "how long a worker holds a claimed email before another worker may take it over",
    )
    mail_poll_interval: Seconds = setting(
        1.0,
        "AZORA_MAIL_POLL_INTERVAL",
        "how often an idle worker looks for due emails (its own process's new mail wakes it)",
    )
    # 128 and 16 (were 32 and 8, before that 16 and 4): claims, outcome groups and their
    # database commands come in bigger batches, and more of them overlap (end to end 247 ->
    # 270 per second, 5,000 emails 260 -> 275-286, less CPU per message; docs/benchmarks.md).
    # The connections matter little (128 over 16 or over 32 measured alike); 8 deliveries per
    # connection: with a slow relay (half a second a message) a delivery waits about 4 s for a
    # connection, far inside the lease. Memory: up to this many messages held at once.
    mail_worker_concurrency: int = setting(
        128, "AZORA_MAIL_WORKER_CONCURRENCY", "deliveries one worker runs at once", ge=1
    )
    mail_relay_connections: int = setting(
        16, "AZORA_MAIL_RELAY_CONNECTIONS", "SMTP connections one worker opens per relay", ge=1
    )
    mail_run_workers: bool = setting(
        True,
        "AZORA_MAIL_RUN_WORKERS",
        "whether the mail service process runs delivery workers itself (besides separate ones)",
    )
    mail_inline_content_limit: int = setting(
        256 * 1024,
        "AZORA_MAIL_INLINE_CONTENT_LIMIT",
        "built messages larger than this (bytes) go to GridFS instead of email_contents",
        ge=0,
    )

    mail_worker_processes: int = setting(
        0,
        "AZORA_MAIL_WORKER_PROCESSES",
        "separate delivery worker processes: how many `python -m services.mail.worker` runs (it "
        "supervises that many when above 1) and `make run` starts besides the mail service (0: "
        "none, the mail service delivers in-process)",
        ge=0,
    )
    # Events (services/mail/feedback/event_log.py).
    event_retention_days: float = setting(
        30.0, "AZORA_EVENT_RETENTION_DAYS", "days events are kept, then swept", ge=0
    )
    event_publish_interval: Seconds = setting(
        1.0,
        "AZORA_EVENT_PUBLISH_INTERVAL",
        "how often the event publisher copies recorded events into the events collection",
    )
    event_hint_abandon_after: Seconds = setting(
        1800.0,
        "AZORA_EVENT_HINT_ABANDON_AFTER",
        "after this long an event hint whose state change never landed is dropped (longer than "
        "any write can stay in flight)",
    )

    # Inbound mail (services/mail/inbound/).
    inbound_retention_days: float = setting(
        30.0,
        "AZORA_INBOUND_RETENTION_DAYS",
        "days a received message (GET /api/v1/inbound) is kept, then swept",
        gt=0,
    )
    inbound_webhook_attachment_limit: int = setting(
        1_048_576,
        "AZORA_INBOUND_WEBHOOK_ATTACHMENT_LIMIT",
        "bytes of attachments (decoded, all together) a webhook route's JSON carries base64; "
        "above it no attachment content is included, only the link to the raw message",
        ge=0,
    )
    # Not a variable itself: the AZORA_WEBHOOK_* group, read by `from_env`.
    webhooks: WebhookSettings = WebhookSettings()

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, service_name: str = "azora") -> Self:
        """The shared and mail settings, then the webhook group (every problem reported)."""
        settings = super().from_env(env, service_name=service_name)
        production = settings.environment is Environment.PRODUCTION
        hooks = WebhookSettings.validated(
            WebhookSettings.values_from_env(env, production=production)
        )
        return settings.with_overrides(webhooks=hooks)


__all__ = ["DEFAULT_WEBHOOK_SCHEDULE", "MailSettings", "WebhookSettings"]
