"""Typed settings read once from the environment and passed down from each composition root.

Each setting is declared once, as a field of a pydantic model, with `setting()`: its type,
default, environment variable and meaning (docs/operations.md's table is generated from these
declarations by `python -m scripts.settings_table`). `Settings` here holds what every process
shares (environment, database, secrets, logs, tracing and metrics, ports and targets of the
services, rate limits, limits of one email, relay egress policy); each service declares its own
in its ``settings.py`` as a subclass of `Settings` (`services.domain.settings.DomainSettings`,
...), so its code reads ``settings.<name>`` for shared and own settings alike.

The product spec's variables keep their names and defaults (PORT, MONGODB_URI, JWT_SECRET,
LOG_LEVEL, SMTP_TIMEOUT, MAX_ATTACHMENT_SIZE, RATE_LIMIT_WINDOW, RATE_LIMIT_MAX); the rest are
ours and prefixed ``AZORA_``. Nothing here is a module-level singleton: `from_env` is called by
the entry point of each process (and by tests with their own mapping).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import ipaddress
import re
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Self, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
)
from pydantic.fields import FieldInfo

DEV_JWT_SECRET = "azora-development-jwt-secret-not-for-production"  # noqa: S105 - dev only
# 32 zero-free bytes, base64; refused in production like the JWT default.
DEV_SECRETS_KEY = base64.b64encode(b"azora-dev-secrets-key-32-bytes!!").decode()
DEV_TENANT_ID = "dev"
# RATE_LIMIT_MAX when unset outside production: about 11 requests a second for a whole window.
DEVELOPMENT_RATE_LIMIT_MAX = 10_000


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


# Observability: each process's metrics port variable and default (0 = not served).
METRICS_PORTS = {
    "domain-service": ("AZORA_METRICS_PORT_DOMAIN", 9101),
    "smtp-service": ("AZORA_METRICS_PORT_SMTP", 9102),
    "mail-service": ("AZORA_METRICS_PORT_MAIL", 9103),
    "gateway": ("AZORA_METRICS_PORT_GATEWAY", 9104),
    "mail-worker": ("AZORA_METRICS_PORT_MAIL_WORKER", 9105),
    "submission": ("AZORA_METRICS_PORT_SUBMISSION", 9106),
    "inbound": ("AZORA_METRICS_PORT_INBOUND", 9108),
}

# ---------------------------------------------------------------------------------------------
# Declaring settings


class _Unset(enum.Enum):
    UNSET = enum.auto()


_UNSET = _Unset.UNSET


@dataclass(frozen=True, slots=True)
class EnvSpec:
    """How one field is read: its variables (the first one set wins) and per-environment defaults.

    Attributes:
        names: the environment variables, in order of precedence.
        production: the default when unset in production (`_UNSET`: the field's default).
        development: the default when unset outside production.
        shown: the default as the docs table shows it, when the field's own value would mislead.
    """

    names: tuple[str, ...]
    production: Any = _UNSET
    development: Any = _UNSET
    shown: str = ""

    @property
    def has_production_default(self) -> bool:
        """Whether production has a default of its own."""
        return self.production is not _UNSET

    @property
    def has_development_default(self) -> bool:
        """Whether development (and test) have a default of their own."""
        return self.development is not _UNSET


def setting(
    default: Any,
    env: str | tuple[str, ...] | None,
    doc: str,
    *,
    production: Any = _UNSET,
    development: Any = _UNSET,
    shown: str = "",
    **constraints: Any,
) -> Any:
    """Declare one setting: default, variable(s), meaning and constraints (`Field`'s ge, le...).

    `production` / `development` replace the default when the variable is unset in (outside)
    production; `env=None` declares a field that no variable sets (derived at start-up).
    """
    names = (env,) if isinstance(env, str) else (env or ())
    spec = EnvSpec(names, production, development, shown)
    return Field(default, description=doc, json_schema_extra={"env": _SpecRef(spec)}, **constraints)


class _SpecRef(dict[str, Any]):
    """Carries an `EnvSpec` through pydantic's json_schema_extra (kept out of JSON schemas)."""

    def __init__(self, spec: EnvSpec) -> None:
        super().__init__()
        self.spec = spec


def env_spec(field: FieldInfo) -> EnvSpec:
    """The `EnvSpec` of a field declared with `setting()` (no variables otherwise)."""
    extra = field.json_schema_extra
    ref = extra.get("env") if isinstance(extra, dict) else None
    return ref.spec if isinstance(ref, _SpecRef) else EnvSpec(())


# Value types: what a variable's text must look like. A blank variable counts as unset, except
# for lists, where it is the empty list (AZORA_TRUSTED_PROXIES="" trusts nobody).


def _bounce_domain(value: str) -> str:
    """``bounces.{domain}``-style templates and fixed names only (lower case, no dot at the end)."""
    value = value.strip().lower().rstrip(".")
    fixed = value.replace("{domain}", "example.com", 1)
    labels = fixed.split(".")
    if (
        "{" in fixed
        or "}" in fixed
        or ("{domain}" in value and not value.endswith(".{domain}"))
        or len(labels) < 2
        or not all(re.fullmatch(r"[a-z0-9_]([a-z0-9-]{0,61}[a-z0-9])?", label) for label in labels)
    ):
        raise ValueError(
            "must be a domain name, or labels followed by .{domain} (e.g. bounces.{domain})"
        )
    return value


def _comma_list(value: object) -> object:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


def _lower(value: object) -> object:
    return value.strip().lower() if isinstance(value, str) else value


def _networks(values: tuple[str, ...]) -> tuple[str, ...]:
    for network in values:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ValueError(f"expected IP networks (CIDR), got {network!r}") from None
    return values


def _keys(values: tuple[str, ...]) -> tuple[str, ...]:
    for key in values:
        decode_key(key)  # SettingsError is a ValueError: pydantic reports it as this field's
    return values


def _peers(values: tuple[str, ...]) -> tuple[str, ...]:
    for peer in values:
        label, sep, url = peer.partition("=")
        if not sep or not label.strip() or not url.strip().startswith(("http://", "https://")):
            raise ValueError(f"expected name=http://host:port/metrics, got {peer!r}")
    return values


def _day_map(value: object) -> object:
    if not isinstance(value, str):
        return value
    found: list[tuple[str, float]] = []
    for pair in (p.strip() for p in value.split(",") if p.strip()):
        key, sep, raw = pair.partition("=")
        try:
            days = float(raw)
        except ValueError:
            days = -1.0
        if not sep or not key.strip() or days < 0:
            raise ValueError(f"expected tenant=days (days >= 0), got {pair!r}")
        found.append((key.strip(), days))
    return tuple(found)


Port = Annotated[int, Field(ge=0, le=65535)]
Count = Annotated[int, Field(ge=0)]
Seconds = Annotated[float, Field(ge=0)]
Strings = Annotated[tuple[str, ...], BeforeValidator(_comma_list)]
Networks = Annotated[tuple[str, ...], BeforeValidator(_comma_list), AfterValidator(_networks)]
Keys = Annotated[tuple[str, ...], BeforeValidator(_comma_list), AfterValidator(_keys)]
Peers = Annotated[tuple[str, ...], BeforeValidator(_comma_list), AfterValidator(_peers)]
TenantDays = Annotated[tuple[tuple[str, float], ...], BeforeValidator(_day_map)]
LogLevel = Annotated[Literal["debug", "info", "warn", "warning", "error"], BeforeValidator(_lower)]


class SettingsModel(BaseModel):
    """Base of every settings class: reading from an environment mapping, copies, errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @classmethod
    def declared(cls) -> Iterator[tuple[str, FieldInfo, EnvSpec]]:
        """The fields this class itself declares (not inherited), with their `EnvSpec`."""
        own = vars(cls).get("__annotations__", {})
        for name, field in cls.model_fields.items():
            if name in own:
                yield name, field, env_spec(field)

    @classmethod
    def values_from_env(cls, env: Mapping[str, str], *, production: bool) -> dict[str, Any]:
        """The raw text of every field whose variable is set, or its per-environment default."""
        values: dict[str, Any] = {}
        for name, field in cls.model_fields.items():
            spec = env_spec(field)
            listed = get_origin(field.annotation) is tuple
            raw = next(
                (
                    env[variable].strip()
                    for variable in spec.names
                    if variable in env and (listed or env[variable].strip())
                ),
                None,
            )
            if raw is not None:
                values[name] = raw
            elif production and spec.production is not _UNSET:
                values[name] = spec.production
            elif not production and spec.development is not _UNSET:
                values[name] = spec.development
        return values

    @classmethod
    def validated(
        cls, values: Mapping[str, Any], *, names: Mapping[str, str] | None = None
    ) -> Self:
        """Validate values read by `values_from_env`; every problem in one `SettingsError`.

        Args:
            values: raw values by field name.
            names: variable names of fields whose variable is not their declared one.
        """
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = []
            for error in exc.errors():
                field = str(error["loc"][0]) if error["loc"] else ""
                variable = (names or {}).get(field) or "/".join(
                    env_spec(cls.model_fields[field]).names if field in cls.model_fields else ()
                )
                message = str(error["msg"]).removeprefix("Value error, ")
                problems.append(f"{variable or field}: {message} (got {error['input']!r})")
            raise SettingsError("invalid settings: " + "; ".join(problems)) from None

    def with_overrides(self, **changes: Any) -> Self:
        """A copy with some fields changed (tests, per-service names); values are not checked."""
        unknown = sorted(set(changes) - set(type(self).model_fields))
        if unknown:
            raise TypeError(f"{type(self).__name__} has no settings {unknown}")
        return self.model_copy(update=changes)


# ---------------------------------------------------------------------------------------------
# What every process shares


class Settings(SettingsModel):
    """What every process shares. Durations are seconds unless the name says otherwise."""

    environment: Annotated[Environment, BeforeValidator(_lower)] = setting(
        Environment.DEVELOPMENT,
        ("AZORA_ENV", "NODE_ENV"),
        "`development`, `test` or `production`; production refuses missing or default secrets, "
        "anonymous access and private relay addresses",
    )
    service_name: str = setting("azora", None, "the process's name (logs, traces, metrics port)")
    version: str = setting("0.1.0", "AZORA_VERSION", "version reported by health and traces")
    # Ports and targets of the processes.
    port: Port = setting(3006, "PORT", "REST gateway port")
    host: str = setting("127.0.0.1", "AZORA_HOST", "listen address of the services")
    domain_grpc_port: Port = setting(50051, "AZORA_DOMAIN_GRPC_PORT", "domain service gRPC port")
    smtp_grpc_port: Port = setting(50052, "AZORA_SMTP_GRPC_PORT", "SMTP service gRPC port")
    mail_grpc_port: Port = setting(50053, "AZORA_MAIL_GRPC_PORT", "mail service gRPC port")
    domain_service_target: str = setting(
        "127.0.0.1:50051",
        "AZORA_DOMAIN_SERVICE_TARGET",
        "where the others reach the domain service (host:port)",
        shown="127.0.0.1:`AZORA_DOMAIN_GRPC_PORT`",
    )
    smtp_service_target: str = setting(
        "127.0.0.1:50052",
        "AZORA_SMTP_SERVICE_TARGET",
        "where the others reach the SMTP service (host:port)",
        shown="127.0.0.1:`AZORA_SMTP_GRPC_PORT`",
    )
    mail_service_target: str = setting(
        "127.0.0.1:50053",
        "AZORA_MAIL_SERVICE_TARGET",
        "where the others reach the mail service (host:port)",
        shown="127.0.0.1:`AZORA_MAIL_GRPC_PORT`",
    )
    # Database.
    mongodb_uri: str = setting("mongodb://127.0.0.1:27017/", "MONGODB_URI", "MongoDB URI")
    mongodb_database: str = setting("azora", "AZORA_MONGODB_DATABASE", "database name")
    mongodb_server_selection_timeout: Seconds = setting(
        5.0,
        "AZORA_MONGODB_SERVER_SELECTION_TIMEOUT",
        "seconds to find a reachable database server before a request is UNAVAILABLE",
    )
    mongodb_request_timeout: Seconds = setting(
        10.0,
        "AZORA_MONGODB_REQUEST_TIMEOUT",
        "the most seconds one request spends on the database (the caller's deadline bounds it "
        'too); a query that is still running then is DEADLINE_EXCEEDED (HTTP 504, "the '
        'database query ran out of time ... the database is reachable"); only a database that '
        "cannot be reached (no server selected within `AZORA_MONGODB_SERVER_SELECTION_TIMEOUT`, "
        'connection refused or reset) is UNAVAILABLE (503, "the database is unreachable") '
        "with a retry delay",
    )
    # Secrets.
    jwt_secret: str = setting(
        DEV_JWT_SECRET,
        "JWT_SECRET",
        "key of user JWTs; production requires a random value of at least 32 characters",
        shown="a development value (refused in production)",
    )
    jwt_issuer: str = setting("", "AZORA_JWT_ISSUER", "required `iss` of user JWTs; empty = any")
    jwt_audience: str = setting(
        "", "AZORA_JWT_AUDIENCE", "required `aud` of user JWTs; empty = any"
    )
    service_token_secret: str = setting(
        DEV_SERVICE_TOKEN_SECRET,
        "AZORA_SERVICE_TOKEN_SECRET",
        "key of the tokens the services mint for each other (the only tokens internal rpcs "
        "accept); production requires at least 32 characters, different from `JWT_SECRET`; give "
        "it to the service processes only, never to whoever issues user tokens",
        shown="outside production: derived from `JWT_SECRET`",
    )
    secrets_key: str = setting(
        DEV_SECRETS_KEY,
        "AZORA_SECRETS_KEY",
        "master key of secrets at rest (32 random bytes, base64); required in production",
        shown="a development value (refused in production)",
    )
    secrets_previous_keys: Keys = setting(
        (),
        "AZORA_SECRETS_PREVIOUS_KEYS",
        "former `AZORA_SECRETS_KEY` values (base64, comma-separated): still decrypt, never encrypt",
    )
    log_level: LogLevel = setting(
        "info", "LOG_LEVEL", "`debug`, `info`, `warn`, `warning` or `error`"
    )
    # Product spec names, kept in its units: SMTP_TIMEOUT and RATE_LIMIT_WINDOW in milliseconds.
    smtp_timeout_ms: int = setting(30_000, "SMTP_TIMEOUT", "SMTP timeout (ms)", ge=1)
    # Limits of one email, whichever way it comes in (API or SMTP submission).
    max_attachment_size: int = setting(
        10 * 1024 * 1024, "MAX_ATTACHMENT_SIZE", "largest attachment (bytes)", ge=1
    )
    mail_max_recipients: int = setting(
        50, "AZORA_MAIL_MAX_RECIPIENTS", "most recipients (to + cc + bcc) of one email", ge=1
    )
    mail_max_message_size: int = setting(
        30 * 1024 * 1024,
        "AZORA_MAIL_MAX_MESSAGE_SIZE",
        "largest built message (headers, bodies, encoded attachments) in bytes",
        ge=1,
    )
    # Rate limits and quotas (services.core.ratelimit; docs/operations.md "Rate limits").
    # 100 is the product spec's figure and production's default; outside production the
    # default is DEVELOPMENT_RATE_LIMIT_MAX, so someone following the setup guide (polling an
    # email once a second, say) is not refused by a budget meant for the internet.
    rate_limit_window_ms: int = setting(
        15 * 60 * 1000, "RATE_LIMIT_WINDOW", "window of the API budget (ms)", ge=1
    )
    rate_limit_max: int = setting(
        100,
        "RATE_LIMIT_MAX",
        "API budget per client address and per principal, for every rpc except the sending ones",
        development=DEVELOPMENT_RATE_LIMIT_MAX,
        ge=1,
    )
    send_rate_limit_window_ms: int = setting(
        60 * 1000, "AZORA_SEND_RATE_LIMIT_WINDOW", "window of the sending budget (ms)", ge=1
    )
    send_rate_limit_max: int = setting(
        100,
        "AZORA_SEND_RATE_LIMIT_MAX",
        "budget of the sending rpcs, per client address and per principal",
        ge=1,
    )
    quota_emails_per_hour: Count = setting(
        1000,
        "AZORA_QUOTA_EMAILS_PER_HOUR",
        "accepted emails per tenant per clock hour; 0 = unlimited",
    )
    quota_emails_per_day: Count = setting(
        10_000,
        "AZORA_QUOTA_EMAILS_PER_DAY",
        "accepted emails per tenant per UTC day; 0 = unlimited",
    )
    rate_limit_sync_interval: Seconds = setting(
        0.25,
        "AZORA_RATE_LIMIT_SYNC_INTERVAL",
        "seconds between exchanges of counts with the other replicas",
    )
    rate_limit_blocks: int = setting(
        32,
        "AZORA_RATE_LIMIT_BLOCKS",
        "blocks a key's window of the API or send budget is cut into (one database insert per "
        'block; see "One budget across processes")',
        ge=1,
    )
    rate_limit_block_idle: Seconds = setting(
        30.0,
        "AZORA_RATE_LIMIT_BLOCK_IDLE",
        "seconds after which a process gives back the unused part of a block it has not "
        "admitted from (the other processes can then claim it)",
    )
    auth_failure_max: Count = setting(
        20,
        "AZORA_AUTH_FAILURE_MAX",
        "failed authentications per client address per window before the address is refused "
        "with RESOURCE_EXHAUSTED until the window ends; 0 = not limited",
    )
    auth_failure_window_ms: int = setting(
        15 * 60 * 1000,
        "AZORA_AUTH_FAILURE_WINDOW",
        "window of `AZORA_AUTH_FAILURE_MAX` (ms)",
        ge=1,
    )
    # In production any process on the same host could otherwise claim any client address
    # through x-forwarded-for: trust proxies only where they are configured.
    trusted_proxies: Networks = setting(
        ("127.0.0.1/32", "::1/128"),
        "AZORA_TRUSTED_PROXIES",
        "CIDRs whose `x-forwarded-for` is believed (the gateways'); empty = none, so a direct "
        "gRPC caller cannot pick the address it is counted under",
        production=(),
        shown="`127.0.0.1/32,::1/128`; empty in production",
    )
    grpc_max_message_bytes: int = setting(
        64 * 1024 * 1024,
        "AZORA_GRPC_MAX_MESSAGE_BYTES",
        "largest gRPC message a service accepts",
        ge=1024,
    )
    shutdown_grace: Seconds = setting(
        10.0, "AZORA_SHUTDOWN_GRACE", "seconds in-flight calls get after SIGTERM"
    )
    event_loop: Annotated[Literal["uvloop", "asyncio"], BeforeValidator(_lower)] = setting(
        "uvloop",
        "AZORA_EVENT_LOOP",
        "the process's event loop: `uvloop` (libuv, faster) or `asyncio` (the standard library's)",
    )
    # DNS lookups (verification, record checks).
    dns_nameservers: Strings = setting(
        (), "AZORA_DNS_NAMESERVERS", "nameserver addresses (comma-separated); empty = the system's"
    )
    dns_port: Port = setting(53, "AZORA_DNS_PORT", "port of those nameservers")
    dns_timeout: Seconds = setting(5.0, "AZORA_DNS_TIMEOUT", "seconds per DNS lookup")
    # Work shared by the services.
    lifecycle_sweep_interval: Seconds = setting(
        60.0,
        "AZORA_LIFECYCLE_SWEEP_INTERVAL",
        "seconds between runs of the domain and DKIM lifecycle loops",
    )
    api_key_cache_ttl: Seconds = setting(
        30.0, "AZORA_API_KEY_CACHE_TTL", "seconds an answer about an API key is trusted"
    )
    domain_cache_ttl: Seconds = setting(
        5.0,
        "AZORA_DOMAIN_CACHE_TTL",
        "seconds the SMTP and mail services trust an answer of the domain service about a domain",
    )
    max_page_size: int = setting(
        200,
        "AZORA_MAX_PAGE_SIZE",
        "largest page of a list; larger sizes are coerced to it (AIP-158)",
        ge=1,
    )
    default_page_size: int = setting(50, None, "page size when a list request gives none")
    # Bounces that come back after the relay's answer (services/core/verp.py): the mail
    # workers put return paths on this domain, the inbound server accepts mail for it, the
    # domain service lists its records among a domain's required records.
    bounce_domain: Annotated[str, AfterValidator(_bounce_domain)] = setting(
        "bounces.{domain}",
        "AZORA_BOUNCE_DOMAIN",
        "domain of the VERP return paths (envelope senders) of outgoing mail: `{domain}` "
        "stands for the sender's domain (one bounce domain per sending domain, so SPF aligns "
        "for DMARC), or one fixed name shared by every domain",
    )
    bounce_mx_host: str = setting(
        "",
        "AZORA_BOUNCE_MX_HOST",
        "host name the bounce domain's MX record names: the inbound server's public name",
        shown="the machine's FQDN",
    )
    # Relays (SMTP service probes, mail service delivers).
    smtp_allow_private_hosts: bool = setting(
        True,
        "AZORA_SMTP_ALLOW_PRIVATE_HOSTS",
        "whether relay hosts may resolve to loopback, private, link-local, CGNAT or metadata "
        "addresses (SSRF guard)",
        production=False,
        shown="true; false in production",
    )
    smtp_ca_file: str = setting(
        "",
        "AZORA_SMTP_CA_FILE",
        "a PEM file of extra CA certificates trusted for relay TLS, besides the system store",
    )
    # Observability.
    otel_endpoint: str = setting(
        "",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTLP/HTTP collector base URL; unset = tracing off",
    )
    metrics_host: str = setting(
        "127.0.0.1", "AZORA_METRICS_HOST", "listen address of the per-process metrics endpoint"
    )
    metrics_port: Port = setting(
        0, None, "this process's metrics port (`AZORA_METRICS_PORT_*`, below); 0 = not served"
    )
    readiness_interval: Seconds = setting(
        5.0,
        "AZORA_READINESS_INTERVAL",
        "seconds between database probes of the grpc.health.v1 readiness watcher",
    )
    database_watchdog: Seconds = setting(
        60.0,
        "AZORA_DATABASE_WATCHDOG",
        "seconds of failed probes after which a new client tries the database; if it answers, "
        "the process exits (75) for its supervisor to restart it; 0 = off",
    )

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
        return decode_key(self.secrets_key)

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, service_name: str = "azora") -> Self:
        """Read settings from an environment mapping and validate them.

        Raises:
            SettingsError: a value is malformed, or production lacks a required secret.
        """
        raw_env = env.get("AZORA_ENV") or env.get("NODE_ENV") or "development"
        try:
            environment = Environment(raw_env.strip().lower())
        except ValueError:
            raise SettingsError(
                f"AZORA_ENV/NODE_ENV must be one of {[e.value for e in Environment]}, "
                f"got {raw_env!r}"
            ) from None
        production = environment is Environment.PRODUCTION
        values = cls.values_from_env(env, production=production)
        values["service_name"] = service_name
        # A target defaults to the port of its service on loopback.
        for target, port in (
            ("domain_service_target", "domain_grpc_port"),
            ("smtp_service_target", "smtp_grpc_port"),
            ("mail_service_target", "mail_grpc_port"),
        ):
            if target not in values:
                values[target] = f"127.0.0.1:{values.get(port, cls.model_fields[port].default)}"
        values.setdefault("bounce_mx_host", socket.getfqdn())
        names = {}
        variable, default = METRICS_PORTS.get(service_name, ("", 0))
        if variable:
            names["metrics_port"] = variable
            values["metrics_port"] = env.get(variable, "").strip() or default
        settings = cls.validated(values, names=names)
        return settings._with_secrets(given=set(values))

    def _with_secrets(self, *, given: set[str]) -> Self:
        """Fill development secrets outside production; refuse weak or missing ones in it."""
        settings = self
        if self.is_production:
            problems = []
            if len(self.jwt_secret) < 32 or self.jwt_secret == DEV_JWT_SECRET:
                problems.append(
                    "JWT_SECRET must be set to a random value of at least 32 characters"
                )
            if self.secrets_key == DEV_SECRETS_KEY:
                problems.append("AZORA_SECRETS_KEY must be set (32 random bytes, base64)")
            if len(self.service_token_secret) < 32 or self.service_token_secret in (
                self.jwt_secret,
                derived_service_token_secret(self.jwt_secret),
                DEV_SERVICE_TOKEN_SECRET,
            ):
                problems.append(
                    "AZORA_SERVICE_TOKEN_SECRET must be set to a random value of at least 32 "
                    "characters, different from JWT_SECRET"
                )
            if problems:
                raise SettingsError("production mode refuses to start: " + "; ".join(problems))
        elif "service_token_secret" not in given:
            settings = self.model_copy(
                update={"service_token_secret": derived_service_token_secret(self.jwt_secret)}
            )
        decode_key(settings.secrets_key)  # fail at start-up, not on first use
        return settings


def decode_key(value: str) -> bytes:
    """A 32-byte key from base64.

    Raises:
        SettingsError: not base64, or not 32 bytes.
    """
    try:
        key = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise SettingsError("AZORA_SECRETS_KEY must be base64") from None
    if len(key) != 32:
        raise SettingsError("AZORA_SECRETS_KEY must decode to exactly 32 bytes")
    return key


__all__ = [
    "DEV_TENANT_ID",
    "METRICS_PORTS",
    "Count",
    "Keys",
    "Networks",
    "Peers",
    "EnvSpec",
    "Environment",
    "Port",
    "Seconds",
    "Settings",
    "SettingsError",
    "SettingsModel",
    "Strings",
    "TenantDays",
    "setting",
]
