"""SSRF through the SMTP relay host (OWASP API7), with the services in production mode.

tests/smtp/test_ssrf_guard.py checks the guard itself (every forbidden range, names resolving
to them at the connection test's resolve step, address literals in configs) on an SMTP service
whose setting was switched off by hand. Here the SMTP and mail services run with
AZORA_ENV=production and nothing else about the guard configured, names resolve through the
test's Knot server, and every way to make the suite open a connection is tried: storing a
relay (address literals of every forbidden kind, names resolving to them), testing it, and
delivering mail through it. A loopback aiosmtpd stands where the forbidden relay would be and
must never see a connection.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from azora.domain.v1 import domain_pb2
from azora.mail.v1 import mail_pb2, mail_pb2_grpc
from azora.smtp.v1 import smtp_pb2, smtp_pb2_grpc

from services.core.settings import Settings
from services.domain.app import DomainApp
from services.mail.app import build_app as build_mail
from services.smtp.app import build_app as build_smtp
from tests.conftest import TEST_JWT_SECRET, Tenant, make_settings, new_tenant, unique_domain
from tests.support.dns_server import KnotServer

FORBIDDEN_LITERALS = [
    "127.0.0.1",
    "127.1.2.3",
    "[::1]",
    "10.0.0.1",
    "172.16.5.4",
    "192.168.1.1",
    "169.254.169.254",
    "[fe80::1]",
    "[::ffff:127.0.0.1]",
    "[::ffff:10.0.0.1]",
    "[::ffff:169.254.169.254]",
    "0.0.0.0",  # noqa: S104 (a forbidden target, not a bind address)
    "100.64.0.1",
    "[fd00::1]",
]
# Names in the hostile zone -> what they resolve to.
HOSTILE_NAMES = {
    "loop": ("A", "127.0.0.1"),
    "loop6": ("AAAA", "::1"),
    "private": ("A", "10.1.2.3"),
    "linklocal": ("A", "169.254.169.254"),
    "linklocal6": ("AAAA", "fe80::1"),
    "mapped": ("AAAA", "::ffff:127.0.0.1"),
    "mapped-private": ("AAAA", "::ffff:192.168.0.1"),
    "unspecified": ("A", "0.0.0.0"),  # noqa: S104
}


@dataclass
class Production:
    """SMTP and mail services in production mode, and the loopback trap relay."""

    smtp: smtp_pb2_grpc.SmtpServiceAsyncStub
    mail: mail_pb2_grpc.MailServiceAsyncStub
    settings: Settings
    trap_port: int
    connections: list[str]
    zone: str


@pytest.fixture(scope="module")
async def production(
    ferretdb: str, domain_app: DomainApp, knot_server: KnotServer
) -> AsyncIterator[Production]:
    """The SMTP and mail services with AZORA_ENV=production (own database), and the trap."""
    zone = f"ssrf{secrets.token_hex(4)}.test"
    knot_server.set_zone(
        zone, [(label, kind, value) for label, (kind, value) in HOSTILE_NAMES.items()]
    )
    connections: list[str] = []

    async def trap(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(str(writer.get_extra_info("peername")))
        writer.write(b"220 trap ESMTP\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(trap, "127.0.0.1", 0)
    trap_port = server.sockets[0].getsockname()[1]
    settings = make_settings(
        ferretdb,
        f"azora_ssrf_{secrets.token_hex(4)}",
        AZORA_ENV="production",
        JWT_SECRET=TEST_JWT_SECRET,
        AZORA_SECRETS_KEY=base64.b64encode(secrets.token_bytes(32)).decode(),
        AZORA_DNS_NAMESERVERS=knot_server.host,
        AZORA_DNS_PORT=str(knot_server.port),
        AZORA_DNS_TIMEOUT="2",
        AZORA_DOMAIN_SERVICE_TARGET=f"127.0.0.1:{domain_app.running.port}",
        AZORA_MAIL_POLL_INTERVAL="0.1",
        # One attempt per email: a retry after the test would resolve the test's names
        # through the real system resolver (and wait for its timeouts).
        AZORA_MAIL_RETRY_MIN_BACKOFF="3600",
        AZORA_MAIL_RETRY_MAX_BACKOFF="3600",
    )
    assert settings.is_production
    smtp = await build_smtp(settings, bind="127.0.0.1:0", run_lifecycle=False)
    mail = await build_mail(
        settings.with_overrides(smtp_service_target=f"127.0.0.1:{smtp.running.port}"),
        bind="127.0.0.1:0",
    )
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{smtp.running.port}") as smtp_channel,
        grpc.aio.insecure_channel(f"127.0.0.1:{mail.running.port}") as mail_channel,
    ):
        yield Production(
            smtp_pb2_grpc.SmtpServiceStub(smtp_channel),
            mail_pb2_grpc.MailServiceStub(mail_channel),
            settings,
            trap_port,
            connections,
            zone,
        )
    await mail.running.stop(None)
    await smtp.running.database.client.drop_database(settings.mongodb_database)
    await smtp.running.stop(None)
    server.close()
    await server.wait_closed()
    knot_server.remove_zone(zone)


@pytest.fixture(autouse=True)
def _fresh_trap(request: pytest.FixtureRequest) -> None:
    """Each test starts with no recorded trap connections."""
    if "production" in request.fixturenames:
        request.getfixturevalue("production").connections.clear()


def test_production_forbids_private_relays_by_default() -> None:
    # Production without any SSRF setting: private hosts are forbidden.
    settings = Settings.from_env(
        {
            "AZORA_ENV": "production",
            "JWT_SECRET": TEST_JWT_SECRET,
            "AZORA_SERVICE_TOKEN_SECRET": secrets.token_urlsafe(48),
            "AZORA_SECRETS_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
        },
        service_name="test",
    )
    assert settings.smtp_allow_private_hosts is False


async def _own_domain(
    domains_stub: Any, knot_server: KnotServer, tenant: Tenant
) -> domain_pb2.Domain:
    name = unique_domain("ssrf-sender.test")
    domain = await domains_stub.CreateDomain(
        domain_pb2.CreateDomainRequest(name=name), metadata=tenant.metadata
    )
    knot_server.set_zone(name, [("@", "TXT", f'"azora-verify={domain.verification_token}"')])
    verified = await domains_stub.VerifyDomain(
        domain_pb2.VerifyDomainRequest(id=domain.id), metadata=tenant.metadata
    )
    active: domain_pb2.Domain = verified.domain
    assert active.status == domain_pb2.DOMAIN_STATUS_ACTIVE
    return active


@pytest.mark.parametrize("host", FORBIDDEN_LITERALS)
async def test_forbidden_literals_are_refused_on_store_and_test(
    production: Production, domains_stub: Any, settings: Settings, host: str
) -> None:
    # An address literal of a forbidden kind is INVALID_ARGUMENT on host, stored or tested.
    tenant = new_tenant(settings)
    domain = await domains_stub.CreateDomain(
        domain_pb2.CreateDomainRequest(name=unique_domain()), metadata=tenant.metadata
    )
    request = smtp_pb2.UpdateSmtpConfigRequest(
        domain_id=domain.id, host=host, port=production.trap_port
    )
    for call in (
        production.smtp.UpdateSmtpConfig(request, metadata=tenant.metadata),
        production.smtp.TestSmtpConnection(
            smtp_pb2.TestSmtpConnectionRequest(config=request), metadata=tenant.metadata
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "host" in (raised.value.details() or "")
    assert production.connections == []


@pytest.mark.parametrize("label", sorted(HOSTILE_NAMES))
async def test_names_resolving_to_forbidden_addresses_never_connect(
    production: Production, domains_stub: Any, settings: Settings, label: str
) -> None:
    # A name resolving to a forbidden address: refused on store, or stored but never connected
    # to, neither by the connection test nor by delivery.
    tenant = new_tenant(settings)
    domain = await domains_stub.CreateDomain(
        domain_pb2.CreateDomainRequest(name=unique_domain()), metadata=tenant.metadata
    )
    host = f"{label}.{production.zone}"
    request = smtp_pb2.UpdateSmtpConfigRequest(
        domain_id=domain.id,
        host=host,
        port=production.trap_port,
        security="none",
    )
    report = await production.smtp.TestSmtpConnection(
        smtp_pb2.TestSmtpConnectionRequest(config=request), metadata=tenant.metadata
    )
    assert not report.ok
    assert report.failed_step == "resolve"
    assert production.connections == []


# Spellings of 127.0.0.1 that are no IP address to Python's ipaddress module but that the
# system resolver (getaddrinfo, inet_aton) turns into loopback.
LOOPBACK_SPELLINGS = ["127.1", "0177.0.0.1", "0x7f.0.0.1", "127.000.000.001", "0x7f.1"]


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
async def test_delivery_never_connects_to_loopback_spellings(
    production: Production,
    domains_stub: Any,
    knot_server: KnotServer,
    settings: Settings,
    host: str,
) -> None:
    # The mail workers deliver to the stored relay: a host the system resolver turns into
    # loopback must be refused on store or never connected to by delivery.
    tenant = new_tenant(settings)
    domain = await _own_domain(domains_stub, knot_server, tenant)
    request = smtp_pb2.UpdateSmtpConfigRequest(
        domain_id=domain.id,
        host="localhost",
        port=production.trap_port,
        security="none",
    )
    try:
        await production.smtp.UpdateSmtpConfig(request, metadata=tenant.metadata)
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT  # noqa: PT017 (refused: fine)
        return
    email = await production.mail.SendEmail(
        mail_pb2.SendEmailRequest(
            from_address=f"app@{domain.name}", to=["someone@example.org"], text="t"
        ),
        metadata=tenant.metadata,
    )
    for _ in range(100):  # bounded wait for the first delivery attempt
        current = await production.mail.GetEmail(
            mail_pb2.GetEmailRequest(id=email.id), metadata=tenant.metadata
        )
        if current.attempts or current.status != mail_pb2.EMAIL_STATUS_QUEUED:
            break
        await asyncio.sleep(0.1)
    assert production.connections == []


@pytest.fixture
async def system_dns_is_knot(
    production: Production, knot_server: KnotServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Let the event loop's getaddrinfo answer names of the hostile zone from Knot.

    Delivery resolves relay names with the configured resolver (Knot here) before it applies
    the address policy; this makes the system resolver give the same answers, so the test
    still catches a delivery path that hands the name to the OS (getaddrinfo) unchecked. In
    production an attacker controls the public DNS answers for their own names; Knot plays
    that part for the hostile zone only (every other name goes to the real getaddrinfo).
    """
    import socket

    import dns.asyncresolver

    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [knot_server.host]
    resolver.port = knot_server.port
    loop = asyncio.get_running_loop()
    original = loop.getaddrinfo

    async def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host or "")
        if not name.rstrip(".").endswith(production.zone):
            return await original(host, port, *args, **kwargs)
        answers = []
        for kind, family in (("A", socket.AF_INET), ("AAAA", socket.AF_INET6)):
            try:
                for record in await resolver.resolve(name, kind):
                    address = record.to_text()
                    sockaddr: tuple[Any, ...] = (
                        (address, int(port))
                        if family == socket.AF_INET
                        else (address, int(port), 0, 0)
                    )
                    answers.append((family, socket.SOCK_STREAM, 6, "", sockaddr))
            except dns.exception.DNSException:
                continue
        if not answers:
            raise socket.gaierror(socket.EAI_NONAME, "not found")
        return answers

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)


@pytest.mark.usefixtures("system_dns_is_knot")
@pytest.mark.parametrize("label", ["loop", "mapped"])
async def test_delivery_never_connects_to_names_resolving_to_loopback(
    production: Production,
    domains_stub: Any,
    knot_server: KnotServer,
    settings: Settings,
    label: str,
) -> None:
    # A relay name stored while it is "just a name" is judged again when delivery connects.
    tenant = new_tenant(settings)
    domain = await _own_domain(domains_stub, knot_server, tenant)
    request = smtp_pb2.UpdateSmtpConfigRequest(
        domain_id=domain.id,
        host=f"{label}.{production.zone}",
        port=production.trap_port,
        security="none",
    )
    try:
        await production.smtp.UpdateSmtpConfig(request, metadata=tenant.metadata)
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT  # noqa: PT017 (refused: fine)
        return
    email = await production.mail.SendEmail(
        mail_pb2.SendEmailRequest(
            from_address=f"app@{domain.name}", to=["someone@example.org"], text="t"
        ),
        metadata=tenant.metadata,
    )
    # Until the first attempt is over (bounded): it must happen while names resolve via Knot.
    for _ in range(200):
        current = await production.mail.GetEmail(
            mail_pb2.GetEmailRequest(id=email.id), metadata=tenant.metadata
        )
        if current.attempts:
            break
        await asyncio.sleep(0.1)
    assert current.attempts, "delivery was never attempted"
    assert production.connections == []
