"""Fixtures of the submission server tests: the server in-process in front of a real mail service.

The mail service is the `local_mail` one (fresh database, real FerretDB; sender domains and
relays from in-memory directories, API keys from the session's real domain service). The relay
is the suite's aiosmtpd one (tests/support/smtp_relay.py) with SMTPUTF8 offered; the sending
domain has an RSA DKIM key whose public half `dkim_dns` answers for dkimpy. Clients are real
programs: Python's smtplib (in a thread, the server runs on the test's loop) and swaks.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import smtplib
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from azora.iam.v1 import api_keys_pb2, api_keys_pb2_grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from services.core.smtp_tls import development_pair, server_context
from services.mail.app import MailApp
from services.mail.app import build_app as build_mail_app
from services.mail.relay_directory import InMemoryRelayDirectory, SigningKey
from services.mail.relay_lookup import DirectoryRelayLookup
from services.mail.senders import StaticSenderDirectory
from services.submission.app import SubmissionApp, build_app
from services.submission.settings import SubmissionSettings
from tests.conftest import Tenant
from tests.mail.conftest import LocalMail, local_mail, other_tenant  # noqa: F401 - fixtures
from tests.support.settings import SuiteSettings
from tests.support.smtp_relay import RunningRelay, start_relay

SELECTOR = "sub1"


@dataclass
class Submission:
    """A submission server in front of a mail service, with a tenant, its key and domain."""

    app: SubmissionApp
    mail: LocalMail
    tenant: Tenant
    api_key: str
    domain: str
    relay: RunningRelay
    cafile: Path
    public_key: bytes
    settings: SuiteSettings

    @property
    def port(self) -> int:
        """The STARTTLS port."""
        return self.app.ports["starttls"]

    @property
    def tls_port(self) -> int:
        """The implicit-TLS port."""
        return self.app.ports["tls"]

    def client_context(self) -> ssl.SSLContext:
        """A client TLS context trusting the server's (self-signed) certificate."""
        return ssl.create_default_context(cafile=str(self.cafile))

    def starttls_client(self) -> smtplib.SMTP:
        """An smtplib client over STARTTLS, after EHLO and STARTTLS (blocking: call in a thread)."""
        client = smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.test", timeout=30)
        client.ehlo()
        client.starttls(context=self.client_context())
        client.ehlo()
        return client

    def tls_client(self) -> smtplib.SMTP_SSL:
        """An smtplib client over implicit TLS, after EHLO (blocking: call in a thread)."""
        client = smtplib.SMTP_SSL(
            "127.0.0.1",
            self.tls_port,
            local_hostname="client.test",
            context=self.client_context(),
            timeout=30,
        )
        client.ehlo()
        return client

    def dkim_dns(self, name: bytes, timeout: int = 5) -> bytes:
        """The dnsfunc for dkimpy: the domain's DKIM record, nothing else."""
        if name.decode().rstrip(".") == f"{SELECTOR}._domainkey.{self.domain}":
            return b"v=DKIM1; k=rsa; p=" + base64.b64encode(self.public_key)
        return b""

    @property
    def received(self) -> list[tuple[str, list[str], bytes]]:
        """What the relay accepted: (envelope sender, recipients, content) per transaction."""
        return [(e.mail_from, e.rcpt_tos, e.content) for e in self.relay.envelopes]

    async def deliver(self) -> int:
        """Run one delivery pass of a worker on the mail service's database."""
        return await self.mail.worker().run_once()


async def new_api_key(
    stub: api_keys_pb2_grpc.ApiKeyServiceAsyncStub, tenant: Tenant, scopes: list[str]
) -> str:
    """A fresh API key of `tenant` with `scopes`."""
    created = await stub.CreateApiKey(
        api_keys_pb2.CreateApiKeyRequest(name="smtp", scopes=scopes), metadata=tenant.metadata
    )
    return created.secret


StartSubmission = Callable[..., "asyncio.Future[Submission]"]


@pytest.fixture
async def start_submission(
    local_mail: LocalMail,  # noqa: F811
    tenant: Tenant,
    api_keys_stub: api_keys_pb2_grpc.ApiKeyServiceAsyncStub,
    tmp_path: Path,
) -> AsyncIterator[Callable[..., Any]]:
    """Start a submission server (settings overridable) in front of `local_mail`."""
    # SMTPUTF8 offered: internationalised addresses are delivered, not failed.
    relay = await start_relay(smtputf8=True)
    domain_id, name = local_mail.add_domain(tenant, port=relay.port)
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    local_mail.relays.add_key(
        tenant_id=tenant.id, key=SigningKey(domain_id, name, SELECTOR, "rsa-sha256", pem)
    )
    api_key = await new_api_key(api_keys_stub, tenant, ["emails:send"])
    cert, key = development_pair(tmp_path / "tls", "submission.test")
    apps: list[SubmissionApp] = []

    async def start(**overrides: Any) -> Submission:
        settings = local_mail.settings.with_overrides(
            mail_service_target=f"127.0.0.1:{local_mail.app.running.port}",
            **{k: v for k, v in overrides.items() if k.startswith("mail_")},
        )
        submission = SubmissionSettings(
            port=0,
            tls_port=0,
            health_port=0,
            hostname="submission.test",
            require_tls_for_auth=True,
            auth_failure_delay=0.0,
        ).with_overrides(**{k: v for k, v in overrides.items() if not k.startswith("mail_")})
        app = await build_app(settings, submission, context=server_context(cert, key))
        apps.append(app)
        return Submission(
            app, local_mail, tenant, api_key, name, relay, cert, public, local_mail.settings
        )

    yield start
    for app in apps:
        await app.stop(0)
    await relay.close()


@pytest.fixture
async def submission(start_submission: Callable[..., Any]) -> Submission:
    """A submission server with the default settings (AUTH only after TLS)."""
    started: Submission = await start_submission()
    return started


class RawClient:
    """A line-level SMTP client over asyncio streams, for what smtplib would not send.

    smtplib fixes line ends in DATA and follows the protocol; this one writes exactly the bytes
    it is given (bare LF, NUL, pipelined commands) and reads replies as they come.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int, context: ssl.SSLContext | None = None) -> RawClient:
        """Connect (implicit TLS when `context` is given); the greeting is left unread."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
        return cls(reader, writer)

    async def reply(self) -> str:
        """The next (possibly multi-line) reply, lines joined by newlines; "" at EOF."""
        lines: list[str] = []
        while True:
            line = (await self.reader.readline()).decode()
            if not line:
                return "\n".join(lines)
            lines.append(line.rstrip("\r\n"))
            if len(line) < 4 or line[3] != "-":
                return "\n".join(lines)

    async def send(self, data: bytes) -> None:
        """Write raw bytes."""
        self.writer.write(data)
        await self.writer.drain()

    async def command(self, line: str) -> str:
        """Send one command line and read its reply."""
        await self.send(line.encode() + b"\r\n")
        return await self.reply()

    async def login(self, api_key: str) -> str:
        """Greeting, EHLO and AUTH PLAIN; the reply to AUTH."""
        await self.reply()
        await self.command("EHLO client.test")
        token = base64.b64encode(f"\0apikey\0{api_key}".encode()).decode()
        return await self.command(f"AUTH PLAIN {token}")

    async def close(self) -> None:
        """Close the connection."""
        self.writer.close()
        # The server may already have closed it.
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()
        # After a reset the TLS transport may keep its socket until collected: drop it now.
        self.writer.transport.abort()


async def mail_app_like(submission: Submission, settings: SuiteSettings) -> MailApp:
    """Another mail service (own settings) knowing the same sender domains and relays."""
    senders = StaticSenderDirectory(dict(submission.mail.senders.domains))
    relays = InMemoryRelayDirectory()
    relays.domains = set(submission.mail.relays.domains)
    relays.relays = dict(submission.mail.relays.relays)
    relays.keys = dict(submission.mail.relays.keys)
    return await build_mail_app(
        settings,
        bind="127.0.0.1:0",
        senders=senders,
        relays=DirectoryRelayLookup(relays),
        run_workers=False,
    )


async def submission_in_front_of(
    submission: Submission, mail: MailApp, settings: SuiteSettings, **overrides: Any
) -> SubmissionApp:
    """Another submission server (same certificate, `settings`) in front of `mail`."""
    return await build_app(
        settings.with_overrides(mail_service_target=f"127.0.0.1:{mail.running.port}"),
        submission.app.settings.with_overrides(**overrides),
        context=server_context(submission.cafile, submission.cafile.with_name("key.pem")),
    )
