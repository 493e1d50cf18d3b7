"""Deletion cascade: when a domain is deleted, the SMTP service purges the domain's data.

The SMTP service owns the relay configurations, DKIM keyrings and generated records, so the
domain service never deletes them itself: it asks the owner through the internal rpc
``SmtpService/DeleteDomainData`` with a short-lived service token minted for the deleted
domain's tenant (``internal_only`` lets only service tokens in).

The hook never fails the deletion the user asked for: the domain is already gone when it runs.
If the SMTP service cannot be reached, a warning is logged and nothing retries here, because
the SMTP service's DKIM lifecycle loop removes the data of domains that no longer exist
(orphans with DKIM keys) by itself. A relay configuration without any DKIM key is not found by
that loop; it is unreachable (every SMTP use case asks the domain service first) and costs one
small document.
"""

from __future__ import annotations

import logging

import grpc
from azora.smtp.v1 import smtp_pb2, smtp_pb2_grpc

from services.core.auth import ServiceTokens
from services.core.settings import Settings
from services.domain.models import Domain

log = logging.getLogger(__name__)

SERVICE_SUBJECT = "service:domain"


class SmtpDataCascade:
    """A `DomainDeletedHook`: asks the SMTP service to purge a deleted domain's data."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        settings: Settings,
        timeout: float = 5.0,
    ) -> None:
        self._stub = smtp_pb2_grpc.SmtpServiceStub(channel)
        self._tokens = ServiceTokens.from_settings(
            settings, subject=SERVICE_SUBJECT, scopes=["smtp:write"]
        )
        # Bounded: the user's DELETE waits for this call, and the lifecycle loop is the backstop.
        self._timeout = timeout

    async def __call__(self, domain: Domain) -> None:
        """Purge `domain`'s SMTP data; failures are logged, never raised."""
        try:
            await self._stub.DeleteDomainData(
                smtp_pb2.DeleteDomainDataRequest(domain_id=domain.id),
                metadata=self._tokens.metadata(domain.tenant_id),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as exc:
            log.warning(
                "SMTP data of a deleted domain not purged now; the SMTP lifecycle loop removes "
                "orphaned DKIM keyrings later",
                extra={"fields": {"domain_id": domain.id, "code": exc.code().name}},
            )
        else:
            log.info(
                "SMTP data of deleted domain purged", extra={"fields": {"domain_id": domain.id}}
            )


__all__ = ["SERVICE_SUBJECT", "SmtpDataCascade"]
