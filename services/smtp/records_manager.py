"""SPF and DMARC records and the DNS check of everything a domain should publish.

Every use case first asks the domain service whether the domain exists in the caller's tenant
(`DomainDirectory`), so another tenant's domain is NOT_FOUND everywhere. The generated SPF and
DMARC values are remembered so that the DNS check can compare what is published with them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from services.core.clock import Clock
from services.smtp.dkim_manager import DkimManager
from services.smtp.dmarc import DmarcBuilder
from services.smtp.dns_check import RecordChecker
from services.smtp.domains_client import DomainDirectory
from services.smtp.models import (
    DkimKeyStatus,
    DmarcInput,
    DmarcRecord,
    RecordCheck,
    SpfMechanismInput,
    SpfQualifier,
    SpfRecord,
)
from services.smtp.repository import AuthRecordRepository, SmtpConfigRepository
from services.smtp.spf import SpfBuilder


class RecordsManager:
    """SPF, DMARC and DNS-check use cases; the servicer translates to and from protobuf only."""

    def __init__(
        self,
        *,
        domains: DomainDirectory,
        configs: SmtpConfigRepository,
        auth_records: AuthRecordRepository,
        dkim: DkimManager,
        checker: RecordChecker,
        spf: SpfBuilder,
        dmarc: DmarcBuilder,
        clock: Clock,
    ) -> None:
        self._domains = domains
        self._configs = configs
        self._auth_records = auth_records
        self._dkim = dkim
        self._checker = checker
        self._spf = spf
        self._dmarc = dmarc
        self._clock = clock

    async def generate_spf(
        self,
        *,
        tenant_id: str,
        domain_id: str,
        mechanisms: Sequence[SpfMechanismInput],
        all_qualifier: SpfQualifier | None,
        redirect: str,
        exclude_relay: bool,
    ) -> SpfRecord:
        """Build and validate the domain's SPF record (and remember it for DNS checks).

        Raises:
            InvalidArgument: a mechanism, ``all`` or ``redirect`` is invalid, or the record
                needs more than 10 DNS lookups.
            NotFound: no such domain in this tenant.
        """
        domain = await self._domains.get(tenant_id=tenant_id, domain_id=domain_id)
        config = await self._configs.find(tenant_id=tenant_id, domain_id=domain.id)
        record = await self._spf.build(
            domain=domain.name,
            relay_host=None if exclude_relay or config is None else config.relay.host,
            mechanisms=mechanisms,
            all_qualifier=all_qualifier,
            redirect=redirect,
        )
        await self._auth_records.save_spf(
            tenant_id=tenant_id, domain_id=domain.id, value=record.value, now=self._clock.now()
        )
        return record

    async def generate_dmarc(
        self, *, tenant_id: str, domain_id: str, request: DmarcInput
    ) -> DmarcRecord:
        """Build and validate the domain's DMARC record (and remember it for DNS checks).

        Raises:
            InvalidArgument: a tag is invalid.
            NotFound: no such domain in this tenant.
        """
        domain = await self._domains.get(tenant_id=tenant_id, domain_id=domain_id)
        record = self._dmarc.build(domain=domain.name, request=request)
        await self._auth_records.save_dmarc(
            tenant_id=tenant_id,
            domain_id=domain.id,
            value=record.value,
            authorizations=record.external_authorizations,
            now=self._clock.now(),
        )
        return record

    async def check_dns(self, *, tenant_id: str, domain_id: str) -> list[RecordCheck]:
        """Look up every record the domain should publish and judge each.

        Raises:
            NotFound: no such domain in this tenant.
        """
        domain = await self._domains.get(tenant_id=tenant_id, domain_id=domain_id)
        ring = await self._dkim.keyring(domain)
        records = await self._auth_records.find(tenant_id=tenant_id, domain_id=domain.id)
        live = sorted(
            (k for k in ring.keys if k.status is not DkimKeyStatus.RETIRED),
            key=lambda k: k.created_at,
        )
        name = domain.name
        checks = await asyncio.gather(
            self._checker.verification(name, domain.verification_token),
            *(self._checker.dkim(name, k) for k in live),
            self._checker.spf(name, records.spf if records else None),
            self._checker.dmarc(name, records.dmarc if records else None),
            *(
                self._checker.report_authorization(a.record_name)
                for a in (records.dmarc_authorizations if records else ())
            ),
            self._checker.mx(name),
        )
        if live:
            await self._dkim.store_checks(
                ring, {k.selector: checks[1 + i] for i, k in enumerate(live)}
            )
        return list(checks)


__all__ = ["RecordsManager"]
