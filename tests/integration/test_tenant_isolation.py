"""Tenant isolation: another tenant's domain is NOT_FOUND on every rpc, and never listed."""

from __future__ import annotations

from collections.abc import Awaitable

import grpc
from azora.domain.v1 import domain_pb2, domain_pb2_grpc

from services.core.settings import Settings
from tests.conftest import Tenant, new_tenant, unique_domain
from tests.support.grpc_errors import failure_of


async def test_tenant_b_gets_not_found_for_tenant_a_domains_on_every_rpc(
    domains_stub: domain_pb2_grpc.DomainServiceAsyncStub, tenant: Tenant, settings: Settings
) -> None:
    # Every rpc that takes a domain id answers NOT_FOUND to another tenant, exactly as for an
    # id that does not exist, and changes nothing.
    owner, intruder = tenant, new_tenant(settings)
    domain = await domains_stub.CreateDomain(
        domain_pb2.CreateDomainRequest(name=unique_domain()), metadata=owner.metadata
    )
    calls: dict[str, Awaitable[object]] = {
        "GetDomain": domains_stub.GetDomain(
            domain_pb2.GetDomainRequest(id=domain.id), metadata=intruder.metadata
        ),
        "UpdateDnsRecords": domains_stub.UpdateDnsRecords(
            domain_pb2.UpdateDnsRecordsRequest(
                id=domain.id,
                records=[domain_pb2.DnsRecord(type="A", name="x", value="192.0.2.1")],
            ),
            metadata=intruder.metadata,
        ),
        "VerifyDomain": domains_stub.VerifyDomain(
            domain_pb2.VerifyDomainRequest(id=domain.id), metadata=intruder.metadata
        ),
        "ExportZoneFile": domains_stub.ExportZoneFile(
            domain_pb2.ExportZoneFileRequest(id=domain.id), metadata=intruder.metadata
        ),
        "DeleteDomain": domains_stub.DeleteDomain(
            domain_pb2.DeleteDomainRequest(id=domain.id), metadata=intruder.metadata
        ),
    }
    for rpc, call in calls.items():
        failure = await failure_of(call)
        assert failure.code == grpc.StatusCode.NOT_FOUND, rpc
        assert failure.resource == ("Domain", domain.id), rpc
    listed = await domains_stub.ListDomains(
        domain_pb2.ListDomainsRequest(), metadata=intruder.metadata
    )
    assert listed.total_size == 0
    assert list(listed.domains) == []
    # The owner's domain is untouched by all of the above.
    still = await domains_stub.GetDomain(
        domain_pb2.GetDomainRequest(id=domain.id), metadata=owner.metadata
    )
    assert still == domain
