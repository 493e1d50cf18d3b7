"""Abuse limits: each is configurable and answers a clear error naming what is too large.

Request size (gateway and services), recipients, attachments, domains and DNS records per
tenant, page sizes; each test sets a small limit on services of its own.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import grpc
import pytest
from azora.domain.v1 import domain_pb2
from azora.mail.v1 import mail_pb2

from services.core.settings import Settings, SettingsError
from tests.conftest import new_tenant, unique_domain
from tests.support.grpc_errors import RpcFailure, failure_of
from tests.support.ratelimit_fixtures import LimitedServices, limited
from tests.support.settings import SuiteSettings

__all__ = ["limited"]


def _record(i: int) -> domain_pb2.DnsRecord:
    return domain_pb2.DnsRecord(type="A", name=f"h{i}", value=f"192.0.2.{i + 1}")


def _violations(failure: RpcFailure) -> str:
    return " ".join(f"{k}: {v}" for k, v in failure.field_violations.items())


# The gateway refuses a body over AZORA_GATEWAY_MAX_BODY_BYTES with 413 naming the body,
# before any service sees it.
async def test_gateway_body_limit(
    limited: LimitedServices, settings: Settings, http: aiohttp.ClientSession
) -> None:
    service = await limited.domain(limited.settings())
    base = await limited.gateway(
        service.settings,
        {"azora.domain.v1.DomainService": service.running.port},
        max_body_bytes=512,
    )
    auth = {"Authorization": f"Bearer {new_tenant(settings).token}"}
    body = {"name": "a" * 600 + ".example"}
    async with http.post(f"{base}/api/v1/domains", json=body, headers=auth) as response:
        assert response.status == 413
        error = await response.json()
    assert error["code"] == 3
    by_type = {d["@type"].rpartition("/")[2]: d for d in error["details"]}
    assert by_type["google.rpc.ErrorInfo"]["reason"] == "REQUEST_BODY_TOO_LARGE"
    assert by_type["google.rpc.BadRequest"]["fieldViolations"][0]["field"] == "body"


# A service refuses a message over AZORA_GRPC_MAX_MESSAGE_BYTES (RESOURCE_EXHAUSTED, from gRPC
# itself, before our code runs); a message under it is served.
async def test_service_message_limit(limited: LimitedServices, settings: Settings) -> None:
    service = await limited.domain(limited.settings(AZORA_GRPC_MAX_MESSAGE_BYTES="2048"))
    tenant = new_tenant(settings)
    big = domain_pb2.CreateDomainRequest(name="a" * 4096 + ".example")
    failure = await failure_of(service.stub.CreateDomain(big, metadata=tenant.metadata))
    assert failure.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in failure.message
    small = domain_pb2.CreateDomainRequest(name=unique_domain())
    await service.stub.CreateDomain(small, metadata=tenant.metadata)


# AZORA_MAIL_MAX_RECIPIENTS bounds to + cc + bcc, MAX_ATTACHMENT_SIZE each attachment.
async def test_recipient_and_attachment_limits(
    limited: LimitedServices, settings: Settings
) -> None:
    mail = await limited.mail(
        limited.settings(AZORA_MAIL_MAX_RECIPIENTS="2", MAX_ATTACHMENT_SIZE="100")
    )
    tenant = new_tenant(settings)
    domain = mail.add_domain(tenant)
    failure = await failure_of(
        mail.send(tenant, domain, to=["a@example.org", "b@example.org"], cc=["c@example.org"])
    )
    assert failure.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "to" in failure.field_violations, failure
    assert "at most 2" in _violations(failure)
    attachment = mail_pb2.Attachment(filename="x.bin", content=b"x" * 200)
    failure = await failure_of(mail.send(tenant, domain, attachments=[attachment]))
    assert failure.code is grpc.StatusCode.INVALID_ARGUMENT
    assert any(f.startswith("attachments[0]") for f in failure.field_violations), failure
    assert "at most 100" in _violations(failure)
    # At the limits the email is accepted.
    small = mail_pb2.Attachment(filename="x.bin", content=b"x" * 100)
    await mail.send(tenant, domain, to=["a@example.org", "b@example.org"], attachments=[small])


# AZORA_MAX_DOMAINS_PER_TENANT: the next domain is refused with a quota precondition.
async def test_domains_per_tenant(limited: LimitedServices, settings: Settings) -> None:
    service = await limited.domain(limited.settings(AZORA_MAX_DOMAINS_PER_TENANT="2"))
    tenant = new_tenant(settings)
    for _ in range(2):
        request = domain_pb2.CreateDomainRequest(name=unique_domain())
        await service.stub.CreateDomain(request, metadata=tenant.metadata)
    request = domain_pb2.CreateDomainRequest(name=unique_domain())
    failure = await failure_of(service.stub.CreateDomain(request, metadata=tenant.metadata))
    assert failure.code is grpc.StatusCode.FAILED_PRECONDITION
    assert failure.reason == "DOMAIN_LIMIT_REACHED"
    assert failure.precondition_types == ["QUOTA"]
    assert "limit 2" in failure.message
    # Another tenant is not affected.
    other = new_tenant(settings)
    await service.stub.CreateDomain(request, metadata=other.metadata)


# AZORA_MAX_DNS_RECORDS: a record set over the limit is refused naming `records`.
async def test_dns_records_per_domain(limited: LimitedServices, settings: Settings) -> None:
    service = await limited.domain(limited.settings(AZORA_MAX_DNS_RECORDS="2"))
    tenant = new_tenant(settings)
    domain = await service.stub.CreateDomain(
        domain_pb2.CreateDomainRequest(name=unique_domain()), metadata=tenant.metadata
    )
    request = domain_pb2.UpdateDnsRecordsRequest(
        id=domain.id, records=[_record(i) for i in range(3)]
    )
    failure = await failure_of(service.stub.UpdateDnsRecords(request, metadata=tenant.metadata))
    assert failure.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "records" in failure.field_violations, failure
    accepted = domain_pb2.UpdateDnsRecordsRequest(
        id=domain.id, records=[_record(i) for i in range(2)]
    )
    await service.stub.UpdateDnsRecords(accepted, metadata=tenant.metadata)


# AZORA_MAX_DNS_RECORDS_PER_TENANT bounds the records of all of a tenant's domains together:
# FAILED_PRECONDITION naming `records`, nothing stored; replacing a domain's own set counts it once.
async def test_dns_records_per_tenant(limited: LimitedServices, settings: Settings) -> None:
    service = await limited.domain(limited.settings(AZORA_MAX_DNS_RECORDS_PER_TENANT="3"))
    tenant = new_tenant(settings)
    first, second = [
        await service.stub.CreateDomain(
            domain_pb2.CreateDomainRequest(name=unique_domain()), metadata=tenant.metadata
        )
        for _ in range(2)
    ]
    await service.stub.UpdateDnsRecords(
        domain_pb2.UpdateDnsRecordsRequest(id=first.id, records=[_record(i) for i in range(2)]),
        metadata=tenant.metadata,
    )
    over = domain_pb2.UpdateDnsRecordsRequest(id=second.id, records=[_record(i) for i in range(2)])
    failure = await failure_of(service.stub.UpdateDnsRecords(over, metadata=tenant.metadata))
    assert failure.code is grpc.StatusCode.FAILED_PRECONDITION
    assert failure.reason == "DNS_RECORD_LIMIT_REACHED"
    unchanged = await service.stub.GetDomain(
        domain_pb2.GetDomainRequest(id=second.id), metadata=tenant.metadata
    )
    assert list(unchanged.dns_records) == []
    await service.stub.UpdateDnsRecords(  # 2 + 1 = 3: allowed
        domain_pb2.UpdateDnsRecordsRequest(id=second.id, records=[_record(0)]),
        metadata=tenant.metadata,
    )
    await service.stub.UpdateDnsRecords(  # first's own 2 replaced by 2: still 3
        domain_pb2.UpdateDnsRecordsRequest(id=first.id, records=[_record(i) for i in (3, 4)]),
        metadata=tenant.metadata,
    )
    other = new_tenant(settings)  # another tenant's budget is its own
    theirs = await service.stub.CreateDomain(
        domain_pb2.CreateDomainRequest(name=unique_domain()), metadata=other.metadata
    )
    await service.stub.UpdateDnsRecords(
        domain_pb2.UpdateDnsRecordsRequest(id=theirs.id, records=[_record(i) for i in range(3)]),
        metadata=other.metadata,
    )


# AZORA_MAX_PAGE_SIZE caps a page (AIP-158: larger sizes are coerced to the maximum, the rest
# comes on the next page); a negative size is refused naming pageSize.
async def test_page_size_cap(limited: LimitedServices, settings: Settings) -> None:
    service = await limited.domain(limited.settings(AZORA_MAX_PAGE_SIZE="2"))
    tenant = new_tenant(settings)
    for _ in range(3):
        request = domain_pb2.CreateDomainRequest(name=unique_domain())
        await service.stub.CreateDomain(request, metadata=tenant.metadata)
    page = await service.stub.ListDomains(
        domain_pb2.ListDomainsRequest(page_size=100), metadata=tenant.metadata
    )
    assert len(page.domains) == 2
    assert page.next_page_token
    rest = await service.stub.ListDomains(
        domain_pb2.ListDomainsRequest(page_size=100, page_token=page.next_page_token),
        metadata=tenant.metadata,
    )
    assert len(rest.domains) == 1
    failure = await failure_of(
        service.stub.ListDomains(
            domain_pb2.ListDomainsRequest(page_size=-1), metadata=tenant.metadata
        )
    )
    assert failure.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "pageSize" in failure.field_violations


@pytest.mark.parametrize(
    "variable",
    [
        "RATE_LIMIT_MAX",
        "RATE_LIMIT_WINDOW",
        "AZORA_SEND_RATE_LIMIT_MAX",
        "AZORA_SEND_RATE_LIMIT_WINDOW",
        "AZORA_MAIL_MAX_RECIPIENTS",
        "MAX_ATTACHMENT_SIZE",
        "AZORA_MAX_DOMAINS_PER_TENANT",
        "AZORA_MAX_DNS_RECORDS",
        "AZORA_MAX_PAGE_SIZE",
        "AZORA_GRPC_MAX_MESSAGE_BYTES",
    ],
)
def test_limit_settings_are_validated(variable: str) -> None:
    # A limit that is not a positive number stops the process at start-up, naming the variable.
    for bad in ("lots", "0", "-5"):
        with pytest.raises(SettingsError, match=variable):
            SuiteSettings.from_env({variable: bad})


def test_trusted_proxies_setting_is_validated() -> None:
    with pytest.raises(SettingsError, match="AZORA_TRUSTED_PROXIES"):
        Settings.from_env({"AZORA_TRUSTED_PROXIES": "10.0.0.0/8,not-a-network"})
    settings: Any = Settings.from_env({"AZORA_TRUSTED_PROXIES": ""})
    assert settings.trusted_proxies == ()


def test_gateway_body_limit_follows_the_services_limit() -> None:
    # Unless set on its own, the gateway accepts exactly what the services accept, so a body it
    # lets through is never refused by a service as RESOURCE_EXHAUSTED (a misleading 429).
    from gateway.config import GatewayConfig

    assert GatewayConfig.from_env({}).max_body_bytes == Settings().grpc_max_message_bytes
    lowered = {"AZORA_GRPC_MAX_MESSAGE_BYTES": "5000"}
    assert GatewayConfig.from_env(lowered).max_body_bytes == 5000
    own = {**lowered, "AZORA_GATEWAY_MAX_BODY_BYTES": "100"}
    assert GatewayConfig.from_env(own).max_body_bytes == 100
