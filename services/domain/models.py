"""Plain data for the domain service (no bson, no protobuf): domains, DNS records, checks."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime


class DomainStatus(enum.StrEnum):
    """Lifecycle of a domain: pending -> active -> suspended, pending -> expired."""

    PENDING = "pending"
    ACTIVE = "active"
    SUSPENDED = "suspended"
    EXPIRED = "expired"


class DnsRecordType(enum.StrEnum):
    """DNS record types a tenant may store for a domain."""

    A = "A"
    AAAA = "AAAA"
    CNAME = "CNAME"
    MX = "MX"
    TXT = "TXT"
    SRV = "SRV"
    PTR = "PTR"


@dataclass(frozen=True, slots=True)
class DnsRecordInput:
    """A DNS record as the caller sent it, before validation (all fields raw)."""

    type: str
    name: str
    value: str
    ttl: int = 0  # 0 = use the default TTL
    priority: int = 0  # MX preference, SRV priority
    weight: int = 0  # SRV only
    port: int = 0  # SRV only


@dataclass(frozen=True, slots=True)
class DnsRecord:
    """A validated, normalised DNS record of a domain.

    `name` is the fully-qualified owner name, lowercase, without the trailing dot.
    `value` is canonical: addresses in compressed form, host names lowercase FQDN without
    trailing dot, TXT text unsplit. `txt_strings` holds TXT text split into <=255-octet strings.
    """

    type: DnsRecordType
    name: str
    value: str
    ttl: int
    priority: int = 0
    weight: int = 0
    port: int = 0
    txt_strings: tuple[str, ...] = ()


class VerificationOutcome(enum.StrEnum):
    """What a verification lookup found."""

    MATCHED = "matched"
    NO_RECORD = "no_record"  # the name exists but has no matching TXT record / no TXT at all
    NXDOMAIN = "nxdomain"
    WRONG_TOKEN = "wrong_token"  # noqa: S105 - an outcome name, not a secret  # azora-verify=... present with a different token
    TIMEOUT = "timeout"
    ERROR = "error"  # SERVFAIL, refused, no nameserver answered properly


@dataclass(frozen=True, slots=True)
class VerificationCheck:
    """The result of one ownership lookup."""

    outcome: VerificationOutcome
    checked_at: datetime
    record_name: str
    found: tuple[str, ...] = ()
    detail: str = ""


@dataclass(slots=True)
class Domain:
    """A tenant's domain."""

    id: str
    tenant_id: str
    name: str  # IDNA (A-label) form, lowercase
    unicode_name: str  # U-label form for display
    status: DomainStatus
    verification_token: str
    created_at: datetime
    updated_at: datetime
    verification_expires_at: datetime | None = None
    verified_at: datetime | None = None
    suspended_at: datetime | None = None
    status_reason: str = ""
    dns_records: list[DnsRecord] = field(default_factory=list)
    last_check: VerificationCheck | None = None
    token_missing_since: datetime | None = None  # active domain whose token vanished
    next_check_at: datetime | None = None
    version: int = 0  # optimistic concurrency counter


@dataclass(frozen=True, slots=True)
class RequiredRecord:
    """A record the user must (or should) publish for the domain to work."""

    purpose: str  # verification, dkim, spf, dmarc
    type: DnsRecordType
    name: str
    value: str
    required: bool
    description: str


@dataclass(frozen=True, slots=True)
class DomainPage:
    """One page of a domain listing."""

    domains: list[Domain]
    next_page_token: str
    total_size: int
