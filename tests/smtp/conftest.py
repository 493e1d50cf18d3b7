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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
from azora.domain.v1 import domain_pb2, domain_pb2_grpc
from azora.smtp.v1 import smtp_pb2_grpc

from services.core.clock import ManualClock
from services.core.settings import Settings
from services.domain.app import DomainApp
from services.smtp.app import SmtpApp, build_app
from tests.conftest import Tenant, unique_domain

RELAY_HOSTNAME = "relay.azora-test.example"
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
def smtp_settings(settings: Settings, domain_app: DomainApp, ca_file: Path) -> Settings:
    """Settings of the SMTP service: the real domain service and the test CA."""
    return settings.with_overrides(
        domain_service_target=f"127.0.0.1:{domain_app.running.port}",
        smtp_ca_file=str(ca_file),
    )


@pytest.fixture(scope="session")
async def smtp_app(smtp_settings: Settings, smtp_clock: ManualClock) -> AsyncIterator[SmtpApp]:
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


@dataclass
class RecordingHandler:
    """aiosmtpd handler that keeps what it was told (nothing is delivered anywhere)."""

    messages: list[bytes] = field(default_factory=list)

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:  # noqa: N802
        self.messages.append(envelope.content)
        return "250 OK"


def authenticator(
    *, echo_credentials: bool = False
) -> Callable[[SMTP, Any, Any, str, Any], AuthResult]:
    """Accepts USERNAME/PASSWORD; with `echo_credentials` a failure reply repeats them."""

    def check(server: SMTP, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        assert isinstance(data, LoginPassword)
        if data.login == USERNAME.encode() and data.password == PASSWORD.encode():
            return AuthResult(success=True)
        if echo_credentials:
            # A hostile (or buggy) server repeating what it got must not leak it to the user.
            echoed = f"{data.login.decode()}:{data.password.decode()}"
            return AuthResult(success=False, handled=False, message=f"535 5.7.8 no: {echoed}")
        return AuthResult(success=False, handled=False)

    return check


@dataclass
class RunningServer:
    """A listening test server."""

    server: asyncio.Server
    port: int


StartServer = Callable[..., Awaitable[RunningServer]]


@pytest.fixture
async def start_smtpd() -> AsyncIterator[StartServer]:
    """Start aiosmtpd servers on 127.0.0.1:0 in this loop; all are closed after the test.

    Keywords: ``implicit_tls`` (an SSLContext: TLS from the first byte), ``starttls`` (an
    SSLContext offered through STARTTLS), ``require_starttls``, ``auth`` (an authenticator),
    ``auth_require_tls``.
    """
    servers: list[asyncio.Server] = []

    async def start(
        *,
        implicit_tls: ssl.SSLContext | None = None,
        starttls: ssl.SSLContext | None = None,
        require_starttls: bool = False,
        auth: Callable[..., AuthResult] | None = None,
        auth_require_tls: bool = True,
    ) -> RunningServer:
        handler = RecordingHandler()

        def factory() -> SMTP:
            return SMTP(
                handler,
                hostname=RELAY_HOSTNAME,
                tls_context=starttls,
                require_starttls=require_starttls,
                authenticator=auth,
                auth_require_tls=auth_require_tls,
            )

        server = await asyncio.get_running_loop().create_server(
            factory, "127.0.0.1", 0, ssl=implicit_tls
        )
        servers.append(server)
        return RunningServer(server, server.sockets[0].getsockname()[1])

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


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
