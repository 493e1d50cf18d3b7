"""Fixtures of the SMTP service tests: the service in-process, a test CA, real SMTP servers.

The SMTP service talks to the session's real domain service (ownership checks over gRPC) and
to the session's Knot server (DNS). SMTP servers are aiosmtpd instances (or, for the two
misbehaving servers aiosmtpd cannot imitate, tiny asyncio servers) listening on loopback in
the test's own event loop. TLS uses a throwaway CA from trustme; the service trusts it through
``AZORA_SMTP_CA_FILE``.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
import trustme
from azora.domain.v1 import domain_pb2, domain_pb2_grpc
from azora.smtp.v1 import smtp_pb2_grpc

from services.core.clock import ManualClock
from services.domain.app import DomainApp
from services.smtp.app import SmtpApp, build_app
from tests.conftest import Tenant, unique_domain
from tests.support.settings import SuiteSettings
from tests.support.smtp_relay import RELAY_HOSTNAME as RELAY_HOSTNAME
from tests.support.smtp_relay import Authenticator, StartRelay
from tests.support.smtp_relay import authenticator as accept_only

USERNAME = "relay-user"
PASSWORD = "s3cret-Relay-Passw0rd!"


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    """A throwaway certificate authority for the test relays."""
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test CA's certificate as a PEM file (what AZORA_SMTP_CA_FILE points at)."""
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(scope="session")
def server_tls(tls_ca: trustme.CA) -> ssl.SSLContext:
    """Server context for the relays: a certificate for 127.0.0.1 and the relay's name."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("127.0.0.1", RELAY_HOSTNAME).configure_cert(context)
    return context


@pytest.fixture(scope="session")
def smtp_clock() -> ManualClock:
    """The SMTP service's clock (tests move it to end DKIM overlaps)."""
    return ManualClock(datetime(2026, 11, 23, 12, 0, tzinfo=UTC))


@pytest.fixture(scope="session")
def smtp_settings(settings: SuiteSettings, domain_app: DomainApp, ca_file: Path) -> SuiteSettings:
    """Settings of the SMTP service: the real domain service and the test CA."""
    return settings.with_overrides(
        domain_service_target=f"127.0.0.1:{domain_app.running.port}",
        smtp_ca_file=str(ca_file),
    )


@pytest.fixture(scope="session")
async def smtp_app(smtp_settings: SuiteSettings, smtp_clock: ManualClock) -> AsyncIterator[SmtpApp]:
    """The SMTP service process's server, in-process on a free port."""
    app = await build_app(smtp_settings, clock=smtp_clock, bind="127.0.0.1:0", run_lifecycle=False)
    yield app
    await app.running.stop(None)


@pytest.fixture(scope="session")
async def smtp_channel(smtp_app: SmtpApp) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to the SMTP service."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{smtp_app.running.port}") as channel:
        yield channel


@pytest.fixture(scope="session")
def smtp_stub(smtp_channel: grpc.aio.Channel) -> smtp_pb2_grpc.SmtpServiceAsyncStub:
    """SmtpService client."""
    return smtp_pb2_grpc.SmtpServiceStub(smtp_channel)


async def register(
    stub: domain_pb2_grpc.DomainServiceAsyncStub, tenant: Tenant, name: str | None = None
) -> domain_pb2.Domain:
    """A new domain of `tenant` in the domain service."""
    return await stub.CreateDomain(
        domain_pb2.CreateDomainRequest(name=name or unique_domain()), metadata=tenant.metadata
    )


# --- SMTP servers ----------------------------------------------------------------------------


def authenticator(*, echo_credentials: bool = False) -> Authenticator:
    """Accepts USERNAME/PASSWORD; with `echo_credentials` a failure reply repeats them."""
    return accept_only(USERNAME, PASSWORD, echo_refused=echo_credentials)


@dataclass
class RunningServer:
    """A listening bare TCP server (`raw_server`)."""

    server: asyncio.Server
    port: int


# aiosmtpd relays come from the suite's one relay fixture (tests/support/smtp_relay.py).
StartServer = StartRelay


@pytest.fixture
def start_smtpd(start_smtp_relay: StartRelay) -> StartRelay:
    """Relays on 127.0.0.1:0 (`tests.support.smtp_relay.start_relay`), closed after the test."""
    return start_smtp_relay


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[bytes | None], Awaitable[RunningServer]]]:
    """Start a bare TCP server that sends `greeting` and then waits (None: never says a word).

    For the two behaviours aiosmtpd has no switch for: silence, and 421 at the greeting.
    """
    servers: list[asyncio.Server] = []
    writers: list[asyncio.StreamWriter] = []

    async def start(greeting: bytes | None) -> RunningServer:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.append(writer)
            if greeting is not None:
                writer.write(greeting)
                await writer.drain()
                writer.close()
                return
            await reader.read()  # hold the connection open without answering

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        servers.append(server)
        return RunningServer(server, server.sockets[0].getsockname()[1])

    yield start
    for writer in writers:
        writer.close()
    for server in servers:
        server.close()
        await server.wait_closed()
