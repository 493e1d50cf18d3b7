"""Which domains exist and whose they are: asked of the domain service, never read from its data.

The domain service owns the ``domains`` collection; the SMTP service confirms that a domain
exists and belongs to the caller's tenant by calling ``azora.domain.v1.DomainService/GetDomain``
with a short-lived service token minted for that tenant (signed with AZORA_SERVICE_TOKEN_SECRET),
so the domain service applies its own tenant filter. Answers are cached for a few seconds: a
burst of calls about one domain costs one round trip, and a deletion is noticed within the TTL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import grpc
from azora.domain.v1 import domain_pb2, domain_pb2_grpc

from services.core.auth import ServiceTokens
from services.core.cache import TtlCache
from services.core.errors import NotFound, Unavailable
from services.core.ids import check_id
from services.core.settings import Settings

SERVICE_SUBJECT = "service:smtp"


@dataclass(frozen=True, slots=True)
class DomainInfo:
    """What the SMTP service needs to know about a domain."""

    id: str
    tenant_id: str
    name: str  # A-label form
    status: str  # pending, active, suspended, expired
    verification_token: str


class DomainDirectory(Protocol):
    """Looks a tenant's domain up at its owner."""

    async def get(self, *, tenant_id: str, domain_id: str) -> DomainInfo:
        """The tenant's domain.

        Raises:
            InvalidArgument: the id is malformed (field ``domain_id``).
            NotFound: no such domain in this tenant.
            Unavailable: the domain service cannot answer right now.
        """
        ...


class GrpcDomainDirectory:
    """`DomainDirectory` over the domain service's gRPC API, with a short cache."""

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
        self._cache: TtlCache[tuple[str, str], DomainInfo] = TtlCache(
            ttl=cache_ttl, max_entries=max_entries
        )

    async def get(self, *, tenant_id: str, domain_id: str) -> DomainInfo:
        """See `DomainDirectory.get`."""
        check_id(domain_id, field="domain_id")
        cached = self._cache.get((tenant_id, domain_id))
        if cached is not None:
            return cached
        try:
            reply = await self._stub.GetDomain(
                domain_pb2.GetDomainRequest(id=domain_id),
                metadata=self._tokens.metadata(tenant_id),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                # Unknown, malformed or another tenant's id: all look the same to the caller.
                self._cache.forget((tenant_id, domain_id))
                raise NotFound("Domain", domain_id) from None
            raise Unavailable(
                f"the domain service did not answer ({exc.code().name})",
                reason="DOMAIN_SERVICE_UNAVAILABLE",
            ) from None
        info = DomainInfo(
            id=reply.id,
            tenant_id=tenant_id,
            name=reply.name,
            status=domain_pb2.DomainStatus.Name(reply.status)
            .removeprefix("DOMAIN_STATUS_")
            .lower(),
            verification_token=reply.verification_token,
        )
        return self._cache.put((tenant_id, domain_id), info)


__all__ = ["SERVICE_SUBJECT", "DomainDirectory", "DomainInfo", "GrpcDomainDirectory"]
