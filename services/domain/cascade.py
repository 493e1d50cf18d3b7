"""Deletion cascade: when a domain is deleted, its owners clean up what they hold for it.

The mail service cancels the domain's queued, scheduled and deferred emails (internal rpc
``MailService/CancelDomainEmails``), each with a CANCELLED event saying why, so none keeps
retrying without a relay; and the SMTP service purges the domain's data, as below.

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
from azora.mail.v1 import mail_pb2, mail_pb2_grpc
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


class MailCancelCascade:
    """A `DomainDeletedHook`: asks the mail service to cancel a deleted domain's emails."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        settings: Settings,
        timeout: float = 10.0,
    ) -> None:
        self._stub = mail_pb2_grpc.MailServiceStub(channel)
        self._tokens = ServiceTokens.from_settings(
            settings, subject=SERVICE_SUBJECT, scopes=["emails:write"]
        )
        # Bounded: the user's DELETE waits for this call.
        self._timeout = timeout

    async def __call__(self, domain: Domain) -> None:
        """Cancel `domain`'s unfinished emails; failures are logged, never raised.

        Not retried here: an email left behind is refused a relay at every attempt (the
        domain is gone) and ends FAILED at its maximum lifetime, with the reason recorded.
        """
        try:
            answer = await self._stub.CancelDomainEmails(
                mail_pb2.CancelDomainEmailsRequest(domain_id=domain.id),
                metadata=self._tokens.metadata(domain.tenant_id),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as exc:
            log.warning(
                "emails of a deleted domain not cancelled now; they fail at their maximum "
                "lifetime instead",
                extra={"fields": {"domain_id": domain.id, "code": exc.code().name}},
            )
        else:
            log.info(
                "emails of deleted domain cancelled",
                extra={
                    "fields": {
                        "domain_id": domain.id,
                        "cancelled": answer.cancelled_count,
                        "in_delivery": answer.in_delivery_count,
                    }
                },
            )


__all__ = ["SERVICE_SUBJECT", "MailCancelCascade", "SmtpDataCascade"]
