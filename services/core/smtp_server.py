"""The SMTP server machinery both listeners (submission, inbound) share, over aiosmtpd.

Each listener is a subclass of `GuardedSMTP` with its own handler and policy; what is the same
for both lives here once:

* `ConnectionLimits`: concurrent connections per client address, the set of open sessions,
  and the draining flag of a shutdown;
* `GuardedSMTP`: the client address, idle and whole-session timeouts (421 said, never a silent
  close, and never while a message is being handed over), a limit on malformed commands,
  enhanced status codes on every reply, and the shutdown rule (sessions between transactions
  are closed with 421 4.3.2, a transaction in progress may finish);
* `SmtpListeners`: starting TCP listeners (optionally implicit TLS) and the graceful stop;
* `WindowCounter`: a per-address count in fixed windows (messages per client address).

Hooks for the listener's policy: `admit` (may refuse a connection before the greeting) and
`before_command` (may refuse a command).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from aiosmtpd.smtp import SMTP

from services.core import smtp_replies as replies
from services.core.server import ServiceServer

log = logging.getLogger(__name__)

# Replies to commands the client got wrong; enough of them and the client is disconnected.
_BAD_COMMAND_CODES = ("500", "501", "502", "503", "504", "555")


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """Limits of one SMTP session (durations in seconds)."""

    idle_timeout: float
    session_timeout: float
    max_bad_commands: int


class ConnectionLimits:
    """Per-client-address bookkeeping shared by every session of one process."""

    def __init__(self, *, max_connections_per_ip: int) -> None:
        self._max_per_ip = max_connections_per_ip
        self.connections: dict[str, int] = {}
        self.sessions: set[GuardedSMTP] = set()
        self.draining = False
        self.idle = asyncio.Event()
        self.idle.set()

    def connect(self, session: GuardedSMTP, address: str) -> bool:
        """Count a new connection; False if the address has too many already."""
        if self.connections.get(address, 0) >= self._max_per_ip:
            return False
        self.connections[address] = self.connections.get(address, 0) + 1
        self.sessions.add(session)
        self.idle.clear()
        return True

    def disconnect(self, session: GuardedSMTP, address: str) -> None:
        """Forget a connection counted by `connect`."""
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        left = self.connections.get(address, 0) - 1
        if left > 0:
            self.connections[address] = left
        else:
            self.connections.pop(address, None)
        if not self.sessions:
            self.idle.set()


class GuardedSMTP(SMTP):
    """One client connection with the shared limits (see the module docstring)."""

    def __init__(
        self,
        handler: Any,
        *,
        limits: ConnectionLimits,
        session_limits: SessionLimits,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, timeout=session_limits.idle_timeout, **kwargs)
        self._limits = limits
        self._session_limits = session_limits
        self.client_address = ""
        # True while a message is being handed to a service: never cut then (the client
        # would retry a message that may be stored).
        self.submitting = False
        self._counted = False
        self._closing = False
        self._bad_commands = 0
        self._session_timer: asyncio.TimerHandle | None = None
        # A close started from a timer callback (kept so the task is not collected early).
        self._closer: asyncio.Task[None] | None = None
        # Every command goes through `_guard` (limits, shutdown) before aiosmtpd's own handler.
        self._smtp_methods = {
            name: self._guard(name, method) for name, method in self._smtp_methods.items()
        }

    def refused(self, what: str, **fields: object) -> None:
        """Log a refusal with the client address (callers never pass credentials)."""
        log.warning(what, extra={"fields": {"client": self.client_address, **fields}})

    # Policy hooks ---------------------------------------------------------------------------

    async def admit(self) -> str | None:
        """A 421 reply refusing the connection before the greeting, or None to admit it."""
        return None

    async def before_command(self, name: str) -> bool:
        """Whether the command may run (False: this hook replied or closed already)."""
        return True

    # Connection lifecycle -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Remember the client address and start the session clock (not again after STARTTLS)."""
        starttls = self.transport is not None
        super().connection_made(transport)
        if starttls:
            return
        peer = transport.get_extra_info("peername")
        self.client_address = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
        self._session_timer = self.loop.call_later(
            self._session_limits.session_timeout, self._session_expired
        )

    def connection_lost(self, error: Exception | None) -> None:
        """Forget the connection."""
        if self._session_timer is not None:
            self._session_timer.cancel()
        if self._counted:
            self._limits.disconnect(self, self.client_address)
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        if self._limits.draining:
            await self.close_with(replies.SHUTTING_DOWN)
            return
        refusal = await self.admit()
        if refusal is not None:
            await self.close_with(refusal)
            return
        if not self._limits.connect(self, self.client_address):
            self.refused("connection refused: too many connections from the address")
            await self.close_with(replies.TOO_MANY_CONNECTIONS)
            return
        self._counted = True
        await super()._handle_client()

    async def close_with(self, reply: str) -> None:
        """Say `reply` (a 421) and close the connection (nothing to say if it is closing)."""
        if self._closing or self.transport is None:
            return
        self._closing = True
        if self.transport.is_closing():
            # Already on its way out (the peer's TLS close_notify starts asyncio's shutdown and
            # aiosmtpd then closes the writer too): a TLS transport closed twice has dropped its
            # protocol, and writing to it raises AttributeError instead of ConnectionError.
            return
        try:
            self._writer.write(reply.encode("ascii") + b"\r\n")
            await asyncio.wait_for(self._writer.drain(), timeout=5.0)
        except (ConnectionError, TimeoutError, RuntimeError):
            pass  # the client is gone or stuck: closing is all that is left
        if self.transport is not None:
            self.transport.close()

    def _timeout_cb(self) -> None:
        # Idle timeout: say so (aiosmtpd would just close). A client waiting for our answer to
        # DATA is not idle: cutting it would make it retry a message that may be stored.
        if self.submitting:
            self._reset_timeout()
            return
        self.refused("idle timeout")
        self._closer = self.loop.create_task(self.close_with(replies.IDLE_TIMEOUT))

    def _session_expired(self) -> None:
        if self.submitting:
            # Never cut a hand-over in flight: the client would retry a message we stored.
            self._session_timer = self.loop.call_later(1.0, self._session_expired)
            return
        self.refused("session time limit reached")
        self._closer = self.loop.create_task(self.close_with(replies.SESSION_TIMEOUT))

    def in_transaction(self) -> bool:
        """Whether a MAIL transaction is open (or its DATA being stored)."""
        return self.submitting or bool(self.envelope is not None and self.envelope.mail_from)

    # Replies and commands -------------------------------------------------------------------

    async def push(self, status: str | bytes) -> None:
        """Send a reply, with an enhanced status code; count the client's bad commands."""
        if isinstance(status, str):
            status = replies.enhanced(status)
            if status[:3] in _BAD_COMMAND_CODES:
                self._bad_commands += 1
            await super().push(status)
        else:
            await super().push(status)
        if self._bad_commands >= self._session_limits.max_bad_commands and not self._closing:
            self.refused("too many bad commands", count=self._bad_commands)
            await self.close_with(replies.TOO_MANY_BAD_COMMANDS)

    def _guard(
        self, name: str, method: Callable[[str | None], Awaitable[None]]
    ) -> Callable[[str | None], Awaitable[None]]:
        async def guarded(arg: str | None) -> None:
            if self._closing:
                return
            if self._limits.draining and not self.in_transaction() and name != "QUIT":
                await self.close_with(replies.SHUTTING_DOWN)
                return
            if not await self.before_command(name):
                return
            await method(arg)
            if self._limits.draining and not self.in_transaction() and not self._closing:
                # Shutting down: the transaction this command ended was the last one.
                await self.close_with(replies.SHUTTING_DOWN)

        return guarded


@dataclass
class SmtpListeners:
    """Running listeners with their shared limits; `stop` drains them."""

    limits: ConnectionLimits
    servers: list[asyncio.Server] = field(default_factory=list)
    # Bound ports by listener name.
    ports: dict[str, int] = field(default_factory=dict)

    async def listen(
        self,
        name: str,
        factory: Callable[[], GuardedSMTP],
        *,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
    ) -> int:
        """Start one listener (`ssl_context`: implicit TLS); return the bound port."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(factory, host, port, ssl=ssl_context)
        self.servers.append(server)
        bound = int(server.sockets[0].getsockname()[1])
        self.ports[name] = bound
        return bound

    async def stop(self, grace: float) -> None:
        """Stop accepting, let transactions in progress finish for `grace` s, 421 the rest."""
        for server in self.servers:
            server.close()
        self.limits.draining = True
        idle = [s for s in self.limits.sessions if not s.in_transaction()]
        await asyncio.gather(*(s.close_with(replies.SHUTTING_DOWN) for s in idle))
        try:
            if self.limits.sessions:
                await asyncio.wait_for(self.limits.idle.wait(), timeout=grace)
        except TimeoutError:
            left = list(self.limits.sessions)
            log.warning("grace period over", extra={"fields": {"sessions": len(left)}})
            await asyncio.gather(*(s.close_with(replies.SHUTTING_DOWN) for s in left))
        for server in self.servers:
            await server.wait_closed()


async def stop_front_door(
    health: ServiceServer,
    listeners: SmtpListeners,
    channels: Sequence[grpc.aio.Channel],
    grace: float,
) -> None:
    """Stop an SMTP front door: not ready, drain its listeners for `grace` s, then the rest."""
    await health.health.enter_graceful_shutdown()
    await listeners.stop(grace)
    await health.server.stop(0)
    for channel in channels:
        await channel.close()


def silence_protocol_log() -> None:
    """Keep aiosmtpd's per-line protocol log (which would include AUTH payloads) out of ours."""
    logging.getLogger("mail.log").setLevel(logging.ERROR)


class WindowCounter:
    """Counts events per key in fixed windows; a key's count restarts with each window.

    In memory and per process, like the connection counts: a front door's own abuse limit.
    Keys of ended windows are forgotten when a new window starts, so nothing grows.
    """

    def __init__(self, *, limit: int, window: float, clock: Callable[[], float]) -> None:
        self._limit = limit
        self._window = max(window, 0.001)
        self._clock = clock
        self._current = -1
        self._counts: dict[str, int] = {}

    def take(self, key: str) -> bool:
        """Count one event of `key`; False (not counted) when the window's limit is reached."""
        window = int(self._clock() // self._window)
        if window != self._current:
            self._current, self._counts = window, {}
        used = self._counts.get(key, 0)
        if used >= self._limit:
            return False
        self._counts[key] = used + 1
        return True


__all__ = [
    "ConnectionLimits",
    "GuardedSMTP",
    "SessionLimits",
    "SmtpListeners",
    "WindowCounter",
    "silence_protocol_log",
    "stop_front_door",
]
