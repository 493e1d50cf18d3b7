"""Fixtures of the mail service tests: the service in-process, real SMTP relays on loopback.

Each test gets its own mail service on a fresh database (the queue is global to a database,
so a worker in one test must never see another test's emails) and its own manual clock.
Two ways to reach domains and relays:

* `local_mail`: sender domains and relay settings from in-memory directories (our own
  interfaces), so delivery behaviour can be tested against scripted relays quickly;
* `e2e_mail` (in test_end_to_end.py): the real domain and SMTP services, a domain verified
  through the test Knot server, a relay configured and a DKIM key activated through their APIs.

Relays are real SMTP servers: aiosmtpd, or `ScriptedRelay`, a small asyncio server that answers
exactly what a test tells it to (codes aiosmtpd cannot produce on demand, drops, silence).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import grpc
import idna
import pytest
from azora.mail.v1 import mail_pb2, mail_pb2_grpc

from services.core.clock import ManualClock
from services.core.ids import new_id
from services.mail.app import RELAY_HEALTH_REFRESH, MailApp, build_app, make_worker
from services.mail.delivery import DeliveryWorker
from services.mail.relay_directory import InMemoryRelayDirectory, RelaySecurity, RelaySettings
from services.mail.relay_health import RelayHealthStore
from services.mail.relay_lookup import DirectoryRelayLookup
from services.mail.senders import SenderDomain, StaticSenderDirectory
from tests.conftest import Tenant, make_settings, new_tenant, unique_domain
from tests.support.settings import SuiteSettings

# Backoff settings that make retry times easy to assert: 60 s doubling to 600 s, no jitter
# unless a test asks, give up after one hour.
RETRY_ENV = {
    "AZORA_MAIL_RETRY_MIN_BACKOFF": "60",
    "AZORA_MAIL_RETRY_MAX_BACKOFF": "600",
    "AZORA_MAIL_RETRY_JITTER": "0",
    "AZORA_MAIL_MAX_LIFETIME": "3600",
    "AZORA_MAIL_LEASE": "30",
    "AZORA_MAIL_POLL_INTERVAL": "0.05",
    "AZORA_MAIL_WORKER_CONCURRENCY": "4",
}
START = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


@dataclass
class Received:
    """One message a relay accepted."""

    mail_from: str
    rcpt_to: list[str]
    data: bytes

    @property
    def message_id(self) -> str:
        """The Message-ID header's value."""
        for line in self.data.split(b"\r\n"):
            if line.lower().startswith(b"message-id:"):
                return line.split(b":", 1)[1].strip().decode()
            if not line:
                break
        return ""


@dataclass
class Script:
    """What a scripted relay answers. A reply may be "DROP" (close) or "HANG" (say nothing)."""

    greeting: str = "220 scripted.test ESMTP"
    mail: str = "250 2.1.0 sender ok"
    rcpt: dict[str, str] = field(default_factory=dict)  # per address; default 250
    data: str = "354 go ahead"
    final: str = "250 2.0.0 queued"
    final_delay: float = 0.0  # seconds before the final reply (to hold connections open)


class ScriptedRelay:
    """A plain asyncio SMTP server driven by a `Script` (no TLS, no AUTH)."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.received: list[Received] = []
        self.connections = 0
        self.active = 0
        self.max_active = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def port(self) -> int:
        """The bound port."""
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> ScriptedRelay:
        """Listen on 127.0.0.1:0."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _say(self, writer: asyncio.StreamWriter, reply: str) -> bool:
        if reply == "DROP":
            writer.close()
            return False
        if reply == "HANG":
            await asyncio.sleep(3600)
            return False
        writer.write(reply.encode() + b"\r\n")
        await writer.drain()
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self._writers.append(writer)
        try:
            if not await self._say(writer, self.script.greeting):
                return
            mail_from, rcpts = "", list[str]()
            while line := await reader.readline():
                command = line.decode().strip()
                verb = command.split(" ", 1)[0].upper()
                if verb in ("EHLO", "HELO"):
                    reply = "250 scripted.test"
                elif verb == "MAIL":
                    mail_from, rcpts = command[10:].strip("<>"), []
                    reply = self.script.mail
                elif verb == "RCPT":
                    address = command[8:].strip().strip("<>")
                    reply = self.script.rcpt.get(address, "250 2.1.5 recipient ok")
                    if reply.startswith("2"):
                        rcpts.append(address)
                elif verb == "DATA":
                    if not await self._say(writer, self.script.data):
                        return
                    if not self.script.data.startswith("3"):
                        continue
                    body = bytearray()
                    while (chunk := await reader.readline()) not in (b".\r\n", b""):
                        body += chunk[1:] if chunk.startswith(b"..") else chunk
                    if self.script.final_delay:
                        await asyncio.sleep(self.script.final_delay)
                    if self.script.final == "DROP":
                        writer.close()
                        return
                    if self.script.final.startswith("2"):
                        self.received.append(Received(mail_from, list(rcpts), bytes(body)))
                    reply = self.script.final
                elif verb == "QUIT":
                    await self._say(writer, "221 bye")
                    return
                else:  # RSET, NOOP
                    reply = "250 ok"
                if not await self._say(writer, reply):
                    return
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            self.active -= 1
            writer.close()


@pytest.fixture
async def scripted_relay() -> AsyncIterator[Callable[[Script], asyncio.Future[ScriptedRelay]]]:
    """Start scripted relays for one test (all closed afterwards)."""
    relays: list[ScriptedRelay] = []

    def start(script: Script) -> asyncio.Future[ScriptedRelay]:
        relay = ScriptedRelay(script)
        relays.append(relay)
        return asyncio.ensure_future(relay.start())

    yield start
    for relay in relays:
        await relay.close()


@dataclass
class LocalMail:
    """A mail service whose domains and relays come from in-memory directories."""

    app: MailApp
    stub: mail_pb2_grpc.MailServiceAsyncStub
    clock: ManualClock
    settings: SuiteSettings
    senders: StaticSenderDirectory
    relays: InMemoryRelayDirectory
    lookup: DirectoryRelayLookup

    def add_domain(
        self,
        tenant: Tenant,
        *,
        port: int | None,
        name: str | None = None,
        timeout: float = 5.0,
        security: RelaySecurity = RelaySecurity.NONE,
    ) -> tuple[str, str]:
        """An active domain of `tenant` (relay on 127.0.0.1:`port` unless None)."""
        name = name or unique_domain()
        domain_id = new_id()
        a_label = idna.encode(name, uts46=True).decode()
        self.senders.domains[(tenant.id, a_label)] = SenderDomain(domain_id, a_label)
        self.relays.domains.add((tenant.id, domain_id))
        if port is not None:
            self.relays.add_relay(
                tenant_id=tenant.id,
                relay=RelaySettings(
                    domain_id=domain_id,
                    host="127.0.0.1",
                    port=port,
                    security=security,
                    timeout=timeout,
                ),
            )
        return domain_id, name

    def worker(self, **overrides: str) -> DeliveryWorker:
        """A delivery worker on this service's database and clock."""
        settings = self.settings
        if overrides:
            settings = make_settings(
                settings.mongodb_uri, settings.mongodb_database, **{**RETRY_ENV, **overrides}
            )
        return make_worker(
            settings,
            emails=self.app.emails,
            relays=self.lookup,
            clock=self.clock,
            relay_health=RelayHealthStore(
                self.app.running.database.db, refresh=RELAY_HEALTH_REFRESH
            ),
        )

    async def send(self, tenant: Tenant, **fields: object) -> mail_pb2.Email:
        """SendEmail as `tenant`."""
        request = mail_pb2.SendEmailRequest(**fields)  # type: ignore[arg-type]
        return await self.stub.SendEmail(request, metadata=tenant.metadata)

    async def get(self, tenant: Tenant, email_id: str) -> mail_pb2.Email:
        """GetEmail as `tenant`."""
        return await self.stub.GetEmail(
            mail_pb2.GetEmailRequest(id=email_id), metadata=tenant.metadata
        )


@pytest.fixture
async def local_mail(ferretdb: str, domain_app: object) -> AsyncIterator[LocalMail]:
    """A mail service on a fresh database, with in-memory domains and relays, no workers.

    API keys are still resolved by the session's domain service (`domain_app`).
    """
    from services.domain.app import DomainApp

    assert isinstance(domain_app, DomainApp)
    settings = make_settings(
        ferretdb,
        f"azora_mail_{secrets.token_hex(4)}",
        AZORA_DOMAIN_SERVICE_TARGET=f"127.0.0.1:{domain_app.running.port}",
        **RETRY_ENV,
    )
    clock = ManualClock(START)
    senders = StaticSenderDirectory()
    relays = InMemoryRelayDirectory()
    lookup = DirectoryRelayLookup(relays)
    app = await build_app(
        settings,
        clock=clock,
        bind="127.0.0.1:0",
        senders=senders,
        relays=lookup,
        run_workers=False,
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.running.port}") as channel:
        yield LocalMail(
            app,
            mail_pb2_grpc.MailServiceStub(channel),
            clock,
            settings,
            senders,
            relays,
            lookup,
        )
    await app.running.database.client.drop_database(settings.mongodb_database)
    await app.running.stop(None)


@pytest.fixture
def other_tenant(settings: SuiteSettings) -> Tenant:
    """A second tenant, for isolation checks."""
    return new_tenant(settings)
