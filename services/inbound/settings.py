"""Settings of the inbound SMTP server (``AZORA_INBOUND_*``), read once at start-up.

The shared `Settings` still apply (domain and mail service targets, message size limit, DNS
nameservers for the SPF/DKIM/DMARC checks, service token key, log level, environment) and are
passed beside these, which are the listener's own. Production listens on port 25 and refuses to
start without a certificate and key for STARTTLS (the same two settings as the submission
server's, under this server's prefix); development uses an unprivileged port and a self-signed
pair under ``var/inbound/``. STARTTLS is opportunistic: senders may deliver without it.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Self

from services.core.settings import Port, Seconds, Settings, SettingsModel, setting
from services.core.smtp_tls import check_certificate_settings

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
DEV_TLS_DIR = REPO_ROOT / "var" / "inbound"
PRODUCTION_PORT = 25
DEVELOPMENT_PORT = 2525


class InboundSettings(SettingsModel):
    """Configuration of the inbound listener. Durations are seconds."""

    host: str = setting("127.0.0.1", "AZORA_INBOUND_HOST", "listen address", shown="`AZORA_HOST`")
    port: Port = setting(
        DEVELOPMENT_PORT,
        "AZORA_INBOUND_PORT",
        "inbound SMTP (MX) with opportunistic STARTTLS; 0 = a free port",
        production=PRODUCTION_PORT,
        shown=f"{PRODUCTION_PORT} in production, {DEVELOPMENT_PORT} otherwise",
    )
    # The SMTP port only says that a socket is open.
    health_port: Port = setting(
        50056, "AZORA_INBOUND_HEALTH_PORT", "grpc.health.v1 of the inbound server (probes)"
    )
    hostname: str = setting(
        "",
        "AZORA_INBOUND_HOSTNAME",
        "name in the greeting, EHLO reply and Authentication-Results",
        shown="the machine's FQDN",
    )
    cert_file: str = setting(
        "",
        "AZORA_INBOUND_CERT_FILE",
        "certificate chain (PEM) for STARTTLS; required in production",
        shown="development: generated under `var/inbound/`",
    )
    key_file: str = setting(
        "",
        "AZORA_INBOUND_KEY_FILE",
        "private key of that certificate (PEM); required in production",
        shown="development: generated under `var/inbound/`",
    )
    max_connections_per_ip: int = setting(
        10, "AZORA_INBOUND_MAX_CONNECTIONS_PER_IP", "connections per client address", ge=1
    )
    max_messages_per_ip: int = setting(
        100,
        "AZORA_INBOUND_MAX_MESSAGES_PER_IP",
        "messages (DATA) one client address may send per window; then 451 4.7.1",
        ge=1,
    )
    message_window: Seconds = setting(
        60.0, "AZORA_INBOUND_MESSAGE_WINDOW", "seconds over which messages per address count"
    )
    max_recipients: int = setting(
        50, "AZORA_INBOUND_MAX_RECIPIENTS", "recipients of one transaction (then 452)", ge=1
    )
    idle_timeout: Seconds = setting(
        300.0, "AZORA_INBOUND_IDLE_TIMEOUT", "seconds a session may wait between commands"
    )
    session_timeout: Seconds = setting(
        1800.0, "AZORA_INBOUND_SESSION_TIMEOUT", "seconds one session may last"
    )
    max_bad_commands: int = setting(
        10, "AZORA_INBOUND_MAX_BAD_COMMANDS", "malformed commands of a session", ge=1
    )
    shutdown_grace: Seconds = setting(
        30.0,
        "AZORA_INBOUND_SHUTDOWN_GRACE",
        "seconds transactions in progress may finish after SIGTERM before the rest get 421",
    )
    route_cache_ttl: Seconds = setting(
        10.0,
        "AZORA_INBOUND_ROUTE_CACHE_TTL",
        "seconds an answer of the domain service about a recipient (route or none) is reused",
    )
    call_timeout: Seconds = setting(
        30.0,
        "AZORA_INBOUND_CALL_TIMEOUT",
        "deadline of each call to the domain and mail services (then 451 4.3.0)",
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str], base: Settings) -> Self:
        """Read ``AZORA_INBOUND_*`` and check production's requirements.

        Raises:
            SettingsError: a value is malformed, or production lacks its certificate and key.
        """
        production = base.is_production
        values = cls.values_from_env(env, production=production)
        values.setdefault("host", base.host)
        values.setdefault("hostname", socket.getfqdn())
        settings = cls.validated(values)
        check_certificate_settings(
            settings.cert_file,
            settings.key_file,
            prefix="AZORA_INBOUND",
            server="inbound server",
            production=production,
        )
        return settings


__all__ = ["DEV_TLS_DIR", "InboundSettings"]
