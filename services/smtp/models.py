"""Plain data for the SMTP service (no bson, no protobuf).

Relay configurations, DKIM keys and their keyring, SPF/DMARC inputs and results, connection-test
transcripts and DNS checks. Secrets appear here only sealed (`services.core.secrets_box`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta


class SecurityMode(enum.StrEnum):
    """How the connection to a relay is protected."""

    IMPLICIT_TLS = "implicit_tls"  # TLS from the first byte (port 465)
    STARTTLS_REQUIRED = "starttls_required"
    STARTTLS_OPPORTUNISTIC = "starttls_opportunistic"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class RelaySettingsInput:
    """Relay settings as the caller sent them, before validation.

    `password` is None when the caller did not send one (keep the stored password) and ""
    when it asked to remove it. `timeout` is None for "use SMTP_TIMEOUT".
    """

    host: str
    port: int
    security: SecurityMode | None
    secure: bool
    username: str
    password: str | None
    client_hostname: str
    timeout: timedelta | None
    tls_skip_verify: bool


@dataclass(frozen=True, slots=True)
class RelaySettings:
    """Validated relay settings (host lowercase A-label or canonical IP address)."""

    host: str
    port: int
    security: SecurityMode
    username: str
    client_hostname: str
    timeout: timedelta
    tls_skip_verify: bool


@dataclass(slots=True)
class SmtpConfig:
    """A domain's stored relay; the password only sealed."""

    domain_id: str
    tenant_id: str
    relay: RelaySettings
    sealed_password: str | None
    created_at: datetime
    updated_at: datetime
    version: int = 0

    @property
    def password_set(self) -> bool:
        """Whether a password is stored."""
        return self.sealed_password is not None


class DkimAlgorithm(enum.StrEnum):
    """DKIM key types (RFC 6376 rsa, RFC 8463 ed25519)."""

    RSA = "rsa"
    ED25519 = "ed25519"

    @property
    def signing_algorithm(self) -> str:
        """The a= tag value signatures made with this key carry."""
        return "rsa-sha256" if self is DkimAlgorithm.RSA else "ed25519-sha256"


class DkimKeyStatus(enum.StrEnum):
    """Rotation lifecycle: pending -> active -> retiring -> retired."""

    PENDING = "pending"
    ACTIVE = "active"
    RETIRING = "retiring"
    RETIRED = "retired"


class CheckStatus(enum.StrEnum):
    """Result of comparing a published record with the expected one."""

    OK = "ok"
    MISSING = "missing"
    DIFFERENT = "different"
    ERROR = "error"  # the lookup failed; says nothing about the record


@dataclass(frozen=True, slots=True)
class RecordCheck:
    """The DNS check of one expected record."""

    purpose: str  # verification, dkim, spf, dmarc, mx, dmarc_report_authorization
    type: str
    record_name: str
    expected: str
    found: tuple[str, ...]
    status: CheckStatus
    checked_at: datetime
    detail: str = ""


@dataclass(slots=True)
class DkimKey:
    """A DKIM key of a domain; the private key only sealed (PKCS#8 PEM inside)."""

    selector: str
    algorithm: DkimAlgorithm
    key_bits: int  # 0 for Ed25519
    public_key: str  # the p= value (base64)
    sealed_private_key: str
    status: DkimKeyStatus
    created_at: datetime
    auto_activate: bool = False
    activated_at: datetime | None = None
    replaced_at: datetime | None = None  # became RETIRING
    retire_at: datetime | None = None  # when RETIRING ends
    retired_at: datetime | None = None
    dns_check: RecordCheck | None = None


@dataclass(slots=True)
class DkimKeyring:
    """Every DKIM key of one domain, stored and changed as one document.

    One document per domain makes each rotation step (activate one key and demote the previous
    one) a single atomic, version-checked write, so no reader ever sees two active keys or none.
    """

    domain_id: str
    tenant_id: str
    domain_name: str
    keys: list[DkimKey] = field(default_factory=list)
    next_check_at: datetime | None = None  # when the lifecycle loop looks at this ring again
    version: int = 0

    def key(self, selector: str) -> DkimKey | None:
        """The key with this selector, if any."""
        return next((k for k in self.keys if k.selector == selector), None)

    @property
    def active(self) -> DkimKey | None:
        """The key that signs mail now."""
        return next((k for k in self.keys if k.status is DkimKeyStatus.ACTIVE), None)


@dataclass(frozen=True, slots=True)
class SigningKey:
    """What a signer needs: selector, domain, algorithm and the private key (PKCS#8 PEM)."""

    domain: str
    selector: str
    algorithm: DkimAlgorithm
    private_key_pem: bytes

    def __repr__(self) -> str:  # keep the key out of logs and tracebacks
        return f"SigningKey(domain={self.domain!r}, selector={self.selector!r})"


class SpfQualifier(enum.StrEnum):
    """SPF qualifiers (RFC 7208 §4.6.2)."""

    PASS = "+"  # noqa: S105 - an SPF qualifier, not a secret
    FAIL = "-"
    SOFTFAIL = "~"
    NEUTRAL = "?"


@dataclass(frozen=True, slots=True)
class SpfMechanismInput:
    """One mechanism as the caller sent it; qualifier None means the default (pass)."""

    kind: str
    value: str
    qualifier: SpfQualifier | None


@dataclass(frozen=True, slots=True)
class SpfRecord:
    """A built SPF record with what it costs and what to watch out for."""

    record_name: str
    value: str
    strings: tuple[str, ...]
    dns_lookups: int
    warnings: tuple[str, ...]
    published: tuple[str, ...]


class DmarcPolicy(enum.StrEnum):
    """p= and sp= values."""

    NONE = "none"
    QUARANTINE = "quarantine"
    REJECT = "reject"


class DmarcAlignment(enum.StrEnum):
    """adkim= and aspf= values."""

    RELAXED = "r"
    STRICT = "s"


@dataclass(frozen=True, slots=True)
class DmarcInput:
    """DMARC policy as the caller sent it (None = tag not given)."""

    policy: DmarcPolicy | None
    subdomain_policy: DmarcPolicy | None
    percent: int | None
    dkim_alignment: DmarcAlignment | None
    spf_alignment: DmarcAlignment | None
    aggregate_report_uris: tuple[str, ...]
    failure_report_uris: tuple[str, ...]
    failure_options: str
    report_interval: int | None


@dataclass(frozen=True, slots=True)
class ExternalAuthorization:
    """A record a report domain must publish to accept another domain's DMARC reports."""

    record_name: str
    value: str
    report_domain: str


@dataclass(frozen=True, slots=True)
class DmarcRecord:
    """A built DMARC record."""

    record_name: str
    value: str
    strings: tuple[str, ...]
    external_authorizations: tuple[ExternalAuthorization, ...]
    warnings: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AuthRecords:
    """The SPF and DMARC records last generated for a domain (what DNS checks expect)."""

    domain_id: str
    tenant_id: str
    spf: str | None = None
    dmarc: str | None = None
    dmarc_authorizations: tuple[ExternalAuthorization, ...] = ()
    updated_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class TlsInfo:
    """A negotiated TLS session as seen by the client."""

    protocol: str
    cipher: str
    peer_subject: str
    peer_issuer: str
    not_before: datetime | None
    not_after: datetime | None
    verified: bool
    subject_alt_names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ConnectionStep:
    """One step of a connection test."""

    name: str  # resolve, connect, tls, banner, ehlo, starttls, auth, quit
    ok: bool
    duration: float  # seconds
    reply_code: int = 0
    detail: str = ""
    extensions: tuple[str, ...] = ()
    auth_mechanisms: tuple[str, ...] = ()
    tls: TlsInfo | None = None
    addresses: tuple[str, ...] = ()
    auth_mechanism: str = ""


@dataclass(frozen=True, slots=True)
class ConnectionReport:
    """The transcript of a connection test."""

    ok: bool
    steps: tuple[ConnectionStep, ...]
    failed_step: str
    duration: float
    reply_code: int
    message: str
