"""Typed settings read once from the environment and passed down from each composition root.

The product spec's variables keep their names and defaults (PORT, MONGODB_URI, JWT_SECRET,
LOG_LEVEL, SMTP_TIMEOUT, MAX_ATTACHMENT_SIZE, RATE_LIMIT_WINDOW, RATE_LIMIT_MAX); the rest are
ours and prefixed ``AZORA_``. Nothing here is a module-level singleton: `Settings.from_env` is
called by `app.py` of each service (and by tests with their own mapping).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

DEV_JWT_SECRET = "azora-development-jwt-secret-not-for-production"  # noqa: S105 - dev only
# 32 zero-free bytes, base64; refused in production like the JWT default.
DEV_SECRETS_KEY = base64.b64encode(b"azora-dev-secrets-key-32-bytes!!").decode()
DEV_TENANT_ID = "dev"


def derived_service_token_secret(jwt_secret: str) -> str:
    """The development key of service tokens, derived from JWT_SECRET.

    Every process of a development suite agrees on it without configuration, and it never
    equals JWT_SECRET. Production refuses it: whoever knows JWT_SECRET can derive it.
    """
    return hmac.new(jwt_secret.encode(), b"azora service tokens", hashlib.sha256).hexdigest()


DEV_SERVICE_TOKEN_SECRET = derived_service_token_secret(DEV_JWT_SECRET)


class Environment(enum.StrEnum):
    """Where the suite runs; production refuses missing or default secrets."""

    DEVELOPMENT = "development"
    TEST = "test"
    PRODUCTION = "production"


class SettingsError(ValueError):
    """A setting is missing or malformed; the process must not start."""


# --- webhooks ---
# Settings of webhook delivery (services/mail/feedback/webhook_*), kept together in one block:
# the nested `Settings.webhooks`, read from AZORA_WEBHOOK_* by `WebhookSettings.read`.

# Standard Webhooks' suggested schedule: the waits before attempts 2, 3, ... (over a day).
DEFAULT_WEBHOOK_SCHEDULE = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    """Webhook endpoints and their dispatcher. Durations are seconds."""

    # Waits before each retry (AZORA_WEBHOOK_RETRY_SCHEDULE="5,300,..."); after the last one
    # fails the delivery is FAILED. Each wait is stretched or shrunk by up to `retry_jitter`.
    retry_schedule: tuple[float, ...] = DEFAULT_WEBHOOK_SCHEDULE
    retry_jitter: float = 0.2
    # How long one request may take (connection, TLS, answer) before it counts as failed.
    timeout: float = 15.0
    # How long the previous secret keeps signing after a rotation.
    secret_overlap: float = 24 * 3600.0
    # An endpoint whose every attempt failed for this long is disabled automatically.
    disable_after: float = 5 * 24 * 3600.0
    # SSRF guard: may endpoints resolve to loopback, private, link-local or metadata addresses?
    # And is plain http accepted? Both true outside production (tests, local receivers).
    allow_private_hosts: bool = True
    allow_http: bool = True
    # Dispatcher: lease of a claimed delivery (longer than `timeout`), poll interval, how far
    # back each scan of the events collection starts (events inserted late, out of id order,
    # are found within it), how many requests run at once in all and per endpoint.
    lease: float = 60.0
    poll_interval: float = 0.5
    lookback: float = 300.0
    concurrency: int = 64
    endpoint_concurrency: int = 4
    # Days a delivery and its attempt log are kept.
    delivery_retention_days: float = 30.0
    # grpc.health.v1 port of the dispatcher process (its probes' target), and where it serves
    # its Prometheus metrics (0 = not served).
    dispatcher_health_port: int = 50055
    dispatcher_metrics_port: int = 9107

    @classmethod
    def read(cls, reader: _Reader, *, production: bool) -> WebhookSettings:
        """The AZORA_WEBHOOK_* variables (outside production private hosts and http are on)."""
        d = cls()
        return cls(
            retry_schedule=_seconds_list(reader, "AZORA_WEBHOOK_RETRY_SCHEDULE", d.retry_schedule),
            retry_jitter=reader.number("AZORA_WEBHOOK_RETRY_JITTER", d.retry_jitter),
            timeout=reader.number("AZORA_WEBHOOK_TIMEOUT", d.timeout),
            secret_overlap=reader.number("AZORA_WEBHOOK_SECRET_OVERLAP", d.secret_overlap),
            disable_after=reader.number("AZORA_WEBHOOK_DISABLE_AFTER", d.disable_after),
            allow_private_hosts=reader.flag("AZORA_WEBHOOK_ALLOW_PRIVATE_HOSTS", not production),
            allow_http=reader.flag("AZORA_WEBHOOK_ALLOW_HTTP", not production),
            lease=reader.number("AZORA_WEBHOOK_LEASE", d.lease),
            poll_interval=reader.number("AZORA_WEBHOOK_POLL_INTERVAL", d.poll_interval),
            lookback=reader.number("AZORA_WEBHOOK_LOOKBACK", d.lookback),
            concurrency=reader.integer("AZORA_WEBHOOK_CONCURRENCY", d.concurrency, minimum=1),
            endpoint_concurrency=reader.integer(
                "AZORA_WEBHOOK_ENDPOINT_CONCURRENCY", d.endpoint_concurrency, minimum=1
            ),
            delivery_retention_days=reader.number(
                "AZORA_WEBHOOK_DELIVERY_RETENTION_DAYS", d.delivery_retention_days
            ),
            dispatcher_health_port=reader.port(
                "AZORA_WEBHOOK_DISPATCHER_HEALTH_PORT", d.dispatcher_health_port
            ),
            dispatcher_metrics_port=reader.port(
                "AZORA_WEBHOOK_DISPATCHER_METRICS_PORT", d.dispatcher_metrics_port
            ),
        )


def _seconds_list(reader: _Reader, name: str, default: tuple[float, ...]) -> tuple[float, ...]:
    """Comma-separated seconds (at least one, none negative)."""
    raw = reader.env.get(name, "").strip()
    if not raw:
        return default
    try:
        found = tuple(float(v) for v in raw.split(",") if v.strip())
    except ValueError:
        found = ()
    if not found or any(v < 0 for v in found):
        reader.errors.append(f"{name} must be comma-separated seconds (>= 0), got {raw!r}")
        return default
    return found


# --- end of webhooks ---


@dataclass(frozen=True, slots=True)
class Settings:
    """All configuration of the suite. Durations are seconds unless the name says otherwise."""

    environment: Environment = Environment.DEVELOPMENT
    service_name: str = "azora"
    version: str = "0.1.0"
    # REST gateway port (product spec: PORT, default 3006).
    port: int = 3006
    host: str = "127.0.0.1"
    domain_grpc_port: int = 50051
    smtp_grpc_port: int = 50052
    mail_grpc_port: int = 50053
    # Where each service reaches the others (host:port).
    domain_service_target: str = "127.0.0.1:50051"
    smtp_service_target: str = "127.0.0.1:50052"
    mail_service_target: str = "127.0.0.1:50053"
    mongodb_uri: str = "mongodb://127.0.0.1:27017/"
    mongodb_database: str = "azora"
    mongodb_server_selection_timeout: float = 5.0
    # The most one request spends on the database in total (also bounded by the caller's
    # deadline). Past it the answer is UNAVAILABLE (retry), so a database outage reaches clients
    # as UNAVAILABLE after this long rather than as their own deadline expiring.
    mongodb_request_timeout: float = 10.0
    jwt_secret: str = DEV_JWT_SECRET
    jwt_issuer: str = ""
    jwt_audience: str = ""
    # Signs the tokens services mint for each other (AZORA_SERVICE_TOKEN_SECRET). Distinct from
    # JWT_SECRET, so whoever issues user tokens cannot mint a service identity; outside
    # production it defaults to a value derived from JWT_SECRET.
    service_token_secret: str = DEV_SERVICE_TOKEN_SECRET
    secrets_key: str = DEV_SECRETS_KEY
    log_level: str = "info"
    # Product spec names, kept in its units: SMTP_TIMEOUT and RATE_LIMIT_WINDOW in milliseconds.
    smtp_timeout_ms: int = 30_000
    max_attachment_size: int = 10 * 1024 * 1024
    # Rate limits and quotas (services.core.ratelimit; docs/operations.md "Rate limits").
    # RATE_LIMIT_MAX requests per RATE_LIMIT_WINDOW per client IP and per principal, for every
    # rpc except the sending ones, which have their own budget (AZORA_SEND_RATE_LIMIT_*).
    # 100 is the product spec's figure and production's default; outside production the
    # default is DEVELOPMENT_RATE_LIMIT_MAX, so someone following the setup guide (polling an
    # email once a second, say) is not refused by a budget meant for the internet.
    rate_limit_window_ms: int = 15 * 60 * 1000
    rate_limit_max: int = 100
    send_rate_limit_window_ms: int = 60 * 1000
    send_rate_limit_max: int = 100
    # Emails a tenant may submit per clock hour and per UTC day (0 = unlimited).
    quota_emails_per_hour: int = 1000
    quota_emails_per_day: int = 10_000
    # How often each process publishes its counts to the database and reads the others'.
    rate_limit_sync_interval: float = 0.25
    # How many blocks a key's window of a request budget is cut into: a process claims one
    # block (one database insert) at a time and admits requests from it (ratelimit.SharedBlocks).
    rate_limit_blocks: int = 32
    # Failed authentications (bad keys or tokens) per client address and window before the
    # address is refused with RESOURCE_EXHAUSTED until the window ends (0 = not limited).
    auth_failure_max: int = 20
    auth_failure_window_ms: int = 15 * 60 * 1000
    # Peers whose x-forwarded-for is believed (CIDRs): the gateway's addresses. Anyone else's
    # header is ignored, so a direct gRPC caller cannot pick the IP it is counted under.
    # from_env trusts loopback (the local gateway) outside production and nothing in it.
    trusted_proxies: tuple[str, ...] = ("127.0.0.1/32", "::1/128")
    # Largest gRPC message a service accepts (AZORA_GRPC_MAX_MESSAGE_BYTES).
    grpc_max_message_bytes: int = 64 * 1024 * 1024
    shutdown_grace: float = 10.0
    # Verification DNS: empty nameservers = the system resolver.
    dns_nameservers: tuple[str, ...] = ()
    dns_port: int = 53
    dns_timeout: float = 5.0
    verification_window: float = 72 * 3600.0
    recheck_interval: float = 3600.0
    suspension_grace: float = 72 * 3600.0
    lifecycle_sweep_interval: float = 60.0
    api_key_cache_ttl: float = 30.0
    max_page_size: int = 200
    default_page_size: int = 50
    max_domains_per_tenant: int = 1000
    max_dns_records_per_domain: int = 500
    max_dns_records_per_tenant: int = 5000
    # SMTP service
    # SSRF guard: may relay hosts resolve to loopback, private, link-local, CGNAT or metadata
    # addresses? from_env makes it true outside production (local relays, tests), false in it.
    smtp_allow_private_hosts: bool = True
    # A PEM file of extra CA certificates trusted for relay TLS, besides the system store.
    smtp_ca_file: str = ""
    # How long a replaced DKIM key stays RETIRING (its record must stay published meanwhile).
    dkim_rotation_overlap: float = 7 * 24 * 3600.0
    # How often the lifecycle loop looks the DKIM records of a domain up again.
    dkim_check_interval: float = 600.0
    # How long the SMTP service trusts an answer of the domain service about a domain.
    domain_cache_ttl: float = 5.0
    # Former AZORA_SECRETS_KEY values (base64, comma-separated): still decrypt, never encrypt.
    secrets_previous_keys: tuple[str, ...] = ()
    # Mail service
    # Most recipients (to + cc + bcc) of one email.
    mail_max_recipients: int = 50
    # Largest built message (headers, bodies, encoded attachments) in bytes.
    mail_max_message_size: int = 30 * 1024 * 1024
    # How far ahead sendAt may be.
    mail_schedule_horizon: float = 30 * 24 * 3600.0
    # How long an idempotency key is remembered.
    mail_idempotency_ttl: float = 24 * 3600.0
    # Days a finished email (content and timeline) is kept after it finished, and per-tenant
    # exceptions as (tenant id, days) pairs (AZORA_RETENTION_TENANT_DAYS="tenant=days,...").
    retention_days: float = 30.0
    retention_tenant_days: tuple[tuple[str, float], ...] = ()
    # Retry schedule after a temporary failure (Postfix defaults: 300 s doubling to 4000 s,
    # give up after 5 days; RFC 5321 4.5.4.1 wants these configurable). Jitter is a fraction.
    mail_retry_min_backoff: float = 300.0
    mail_retry_max_backoff: float = 4000.0
    mail_retry_jitter: float = 0.2
    mail_max_lifetime: float = 5 * 24 * 3600.0
    # How long a worker holds a claimed email before another worker may take it over.
    mail_lease: float = 120.0
    # How often an idle worker looks for due emails.
    mail_poll_interval: float = 1.0
    # Deliveries one worker runs at once, and SMTP connections it opens per relay.
    mail_worker_concurrency: int = 16
    mail_relay_connections: int = 4
    # Whether the mail service process runs delivery workers itself (besides separate ones).
    mail_run_workers: bool = True
    # Built messages larger than this go to GridFS instead of the queue document.
    mail_inline_content_limit: int = 256 * 1024
    # Observability
    # OTLP/HTTP collector base URL (OTEL_EXPORTER_OTLP_ENDPOINT); empty = tracing off.
    otel_endpoint: str = ""
    # Where this process serves its Prometheus registry for scraping; port 0 = not served.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0
    # Other processes' metrics URLs ("name=http://host:port/metrics") that GET /metrics merges.
    metrics_peers: tuple[str, ...] = ()
    # How often each service re-checks its database for its grpc.health.v1 status.
    readiness_interval: float = 5.0
    # After this many seconds without an answer from the database, a new client tries it; if
    # that one gets an answer, the process's own client is wedged and the process exits
    # non-zero for its supervisor to restart it (0 = never).
    database_watchdog: float = 60.0
    # GET /health reports the queue degraded once its oldest due email waited this long (s).
    health_queue_max_age: float = 900.0
    webhooks: WebhookSettings = WebhookSettings()  # the `# --- webhooks ---` block

    @property
    def is_production(self) -> bool:
        """Whether production rules (mandatory secrets, no anonymous access) apply."""
        return self.environment is Environment.PRODUCTION

    @property
    def allow_anonymous_development(self) -> bool:
        """Requests without credentials act as the development tenant outside production."""
        return not self.is_production

    @property
    def smtp_timeout(self) -> float:
        """SMTP_TIMEOUT in seconds."""
        return self.smtp_timeout_ms / 1000.0

    def secrets_key_bytes(self) -> bytes:
        """The master key for secrets at rest (32 bytes, decoded from base64)."""
        return _decode_key(self.secrets_key)

    def with_overrides(self, **changes: Any) -> Settings:
        """A copy with some fields changed (tests, per-service names)."""
        return replace(self, **changes)

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, service_name: str = "azora") -> Settings:
        """Read settings from an environment mapping and validate them.

        Raises:
            SettingsError: a value is malformed, or production lacks a required secret.
        """
        reader = _Reader(env)
        raw_env = env.get("AZORA_ENV") or env.get("NODE_ENV") or "development"
        try:
            environment = Environment(raw_env.strip().lower())
        except ValueError:
            raise SettingsError(
                f"AZORA_ENV/NODE_ENV must be one of {[e.value for e in Environment]}, "
                f"got {raw_env!r}"
            ) from None
        defaults = cls()
        nameservers = tuple(
            s.strip() for s in env.get("AZORA_DNS_NAMESERVERS", "").split(",") if s.strip()
        )
        settings = cls(
            environment=environment,
            service_name=service_name,
            version=env.get("AZORA_VERSION", defaults.version),
            port=reader.port("PORT", defaults.port),
            host=env.get("AZORA_HOST", defaults.host),
            domain_grpc_port=reader.port("AZORA_DOMAIN_GRPC_PORT", defaults.domain_grpc_port),
            smtp_grpc_port=reader.port("AZORA_SMTP_GRPC_PORT", defaults.smtp_grpc_port),
            mail_grpc_port=reader.port("AZORA_MAIL_GRPC_PORT", defaults.mail_grpc_port),
            domain_service_target=env.get(
                "AZORA_DOMAIN_SERVICE_TARGET",
                f"127.0.0.1:{reader.port('AZORA_DOMAIN_GRPC_PORT', defaults.domain_grpc_port)}",
            ),
            smtp_service_target=env.get(
                "AZORA_SMTP_SERVICE_TARGET",
                f"127.0.0.1:{reader.port('AZORA_SMTP_GRPC_PORT', defaults.smtp_grpc_port)}",
            ),
            mail_service_target=env.get(
                "AZORA_MAIL_SERVICE_TARGET",
                f"127.0.0.1:{reader.port('AZORA_MAIL_GRPC_PORT', defaults.mail_grpc_port)}",
            ),
            mongodb_uri=env.get("MONGODB_URI", defaults.mongodb_uri),
            mongodb_database=env.get("AZORA_MONGODB_DATABASE", defaults.mongodb_database),
            mongodb_request_timeout=reader.number(
                "AZORA_MONGODB_REQUEST_TIMEOUT", defaults.mongodb_request_timeout
            ),
            jwt_secret=env.get("JWT_SECRET", ""),
            jwt_issuer=env.get("AZORA_JWT_ISSUER", ""),
            jwt_audience=env.get("AZORA_JWT_AUDIENCE", ""),
            service_token_secret=env.get("AZORA_SERVICE_TOKEN_SECRET", ""),
            secrets_key=env.get("AZORA_SECRETS_KEY", ""),
            log_level=reader.choice(
                "LOG_LEVEL", defaults.log_level, ("debug", "info", "warn", "warning", "error")
            ),
            smtp_timeout_ms=reader.integer("SMTP_TIMEOUT", defaults.smtp_timeout_ms, minimum=1),
            max_attachment_size=reader.integer(
                "MAX_ATTACHMENT_SIZE", defaults.max_attachment_size, minimum=1
            ),
            rate_limit_window_ms=reader.integer(
                "RATE_LIMIT_WINDOW", defaults.rate_limit_window_ms, minimum=1
            ),
            rate_limit_max=reader.integer(
                "RATE_LIMIT_MAX",
                defaults.rate_limit_max
                if environment is Environment.PRODUCTION
                else DEVELOPMENT_RATE_LIMIT_MAX,
                minimum=1,
            ),
            send_rate_limit_window_ms=reader.integer(
                "AZORA_SEND_RATE_LIMIT_WINDOW", defaults.send_rate_limit_window_ms, minimum=1
            ),
            send_rate_limit_max=reader.integer(
                "AZORA_SEND_RATE_LIMIT_MAX", defaults.send_rate_limit_max, minimum=1
            ),
            quota_emails_per_hour=reader.integer(
                "AZORA_QUOTA_EMAILS_PER_HOUR", defaults.quota_emails_per_hour
            ),
            quota_emails_per_day=reader.integer(
                "AZORA_QUOTA_EMAILS_PER_DAY", defaults.quota_emails_per_day
            ),
            rate_limit_sync_interval=reader.number(
                "AZORA_RATE_LIMIT_SYNC_INTERVAL", defaults.rate_limit_sync_interval
            ),
            rate_limit_blocks=reader.integer(
                "AZORA_RATE_LIMIT_BLOCKS", defaults.rate_limit_blocks, minimum=1
            ),
            auth_failure_max=reader.integer("AZORA_AUTH_FAILURE_MAX", defaults.auth_failure_max),
            auth_failure_window_ms=reader.integer(
                "AZORA_AUTH_FAILURE_WINDOW", defaults.auth_failure_window_ms, minimum=1
            ),
            # In production any process on the same host could otherwise claim any client
            # address through x-forwarded-for: trust proxies only where they are configured.
            trusted_proxies=reader.networks(
                "AZORA_TRUSTED_PROXIES",
                () if environment is Environment.PRODUCTION else defaults.trusted_proxies,
            ),
            grpc_max_message_bytes=reader.integer(
                "AZORA_GRPC_MAX_MESSAGE_BYTES", defaults.grpc_max_message_bytes, minimum=1024
            ),
            shutdown_grace=reader.number("AZORA_SHUTDOWN_GRACE", defaults.shutdown_grace),
            dns_nameservers=nameservers,
            dns_port=reader.port("AZORA_DNS_PORT", defaults.dns_port),
            dns_timeout=reader.number("AZORA_DNS_TIMEOUT", defaults.dns_timeout),
            verification_window=reader.number(
                "AZORA_VERIFICATION_WINDOW", defaults.verification_window
            ),
            recheck_interval=reader.number("AZORA_RECHECK_INTERVAL", defaults.recheck_interval),
            suspension_grace=reader.number("AZORA_SUSPENSION_GRACE", defaults.suspension_grace),
            lifecycle_sweep_interval=reader.number(
                "AZORA_LIFECYCLE_SWEEP_INTERVAL", defaults.lifecycle_sweep_interval
            ),
            api_key_cache_ttl=reader.number("AZORA_API_KEY_CACHE_TTL", defaults.api_key_cache_ttl),
            max_page_size=reader.integer("AZORA_MAX_PAGE_SIZE", defaults.max_page_size, minimum=1),
            max_domains_per_tenant=reader.integer(
                "AZORA_MAX_DOMAINS_PER_TENANT", defaults.max_domains_per_tenant, minimum=1
            ),
            max_dns_records_per_tenant=reader.integer(
                "AZORA_MAX_DNS_RECORDS_PER_TENANT", defaults.max_dns_records_per_tenant, minimum=1
            ),
            max_dns_records_per_domain=reader.integer(
                "AZORA_MAX_DNS_RECORDS", defaults.max_dns_records_per_domain, minimum=1
            ),
            # SMTP service
            smtp_allow_private_hosts=reader.flag(
                "AZORA_SMTP_ALLOW_PRIVATE_HOSTS", environment is not Environment.PRODUCTION
            ),
            smtp_ca_file=env.get("AZORA_SMTP_CA_FILE", defaults.smtp_ca_file).strip(),
            dkim_rotation_overlap=reader.number(
                "AZORA_DKIM_ROTATION_OVERLAP", defaults.dkim_rotation_overlap
            ),
            dkim_check_interval=reader.number(
                "AZORA_DKIM_CHECK_INTERVAL", defaults.dkim_check_interval
            ),
            domain_cache_ttl=reader.number("AZORA_DOMAIN_CACHE_TTL", defaults.domain_cache_ttl),
            secrets_previous_keys=reader.keys("AZORA_SECRETS_PREVIOUS_KEYS"),
            # Mail service
            mail_max_recipients=reader.integer(
                "AZORA_MAIL_MAX_RECIPIENTS", defaults.mail_max_recipients, minimum=1
            ),
            mail_max_message_size=reader.integer(
                "AZORA_MAIL_MAX_MESSAGE_SIZE", defaults.mail_max_message_size, minimum=1
            ),
            mail_schedule_horizon=reader.number(
                "AZORA_MAIL_SCHEDULE_HORIZON", defaults.mail_schedule_horizon
            ),
            mail_idempotency_ttl=reader.number(
                "AZORA_MAIL_IDEMPOTENCY_TTL", defaults.mail_idempotency_ttl
            ),
            retention_days=reader.number("AZORA_RETENTION_DAYS", defaults.retention_days),
            retention_tenant_days=reader.day_map("AZORA_RETENTION_TENANT_DAYS"),
            mail_retry_min_backoff=reader.number(
                "AZORA_MAIL_RETRY_MIN_BACKOFF", defaults.mail_retry_min_backoff
            ),
            mail_retry_max_backoff=reader.number(
                "AZORA_MAIL_RETRY_MAX_BACKOFF", defaults.mail_retry_max_backoff
            ),
            mail_retry_jitter=reader.number("AZORA_MAIL_RETRY_JITTER", defaults.mail_retry_jitter),
            mail_max_lifetime=reader.number("AZORA_MAIL_MAX_LIFETIME", defaults.mail_max_lifetime),
            mail_lease=reader.number("AZORA_MAIL_LEASE", defaults.mail_lease),
            mail_poll_interval=reader.number(
                "AZORA_MAIL_POLL_INTERVAL", defaults.mail_poll_interval
            ),
            mail_worker_concurrency=reader.integer(
                "AZORA_MAIL_WORKER_CONCURRENCY", defaults.mail_worker_concurrency, minimum=1
            ),
            mail_relay_connections=reader.integer(
                "AZORA_MAIL_RELAY_CONNECTIONS", defaults.mail_relay_connections, minimum=1
            ),
            mail_run_workers=reader.flag("AZORA_MAIL_RUN_WORKERS", defaults.mail_run_workers),
            mail_inline_content_limit=reader.integer(
                "AZORA_MAIL_INLINE_CONTENT_LIMIT", defaults.mail_inline_content_limit
            ),
            # Observability
            otel_endpoint=env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip(),
            metrics_host=env.get("AZORA_METRICS_HOST", defaults.metrics_host).strip(),
            metrics_port=_metrics_port(reader, service_name),
            metrics_peers=reader.peers("AZORA_METRICS_PEERS"),
            readiness_interval=reader.number(
                "AZORA_READINESS_INTERVAL", defaults.readiness_interval
            ),
            database_watchdog=reader.number("AZORA_DATABASE_WATCHDOG", defaults.database_watchdog),
            health_queue_max_age=reader.number(
                "AZORA_HEALTH_QUEUE_MAX_AGE", defaults.health_queue_max_age
            ),
            webhooks=WebhookSettings.read(reader, production=environment is Environment.PRODUCTION),
        )
        reader.raise_if_errors()
        return _apply_secret_defaults(settings)


def _apply_secret_defaults(settings: Settings) -> Settings:
    """Fill development secrets outside production; refuse weak or missing ones in production."""
    if settings.is_production:
        problems = []
        if len(settings.jwt_secret) < 32 or settings.jwt_secret == DEV_JWT_SECRET:
            problems.append("JWT_SECRET must be set to a random value of at least 32 characters")
        if not settings.secrets_key or settings.secrets_key == DEV_SECRETS_KEY:
            problems.append("AZORA_SECRETS_KEY must be set (32 random bytes, base64)")
        if len(settings.service_token_secret) < 32 or settings.service_token_secret in (
            settings.jwt_secret,
            derived_service_token_secret(settings.jwt_secret),
            DEV_SERVICE_TOKEN_SECRET,
        ):
            problems.append(
                "AZORA_SERVICE_TOKEN_SECRET must be set to a random value of at least 32 "
                "characters, different from JWT_SECRET"
            )
        if problems:
            raise SettingsError("production mode refuses to start: " + "; ".join(problems))
    else:
        jwt_secret = settings.jwt_secret or DEV_JWT_SECRET
        settings = replace(
            settings,
            jwt_secret=jwt_secret,
            secrets_key=settings.secrets_key or DEV_SECRETS_KEY,
            service_token_secret=settings.service_token_secret
            or derived_service_token_secret(jwt_secret),
        )
    _decode_key(settings.secrets_key)  # fail at start-up, not on first use
    return settings


def _decode_key(value: str) -> bytes:
    try:
        key = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise SettingsError("AZORA_SECRETS_KEY must be base64") from None
    if len(key) != 32:
        raise SettingsError("AZORA_SECRETS_KEY must decode to exactly 32 bytes")
    return key


# RATE_LIMIT_MAX when unset outside production: about 11 requests a second for a whole window.
DEVELOPMENT_RATE_LIMIT_MAX = 10_000


# Observability: each process's metrics port variable and default (0 = not served).
METRICS_PORTS = {
    "domain-service": ("AZORA_METRICS_PORT_DOMAIN", 9101),
    "smtp-service": ("AZORA_METRICS_PORT_SMTP", 9102),
    "mail-service": ("AZORA_METRICS_PORT_MAIL", 9103),
    "gateway": ("AZORA_METRICS_PORT_GATEWAY", 9104),
    "mail-worker": ("AZORA_METRICS_PORT_MAIL_WORKER", 9105),
    "submission": ("AZORA_METRICS_PORT_SUBMISSION", 9106),
}


def _metrics_port(reader: _Reader, service_name: str) -> int:
    variable, default = METRICS_PORTS.get(service_name, ("", 0))
    return reader.port(variable, default) if variable else 0


class _Reader:
    """Parses typed values and collects every problem, so one start-up error lists them all."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.errors: list[str] = []

    def _raw(self, name: str) -> str | None:
        value = self.env.get(name)
        return value.strip() if value is not None and value.strip() else None

    def integer(self, name: str, default: int, *, minimum: int = 0) -> int:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            self.errors.append(f"{name} must be an integer, got {raw!r}")
            return default
        if value < minimum:
            self.errors.append(f"{name} must be >= {minimum}, got {value}")
        return value

    def port(self, name: str, default: int) -> int:
        value = self.integer(name, default)
        if not 0 <= value <= 65535:
            self.errors.append(f"{name} must be a port number (0-65535), got {value}")
        return value

    def number(self, name: str, default: float) -> float:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            self.errors.append(f"{name} must be a number, got {raw!r}")
            return default
        if value < 0:
            self.errors.append(f"{name} must not be negative")
        return value

    def choice(self, name: str, default: str, allowed: tuple[str, ...]) -> str:
        raw = self._raw(name)
        if raw is None:
            return default
        if raw.lower() not in allowed:
            self.errors.append(f"{name} must be one of {allowed}, got {raw!r}")
            return default
        return raw.lower()

    # SMTP service
    def flag(self, name: str, default: bool) -> bool:
        raw = self._raw(name)
        if raw is None:
            return default
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        self.errors.append(f"{name} must be true or false, got {raw!r}")
        return default

    def keys(self, name: str) -> tuple[str, ...]:
        found = tuple(k.strip() for k in self.env.get(name, "").split(",") if k.strip())
        for key in found:
            try:
                _decode_key(key)
            except SettingsError as exc:
                self.errors.append(f"{name}: {exc}")
        return found

    # Rate limits
    def networks(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        raw = self.env.get(name)
        if raw is None:
            return default
        found = tuple(n.strip() for n in raw.split(",") if n.strip())
        for network in found:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                self.errors.append(f"{name}: expected IP networks (CIDR), got {network!r}")
        return found

    # Retention
    def day_map(self, name: str) -> tuple[tuple[str, float], ...]:
        found: list[tuple[str, float]] = []
        for pair in (p.strip() for p in self.env.get(name, "").split(",") if p.strip()):
            key, sep, raw = pair.partition("=")
            try:
                days = float(raw)
            except ValueError:
                days = -1.0
            if not sep or not key.strip() or days < 0:
                self.errors.append(f"{name}: expected tenant=days (days >= 0), got {pair!r}")
                continue
            found.append((key.strip(), days))
        return tuple(found)

    # Observability
    def peers(self, name: str) -> tuple[str, ...]:
        found = tuple(p.strip() for p in self.env.get(name, "").split(",") if p.strip())
        for peer in found:
            label, sep, url = peer.partition("=")
            if not sep or not label.strip() or not url.strip().startswith(("http://", "https://")):
                self.errors.append(f"{name}: expected name=http://host:port/metrics, got {peer!r}")
        return found

    def raise_if_errors(self) -> None:
        if self.errors:
            raise SettingsError("invalid settings: " + "; ".join(self.errors))


# The typed environment reader, for processes with settings of their own (services.submission).
EnvReader = _Reader

__all__ = ["DEV_TENANT_ID", "EnvReader", "Environment", "Settings", "SettingsError", "fields"]
