"""Which active domain a sender address belongs to: asked of the domain service.

A send request names only the From address, so the mail service lists the tenant's ACTIVE
domains (``DomainService/ListDomains`` with a short-lived service token minted for that tenant,
as the SMTP service does) and matches the address's domain by name. The answer is cached per
tenant for a few seconds: a burst of sends costs one round trip, and a suspension or deletion
is noticed within the TTL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import grpc
from azora.domain.v1 import domain_pb2, domain_pb2_grpc

from services.core.auth import ServiceTokens
from services.core.cache import TtlCache
from services.core.errors import Unavailable
from services.core.settings import Settings

SERVICE_SUBJECT = "service:mail"
_MAX_PAGES = 50


@dataclass(frozen=True, slots=True)
class SenderDomain:
    """An active domain of a tenant."""

    id: str
    name: str  # A-label


class SenderDirectory(Protocol):
    """Finds the tenant's active domain for a sender's domain name."""

    async def active_domain(self, *, tenant_id: str, name: str) -> SenderDomain | None:
        """The tenant's ACTIVE domain called `name` (A-label), or None.

        Raises:
            Unavailable: the domain service cannot answer right now.
        """
        ...


class GrpcSenderDirectory:
    """`SenderDirectory` over DomainService/ListDomains, cached per tenant."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        settings: Settings,
        cache_ttl: float = 5.0,
        timeout: float = 5.0,
        max_entries: int = 10_000,
    ) -> None:
        self._stub = domain_pb2_grpc.DomainServiceStub(channel)
        self._tokens = ServiceTokens.from_settings(
            settings, subject=SERVICE_SUBJECT, scopes=["domains:read"]
        )
        self._timeout = timeout
        self._cache: TtlCache[str, dict[str, SenderDomain]] = TtlCache(
            ttl=cache_ttl, max_entries=max_entries
        )

    async def active_domain(self, *, tenant_id: str, name: str) -> SenderDomain | None:
        """See `SenderDirectory.active_domain`."""
        domains = self._cache.get(tenant_id)
        if domains is None:
            domains = self._cache.put(tenant_id, await self._fetch(tenant_id))
        return domains.get(name.lower())

    async def _fetch(self, tenant_id: str) -> dict[str, SenderDomain]:
        found: dict[str, SenderDomain] = {}
        page_token = ""
        try:
            for _ in range(_MAX_PAGES):
                reply = await self._stub.ListDomains(
                    domain_pb2.ListDomainsRequest(
                        status=domain_pb2.DOMAIN_STATUS_ACTIVE, page_size=200, page_token=page_token
                    ),
                    metadata=self._tokens.metadata(tenant_id),
                    timeout=self._timeout,
                )
                for domain in reply.domains:
                    found[domain.name.lower()] = SenderDomain(domain.id, domain.name.lower())
                page_token = reply.next_page_token
                if not page_token:
                    break
        except grpc.aio.AioRpcError as exc:
            raise Unavailable(
                f"the domain service did not answer ({exc.code().name})",
                reason="DOMAIN_SERVICE_UNAVAILABLE",
            ) from None
        return found


class StaticSenderDirectory:
    """`SenderDirectory` from a fixed table (unit tests and benchmarks without a domain service)."""

    def __init__(self, domains: dict[tuple[str, str], SenderDomain] | None = None) -> None:
        self.domains = dict(domains or {})

    async def active_domain(self, *, tenant_id: str, name: str) -> SenderDomain | None:
        """See `SenderDirectory.active_domain`."""
        return self.domains.get((tenant_id, name.lower()))


__all__ = ["GrpcSenderDirectory", "SenderDirectory", "SenderDomain", "StaticSenderDirectory"]
