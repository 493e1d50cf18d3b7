"""Translation between the SMTP service's models and its protobuf messages.

Values a client types by hand (relay security, DMARC policy and alignment, SPF qualifiers, DKIM
key type) arrive as strings: an unknown one becomes INVALID_ARGUMENT on the field that carried
it, listing the accepted values, never INTERNAL and never a default in its place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any, TypeVar

from azora.smtp.v1 import smtp_pb2

from services.core.errors import InvalidArgument
from services.core.protobuf import to_duration, to_timestamp
from services.smtp import dkim_keys
from services.smtp.models import (
    ConnectionReport,
    ConnectionStep,
    DkimAlgorithm,
    DkimKey,
    DkimKeyring,
    DmarcAlignment,
    DmarcInput,
    DmarcPolicy,
    DmarcRecord,
    RecordCheck,
    RelaySettingsInput,
    SecurityMode,
    SmtpConfig,
    SpfMechanismInput,
    SpfQualifier,
    SpfRecord,
    TlsInfo,
)

E = TypeVar("E", bound=Enum)

_SECURITY = {
    smtp_pb2.SECURITY_MODE_IMPLICIT_TLS: SecurityMode.IMPLICIT_TLS,
    smtp_pb2.SECURITY_MODE_STARTTLS_REQUIRED: SecurityMode.STARTTLS_REQUIRED,
    smtp_pb2.SECURITY_MODE_STARTTLS_OPPORTUNISTIC: SecurityMode.STARTTLS_OPPORTUNISTIC,
    smtp_pb2.SECURITY_MODE_NONE: SecurityMode.NONE,
}
_ALGORITHMS = {
    smtp_pb2.DKIM_ALGORITHM_RSA: DkimAlgorithm.RSA,
    smtp_pb2.DKIM_ALGORITHM_ED25519: DkimAlgorithm.ED25519,
}
# Values typed by hand are strings (the protos say why): the spec's and RFC's spelling first,
# then what else is accepted, every key lowercase (matching ignores case).
_SECURITY_NAMES = {
    "none": SecurityMode.NONE,
    "starttls": SecurityMode.STARTTLS_REQUIRED,
    "tls": SecurityMode.IMPLICIT_TLS,
    "starttls_opportunistic": SecurityMode.STARTTLS_OPPORTUNISTIC,
    "starttls_required": SecurityMode.STARTTLS_REQUIRED,
    "implicit_tls": SecurityMode.IMPLICIT_TLS,
    **{smtp_pb2.SecurityMode.Name(number).lower(): mode for number, mode in _SECURITY.items()},
}
_SECURITY_SHOWN = 'none, starttls, tls or starttls_opportunistic (or "SECURITY_MODE_..." names)'
_POLICY_NAMES = {
    **{policy.value: policy for policy in DmarcPolicy},
    **{f"dmarc_policy_{policy.value}": policy for policy in DmarcPolicy},
}
_POLICY_SHOWN = 'none, quarantine or reject (or "DMARC_POLICY_..." names)'
_ALGORITHM_NAMES = {
    **{algorithm.value: algorithm for algorithm in DkimAlgorithm},
    **{f"dkim_algorithm_{algorithm.value}": algorithm for algorithm in DkimAlgorithm},
}
_ALGORITHM_SHOWN = 'rsa or ed25519 (or "DKIM_ALGORITHM_..." names)'
_QUALIFIER_NAMES = {
    **{qualifier.value: qualifier for qualifier in SpfQualifier},
    **{qualifier.name.lower(): qualifier for qualifier in SpfQualifier},
    **{f"spf_qualifier_{qualifier.name.lower()}": qualifier for qualifier in SpfQualifier},
}
_QUALIFIER_SHOWN = '+, -, ~ or ? (or pass, fail, softfail, neutral, "SPF_QUALIFIER_..." names)'
_ALIGNMENT_NAMES = {
    **{alignment.value: alignment for alignment in DmarcAlignment},
    **{alignment.name.lower(): alignment for alignment in DmarcAlignment},
    **{f"dmarc_alignment_{alignment.name.lower()}": alignment for alignment in DmarcAlignment},
}
_ALIGNMENT_SHOWN = 'r or s (or relaxed, strict, "DMARC_ALIGNMENT_..." names)'


def _named(value: str, table: Mapping[str, E], field: str, shown: str) -> E | None:
    """A model enum from a name (any case); "" is None.

    Raises:
        InvalidArgument: on `field`, listing the accepted values, for any other name.
    """
    if not value:
        return None
    try:
        return table[value.strip().lower()]
    except KeyError:
        raise InvalidArgument.single(field, f"must be one of {shown}; got {value[:60]!r}") from None


def _reverse(table: Mapping[Any, E], value: E) -> Any:
    return next(number for number, member in table.items() if member is value)


# --- relay -----------------------------------------------------------------------------------


def relay_from_proto(request: smtp_pb2.UpdateSmtpConfigRequest) -> RelaySettingsInput:
    """Relay settings from a request, unvalidated (the manager validates them)."""
    return RelaySettingsInput(
        host=request.host,
        port=request.port,
        security=_named(request.security, _SECURITY_NAMES, "security", _SECURITY_SHOWN),
        secure=request.secure,
        username=request.username,
        password=request.password if request.HasField("password") else None,
        client_hostname=request.client_hostname,
        timeout=request.timeout.ToTimedelta() if request.HasField("timeout") else None,
        tls_skip_verify=request.tls_skip_verify,
    )


def config_to_proto(config: SmtpConfig) -> smtp_pb2.SmtpConfig:
    """A stored relay as a proto (never the password)."""
    relay = config.relay
    return smtp_pb2.SmtpConfig(
        domain_id=config.domain_id,
        host=relay.host,
        port=relay.port,
        secure=relay.security is SecurityMode.IMPLICIT_TLS,
        security=_reverse(_SECURITY, relay.security),
        username=relay.username,
        password_set=config.password_set,
        client_hostname=relay.client_hostname,
        timeout=to_duration(relay.timeout),
        update_time=to_timestamp(config.updated_at),
        tls_skip_verify=relay.tls_skip_verify,
        create_time=to_timestamp(config.created_at),
    )


def _tls_to_proto(tls: TlsInfo | None) -> smtp_pb2.TlsInfo | None:
    if tls is None:
        return None
    return smtp_pb2.TlsInfo(
        protocol=tls.protocol,
        cipher=tls.cipher,
        peer_subject=tls.peer_subject,
        peer_issuer=tls.peer_issuer,
        not_before=to_timestamp(tls.not_before),
        not_after=to_timestamp(tls.not_after),
        verified=tls.verified,
        subject_alt_names=list(tls.subject_alt_names),
    )


def _step_to_proto(step: ConnectionStep) -> smtp_pb2.TestStep:
    return smtp_pb2.TestStep(
        name=step.name,
        ok=step.ok,
        duration=to_duration(step.duration),
        reply_code=step.reply_code,
        detail=step.detail,
        extensions=list(step.extensions),
        auth_mechanisms=list(step.auth_mechanisms),
        tls=_tls_to_proto(step.tls),
        addresses=list(step.addresses),
        auth_mechanism=step.auth_mechanism,
    )


def report_to_proto(report: ConnectionReport) -> smtp_pb2.TestSmtpConnectionResponse:
    """A connection test transcript as a proto."""
    return smtp_pb2.TestSmtpConnectionResponse(
        ok=report.ok,
        steps=[_step_to_proto(s) for s in report.steps],
        failed_step=report.failed_step,
        duration=to_duration(report.duration),
        reply_code=report.reply_code,
        message=report.message,
    )


# --- DKIM ------------------------------------------------------------------------------------


def algorithm_from_proto(value: str) -> DkimAlgorithm | None:
    """Requested algorithm (None = default RSA)."""
    return _named(value, _ALGORITHM_NAMES, "algorithm", _ALGORITHM_SHOWN)


_KEY_STATUS = {
    "pending": smtp_pb2.DKIM_KEY_STATUS_PENDING,
    "active": smtp_pb2.DKIM_KEY_STATUS_ACTIVE,
    "retiring": smtp_pb2.DKIM_KEY_STATUS_RETIRING,
    "retired": smtp_pb2.DKIM_KEY_STATUS_RETIRED,
}
_CHECK_STATUS = {
    "ok": smtp_pb2.RECORD_CHECK_STATUS_OK,
    "missing": smtp_pb2.RECORD_CHECK_STATUS_MISSING,
    "different": smtp_pb2.RECORD_CHECK_STATUS_DIFFERENT,
    "error": smtp_pb2.RECORD_CHECK_STATUS_ERROR,
}


def check_to_proto(check: RecordCheck | None) -> smtp_pb2.RecordCheck | None:
    """A DNS check result as a proto (None stays unset)."""
    return None if check is None else record_check_to_proto(check)


def record_check_to_proto(check: RecordCheck) -> smtp_pb2.RecordCheck:
    """A DNS check result as a proto."""
    return smtp_pb2.RecordCheck(
        purpose=check.purpose,
        type=check.type,
        record_name=check.record_name,
        expected=check.expected,
        found=list(check.found),
        status=_CHECK_STATUS[check.status.value],
        check_time=to_timestamp(check.checked_at),
        detail=check.detail,
    )


def key_to_proto(ring: DkimKeyring, key: DkimKey) -> smtp_pb2.DkimKey:
    """A DKIM key with the record to publish (never the private key)."""
    return smtp_pb2.DkimKey(
        domain_id=ring.domain_id,
        selector=key.selector,
        algorithm=_reverse(_ALGORITHMS, key.algorithm),
        key_bits=key.key_bits,
        status=_KEY_STATUS[key.status.value],
        record_name=dkim_keys.record_name(key.selector, ring.domain_name),
        record_value=dkim_keys.record_value(key.algorithm, key.public_key),
        record_strings=list(dkim_keys.record_strings(key.algorithm, key.public_key)),
        create_time=to_timestamp(key.created_at),
        activate_time=to_timestamp(key.activated_at),
        retire_time=to_timestamp(key.retired_at),
        dns_check=check_to_proto(key.dns_check),
        replace_time=to_timestamp(key.replaced_at),
        scheduled_retire_time=to_timestamp(key.retire_at),
        auto_activate=key.auto_activate,
        signing_algorithm=key.algorithm.signing_algorithm,
    )


# --- SPF and DMARC ---------------------------------------------------------------------------


def mechanisms_from_proto(
    mechanisms: Sequence[smtp_pb2.SpfMechanism],
) -> list[SpfMechanismInput]:
    """Mechanisms from a request, unvalidated."""
    return [
        SpfMechanismInput(
            kind=m.kind,
            value=m.value,
            qualifier=_named(
                m.qualifier, _QUALIFIER_NAMES, f"mechanisms[{i}].qualifier", _QUALIFIER_SHOWN
            ),
        )
        for i, m in enumerate(mechanisms)
    ]


def qualifier_from_proto(value: str, field: str) -> SpfQualifier | None:
    """An SPF qualifier (None = default)."""
    return _named(value, _QUALIFIER_NAMES, field, _QUALIFIER_SHOWN)


def spf_to_proto(record: SpfRecord) -> smtp_pb2.SpfRecord:
    """A built SPF record as a proto."""
    return smtp_pb2.SpfRecord(
        record_name=record.record_name,
        record_value=record.value,
        dns_lookups=record.dns_lookups,
        warnings=list(record.warnings),
        record_strings=list(record.strings),
        published_records=list(record.published),
    )


def dmarc_from_proto(request: smtp_pb2.GenerateDmarcRecordRequest) -> DmarcInput:
    """DMARC choices from a request, unvalidated."""
    return DmarcInput(
        policy=_named(request.policy, _POLICY_NAMES, "policy", _POLICY_SHOWN),
        subdomain_policy=_named(
            request.subdomain_policy, _POLICY_NAMES, "subdomain_policy", _POLICY_SHOWN
        ),
        percent=request.percent if request.HasField("percent") else None,
        dkim_alignment=_named(
            request.dkim_alignment, _ALIGNMENT_NAMES, "dkim_alignment", _ALIGNMENT_SHOWN
        ),
        spf_alignment=_named(
            request.spf_alignment, _ALIGNMENT_NAMES, "spf_alignment", _ALIGNMENT_SHOWN
        ),
        aggregate_report_uris=tuple(request.aggregate_report_uris),
        failure_report_uris=tuple(request.failure_report_uris),
        failure_options=request.failure_options,
        report_interval=request.report_interval if request.HasField("report_interval") else None,
    )


def dmarc_to_proto(record: DmarcRecord) -> smtp_pb2.DmarcRecord:
    """A built DMARC record as a proto."""
    return smtp_pb2.DmarcRecord(
        record_name=record.record_name,
        record_value=record.value,
        external_authorizations=[
            smtp_pb2.ExternalAuthorization(
                record_name=a.record_name, record_value=a.value, report_domain=a.report_domain
            )
            for a in record.external_authorizations
        ],
        record_strings=list(record.strings),
        warnings=list(record.warnings),
    )
