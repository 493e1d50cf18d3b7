"""Fixtures of the inbound server tests: the server in-process between the real services.

Routes come from a domain service on the session's database (domains made ACTIVE through the
tests' Knot zone) that asks the test's mail service about webhook endpoints; messages are stored
by that real mail service (`local_mail`, fresh database). Sender domains
publish SPF, DKIM and DMARC records in the same Knot server, which every lookup of the checks
goes to (pyspf through dnspython's default resolver, pointed there for the module and restored).
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dkim  # type: ignore[import-untyped]  # dkimpy ships no type information
import dns.resolver
import grpc
import pytest
from azora.domain.v1 import domain_pb2, domain_pb2_grpc, routes_pb2, routes_pb2_grpc
from azora.mail.v1 import inbound_pb2_grpc, webhooks_pb2_grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from services.core.clock import ManualClock
from services.core.smtp_tls import development_pair, server_context
from services.domain.app import DomainApp
from services.domain.app import build_app as build_domain_app
from services.inbound.app import InboundApp, build_app
from services.inbound.authentication import configure_default_resolver
from services.inbound.settings import InboundSettings
from services.mail.feedback.webhook_dispatcher import build_dispatcher
from tests.conftest import Tenant, unique_domain
from tests.mail.conftest import LocalMail, local_mail  # noqa: F401 - fixture
from tests.support.dns_server import KnotServer
from tests.support.settings import SuiteSettings
from tests.support.webhook_receiver import Receiver

SELECTOR = "in1"


@dataclass
class SenderDomain:
    """A remote sender's domain with SPF, DKIM and DMARC published in the tests' zone."""

    name: str
    private_key: bytes

    def sign(self, message: bytes) -> bytes:
        """`message` with a DKIM-Signature of this domain on top."""
        signature: bytes = dkim.sign(
            message,
            SELECTOR.encode(),
            self.name.encode(),
            self.private_key,
            include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
        )
        return signature + message


@dataclass
class Inbound:
    """An inbound server with a tenant's ACTIVE domain (no routes yet)."""

    app: InboundApp
    mail: LocalMail
    domains: DomainApp
    tenant: Tenant
    domain: domain_pb2.Domain
    routes: routes_pb2_grpc.RouteServiceAsyncStub
    inbound: inbound_pb2_grpc.InboundServiceAsyncStub
    cafile: Path

    @property
    def port(self) -> int:
        """The SMTP port."""
        return self.app.port

    async def add_route(self, **fields: Any) -> routes_pb2.Route:
        """A route of the domain."""
        return await self.routes.CreateRoute(
            routes_pb2.CreateRouteRequest(domain_id=self.domain.id, **fields),
            metadata=self.tenant.metadata,
        )


@pytest.fixture(scope="module")
def knot_resolver(settings: SuiteSettings) -> Iterator[None]:
    """Pyspf's lookups go to the tests' Knot server for this module."""
    saved = dns.resolver.default_resolver
    configure_default_resolver(settings.dns_nameservers, settings.dns_port, settings.dns_timeout)
    yield
    dns.resolver.default_resolver = saved


@pytest.fixture
def sender_domain(knot_server: KnotServer) -> SenderDomain:
    """A sender domain: SPF allows 127.0.0.1, a DKIM key, DMARC p=reject."""
    name = unique_domain("sender")
    # 1024 bits: the key's TXT record must fit one 255-octet string of the tests' zone file.
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    knot_server.set_zone(
        name,
        [
            ("@", "TXT", '"v=spf1 ip4:127.0.0.1 -all"'),
            (
                f"{SELECTOR}._domainkey",
                "TXT",
                f'"v=DKIM1; k=rsa; p={base64.b64encode(public).decode()}"',
            ),
            ("_dmarc", "TXT", '"v=DMARC1; p=reject"'),
        ],
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return SenderDomain(name, pem)


async def active_domain(
    stub: domain_pb2_grpc.DomainServiceAsyncStub, tenant: Tenant, knot: KnotServer
) -> domain_pb2.Domain:
    """A new domain of `tenant`, verified through the tests' DNS server."""
    name = unique_domain()
    domain = await stub.CreateDomain(
        domain_pb2.CreateDomainRequest(name=name), metadata=tenant.metadata
    )
    knot.set_zone(name, [("@", "TXT", f'"azora-verify={domain.verification_token}"')])
    result = await stub.VerifyDomain(
        domain_pb2.VerifyDomainRequest(id=domain.id), metadata=tenant.metadata
    )
    assert result.domain.status == domain_pb2.DOMAIN_STATUS_ACTIVE
    return result.domain


StartInbound = Callable[..., Any]


@pytest.fixture
async def start_inbound(
    local_mail: LocalMail,  # noqa: F811
    domain_app: DomainApp,
    domains_stub: domain_pb2_grpc.DomainServiceAsyncStub,
    settings: SuiteSettings,
    tenant: Tenant,
    knot_server: KnotServer,
    knot_resolver: None,
    tmp_path: Path,
    clock: ManualClock,
) -> AsyncIterator[StartInbound]:
    """Start an inbound server (settings overridable) in front of the real services."""
    domain = await active_domain(domains_stub, tenant, knot_server)
    # Webhook routes are checked against the mail service's endpoints: this domain service
    # (same database as the session's) asks the test's mail service.
    routing = await build_domain_app(
        settings.with_overrides(mail_service_target=f"127.0.0.1:{local_mail.app.running.port}"),
        clock=clock,
        bind="127.0.0.1:0",
        run_lifecycle=False,
    )
    cert, key = development_pair(tmp_path / "tls", "mx.test")
    apps: list[InboundApp] = []
    channels: list[grpc.aio.Channel] = []

    async def start(
        mail_target: str | None = None, domain_target: str | None = None, **overrides: Any
    ) -> Inbound:
        suite = settings.with_overrides(
            mail_service_target=mail_target or f"127.0.0.1:{local_mail.app.running.port}",
            domain_service_target=domain_target or f"127.0.0.1:{routing.running.port}",
        )
        own = InboundSettings(port=0, health_port=0, hostname="mx.test").with_overrides(**overrides)
        app = await build_app(suite, own, context=server_context(cert, key))
        apps.append(app)
        domain_channel = grpc.aio.insecure_channel(f"127.0.0.1:{routing.running.port}")
        mail_channel = grpc.aio.insecure_channel(f"127.0.0.1:{local_mail.app.running.port}")
        channels.extend((domain_channel, mail_channel))
        return Inbound(
            app,
            local_mail,
            routing,
            tenant,
            domain,
            routes_pb2_grpc.RouteServiceStub(domain_channel),
            inbound_pb2_grpc.InboundServiceStub(mail_channel),
            cert,
        )

    yield start
    for app in apps:
        await app.stop(0)
    for channel in channels:
        await channel.close()
    await routing.running.stop(None)


@pytest.fixture
async def inbound(start_inbound: StartInbound) -> Inbound:
    """An inbound server with the default settings."""
    started: Inbound = await start_inbound()
    return started


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """An HTTP receiver on loopback that answers 200 to everything."""
    running = await Receiver().start()
    yield running
    await running.close()


def webhooks_of(inbound: Inbound) -> webhooks_pb2_grpc.WebhookServiceAsyncStub:
    """WebhookService of the test's mail service."""
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{inbound.mail.app.running.port}")
    inbound.mail.app.running.channels.append(channel)
    return webhooks_pb2_grpc.WebhookServiceStub(channel)


async def dispatch(inbound: Inbound, receiver: Receiver, count: int) -> None:
    """What the webhook dispatcher process does, round by round, until `count` requests came."""
    mail = inbound.mail
    dispatcher, transport = build_dispatcher(
        mail.settings, mail.app.running.database.db, clock=mail.clock
    )
    try:
        for _ in range(5):
            await dispatcher.step()
            await dispatcher.drain()
            if len(receiver.requests) >= count:
                break
    finally:
        await transport.close()
    await receiver.wait_for(count)
