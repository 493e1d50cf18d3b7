"""Composition root of the inbound SMTP server (``python -m services.inbound``).

Listens for mail to the hosted domains (port 25 in production), asks the domain service for
each recipient's route and stores accepted messages through the mail service, both over gRPC
with service tokens. A grpc.health.v1 server on its own port is what Kubernetes probes
(SERVING while the listener accepts).

SIGTERM: health turns NOT_SERVING and the listener stops accepting; sessions between
transactions get ``421 4.3.2`` at once, transactions in progress may finish within the grace
period, then everyone left gets 421 and the process exits (the shared `SmtpListeners.stop`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import sys
import time
from dataclasses import dataclass, field

import grpc

from services.core.event_loop import run_event_loop
from services.core.logs import configure_logging
from services.core.metrics import start_exposition
from services.core.server import ServiceServer, create_server
from services.core.settings import Settings, SettingsError
from services.core.smtp_server import (
    ConnectionLimits,
    SmtpListeners,
    WindowCounter,
    silence_protocol_log,
    stop_front_door,
)
from services.core.smtp_tls import listener_context
from services.core.tracing import configure_tracing, traced_channel
from services.inbound.authentication import MessageAuthenticator, configure_default_resolver
from services.inbound.clients import GrpcInboundStorer, GrpcRecipientResolver
from services.inbound.server import (
    Authenticator,
    InboundHandler,
    InboundSMTP,
    InboundStorer,
    RecipientResolver,
)
from services.inbound.settings import DEV_TLS_DIR, InboundSettings

SERVICE_NAME = "inbound"
log = logging.getLogger(__name__)


@dataclass
class InboundApp:
    """The running listener, its limits and the health server."""

    settings: InboundSettings
    limits: ConnectionLimits
    health: ServiceServer
    listeners: SmtpListeners
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    @property
    def port(self) -> int:
        """The bound SMTP port."""
        return self.listeners.ports["smtp"]

    async def stop(self, grace: float) -> None:
        """Stop accepting, let transactions in progress finish for `grace` s, 421 the rest."""
        await stop_front_door(self.health, self.listeners, self.channels, grace)


def tls_context(settings: InboundSettings) -> ssl.SSLContext:
    """The configured certificate, or (outside production) the generated development pair."""
    return listener_context(
        settings.cert_file,
        settings.key_file,
        hostname=settings.hostname,
        development_dir=DEV_TLS_DIR,
    )


async def build_app(
    settings: Settings,
    inbound: InboundSettings,
    *,
    resolver: RecipientResolver | None = None,
    storer: InboundStorer | None = None,
    authenticator: Authenticator | None = None,
    context: ssl.SSLContext | None = None,
) -> InboundApp:
    """Start the listener and the health server.

    Args:
        settings: the suite's settings (service targets, message size limit, DNS).
        inbound: the listener's own settings (port 0 picks a free port).
        resolver: where recipients' routes come from (default: the domain service).
        storer: where messages go (default: the mail service).
        authenticator: SPF/DKIM/DMARC checks (default: through the configured nameservers).
        context: TLS certificate and key for STARTTLS (default: from `inbound`).
    """
    channels: list[grpc.aio.Channel] = []
    if resolver is None:
        domain_channel = traced_channel(settings.domain_service_target)
        channels.append(domain_channel)
        resolver = GrpcRecipientResolver(
            domain_channel,
            settings=settings,
            ttl=inbound.route_cache_ttl,
            timeout=inbound.call_timeout,
        )
    if storer is None:
        mail_channel = traced_channel(
            settings.mail_service_target,
            options=[("grpc.max_send_message_length", settings.grpc_max_message_bytes)],
        )
        channels.append(mail_channel)
        storer = GrpcInboundStorer(mail_channel, settings=settings, timeout=inbound.call_timeout)
    if authenticator is None:
        authenticator = MessageAuthenticator(
            hostname=inbound.hostname,
            nameservers=settings.dns_nameservers,
            port=settings.dns_port,
            timeout=settings.dns_timeout,
        )
    context = context or tls_context(inbound)
    limits = ConnectionLimits(max_connections_per_ip=inbound.max_connections_per_ip)
    handler = InboundHandler(
        settings=inbound,
        resolver=resolver,
        authenticator=authenticator,
        storer=storer,
        messages=WindowCounter(
            limit=inbound.max_messages_per_ip, window=inbound.message_window, clock=time.time
        ),
    )

    def factory() -> InboundSMTP:
        return InboundSMTP(
            handler,
            settings=inbound,
            limits=limits,
            message_size_limit=settings.mail_max_message_size,
            tls_context=context,
        )

    listeners = SmtpListeners(limits)
    await listeners.listen("smtp", factory, host=inbound.host, port=inbound.port)
    health = await create_server(
        bind=f"{inbound.host}:{inbound.health_port}", service_names=(), registrars=()
    )
    await health.set_serving(True)
    log.info("serving", extra={"fields": {**listeners.ports, "health": health.port}})
    return InboundApp(inbound, limits, health, listeners, channels)


def main() -> None:
    """Entry point: settings, logging, listener, serve until SIGTERM/SIGINT, drain."""
    try:
        settings = Settings.from_env(os.environ, service_name=SERVICE_NAME)
        inbound = InboundSettings.from_env(os.environ, settings)
    except SettingsError as exc:
        print(f"{SERVICE_NAME}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(service=SERVICE_NAME, level=settings.log_level)
    silence_protocol_log()
    configure_tracing(
        service=SERVICE_NAME, version=settings.version, otlp_endpoint=settings.otel_endpoint
    )
    configure_default_resolver(settings.dns_nameservers, settings.dns_port, settings.dns_timeout)
    start_exposition(settings.metrics_host, settings.metrics_port)

    async def serve() -> None:
        app = await build_app(settings, inbound)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down", extra={"fields": {"grace_seconds": inbound.shutdown_grace}})
        await app.stop(inbound.shutdown_grace)
        log.info("stopped")

    run_event_loop(serve(), settings)


__all__ = ["SERVICE_NAME", "InboundApp", "build_app", "main", "tls_context"]
