"""Settings of the SMTP submission server (``AZORA_SUBMISSION_*``), read once at start-up.

The shared `Settings` still apply (mail service target, API key cache TTL, message size and
recipient limits, JWT secret for service tokens, log level, environment); these are the
listener's own: ports, TLS files, and the abuse limits. Production defaults to the standard
ports 587 (STARTTLS) and 465 (implicit TLS, RFC 8314) and refuses to start without a certificate
and key; development defaults to unprivileged ports and a self-signed pair under ``var/``.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from services.core.settings import EnvReader, Settings, SettingsError

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
DEV_TLS_DIR = REPO_ROOT / "var" / "submission"
# Ports: production's are the standard ones; development's are unprivileged.
PRODUCTION_PORTS = (587, 465)
DEVELOPMENT_PORTS = (2587, 2465)


@dataclass(frozen=True, slots=True)
class SubmissionSettings:
    """Configuration of the submission listeners. Durations are seconds."""

    host: str = "127.0.0.1"
    # STARTTLS port and implicit-TLS port; 0 picks a free port (tests), -1 turns it off.
    port: int = DEVELOPMENT_PORTS[0]
    tls_port: int = DEVELOPMENT_PORTS[1]
    # grpc.health.v1 for probes (the SMTP ports only say that a socket is open).
    health_port: int = 50054
    hostname: str = ""
    cert_file: str = ""
    key_file: str = ""
    # AUTH only over TLS (530 5.7.0 before STARTTLS). Always true in production.
    require_tls_for_auth: bool = False
    max_connections_per_ip: int = 20
    max_commands_before_auth: int = 20
    idle_timeout: float = 300.0
    session_timeout: float = 1800.0
    max_bad_commands: int = 10
    # Wrong credentials per client address within a window of `auth_failure_window` (fixed
    # windows aligned to the clock, as every rate limit of the suite): from the
    # `auth_failures_before_delay`-th on, each answer is held back `auth_failure_delay` s per
    # failure past that (at most 10 s); at `auth_failures_before_block` the address is refused
    # (connections and AUTH) until the window ends.
    auth_failure_window: float = 600.0
    auth_failures_before_delay: int = 3
    auth_failure_delay: float = 1.0
    auth_failures_before_block: int = 10
    # How long transactions in progress may finish after SIGTERM before the rest get 421.
    shutdown_grace: float = 30.0
    # Deadline of the mail service call that stores a message (then 451 4.3.0).
    submit_timeout: float = 60.0

    @classmethod
    def from_env(cls, env: Mapping[str, str], base: Settings) -> SubmissionSettings:
        """Read ``AZORA_SUBMISSION_*`` and check production's requirements.

        Raises:
            SettingsError: a value is malformed, or production lacks its certificate and key.
        """
        reader = EnvReader(env)
        defaults = cls()
        production = base.is_production
        port, tls_port = PRODUCTION_PORTS if production else DEVELOPMENT_PORTS
        settings = cls(
            host=env.get("AZORA_SUBMISSION_HOST", base.host).strip(),
            port=_port(reader, "AZORA_SUBMISSION_PORT", port),
            tls_port=_port(reader, "AZORA_SUBMISSION_TLS_PORT", tls_port),
            health_port=reader.port("AZORA_SUBMISSION_HEALTH_PORT", defaults.health_port),
            hostname=env.get("AZORA_SUBMISSION_HOSTNAME", "").strip() or socket.getfqdn(),
            cert_file=env.get("AZORA_SUBMISSION_CERT_FILE", "").strip(),
            key_file=env.get("AZORA_SUBMISSION_KEY_FILE", "").strip(),
            require_tls_for_auth=production
            or reader.flag("AZORA_SUBMISSION_REQUIRE_TLS_FOR_AUTH", False),
            max_connections_per_ip=reader.integer(
                "AZORA_SUBMISSION_MAX_CONNECTIONS_PER_IP",
                defaults.max_connections_per_ip,
                minimum=1,
            ),
            max_commands_before_auth=reader.integer(
                "AZORA_SUBMISSION_MAX_COMMANDS_BEFORE_AUTH",
                defaults.max_commands_before_auth,
                minimum=1,
            ),
            idle_timeout=reader.number("AZORA_SUBMISSION_IDLE_TIMEOUT", defaults.idle_timeout),
            session_timeout=reader.number(
                "AZORA_SUBMISSION_SESSION_TIMEOUT", defaults.session_timeout
            ),
            max_bad_commands=reader.integer(
                "AZORA_SUBMISSION_MAX_BAD_COMMANDS", defaults.max_bad_commands, minimum=1
            ),
            auth_failure_window=reader.number(
                "AZORA_SUBMISSION_AUTH_FAILURE_WINDOW", defaults.auth_failure_window
            ),
            auth_failures_before_delay=reader.integer(
                "AZORA_SUBMISSION_AUTH_FAILURES_BEFORE_DELAY",
                defaults.auth_failures_before_delay,
                minimum=1,
            ),
            auth_failure_delay=reader.number(
                "AZORA_SUBMISSION_AUTH_FAILURE_DELAY", defaults.auth_failure_delay
            ),
            auth_failures_before_block=reader.integer(
                "AZORA_SUBMISSION_AUTH_FAILURES_BEFORE_BLOCK",
                defaults.auth_failures_before_block,
                minimum=1,
            ),
            shutdown_grace=reader.number(
                "AZORA_SUBMISSION_SHUTDOWN_GRACE", defaults.shutdown_grace
            ),
            submit_timeout=reader.number(
                "AZORA_SUBMISSION_SUBMIT_TIMEOUT", defaults.submit_timeout
            ),
        )
        if "AZORA_SUBMISSION_AUTH_BLOCK_SECONDS" in env:
            # Said rather than ignored: a block length of its own no longer exists.
            reader.errors.append(
                "AZORA_SUBMISSION_AUTH_BLOCK_SECONDS is gone: an address that failed "
                "authentication AZORA_SUBMISSION_AUTH_FAILURES_BEFORE_BLOCK times is refused "
                "until the AZORA_SUBMISSION_AUTH_FAILURE_WINDOW window ends"
            )
        reader.raise_if_errors()
        if bool(settings.cert_file) != bool(settings.key_file):
            raise SettingsError(
                "AZORA_SUBMISSION_CERT_FILE and AZORA_SUBMISSION_KEY_FILE go together"
            )
        if production and not settings.cert_file:
            raise SettingsError(
                "production mode refuses to start: AZORA_SUBMISSION_CERT_FILE and "
                "AZORA_SUBMISSION_KEY_FILE must name the submission server's certificate and key"
            )
        if settings.port < 0 and settings.tls_port < 0:
            raise SettingsError("AZORA_SUBMISSION_PORT and AZORA_SUBMISSION_TLS_PORT are both off")
        return settings

    def with_overrides(self, **changes: object) -> SubmissionSettings:
        """A copy with some fields changed (tests)."""
        return replace(self, **changes)  # type: ignore[arg-type]


def _port(reader: EnvReader, name: str, default: int) -> int:
    """A port, where -1 means "do not listen"."""
    value = reader.integer(name, default, minimum=-1)
    if value > 65535:
        reader.errors.append(f"{name} must be a port number (0-65535) or -1, got {value}")
    return value


__all__ = ["DEV_TLS_DIR", "SubmissionSettings"]
