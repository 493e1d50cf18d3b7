"""Translation between the domain service's models and its protobuf messages."""

from __future__ import annotations

from collections.abc import Sequence

from azora.domain.v1 import domain_pb2

from services.core.protobuf import to_timestamp
from services.domain.manager import DomainPolicy, required_records
from services.domain.models import (
    DnsRecord,
    DnsRecordInput,
    Domain,
    DomainStatus,
    VerificationCheck,
)


def status_to_proto(status: DomainStatus) -> domain_pb2.DomainStatus.ValueType:
    """Model status -> proto enum."""
    return domain_pb2.DomainStatus.Value(f"DOMAIN_STATUS_{status.name}")


def status_from_proto(value: int) -> DomainStatus | None:
    """Proto enum -> model status (None for UNSPECIFIED, meaning "any").

    Raises:
        ValueError: the number is not a known status.
    """
    if value == domain_pb2.DOMAIN_STATUS_UNSPECIFIED:
        return None
    name = domain_pb2.DomainStatus.Name(value)  # type: ignore[arg-type]
    return DomainStatus[name.removeprefix("DOMAIN_STATUS_")]


def record_to_proto(record: DnsRecord) -> domain_pb2.DnsRecord:
    """A stored record as a proto."""
    return domain_pb2.DnsRecord(
        type=record.type.value,
        name=record.name,
        value=record.value,
        ttl=record.ttl,
        priority=record.priority,
        weight=record.weight,
        port=record.port,
        txt_strings=list(record.txt_strings),
    )


def record_from_proto(record: domain_pb2.DnsRecord) -> DnsRecordInput:
    """A record from a request, unvalidated (the manager validates the whole set).

    The type is the caller's text ("A", "a", or DnsRecordType's "DNS_RECORD_TYPE_A" as before
    the field became a string); the record-set validation refuses what is no type.
    """
    type_name = record.type.strip()
    if type_name.upper().startswith("DNS_RECORD_TYPE_"):
        type_name = type_name[len("DNS_RECORD_TYPE_") :]
    return DnsRecordInput(
        type=type_name,
        name=record.name,
        value=record.value,
        ttl=record.ttl,
        priority=record.priority,
        weight=record.weight,
        port=record.port,
    )


def check_to_proto(check: VerificationCheck | None) -> domain_pb2.VerificationCheck | None:
    """A verification result as a proto."""
    if check is None:
        return None
    return domain_pb2.VerificationCheck(
        outcome=domain_pb2.VerificationOutcome.Value(f"VERIFICATION_OUTCOME_{check.outcome.name}"),
        check_time=to_timestamp(check.checked_at),
        record_name=check.record_name,
        found=list(check.found),
        detail=check.detail,
    )


def domain_to_proto(domain: Domain, policy: DomainPolicy | None = None) -> domain_pb2.Domain:
    """A domain as a proto, with the records the user has to publish (under `policy`)."""
    return domain_pb2.Domain(
        id=domain.id,
        name=domain.name,
        unicode_name=domain.unicode_name,
        status=status_to_proto(domain.status),
        status_reason=domain.status_reason,
        verification_token=domain.verification_token,
        required_records=[
            domain_pb2.RequiredRecord(
                purpose=r.purpose,
                type=domain_pb2.DnsRecordType.Value(f"DNS_RECORD_TYPE_{r.type.name}"),
                name=r.name,
                value=r.value,
                required=r.required,
                description=r.description,
            )
            for r in required_records(domain, policy)
        ],
        dns_records=[record_to_proto(r) for r in domain.dns_records],
        last_check=check_to_proto(domain.last_check),
        create_time=to_timestamp(domain.created_at),
        update_time=to_timestamp(domain.updated_at),
        verify_time=to_timestamp(domain.verified_at),
        verification_expire_time=to_timestamp(domain.verification_expires_at),
        suspend_time=to_timestamp(domain.suspended_at),
        next_check_time=to_timestamp(domain.next_check_at),
    )


def records_from_proto(records: Sequence[domain_pb2.DnsRecord]) -> list[DnsRecordInput]:
    """Request records as unvalidated inputs."""
    return [record_from_proto(r) for r in records]
