"""HTTP delivery of one signed request to an endpoint, behind the SSRF guard.

The guard is the relays' (`services.core.netguard`): outside production it lets everything
through; in production a host that resolves to a loopback, private, link-local, CGNAT or
metadata address is refused. The check happens at connection time, in the resolver aiohttp
asks for every new connection (no DNS cache), and aiohttp connects to exactly the addresses
that resolver returned, so no second, different resolution can slip in. Literal IP hosts do
not reach a resolver in aiohttp, so they are checked here before the request. Redirects are
not followed (a redirect to an internal address would defeat the guard): a 3xx is a failure.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable
from datetime import datetime

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from services.core.netguard import AddressPolicy, HostResolver, ResolveError, addresses_of
from services.mail.feedback.webhook_models import RESPONSE_KEEP, Attempt
from services.mail.settings import WebhookSettings

USER_AGENT = "Azora-Webhooks/1"


class GuardedResolver(AbstractResolver):
    """aiohttp resolver that resolves once and refuses addresses the policy forbids."""

    def __init__(self, resolver: HostResolver, policy: AddressPolicy) -> None:
        self._resolver = resolver
        self._policy = policy

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """The allowed addresses of `host` (every one is checked; one refused refuses all)."""
        try:
            found = await addresses_of(host, resolver=self._resolver, policy=self._policy)
        except ResolveError as exc:
            raise OSError(str(exc)) from None
        return [
            {
                "hostname": host,
                "host": str(address),
                "port": port,
                "family": socket.AF_INET if address.version == 4 else socket.AF_INET6,
                "proto": 0,
                "flags": 0,
            }
            for address in found
        ]

    async def close(self) -> None:
        """Nothing to release."""


def address_policy(settings: WebhookSettings) -> AddressPolicy:
    """The SSRF policy of webhook connections."""
    return AddressPolicy(
        allow_private=settings.allow_private_hosts,
        what="webhook endpoints",
        setting="AZORA_WEBHOOK_ALLOW_PRIVATE_HOSTS",
    )


class WebhookTransport:
    """Sends requests.

    Pooled (the dispatcher): one connection pool for the process, opened inside its event
    loop on first use and closed by `close`. Not pooled (the API's test sends, rare): a pool
    per request, closed right after, so the API process holds no connections to endpoints.
    """

    def __init__(
        self,
        *,
        resolver: HostResolver,
        policy: AddressPolicy,
        timeout: float,
        pooled: bool = True,
        limit: int = 100,
    ) -> None:
        self._resolver = resolver
        self._policy = policy
        self._timeout = timeout
        self._pooled = pooled
        self._limit = limit
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        """Close the connection pool (if one was opened)."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _new_session(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            resolver=GuardedResolver(self._resolver, self._policy),
            use_dns_cache=False,
            limit=self._limit,
        )
        return aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            headers={"user-agent": USER_AGENT},
        )

    async def post(self, *, url: str, headers: dict[str, str], body: str, at: datetime) -> Attempt:
        """POST `body` and describe what happened; never raises for the endpoint's faults.

        Args:
            url: the endpoint.
            headers: the signed headers.
            body: the exact signed body.
            at: the attempt's time as recorded (the process clock).
        """
        started = time.monotonic()

        def done(status: int = 0, answer: str = "", error: str = "") -> Attempt:
            elapsed = int((time.monotonic() - started) * 1000)
            return Attempt(at, status, elapsed, answer[:RESPONSE_KEEP], error[:RESPONSE_KEEP])

        refusal = self._literal_refusal(url)
        if refusal:
            return done(error=refusal)
        if self._pooled:
            if self._session is None or self._session.closed:
                self._session = self._new_session()
            return await self._post(self._session, url, headers, body, done)
        async with self._new_session() as session:
            return await self._post(session, url, headers, body, done)

    async def _post(
        self,
        session: aiohttp.ClientSession,
        url: str,
        headers: dict[str, str],
        body: str,
        done: Callable[..., Attempt],
    ) -> Attempt:
        try:
            async with session.post(
                url, data=body.encode(), headers=headers, allow_redirects=False
            ) as response:
                raw = await response.content.read(RESPONSE_KEEP)
                answer = raw.decode("utf-8", errors="replace")
                if 300 <= response.status < 400:
                    return done(response.status, answer, "redirects are not followed")
                return done(response.status, answer)
        except TimeoutError:
            return done(error=f"no answer within {self._timeout:g} s")
        except aiohttp.ClientConnectorError as exc:
            return done(error=f"connection failed: {exc.os_error}")
        except (aiohttp.ClientError, OSError) as exc:
            return done(error=f"{type(exc).__name__}: {exc}")

    def _literal_refusal(self, url: str) -> str:
        host = (URL(url).host or "").strip("[]")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return ""
        refusal = self._policy.refusal(address)
        return f"refused by the SSRF guard: {refusal}" if refusal else ""


__all__ = ["USER_AGENT", "GuardedResolver", "WebhookTransport", "address_policy"]
