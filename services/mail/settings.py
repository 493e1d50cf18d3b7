"""Settings of the mail service and its delivery workers: scheduling, retries, retention.

The shared ones (limits of one email, relay egress policy, rate limits) come from
`services.core.settings.Settings`.
"""

from __future__ import annotations

from services.core.settings import Seconds, Settings, TenantDays, setting


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
        1.0, "AZORA_MAIL_POLL_INTERVAL", "how often an idle worker looks for due emails"
    )
    mail_worker_concurrency: int = setting(
        16, "AZORA_MAIL_WORKER_CONCURRENCY", "deliveries one worker runs at once", ge=1
    )
    mail_relay_connections: int = setting(
        4, "AZORA_MAIL_RELAY_CONNECTIONS", "SMTP connections one worker opens per relay", ge=1
    )
    mail_run_workers: bool = setting(
        True,
        "AZORA_MAIL_RUN_WORKERS",
        "whether the mail service process runs delivery workers itself (besides separate ones)",
    )
    mail_inline_content_limit: int = setting(
        256 * 1024,
        "AZORA_MAIL_INLINE_CONTENT_LIMIT",
        "built messages larger than this (bytes) go to GridFS instead of the queue document",
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


__all__ = ["MailSettings"]
