"""Delivery's view of relays and keys, over the SMTP service's `RelayDirectory`.

`services.mail.relay_directory` fetches relay settings and DKIM keys from the SMTP service
(cached briefly). This adapter turns them into what the pool and the worker use, and keeps one
`DkimSigner` per key: loading a private key costs far more than signing a message with it.
"""

from __future__ import annotations

import hashlib

import grpc

from services.core.errors import FailedPrecondition, NotFound
from services.core.settings import Settings
from services.core.tracing import traced_channel
from services.mail.delivery import MessageSigner, RelayEndpoint
from services.mail.dkim_signer import DkimSigner
from services.mail.relay_directory import RELAY_NOT_CONFIGURED, GrpcRelayDirectory, RelayDirectory


class DirectoryRelayLookup:
    """`RelayLookup` over a `RelayDirectory`."""

    def __init__(self, directory: RelayDirectory, *, max_signers: int = 10_000) -> None:
        self._directory = directory
        self._signers: dict[tuple[str, str, str], DkimSigner] = {}
        self._max = max_signers

    async def endpoint(self, *, tenant_id: str, domain_id: str) -> RelayEndpoint:
        """See `RelayLookup.endpoint` (a domain without relay is NotFound, like no domain)."""
        try:
            relay = await self._directory.relay_for(tenant_id=tenant_id, domain_id=domain_id)
        except FailedPrecondition as exc:
            if exc.reason == RELAY_NOT_CONFIGURED:
                raise NotFound("SmtpConfig", domain_id) from None
            raise
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


__all__ = ["DirectoryRelayLookup", "smtp_service_relays"]
