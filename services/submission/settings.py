"""Settings of the SMTP submission server (``AZORA_SUBMISSION_*``), read once at start-up.

The shared `Settings` still apply (mail service target, API key cache TTL, message size and
recipient limits, JWT secret for service tokens, log level, environment) and are passed beside
these, which are the listener's own (so ``host``, ``port`` and ``shutdown_grace`` here are the
listener's): ports, TLS files, and the abuse limits. Production defaults to the standard ports
587 (STARTTLS) and 465 (implicit TLS, RFC 8314) and refuses to start without a certificate and
key; development defaults to unprivileged ports and a self-signed pair under ``var/``.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Self

from pydantic import Field

from services.core.settings import Port, Seconds, Settings, SettingsError, SettingsModel, setting
from services.core.smtp_tls import check_certificate_settings

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
DEV_TLS_DIR = REPO_ROOT / "var" / "submission"
# Ports: production's are the standard ones; development's are unprivileged.
PRODUCTION_PORTS = (587, 465)
DEVELOPMENT_PORTS = (2587, 2465)


# A listening port, or -1: do not listen.
ListenPort = Annotated[int, Field(ge=-1, le=65535)]


class SubmissionSettings(SettingsModel):
    """Configuration of the submission listeners. Durations are seconds."""

    host: str = setting(
        "127.0.0.1", "AZORA_SUBMISSION_HOST", "listen address", shown="`AZORA_HOST`"
    )
    port: ListenPort = setting(
        DEVELOPMENT_PORTS[0],
        "AZORA_SUBMISSION_PORT",
        "SMTP submission with STARTTLS; 0 = a free port, -1 = off",
        production=PRODUCTION_PORTS[0],
        shown=f"{PRODUCTION_PORTS[0]} in production, {DEVELOPMENT_PORTS[0]} otherwise",
    )
    tls_port: ListenPort = setting(
        DEVELOPMENT_PORTS[1],
        "AZORA_SUBMISSION_TLS_PORT",
        "SMTP submission with implicit TLS (RFC 8314); 0 = a free port, -1 = off",
        production=PRODUCTION_PORTS[1],
        shown=f"{PRODUCTION_PORTS[1]} in production, {DEVELOPMENT_PORTS[1]} otherwise",
    )
    # The SMTP ports only say that a socket is open.
    health_port: Port = setting(
        50054, "AZORA_SUBMISSION_HEALTH_PORT", "grpc.health.v1 of the submission server (probes)"
    )
    hostname: str = setting(
        "",
        "AZORA_SUBMISSION_HOSTNAME",
        "name in the greeting and EHLO reply",
        shown="the machine's FQDN",
    )
    cert_file: str = setting(
        "",
        "AZORA_SUBMISSION_CERT_FILE",
        "certificate chain (PEM); required in production",
        shown="development: generated under `var/submission/`",
    )
    key_file: str = setting(
        "",
        "AZORA_SUBMISSION_KEY_FILE",
        "private key of that certificate (PEM); required in production",
        shown="development: generated under `var/submission/`",
    )
    require_tls_for_auth: bool = setting(
        False,
        "AZORA_SUBMISSION_REQUIRE_TLS_FOR_AUTH",
        "AUTH only after STARTTLS or on the implicit-TLS port (530 5.7.0 before); always true "
        "in production",
        shown="true in production, false otherwise",
    )
    max_connections_per_ip: int = setting(
        20, "AZORA_SUBMISSION_MAX_CONNECTIONS_PER_IP", "connections per client address", ge=1
    )
    max_commands_before_auth: int = setting(
        20, "AZORA_SUBMISSION_MAX_COMMANDS_BEFORE_AUTH", "commands of a session before AUTH", ge=1
    )
    idle_timeout: Seconds = setting(
        300.0, "AZORA_SUBMISSION_IDLE_TIMEOUT", "seconds a session may wait between commands"
    )
    session_timeout: Seconds = setting(
        1800.0, "AZORA_SUBMISSION_SESSION_TIMEOUT", "seconds one session may last"
    )
    max_bad_commands: int = setting(
        10, "AZORA_SUBMISSION_MAX_BAD_COMMANDS", "malformed commands of a session", ge=1
    )
    # Wrong credentials per client address within `auth_failure_window`: from the
    # `auth_failures_before_delay`-th on, each answer is held back `auth_failure_delay` s per
    # failure past that (at most 10 s); at `auth_failures_before_block` the address is refused
    # (connections and AUTH) until the window ends (fixed windows aligned to the clock, as
    # every rate limit of the suite).
    auth_failure_window: Seconds = setting(
        600.0,
        "AZORA_SUBMISSION_AUTH_FAILURE_WINDOW",
        "seconds over which wrong credentials of a client address are counted",
    )
    auth_failures_before_delay: int = setting(
        3,
        "AZORA_SUBMISSION_AUTH_FAILURES_BEFORE_DELAY",
        "wrong credentials after which each answer is held back",
        ge=1,
    )
    auth_failure_delay: Seconds = setting(
        1.0,
        "AZORA_SUBMISSION_AUTH_FAILURE_DELAY",
        "seconds of hold-back per failure past that (at most 10 s)",
    )
    auth_failures_before_block: int = setting(
        10,
        "AZORA_SUBMISSION_AUTH_FAILURES_BEFORE_BLOCK",
        "wrong credentials after which the address is refused (connections and AUTH)",
        ge=1,
    )
    shutdown_grace: Seconds = setting(
        30.0,
        "AZORA_SUBMISSION_SHUTDOWN_GRACE",
        "seconds transactions in progress may finish after SIGTERM before the rest get 421",
    )
    submit_timeout: Seconds = setting(
        60.0,
        "AZORA_SUBMISSION_SUBMIT_TIMEOUT",
        "deadline of the mail service call that stores a message (then 451 4.3.0)",
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str], base: Settings) -> Self:
        """Read ``AZORA_SUBMISSION_*`` and check production's requirements.

        Raises:
            SettingsError: a value is malformed, or production lacks its certificate and key.
        """
        production = base.is_production
        if "AZORA_SUBMISSION_AUTH_BLOCK_SECONDS" in env:
            # Said rather than ignored: a block length of its own no longer exists.
            raise SettingsError(
                "AZORA_SUBMISSION_AUTH_BLOCK_SECONDS is gone: an address that failed "
                "authentication AZORA_SUBMISSION_AUTH_FAILURES_BEFORE_BLOCK times is refused "
                "until the AZORA_SUBMISSION_AUTH_FAILURE_WINDOW window ends"
            )
        values = cls.values_from_env(env, production=production)
        values.setdefault("host", base.host)
        values.setdefault("hostname", socket.getfqdn())
        settings = cls.validated(values)
        if production:
            settings = settings.model_copy(update={"require_tls_for_auth": True})
        check_certificate_settings(
            settings.cert_file,
            settings.key_file,
            prefix="AZORA_SUBMISSION",
            server="submission server",
            production=production,
        )
        if settings.port < 0 and settings.tls_port < 0:
            raise SettingsError("AZORA_SUBMISSION_PORT and AZORA_SUBMISSION_TLS_PORT are both off")
        return settings


__all__ = ["DEV_TLS_DIR", "SubmissionSettings"]
