"""Domain use cases and lifecycle: register, list, records, verify, delete, expire, re-check.

Lifecycle (DESIGN.md):
* PENDING -> ACTIVE when the ownership TXT record is found (and no other tenant's ACTIVE domain
  holds the name); PENDING -> EXPIRED when not verified within the verification window; verifying
  an EXPIRED domain issues a new token and starts again.
* ACTIVE (and SUSPENDED) domains are re-checked every `recheck_interval`. An active domain whose
  record disappeared stays ACTIVE for `suspension_grace`, then becomes SUSPENDED with the reason;
  a suspended domain whose record is back becomes ACTIVE again. Lookups that merely failed
  (timeout, SERVFAIL) are recorded but never count as "record gone".
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Protocol

from services.core import verp
from services.core.clock import Clock
from services.core.dns_names import normalize_domain_name
from services.core.errors import Conflict, FailedPrecondition, PreconditionViolation
from services.core.ids import check_id, decode_page_token, encode_page_token, new_id, page_size
from services.core.ownership import expected_record
from services.domain.dns_records import (
    ZONE_FILE_DEFAULT_TTL,
    normalize_record_set,
    to_zone_file,
)
from services.domain.models import (
    DnsRecord,
    DnsRecordInput,
    DnsRecordType,
    Domain,
    DomainPage,
    DomainStatus,
    RequiredRecord,
    VerificationCheck,
    VerificationOutcome,
)
from services.domain.repository import Claim, ClaimRepository, DomainRepository

log = logging.getLogger(__name__)

# Outcomes that prove the record is not published (as opposed to a failed lookup).
_DEFINITE_MISSES = frozenset(
    {VerificationOutcome.NO_RECORD, VerificationOutcome.NXDOMAIN, VerificationOutcome.WRONG_TOKEN}
)

DomainDeletedHook = Callable[[Domain], Awaitable[None]]


class OwnershipChecker(Protocol):
    """Looks up the ownership record (see `services.domain.verifier.OwnershipVerifier`)."""

    async def check(self, *, name: str, token: str) -> VerificationCheck:
        """Look up `name` and compare with `token`; never raises for DNS failures."""
        ...


@dataclass(frozen=True, slots=True)
class DomainPolicy:
    """Tunable rules of the domain lifecycle and limits."""

    verification_window: timedelta = timedelta(hours=72)
    recheck_interval: timedelta = timedelta(hours=1)
    suspension_grace: timedelta = timedelta(hours=72)
    default_page_size: int = 50
    max_page_size: int = 200
    max_domains_per_tenant: int = 1000
    max_dns_records: int = 500
    max_dns_records_per_tenant: int = 5000
    recheck_batch: int = 100
    # Where bounces of the domain's mail come back (AZORA_BOUNCE_DOMAIN, AZORA_BOUNCE_MX_HOST).
    bounce_domain: str = "bounces.{domain}"
    bounce_mx_host: str = ""


class DomainManager:
    """Use cases of the domain service; servicers translate to and from protobuf only."""

    def __init__(
        self,
        *,
        domains: DomainRepository,
        claims: ClaimRepository,
        checker: OwnershipChecker,
        clock: Clock,
        policy: DomainPolicy,
        on_deleted: Sequence[DomainDeletedHook] = (),
    ) -> None:
        self._domains = domains
        self._claims = claims
        self._checker = checker
        self._clock = clock
        self._policy = policy
        self._on_deleted = list(on_deleted)

    @property
    def policy(self) -> DomainPolicy:
        """The rules this manager applies (what the records a domain needs depend on)."""
        return self._policy

    async def create(self, *, tenant_id: str, name: str) -> Domain:
        """Register a domain for the tenant.

        Raises:
            InvalidArgument: the name is not a valid domain name.
            AlreadyExists: the tenant already registered it.
            FailedPrecondition: the tenant reached its domain limit.
        """
        a_label, u_label = normalize_domain_name(name, field="name")
        existing = await self._domains.count(tenant_id=tenant_id, status=None)
        if existing >= self._policy.max_domains_per_tenant:
            raise FailedPrecondition(
                f"the tenant already has {existing} domains (limit "
                f"{self._policy.max_domains_per_tenant})",
                reason="DOMAIN_LIMIT_REACHED",
                violations=[
                    PreconditionViolation("QUOTA", "domains", "maximum domains per tenant")
                ],
            )
        now = self._clock.now()
        domain = Domain(
            id=new_id(),
            tenant_id=tenant_id,
            name=a_label,
            unicode_name=u_label,
            status=DomainStatus.PENDING,
            verification_token=_new_token(),
            created_at=now,
            updated_at=now,
            verification_expires_at=now + self._policy.verification_window,
        )
        await self._domains.insert(domain=domain)
        log.info("domain registered", extra={"fields": {"domain_id": domain.id}})
        return domain

    async def get(self, *, tenant_id: str, domain_id: str) -> Domain:
        """Load one of the tenant's domains.

        Raises:
            InvalidArgument: malformed id.
            NotFound: no such domain in this tenant.
        """
        return await self._domains.get(tenant_id=tenant_id, domain_id=check_id(domain_id))

    async def list(
        self, *, tenant_id: str, status: DomainStatus | None, size: int, page_token: str
    ) -> DomainPage:
        """A page of the tenant's domains in creation order.

        Raises:
            InvalidArgument: negative page size or a bad page token.
        """
        limit = page_size(
            size, default=self._policy.default_page_size, maximum=self._policy.max_page_size
        )
        query = {"status": status.value if status else ""}
        after = decode_page_token(page_token, query)
        rows = await self._domains.list(
            tenant_id=tenant_id, status=status, after_id=after, limit=limit + 1
        )
        total = await self._domains.count(tenant_id=tenant_id, status=status)
        page, more = rows[:limit], len(rows) > limit
        token = encode_page_token(page[-1].id, query) if more and page else ""
        return DomainPage(page, token, total)

    async def replace_records(
        self, *, tenant_id: str, domain_id: str, records: Sequence[DnsRecordInput]
    ) -> Domain:
        """Validate and store a new record set (all or nothing).

        Raises:
            InvalidArgument: any record is invalid (one violation per problem).
            NotFound: no such domain in this tenant.
            FailedPrecondition: the tenant's domains would hold more records than allowed.
        """
        domain = await self.get(tenant_id=tenant_id, domain_id=domain_id)
        normalized = normalize_record_set(
            domain.name, records, max_records=self._policy.max_dns_records
        )
        others = await self._domains.record_count(tenant_id=tenant_id, except_domain_id=domain_id)
        limit = self._policy.max_dns_records_per_tenant
        if others + len(normalized) > limit:
            raise FailedPrecondition(
                f"this tenant's domains may hold at most {limit} DNS records in all; the others "
                f"hold {others}, so this domain may have at most {max(limit - others, 0)}",
                reason="DNS_RECORD_LIMIT_REACHED",
                violations=[
                    PreconditionViolation(
                        "DNS_RECORD_LIMIT_REACHED", "records", f"at most {limit} per tenant"
                    )
                ],
            )
        updated = replace(domain, dns_records=normalized, updated_at=self._clock.now())
        return await self._domains.save(domain=updated)

    async def verify(self, *, tenant_id: str, domain_id: str) -> tuple[Domain, VerificationCheck]:
        """Look up the ownership record now and apply the result.

        Raises:
            NotFound: no such domain in this tenant.
            FailedPrecondition: another tenant's active domain already owns the name.
            Conflict: the domain changed concurrently.
        """
        domain = await self.get(tenant_id=tenant_id, domain_id=domain_id)
        now = self._clock.now()
        if domain.status is DomainStatus.EXPIRED:
            # Starting again: a new token, so an old leaked token cannot be used.
            domain = await self._domains.save(
                domain=replace(
                    domain,
                    status=DomainStatus.PENDING,
                    status_reason="verification restarted with a new token",
                    verification_token=_new_token(),
                    verification_expires_at=now + self._policy.verification_window,
                    updated_at=now,
                )
            )
        check = await self._checker.check(name=domain.name, token=domain.verification_token)
        updated = await self._apply_check(domain, check)
        return updated, check

    async def delete(self, *, tenant_id: str, domain_id: str) -> None:
        """Delete a domain with its records, history and ownership claim.

        Then the other owners of domain data (SMTP config, DKIM keys, queued mail) clean up
        through the `on_deleted` hooks.

        Raises:
            NotFound: no such domain in this tenant.
        """
        removed = await self._domains.delete(tenant_id=tenant_id, domain_id=check_id(domain_id))
        await self._claims.release(name=removed.name, domain_id=removed.id)
        for hook in self._on_deleted:
            await hook(removed)
        log.info("domain deleted", extra={"fields": {"domain_id": removed.id}})

    async def zone_file(self, *, tenant_id: str, domain_id: str) -> str:
        """The domain's stored records and its ownership record as a zone file.

        The ownership TXT record is added unless the stored records already hold it: it must
        stay published after verification (the periodic re-check suspends a domain whose
        record disappeared), so a zone imported from this file has to carry it.
        """
        domain = await self.get(tenant_id=tenant_id, domain_id=domain_id)
        ownership = DnsRecord(
            DnsRecordType.TXT,
            domain.name,
            expected_record(domain.verification_token),
            ZONE_FILE_DEFAULT_TTL,
        )
        stored = any(
            (r.type, r.name, r.value) == (ownership.type, ownership.name, ownership.value)
            for r in domain.dns_records
        )
        return to_zone_file(domain.name, domain.dns_records, extra=() if stored else [ownership])

    async def run_lifecycle_once(self) -> tuple[int, int]:
        """Expire overdue pending domains and re-check due active/suspended ones.

        Safe to run in any number of replicas at once: expiry is one conditional update and
        each re-check is claimed atomically first.

        Returns:
            (domains expired, domains re-checked).
        """
        now = self._clock.now()
        expired = await self._domains.expire_pending(
            now=now,
            reason="not verified within "
            f"{self._policy.verification_window.total_seconds() / 3600:g} hours",
        )
        checked = 0
        while checked < self._policy.recheck_batch:
            domain = await self._domains.claim_due_check(
                now=now, next_check_at=now + self._policy.recheck_interval
            )
            if domain is None:
                break
            checked += 1
            check = await self._checker.check(name=domain.name, token=domain.verification_token)
            try:
                await self._apply_check(domain, check)
            except (Conflict, FailedPrecondition) as exc:
                log.info(
                    "re-check not applied",
                    extra={"fields": {"domain_id": domain.id, "reason": exc.reason}},
                )
        return expired, checked

    async def _apply_check(self, domain: Domain, check: VerificationCheck) -> Domain:
        now = self._clock.now()
        changes: dict[str, object] = {"last_check": check, "updated_at": now}
        if check.outcome is VerificationOutcome.MATCHED:
            await self._claim_name(domain, now)
            if domain.status is not DomainStatus.ACTIVE:
                changes.update(status=DomainStatus.ACTIVE, verified_at=now, status_reason="")
            changes.update(
                suspended_at=None,
                token_missing_since=None,
                next_check_at=now + self._policy.recheck_interval,
            )
        elif check.outcome in _DEFINITE_MISSES and domain.status is DomainStatus.ACTIVE:
            missing_since = domain.token_missing_since or now
            changes["token_missing_since"] = missing_since
            if now - missing_since >= self._policy.suspension_grace:
                changes.update(
                    status=DomainStatus.SUSPENDED,
                    suspended_at=now,
                    status_reason=f"ownership record {expected_record(domain.verification_token)}"
                    f" missing since {missing_since.isoformat()}: {check.detail}",
                )
        return await self._domains.save(domain=replace(domain, **changes))  # type: ignore[arg-type]

    async def _claim_name(self, domain: Domain, now: datetime) -> None:
        claim = Claim(domain.name, domain.tenant_id, domain.id, now)
        holder = await self._claims.try_claim(claim=claim)
        if holder is None:
            return
        holder_domain = await self._domains.get_any(domain_id=holder.domain_id)
        if holder_domain is not None and holder_domain.status is DomainStatus.ACTIVE:
            raise FailedPrecondition(
                f"{domain.name} is verified by another account",
                reason="DOMAIN_OWNED_BY_ANOTHER_TENANT",
                violations=[
                    PreconditionViolation(
                        "OWNERSHIP", domain.name, "another tenant's active domain owns this name"
                    )
                ],
            )
        # The holder lost its proof (suspended, expired or deleted); whoever proves ownership
        # now takes the name over.
        if not await self._claims.take_over(claim=claim, from_domain_id=holder.domain_id):
            raise Conflict("the ownership claim changed concurrently; retry")


def required_records(domain: Domain, policy: DomainPolicy | None = None) -> list[RequiredRecord]:
    """What the user should publish for a domain.

    The ownership TXT record is required; DKIM, SPF and DMARC are guidance whose exact values
    come from the SMTP service's generators. With a bounce domain per sending domain
    (``bounces.{domain}``), its MX (bounces come back to the inbound server) and its SPF record
    (receivers check SPF on the MAIL FROM domain, which is the bounce domain: it authorises what
    the domain's own record does) are guidance too; a shared bounce domain is the operator's.
    """
    return [*_ownership_and_auth(domain), *_bounce_records(domain, policy or DomainPolicy())]


def _bounce_records(domain: Domain, policy: DomainPolicy) -> list[RequiredRecord]:
    if verp.PLACEHOLDER not in policy.bounce_domain or not policy.bounce_mx_host:
        return []
    name = verp.bounce_domain(policy.bounce_domain, domain.name)
    return [
        RequiredRecord(
            "bounce-mx",
            DnsRecordType.MX,
            name,
            policy.bounce_mx_host,
            False,
            "MX (preference 10) of the bounce domain: the envelope sender (Return-Path) of "
            "every message is an address there, and bounces and complaints sent back to it "
            "reach the inbound server, which turns them into bounced/complained events and "
            "suppressions.",
        ),
        RequiredRecord(
            "bounce-spf",
            DnsRecordType.TXT,
            name,
            f"v=spf1 include:{domain.name} ~all",
            False,
            "SPF of the bounce domain: receivers check SPF on the envelope sender's domain, "
            "so it authorises the same servers as the domain's own SPF record.",
        ),
    ]


def _ownership_and_auth(domain: Domain) -> list[RequiredRecord]:
    return [
        RequiredRecord(
            "verification",
            DnsRecordType.TXT,
            domain.name,
            expected_record(domain.verification_token),
            True,
            "Publish this TXT record at the domain, then call POST /api/v1/domains/{id}/verify.",
        ),
        RequiredRecord(
            "dkim",
            DnsRecordType.TXT,
            f"<selector>._domainkey.{domain.name}",
            "",
            False,
            "Generate a DKIM key with POST /api/v1/smtp/domains/{id}/dkim; it returns the "
            "exact record name and value.",
        ),
        RequiredRecord(
            "spf",
            DnsRecordType.TXT,
            domain.name,
            "v=spf1 mx ~all",
            False,
            "Baseline SPF record; POST /api/v1/smtp/domains/{id}/spf builds the exact record "
            "for the relay you configure.",
        ),
        RequiredRecord(
            "dmarc",
            DnsRecordType.TXT,
            f"_dmarc.{domain.name}",
            "v=DMARC1; p=none",
            False,
            "Start with a monitoring DMARC policy; POST /api/v1/smtp/domains/{id}/dmarc builds "
            "a stricter one with report addresses.",
        ),
    ]


def _new_token() -> str:
    return secrets.token_hex(16)
