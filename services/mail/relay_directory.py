"""Where the mail service learns each domain's relay and DKIM key: asked of the SMTP service.

The SMTP service owns relay configurations and DKIM keys (and their secrets, encrypted at rest).
Delivery needs them in clear, so the SMTP service serves them through internal rpcs
(``GetRelayCredentials``, ``GetSigningKey``) that accept only service tokens and have no REST
route. `GrpcRelayDirectory` calls them with a token minted for the email's tenant, so the SMTP
service scopes every lookup to that tenant, and caches answers for a few seconds: a worker
delivering a burst for one domain asks once, while a changed relay or a newly activated key is
picked up within the TTL.

`RelaySettings` and `SigningKey` are plain data; their ``repr`` never shows the password or the
private key, so they can appear in logs and tracebacks safely.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import grpc
from azora.smtp.v1 import smtp_pb2, smtp_pb2_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.core.auth import ServiceTokens
from services.core.errors import FailedPrecondition, NotFound, Unavailable
from services.core.settings import Settings
from services.mail.dkim_signer import DkimSigner

SERVICE_SUBJECT = "service:mail"
DEFAULT_CACHE_TTL = 10.0
RELAY_NOT_CONFIGURED = "RELAY_NOT_CONFIGURED"


class RelaySecurity(enum.StrEnum):
    """How the connection to the relay is protected."""

    IMPLICIT_TLS = "implicit_tls"  # TLS from the first byte (usually port 465)
    STARTTLS_REQUIRED = "starttls_required"  # abandon the connection without STARTTLS
    STARTTLS_OPPORTUNISTIC = "starttls_opportunistic"  # STARTTLS when offered
    NONE = "none"  # plain text


_SECURITY_FROM_PROTO = {
    smtp_pb2.SECURITY_MODE_IMPLICIT_TLS: RelaySecurity.IMPLICIT_TLS,
    smtp_pb2.SECURITY_MODE_STARTTLS_REQUIRED: RelaySecurity.STARTTLS_REQUIRED,
    smtp_pb2.SECURITY_MODE_STARTTLS_OPPORTUNISTIC: RelaySecurity.STARTTLS_OPPORTUNISTIC,
    smtp_pb2.SECURITY_MODE_NONE: RelaySecurity.NONE,
}


@dataclass(frozen=True, slots=True)
class RelaySettings:
    """A domain's relay as delivery uses it, password included (never in repr)."""

    domain_id: str
    host: str
    port: int
    security: RelaySecurity
    username: str = ""
    password: str = field(default="", repr=False)
    client_hostname: str = ""  # EHLO name; empty: the sender's own host name
    timeout: float = 30.0  # seconds, for connecting and for each command
    tls_skip_verify: bool = False


@dataclass(frozen=True, slots=True)
class SigningKey:
    """The key that signs a domain's mail now (the private key never in repr)."""

    domain_id: str
    domain: str  # d=, A-label
    selector: str
    algorithm: Literal["rsa-sha256", "ed25519-sha256"]
    private_key_pem: bytes = field(repr=False)

    def signer(self) -> DkimSigner:
        """A signer for this key (loads the key: keep it, do not build one per message)."""
        return DkimSigner(
            domain=self.domain,
            selector=self.selector,
            private_key=self.private_key_pem,
            algorithm=self.algorithm,
        )


class RelayDirectory(Protocol):
    """Looks up a tenant's domain's relay and active DKIM key at their owner."""

    async def relay_exists(self, *, tenant_id: str, domain_id: str) -> bool:
        """Whether the tenant's domain has a relay configured; never fetches its secrets.

        Raises:
            Unavailable: the SMTP service cannot answer right now.
        """
        ...

    async def relay_for(self, *, tenant_id: str, domain_id: str) -> RelaySettings:
        """The relay to deliver the domain's mail through.

        Raises:
            NotFound: no such domain in this tenant.
            FailedPrecondition: the domain has no relay configured (reason
                RELAY_NOT_CONFIGURED), or its password cannot be decrypted.
            Unavailable: the SMTP service cannot answer right now (defer and retry).
        """
        ...

    async def signing_key(self, *, tenant_id: str, domain_id: str) -> SigningKey | None:
        """The domain's active DKIM key, or None when it has none (send unsigned).

        Raises:
            FailedPrecondition: the key cannot be decrypted.
            Unavailable: the SMTP service cannot answer right now (defer and retry).
        """
        ...


@dataclass(frozen=True, slots=True)
class _Entry:
    """A cached answer: a value, or the error to raise again (fresh each time)."""

    expires: float
    value: object
    error: Callable[[], Exception] | None = None


class GrpcRelayDirectory:
    """`RelayDirectory` over the SMTP service's internal rpcs, with a short cache."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        settings: Settings,
        *,
        cache_ttl: float = DEFAULT_CACHE_TTL,
        timeout: float = 5.0,
        max_entries: int = 10_000,
    ) -> None:
        self._stub = smtp_pb2_grpc.SmtpServiceStub(channel)
        self._settings = settings
        self._ttl = cache_ttl
        self._timeout = timeout
        self._max = max_entries
        self._cache: dict[tuple[str, str, str], _Entry] = {}
        # One call in flight per key: a burst of workers for a cold domain makes one request.
        self._inflight: dict[tuple[str, str, str], asyncio.Future[_Entry]] = {}
        self._tokens = ServiceTokens.from_settings(
            settings, subject=SERVICE_SUBJECT, scopes=["smtp:read"]
        )

    async def relay_exists(self, *, tenant_id: str, domain_id: str) -> bool:
        """See `RelayDirectory.relay_exists`.

        Asks the public GetSmtpConfig (no password in its answer) rather than the credentials
        rpc; a relay this process fetched for delivery moments ago answers without a call.
        """
        fetched = self._cache.get(("relay", tenant_id, domain_id))
        if fetched is not None and fetched.error is None and fetched.expires > time.monotonic():
            return True
        value = await self._cached(("exists", tenant_id, domain_id), self._fetch_exists)
        return value is True

    async def relay_for(self, *, tenant_id: str, domain_id: str) -> RelaySettings:
        """See `RelayDirectory.relay_for`."""
        value = await self._cached(("relay", tenant_id, domain_id), self._fetch_relay)
        assert isinstance(value, RelaySettings)
        return value

    async def signing_key(self, *, tenant_id: str, domain_id: str) -> SigningKey | None:
        """See `RelayDirectory.signing_key`."""
        value = await self._cached(("key", tenant_id, domain_id), self._fetch_key)
        assert value is None or isinstance(value, SigningKey)
        return value

    async def _cached(
        self,
        key: tuple[str, str, str],
        fetch: Callable[[str, str], Awaitable[_Entry]],
    ) -> object:
        entry = self._cache.get(key)
        if entry is None or entry.expires <= time.monotonic():
            pending = self._inflight.get(key)
            if pending is None:
                pending = asyncio.ensure_future(fetch(key[1], key[2]))
                self._inflight[key] = pending
                pending.add_done_callback(lambda _: self._inflight.pop(key, None))
            # Shielded: one waiter being cancelled must not cancel the call the others share.
            entry = await asyncio.shield(pending)
            if len(self._cache) >= self._max:
                self._cache.clear()
            self._cache[key] = entry
        if entry.error is not None:
            raise entry.error()
        return entry.value

    async def _fetch_relay(self, tenant_id: str, domain_id: str) -> _Entry:
        expires = time.monotonic() + self._ttl
        try:
            reply = await self._stub.GetRelayCredentials(
                smtp_pb2.GetRelayCredentialsRequest(domain_id=domain_id, tenant_id=tenant_id),
                metadata=self._tokens.metadata(tenant_id),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as exc:
            # Answers about the data (no domain, no relay) are cached like values; transport
            # trouble is raised now and never cached, so the next message asks again.
            return _Entry(expires, None, _error_of(exc, resource=("Domain", domain_id)))
        relay = RelaySettings(
            domain_id=reply.domain_id,
            host=reply.host,
            port=reply.port,
            security=_SECURITY_FROM_PROTO.get(reply.security, RelaySecurity.STARTTLS_REQUIRED),
            username=reply.username,
            password=reply.password,
            client_hostname=reply.client_hostname,
            timeout=reply.timeout.ToTimedelta().total_seconds(),
            tls_skip_verify=reply.tls_skip_verify,
        )
        return _Entry(expires, relay)

    async def _fetch_exists(self, tenant_id: str, domain_id: str) -> _Entry:
        expires = time.monotonic() + self._ttl
        try:
            await self._stub.GetSmtpConfig(
                smtp_pb2.GetSmtpConfigRequest(domain_id=domain_id),
                metadata=self._tokens.metadata(tenant_id),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                # No relay, or no such domain in this tenant: no relay either way.
                return _Entry(expires, False)
            raise Unavailable(
                f"the SMTP service did not answer ({exc.code().name})",
                reason="SMTP_SERVICE_UNAVAILABLE",
            ) from None
        return _Entry(expires, True)

    async def _fetch_key(self, tenant_id: str, domain_id: str) -> _Entry:
        expires = time.monotonic() + self._ttl
        try:
            reply = await self._stub.GetSigningKey(
                smtp_pb2.GetSigningKeyRequest(domain_id=domain_id),
                metadata=self._tokens.metadata(tenant_id),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return _Entry(expires, None)  # no active key: mail goes out unsigned
            return _Entry(expires, None, _error_of(exc, resource=("SigningKey", domain_id)))
        algorithm: Literal["rsa-sha256", "ed25519-sha256"] = (
            "ed25519-sha256" if reply.algorithm == "ed25519-sha256" else "rsa-sha256"
        )
        key = SigningKey(
            domain_id=reply.domain_id or domain_id,
            domain=reply.domain,
            selector=reply.selector,
            algorithm=algorithm,
            private_key_pem=reply.private_key_pem,
        )
        return _Entry(expires, key)


def _error_of(exc: grpc.aio.AioRpcError, *, resource: tuple[str, str]) -> Callable[[], Exception]:
    """Our typed error for a failed call (as a factory), or raise Unavailable at once."""
    code = exc.code()
    if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
        # Unknown, malformed or another tenant's id: all the same to the caller.
        return lambda: NotFound(*resource)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        reason = _reason(exc) or "FAILED_PRECONDITION"
        message = exc.details() or "failed precondition"
        return lambda: FailedPrecondition(message, reason=reason)
    raise Unavailable(
        f"the SMTP service did not answer ({code.name})", reason="SMTP_SERVICE_UNAVAILABLE"
    ) from None


def _reason(exc: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason of a rich error, if it carries one."""
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    if status is None:
        return ""
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return ""


class InMemoryRelayDirectory:
    """`RelayDirectory` from dicts, for unit tests of the delivery path."""

    def __init__(self) -> None:
        self.relays: dict[tuple[str, str], RelaySettings] = {}
        self.keys: dict[tuple[str, str], SigningKey] = {}
        self.domains: set[tuple[str, str]] = set()  # domains that exist without a relay
        self.calls = 0  # lets tests see how often the directory was asked
        self.credential_reads = 0  # and how often for a relay's credentials

    def add_relay(self, *, tenant_id: str, relay: RelaySettings) -> None:
        """Configure `relay` for its domain in `tenant_id`."""
        self.domains.add((tenant_id, relay.domain_id))
        self.relays[(tenant_id, relay.domain_id)] = relay

    def add_key(self, *, tenant_id: str, key: SigningKey) -> None:
        """Make `key` the active key of its domain in `tenant_id`."""
        self.domains.add((tenant_id, key.domain_id))
        self.keys[(tenant_id, key.domain_id)] = key

    async def relay_exists(self, *, tenant_id: str, domain_id: str) -> bool:
        """See `RelayDirectory.relay_exists`."""
        self.calls += 1
        return (tenant_id, domain_id) in self.relays

    async def relay_for(self, *, tenant_id: str, domain_id: str) -> RelaySettings:
        """See `RelayDirectory.relay_for`."""
        self.calls += 1
        self.credential_reads += 1
        relay = self.relays.get((tenant_id, domain_id))
        if relay is not None:
            return relay
        if (tenant_id, domain_id) in self.domains:
            raise FailedPrecondition(
                "no relay configured for this domain", reason=RELAY_NOT_CONFIGURED
            )
        raise NotFound("Domain", domain_id)

    async def signing_key(self, *, tenant_id: str, domain_id: str) -> SigningKey | None:
        """See `RelayDirectory.signing_key`."""
        self.calls += 1
        return self.keys.get((tenant_id, domain_id))


__all__ = [
    "DEFAULT_CACHE_TTL",
    "RELAY_NOT_CONFIGURED",
    "SERVICE_SUBJECT",
    "GrpcRelayDirectory",
    "InMemoryRelayDirectory",
    "RelayDirectory",
    "RelaySecurity",
    "RelaySettings",
    "SigningKey",
]
