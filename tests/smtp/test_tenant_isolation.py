"""Another tenant's domain is NOT_FOUND on every SmtpService rpc, exactly like an unknown one."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from azora.smtp.v1 import smtp_pb2

from services.core.settings import Settings
from tests.conftest import Tenant, new_tenant
from tests.smtp.conftest import register
from tests.support.grpc_errors import failure_of

if TYPE_CHECKING:
    from azora.domain.v1 import domain_pb2_grpc
    from azora.smtp.v1 import smtp_pb2_grpc

    DomainStub = domain_pb2_grpc.DomainServiceAsyncStub
    Stub = smtp_pb2_grpc.SmtpServiceAsyncStub

Call = Callable[["Stub", str, tuple[tuple[str, str], ...]], Awaitable[Any]]
RELAY_HOST, RELAY_PORT = "smtp.example.com", 587

CALLS: dict[str, Call] = {
    "GetSmtpConfig": lambda s, d, m: s.GetSmtpConfig(
        smtp_pb2.GetSmtpConfigRequest(domain_id=d), metadata=m
    ),
    "UpdateSmtpConfig": lambda s, d, m: s.UpdateSmtpConfig(
        smtp_pb2.UpdateSmtpConfigRequest(domain_id=d, host=RELAY_HOST, port=RELAY_PORT),
        metadata=m,
    ),
    "TestSmtpConnection": lambda s, d, m: s.TestSmtpConnection(
        smtp_pb2.TestSmtpConnectionRequest(domain_id=d), metadata=m
    ),
    "TestSmtpConnection+config": lambda s, d, m: s.TestSmtpConnection(
        smtp_pb2.TestSmtpConnectionRequest(
            domain_id=d,
            config=smtp_pb2.UpdateSmtpConfigRequest(host=RELAY_HOST, port=RELAY_PORT),
        ),
        metadata=m,
    ),
    "GenerateDkimKey": lambda s, d, m: s.GenerateDkimKey(
        smtp_pb2.GenerateDkimKeyRequest(domain_id=d, algorithm="ed25519"),
        metadata=m,
    ),
    "ListDkimKeys": lambda s, d, m: s.ListDkimKeys(
        smtp_pb2.ListDkimKeysRequest(domain_id=d), metadata=m
    ),
    "ActivateDkimKey": lambda s, d, m: s.ActivateDkimKey(
        smtp_pb2.ActivateDkimKeyRequest(domain_id=d, selector="owner"), metadata=m
    ),
    "GenerateSpfRecord": lambda s, d, m: s.GenerateSpfRecord(
        smtp_pb2.GenerateSpfRecordRequest(domain_id=d), metadata=m
    ),
    "GenerateDmarcRecord": lambda s, d, m: s.GenerateDmarcRecord(
        smtp_pb2.GenerateDmarcRecordRequest(domain_id=d, policy="none"),
        metadata=m,
    ),
    "CheckDnsRecords": lambda s, d, m: s.CheckDnsRecords(
        smtp_pb2.CheckDnsRecordsRequest(domain_id=d), metadata=m
    ),
}


@pytest.mark.parametrize("rpc", sorted(CALLS))
async def test_another_tenants_domain_is_not_found(
    smtp_stub: Stub, domains_stub: DomainStub, tenant: Tenant, settings: Settings, rpc: str
) -> None:
    # The owner has a relay and a key; the stranger gets NOT_FOUND for the domain itself.
    domain = await register(domains_stub, tenant)
    await CALLS["UpdateSmtpConfig"](smtp_stub, domain.id, tenant.metadata)
    await smtp_stub.GenerateDkimKey(
        smtp_pb2.GenerateDkimKeyRequest(domain_id=domain.id, selector="owner", algorithm="ed25519"),
        metadata=tenant.metadata,
    )
    stranger = new_tenant(settings)
    failure = await failure_of(CALLS[rpc](smtp_stub, domain.id, stranger.metadata))
    assert failure.code == grpc.StatusCode.NOT_FOUND
    assert failure.resource == ("Domain", domain.id)
    unknown = await failure_of(CALLS[rpc](smtp_stub, "0" * 24, stranger.metadata))
    assert (unknown.code, unknown.resource) == (failure.code, ("Domain", "0" * 24))
    # The owner still sees its own data (the NOT_FOUND was about the caller, not the domain).
    listed = await smtp_stub.ListDkimKeys(
        smtp_pb2.ListDkimKeysRequest(domain_id=domain.id), metadata=tenant.metadata
    )
    assert [k.selector for k in listed.keys] == ["owner"]
