"""Removal of everything the SMTP service stores for a domain that was deleted.

The relay, the DKIM keyring and the generated SPF/DMARC records live in three collections;
the domain service's deletion cascade (DeleteDomainData) and the DKIM lifecycle loop (which
meets rings of domains that no longer exist) both remove all three through this one place.
"""

from __future__ import annotations

import logging

from services.smtp.repository import (
    AuthRecordRepository,
    DkimKeyringRepository,
    SmtpConfigRepository,
)

log = logging.getLogger(__name__)


class DomainDataRemover:
    """Deletes a domain's relay, DKIM keys and generated records."""

    def __init__(
        self,
        *,
        configs: SmtpConfigRepository,
        keyrings: DkimKeyringRepository,
        auth_records: AuthRecordRepository,
    ) -> None:
        self._configs = configs
        self._keyrings = keyrings
        self._auth_records = auth_records

    async def delete_domain_data(self, *, tenant_id: str, domain_id: str) -> None:
        """Remove the relay, DKIM keys and generated records of a deleted domain."""
        await self._configs.delete(tenant_id=tenant_id, domain_id=domain_id)
        await self._keyrings.delete(tenant_id=tenant_id, domain_id=domain_id)
        await self._auth_records.delete(tenant_id=tenant_id, domain_id=domain_id)
        log.info("domain data removed", extra={"fields": {"domain_id": domain_id}})


__all__ = ["DomainDataRemover"]
