"""Composition root of the SMTP submission server (``python -m services.submission``).

Listens for SMTP submission with STARTTLS (587 in production) and implicit TLS (465), resolves
AUTH passwords as API keys through the domain service and hands messages to the mail service,
both over gRPC with the process's own clients. A grpc.health.v1 server on its own port is what
Kubernetes probes, like the other processes (SERVING while the listeners accept).

SIGTERM: health turns NOT_SERVING and the listeners stop accepting; sessions between
transactions get ``421 4.3.2`` at once, transactions in progress may finish within the grace
period (their 250 is stored), then everyone left gets 421 and the process exits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import sys
from dataclasses import dataclass, field

import grpc

from services.core.api_key_client import remote_api_key_resolver
from services.core.auth import ApiKeyResolver
from services.core.event_loop import run_event_loop
from services.core.logs import configure_logging
from services.core.metrics import start_exposition
from services.core.server import ServiceServer, create_server
from services.core.settings import Settings, SettingsError
from services.core.smtp_server import SmtpListeners, silence_protocol_log, stop_front_door
from services.core.smtp_tls import listener_context
from services.core.tracing import configure_tracing, traced_channel
from services.submission.mail_client import GrpcMailSubmitter
from services.submission.server import (
    ClientLimits,
    MailSubmitter,
    SubmissionHandler,
    SubmissionSMTP,
)
from services.submission.settings import DEV_TLS_DIR, SubmissionSettings

SERVICE_NAME = "submission"
log = logging.getLogger(__name__)


@dataclass
class SubmissionApp:
    """The running listeners, their shared limits and the health server."""

    settings: SubmissionSettings
    limits: ClientLimits
    health: ServiceServer
    listeners: SmtpListeners
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    @property
    def ports(self) -> dict[str, int]:
        """Bound ports: "starttls" and "tls" (absent when turned off)."""
        return self.listeners.ports

    async def stop(self, grace: float) -> None:
        """Stop accepting, let transactions in progress finish for `grace` s, 421 the rest."""
        await stop_front_door(self.health, self.listeners, self.channels, grace)


def tls_context(settings: SubmissionSettings) -> ssl.SSLContext:
    """The configured certificate, or (outside production) the generated development pair."""
    return listener_context(
        settings.cert_file,
        settings.key_file,
        hostname=settings.hostname,
        development_dir=DEV_TLS_DIR,
    )


async def build_app(
    settings: Settings,
    submission: SubmissionSettings,
    *,
    api_keys: ApiKeyResolver | None = None,
    mail: MailSubmitter | None = None,
    context: ssl.SSLContext | None = None,
) -> SubmissionApp:
    """Start the listeners and the health server.

    Args:
        settings: the suite's settings (service targets, key cache TTL, message limits).
        submission: the listeners' own settings (ports 0 pick free ports).
        api_keys: where API keys are resolved (default: the domain service, cached).
        mail: where messages go (default: the mail service).
        context: TLS certificate and key (default: from `submission`).
    """
    channels: list[grpc.aio.Channel] = []
    if api_keys is None:
        api_keys, domain_channel = remote_api_key_resolver(settings)
        channels.append(domain_channel)
    if mail is None:
        mail_channel = traced_channel(
            settings.mail_service_target,
            options=[("grpc.max_send_message_length", settings.grpc_max_message_bytes)],
        )
        channels.append(mail_channel)
        mail = GrpcMailSubmitter(mail_channel, timeout=submission.submit_timeout)
    context = context or tls_context(submission)
    limits = ClientLimits.from_settings(submission)
    handler = SubmissionHandler(mail=mail, max_recipients=settings.mail_max_recipients)

    def factory(implicit_tls: bool) -> SubmissionSMTP:
        return SubmissionSMTP(
            handler,
            settings=submission,
            limits=limits,
            api_keys=api_keys,
            message_size_limit=settings.mail_max_message_size,
            implicit_tls=implicit_tls,
            tls_context=None if implicit_tls else context,
        )

    listeners = SmtpListeners(limits)
    if submission.port >= 0:
        await listeners.listen(
            "starttls", lambda: factory(False), host=submission.host, port=submission.port
        )
    if submission.tls_port >= 0:
        await listeners.listen(
            "tls",
            lambda: factory(True),
            host=submission.host,
            port=submission.tls_port,
            ssl_context=context,
        )
    health = await create_server(
        bind=f"{submission.host}:{submission.health_port}", service_names=(), registrars=()
    )
    await health.set_serving(True)
    log.info("serving", extra={"fields": {**listeners.ports, "health": health.port}})
    return SubmissionApp(submission, limits, health, listeners, channels)


def main() -> None:
    """Entry point: settings, logging, listeners, serve until SIGTERM/SIGINT, drain."""
    try:
        settings = Settings.from_env(os.environ, service_name=SERVICE_NAME)
        submission = SubmissionSettings.from_env(os.environ, settings)
    except SettingsError as exc:
        print(f"{SERVICE_NAME}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(service=SERVICE_NAME, level=settings.log_level)
    silence_protocol_log()
    configure_tracing(
        service=SERVICE_NAME, version=settings.version, otlp_endpoint=settings.otel_endpoint
    )
    start_exposition(settings.metrics_host, settings.metrics_port)

    async def serve() -> None:
        app = await build_app(settings, submission)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down", extra={"fields": {"grace_seconds": submission.shutdown_grace}})
        await app.stop(submission.shutdown_grace)
        log.info("stopped")

    run_event_loop(serve(), settings)


__all__ = ["SERVICE_NAME", "SubmissionApp", "build_app", "main", "tls_context"]
