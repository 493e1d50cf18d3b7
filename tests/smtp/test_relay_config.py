"""Relay configuration over gRPC: store, read back, keep secrets, validate every field."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
import pytest
from azora.smtp.v1 import smtp_pb2
from google.protobuf import duration_pb2

from services.core.settings import Settings
from tests.conftest import Tenant, new_tenant
from tests.smtp.conftest import PASSWORD, USERNAME, register
from tests.support.grpc_errors import failure_of

if TYPE_CHECKING:
    from azora.domain.v1 import domain_pb2_grpc
    from azora.smtp.v1 import smtp_pb2_grpc

    DomainStub = domain_pb2_grpc.DomainServiceAsyncStub
    Stub = smtp_pb2_grpc.SmtpServiceAsyncStub


def update(domain_id: str, **fields: object) -> smtp_pb2.UpdateSmtpConfigRequest:
    values: dict[str, object] = {"host": "smtp.example.com", "port": 587, **fields}
    return smtp_pb2.UpdateSmtpConfigRequest(domain_id=domain_id, **values)  # type: ignore[arg-type]


async def test_config_is_stored_and_the_password_never_returned(
    smtp_stub: Stub, domains_stub: DomainStub, tenant: Tenant
) -> None:
    # A full config comes back as sent, with password_set instead of the password.
    domain = await register(domains_stub, tenant)
    stored = await smtp_stub.UpdateSmtpConfig(
        update(
            domain.id,
            host="SMTP.Example.COM.",
            security="starttls",
            username=USERNAME,
            password=PASSWORD,
            client_hostname="mta.example.com",
            timeout=duration_pb2.Duration(seconds=12),
        ),
        metadata=tenant.metadata,
    )
    assert stored.host == "smtp.example.com"
    assert stored.port == 587
    assert stored.security == smtp_pb2.SECURITY_MODE_STARTTLS_REQUIRED
    assert not stored.secure
    assert stored.password_set
    assert stored.timeout.seconds == 12
    assert stored.client_hostname == "mta.example.com"
    assert PASSWORD not in str(stored)
    read = await smtp_stub.GetSmtpConfig(
        smtp_pb2.GetSmtpConfigRequest(domain_id=domain.id), metadata=tenant.metadata
    )
    assert read == stored
    assert PASSWORD.encode() not in read.SerializeToString()


async def test_update_without_password_keeps_it_and_empty_password_removes_it(
    smtp_stub: Stub, domains_stub: DomainStub, tenant: Tenant
) -> None:
    # Omitting the password keeps the stored one (same host and port); sending "" removes it.
    domain = await register(domains_stub, tenant)
    await smtp_stub.UpdateSmtpConfig(
        update(domain.id, username=USERNAME, password=PASSWORD), metadata=tenant.metadata
    )
    kept = await smtp_stub.UpdateSmtpConfig(
        update(domain.id, host="SMTP.example.com", username=USERNAME, client_hostname="mta.x.org"),
        metadata=tenant.metadata,
    )
    assert (kept.host, kept.client_hostname) == ("smtp.example.com", "mta.x.org")
    assert kept.password_set
    removed = await smtp_stub.UpdateSmtpConfig(
        update(domain.id, username=USERNAME, password=""), metadata=tenant.metadata
    )
    assert not removed.password_set


async def test_defaults_secure_flag_and_spec_timeout(
    smtp_stub: Stub, domains_stub: DomainStub, tenant: Tenant, smtp_settings: Settings
) -> None:
    # secure=true (the product spec's field) is implicit TLS; the timeout defaults to SMTP_TIMEOUT.
    domain = await register(domains_stub, tenant)
    implicit = await smtp_stub.UpdateSmtpConfig(
        update(domain.id, port=465, secure=True), metadata=tenant.metadata
    )
    assert implicit.security == smtp_pb2.SECURITY_MODE_IMPLICIT_TLS
    assert implicit.secure
    assert implicit.timeout.ToMilliseconds() == smtp_settings.smtp_timeout_ms
    plain = await smtp_stub.UpdateSmtpConfig(update(domain.id), metadata=tenant.metadata)
    assert plain.security == smtp_pb2.SECURITY_MODE_STARTTLS_REQUIRED
    assert not plain.password_set


async def test_missing_config_is_not_found(
    smtp_stub: Stub, domains_stub: DomainStub, tenant: Tenant
) -> None:
    # A domain without a relay: NOT_FOUND naming the config, not the domain.
    domain = await register(domains_stub, tenant)
    failure = await failure_of(
        smtp_stub.GetSmtpConfig(
            smtp_pb2.GetSmtpConfigRequest(domain_id=domain.id), metadata=tenant.metadata
        )
    )
    assert failure.code == grpc.StatusCode.NOT_FOUND
    assert failure.resource == ("SmtpConfig", domain.id)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"host": ""}, "host"),
        ({"host": "smtp .example.com"}, "host"),
        ({"host": "smtp://smtp.example.com"}, "host"),
        ({"host": "smtp.example.com:587"}, "host"),
        ({"host": "-bad-.example.com"}, "host"),
        ({"host": "a" * 64 + ".example.com"}, "host"),
        ({"port": 0}, "port"),
        ({"port": 70000}, "port"),
        ({"timeout": duration_pb2.Duration(seconds=0)}, "timeout"),
        ({"timeout": duration_pb2.Duration(seconds=3600)}, "timeout"),
        ({"client_hostname": "not a host"}, "clientHostname"),
        ({"client_hostname": "192.0.2.1"}, "clientHostname"),
        ({"username": "user\r\nRCPT TO:<x@y>"}, "username"),
        ({"username": USERNAME, "password": "pass\nword"}, "password"),
        ({"password": PASSWORD}, "username"),
        ({"security": "ssl"}, "security"),
    ],
)
async def test_bad_settings_are_invalid_argument_naming_the_field(
    smtp_stub: Stub,
    domains_stub: DomainStub,
    tenant: Tenant,
    fields: dict[str, object],
    field: str,
) -> None:
    # Every malformed setting is INVALID_ARGUMENT with a violation on its field.
    domain = await register(domains_stub, tenant)
    failure = await failure_of(
        smtp_stub.UpdateSmtpConfig(update(domain.id, **fields), metadata=tenant.metadata)
    )
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in failure.field_violations, failure.field_violations


async def test_all_bad_fields_are_reported_at_once(
    smtp_stub: Stub, domains_stub: DomainStub, tenant: Tenant
) -> None:
    # One round trip names every bad field.
    domain = await register(domains_stub, tenant)
    failure = await failure_of(
        smtp_stub.UpdateSmtpConfig(
            update(domain.id, host="bad host", port=0, client_hostname="x y"),
            metadata=tenant.metadata,
        )
    )
    assert set(failure.field_violations) == {"host", "port", "clientHostname"}


async def test_addresses_and_idn_hosts_are_accepted(
    smtp_stub: Stub, domains_stub: DomainStub, tenant: Tenant
) -> None:
    # IP literals are kept canonical; internationalised names become A-labels.
    domain = await register(domains_stub, tenant)
    v6 = await smtp_stub.UpdateSmtpConfig(
        update(domain.id, host="[2001:DB8::25]"), metadata=tenant.metadata
    )
    assert v6.host == "2001:db8::25"
    idn = await smtp_stub.UpdateSmtpConfig(
        update(domain.id, host="smtp.bücher.example"), metadata=tenant.metadata
    )
    assert idn.host == "smtp.xn--bcher-kva.example"


async def test_another_tenants_domain_is_not_found(
    smtp_stub: Stub, domains_stub: DomainStub, tenant: Tenant, settings: Settings
) -> None:
    # Configuring a domain of another tenant looks exactly like an unknown domain.
    domain = await register(domains_stub, tenant)
    other = new_tenant(settings)
    failure = await failure_of(
        smtp_stub.UpdateSmtpConfig(update(domain.id), metadata=other.metadata)
    )
    assert failure.code == grpc.StatusCode.NOT_FOUND
    assert failure.resource == ("Domain", domain.id)


async def test_malformed_domain_id_is_invalid_argument(smtp_stub: Stub, tenant: Tenant) -> None:
    # A domain id we could never have issued is a client error on domain_id.
    failure = await failure_of(
        smtp_stub.GetSmtpConfig(
            smtp_pb2.GetSmtpConfigRequest(domain_id="nope"), metadata=tenant.metadata
        )
    )
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "domainId" in failure.field_violations
