"""The tests' SMTP relay: a real aiosmtpd server on 127.0.0.1:0 in the test's event loop.

One relay for every test that delivers or probes through SMTP: it records every transaction it
accepts and can offer STARTTLS or speak TLS from the first byte, require AUTH (one username
and password; optionally echoing refused credentials back, as a hostile or buggy server might),
offer SMTPUTF8 (RFC 6531: internationalised addresses), take its time per message, and hold
every message at DATA until the test opens a gate (deliveries kept in flight). Servers
that misbehave in ways aiosmtpd has no switch for (silence, 421 at the greeting, chosen reply
codes, dropped connections) are the scripted ones in tests/smtp/conftest.py (`raw_server`) and
tests/mail/conftest.py (`ScriptedRelay`).

Use `start_relay` (the caller closes it) in fixtures of any scope, or the `start_smtp_relay`
fixture, which closes its relays after the test. Registered by tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

RELAY_HOSTNAME = "relay.azora-test.example"

Authenticator = Callable[[SMTP, Any, Any, str, Any], AuthResult]


@dataclass(frozen=True)
class Envelope:
    """One transaction the relay accepted."""

    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    # Whether the client asked for an SMTPUTF8 transaction (MAIL FROM ... SMTPUTF8).
    smtp_utf8: bool = False


@dataclass
class RecordingHandler:
    """aiosmtpd handler that keeps what it was told (nothing is delivered anywhere).

    `messages` is appended to in place, so a test may hold it and watch it grow.
    """

    delay: float = 0.0  # seconds per DATA, for tests that need deliveries in flight
    # When set, every DATA waits until the gate opens before it is answered (and recorded).
    gate: asyncio.Event | None = None
    messages: list[bytes] = field(default_factory=list)
    envelopes: list[Envelope] = field(default_factory=list)
    # Transactions that reached DATA, answered or still held at the gate.
    arrived: int = 0

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:  # noqa: N802
        self.arrived += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.gate is not None:
            await self.gate.wait()
        self.messages.append(envelope.content)
        self.envelopes.append(
            Envelope(
                envelope.mail_from,
                list(envelope.rcpt_tos),
                envelope.content,
                smtp_utf8=bool(envelope.smtp_utf8),
            )
        )
        return "250 2.0.0 OK"


def authenticator(username: str, password: str, *, echo_refused: bool = False) -> Authenticator:
    """AUTH that accepts exactly `username`/`password`.

    With `echo_refused` a refusal repeats the credentials it got: a hostile (or buggy) server
    whose reply must never reach a user or a log.
    """

    def check(server: SMTP, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        assert isinstance(data, LoginPassword)
        if data.login == username.encode() and data.password == password.encode():
            return AuthResult(success=True)
        if echo_refused:
            echoed = f"{data.login.decode()}:{data.password.decode()}"
            return AuthResult(success=False, handled=False, message=f"535 5.7.8 no: {echoed}")
        return AuthResult(success=False, handled=False)

    return check


@dataclass
class RunningRelay:
    """A listening relay and what it received."""

    server: asyncio.Server
    port: int
    handler: RecordingHandler
    host: str = "127.0.0.1"

    @property
    def messages(self) -> list[bytes]:
        """Message contents accepted, in order (the handler's own list)."""
        return self.handler.messages

    @property
    def envelopes(self) -> list[Envelope]:
        """Transactions accepted, in order."""
        return self.handler.envelopes

    async def close(self) -> None:
        """Stop listening and wait until the server is closed."""
        self.server.close()
        await self.server.wait_closed()


async def start_relay(
    *,
    hostname: str = RELAY_HOSTNAME,
    implicit_tls: ssl.SSLContext | None = None,
    starttls: ssl.SSLContext | None = None,
    require_starttls: bool = False,
    auth: Authenticator | None = None,
    auth_require_tls: bool = True,
    smtputf8: bool = False,
    delay: float = 0.0,
    gate: asyncio.Event | None = None,
) -> RunningRelay:
    """Start a relay on 127.0.0.1:0 in the running loop; the caller closes it.

    Args:
        hostname: the name in the greeting and EHLO reply.
        implicit_tls: TLS from the first byte with this context (usually port 465).
        starttls: offer STARTTLS with this context.
        require_starttls: refuse everything but EHLO/STARTTLS/QUIT before TLS.
        auth: an `authenticator`; None offers no AUTH.
        auth_require_tls: offer AUTH only over TLS (aiosmtpd's default).
        smtputf8: advertise SMTPUTF8 and take UTF-8 addresses and headers.
        delay: seconds the relay takes per message.
        gate: hold every message at DATA until this event is set.
    """
    handler = RecordingHandler(delay=delay, gate=gate)

    def factory() -> SMTP:
        return SMTP(
            handler,
            hostname=hostname,
            tls_context=starttls,
            require_starttls=require_starttls,
            authenticator=auth,
            auth_require_tls=auth_require_tls,
            enable_SMTPUTF8=smtputf8,
        )

    server = await asyncio.get_running_loop().create_server(
        factory, "127.0.0.1", 0, ssl=implicit_tls
    )
    return RunningRelay(server, server.sockets[0].getsockname()[1], handler)


class StartRelay(Protocol):
    """`start_relay`'s signature, as the `start_smtp_relay` fixture hands it out."""

    def __call__(
        self,
        *,
        hostname: str = ...,
        implicit_tls: ssl.SSLContext | None = ...,
        starttls: ssl.SSLContext | None = ...,
        require_starttls: bool = ...,
        auth: Authenticator | None = ...,
        auth_require_tls: bool = ...,
        smtputf8: bool = ...,
        delay: float = ...,
        gate: asyncio.Event | None = ...,
    ) -> Awaitable[RunningRelay]: ...


@pytest.fixture
async def start_smtp_relay() -> AsyncIterator[StartRelay]:
    """`start_relay`, with every relay it started closed after the test."""
    relays: list[RunningRelay] = []

    async def start(**options: Any) -> RunningRelay:
        relay = await start_relay(**options)
        relays.append(relay)
        return relay

    yield start
    for relay in relays:
        await relay.close()
