"""The mail service's view of relays and keys, over the SMTP service's `RelayDirectory`.

`services.mail.relay_directory` fetches relay settings and DKIM keys from the SMTP service
(cached briefly). `RelayLookup` is what the use cases and the workers depend on: whether a
domain has a relay (the use cases: no credentials needed to know that), the relay's endpoint
and the domain's signer (the workers). `DirectoryRelayLookup` turns the directory's answers into
those, and keeps one `DkimSigner` per key: loading a private key costs far more than signing a
message with it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from services.core.settings import Settings
from services.core.tracing import traced_channel
from services.mail.dkim_signer import DkimSigner
from services.mail.relay_directory import GrpcRelayDirectory, RelayDirectory


@dataclass(frozen=True, slots=True)
class RelayEndpoint:
    """Where and how to hand a domain's mail over (password in clear: never log this)."""

    host: str
    port: int
    # implicit_tls, starttls_required, starttls_opportunistic or none.
    security: str = "starttls_required"
    username: str = ""
    password: str = field(default="", repr=False)
    client_hostname: str = ""
    timeout: float = 30.0
    tls_skip_verify: bool = False

    @property
    def pool_key(self) -> tuple[object, ...]:
        """Connections may be shared by emails whose relay settings are identical."""
        return (
            self.host,
            self.port,
            self.security,
            self.username,
            self.password,
            self.client_hostname,
            self.tls_skip_verify,
        )


class MessageSigner(Protocol):
    """Produces the DKIM-Signature header line for a message."""

    def sign(self, message: bytes) -> bytes:
        """The ``DKIM-Signature: ...`` header line (ending in CRLF) to prepend to `message`."""
        ...


class RelayLookup(Protocol):
    """A domain's relay and active signing key."""

    async def has_relay(self, *, tenant_id: str, domain_id: str) -> bool:
        """Whether the tenant's domain has a relay configured (no credentials are fetched).

        Raises:
            Unavailable: the owner of relay settings cannot answer now.
        """
        ...

    async def endpoint(self, *, tenant_id: str, domain_id: str) -> RelayEndpoint:
        """The domain's relay, password included.

        Raises:
            NotFound: no such domain in this tenant.
            FailedPrecondition: the domain has no relay configured (RELAY_NOT_CONFIGURED), or
                its password cannot be decrypted.
            Unavailable: the owner of relay settings cannot answer now.
        """
        ...

    async def signer(self, *, tenant_id: str, domain_id: str) -> MessageSigner | None:
        """A signer with the domain's active DKIM key, or None when it has none.

        Raises:
            Unavailable: the owner of the keys cannot answer now.
        """
        ...


class DirectoryRelayLookup:
    """`RelayLookup` over a `RelayDirectory`."""

    def __init__(self, directory: RelayDirectory, *, max_signers: int = 10_000) -> None:
        self._directory = directory
        self._signers: dict[tuple[str, str, str], DkimSigner] = {}
        self._max = max_signers

    async def has_relay(self, *, tenant_id: str, domain_id: str) -> bool:
        """See `RelayLookup.has_relay`."""
        return await self._directory.relay_exists(tenant_id=tenant_id, domain_id=domain_id)

    async def endpoint(self, *, tenant_id: str, domain_id: str) -> RelayEndpoint:
        """See `RelayLookup.endpoint`."""
        relay = await self._directory.relay_for(tenant_id=tenant_id, domain_id=domain_id)
        return RelayEndpoint(
            host=relay.host,
            port=relay.port,
            security=relay.security.value,
            username=relay.username,
            password=relay.password,
            client_hostname=relay.client_hostname,
            timeout=relay.timeout or 30.0,
            tls_skip_verify=relay.tls_skip_verify,
        )

    async def signer(self, *, tenant_id: str, domain_id: str) -> MessageSigner | None:
        """See `RelayLookup.signer`."""
        key = await self._directory.signing_key(tenant_id=tenant_id, domain_id=domain_id)
        if key is None:
            return None
        cache_key = (key.domain, key.selector, hashlib.sha256(key.private_key_pem).hexdigest())
        signer = self._signers.get(cache_key)
        if signer is None:
            if len(self._signers) >= self._max:
                self._signers.clear()
            signer = self._signers[cache_key] = key.signer()
        return signer


def smtp_service_relays(settings: Settings) -> tuple[DirectoryRelayLookup, grpc.aio.Channel]:
    """The production lookup (SMTP service over gRPC) and its channel, to close on shutdown."""
    channel = traced_channel(settings.smtp_service_target)
    directory = GrpcRelayDirectory(channel, settings, cache_ttl=settings.domain_cache_ttl)
    return DirectoryRelayLookup(directory), channel


__all__ = [
    "DirectoryRelayLookup",
    "MessageSigner",
    "RelayEndpoint",
    "RelayLookup",
    "smtp_service_relays",
]
