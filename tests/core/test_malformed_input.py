"""Malformed input of every kind gets INVALID_ARGUMENT naming the field and writes nothing.

No request, however malformed, produces INTERNAL.
"""

from __future__ import annotations

import grpc
import pytest
from azora.domain.v1 import domain_pb2, domain_pb2_grpc
from pymongo import AsyncMongoClient

from services.core.settings import Settings
from tests.conftest import Tenant
from tests.support.grpc_errors import decode, failure_of


async def domain_count(settings: Settings, tenant: Tenant) -> int:
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(settings.mongodb_uri)
    try:
        return await client[settings.mongodb_database]["domains"].count_documents(
            {"tenant_id": tenant.id}
        )
    finally:
        await client.close()


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\xff\xff\xff",  # not protobuf at all
        b"\x0a\x05ab",  # field 1 claims 5 bytes, only 2 follow
        b"\x0a\x02\xc3\x28",  # field 1 (string) is not valid UTF-8
        b"\x08\x96\x01",  # field 1 sent as a varint where a string is expected (wrong type)
    ],
)
async def test_undecodable_bytes_are_invalid_argument(
    domain_channel: grpc.aio.Channel, tenant: Tenant, settings: Settings, payload: bytes
) -> None:
    # Raw bytes that do not decode as CreateDomainRequest: INVALID_ARGUMENT, nothing stored.
    call = domain_channel.unary_unary(
        "/azora.domain.v1.DomainService/CreateDomain",
        request_serializer=lambda raw: raw,
        response_deserializer=lambda raw: raw,
    )
    try:
        await call(payload, metadata=tenant.metadata)
    except grpc.aio.AioRpcError as error:
        failure = decode(error)
    else:
        pytest.fail("malformed bytes were accepted")
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(failure.field_violations) <= {"request", "name"}
    assert failure.field_violations
    assert await domain_count(settings, tenant) == 0


@pytest.mark.parametrize(
    ("name", "field"),
    [
        ("", "name"),
        ("x" * 100_000, "name"),
        ("\x00.example", "name"),
        ("exa mple.com", "name"),
        ("例え.テスト" * 30, "name"),
        ('{"$gt": ""}', "name"),
        ("\u0430lpha-corp.test", "name"),  # Cyrillic a among Latin letters: a look-alike
    ],
)
async def test_bad_names_write_nothing(
    domains_stub: domain_pb2_grpc.DomainServiceAsyncStub,
    tenant: Tenant,
    settings: Settings,
    name: str,
    field: str,
) -> None:
    # Empty, oversize, control characters, spaces, too-long IDNs, operator-looking strings,
    # mixed-script look-alikes.
    failure = await failure_of(
        domains_stub.CreateDomain(
            domain_pb2.CreateDomainRequest(name=name), metadata=tenant.metadata
        )
    )
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in failure.field_violations
    assert await domain_count(settings, tenant) == 0


async def test_oversized_record_sets_are_refused_whole(
    domains_stub: domain_pb2_grpc.DomainServiceAsyncStub, tenant: Tenant
) -> None:
    # More records than allowed is one violation on `records`, and the set is not stored.
    domain = await domains_stub.CreateDomain(
        domain_pb2.CreateDomainRequest(name="many-records.example"), metadata=tenant.metadata
    )
    records = [domain_pb2.DnsRecord(type="A", name=f"h{i}", value="192.0.2.1") for i in range(501)]
    failure = await failure_of(
        domains_stub.UpdateDnsRecords(
            domain_pb2.UpdateDnsRecordsRequest(id=domain.id, records=records),
            metadata=tenant.metadata,
        )
    )
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "records" in failure.field_violations
    fetched = await domains_stub.GetDomain(
        domain_pb2.GetDomainRequest(id=domain.id), metadata=tenant.metadata
    )
    assert list(fetched.dns_records) == []


async def test_unknown_record_types_in_records(
    domains_stub: domain_pb2_grpc.DomainServiceAsyncStub, tenant: Tenant
) -> None:
    # A record type the API does not define is a field violation listing the accepted types,
    # not a crash and not "no type".
    domain = await domains_stub.CreateDomain(
        domain_pb2.CreateDomainRequest(name="enum-check.example"), metadata=tenant.metadata
    )
    for bad in ("99", "SPF", "DNS_RECORD_TYPE_UNSPECIFIED", ""):
        failure = await failure_of(
            domains_stub.UpdateDnsRecords(
                domain_pb2.UpdateDnsRecordsRequest(
                    id=domain.id, records=[domain_pb2.DnsRecord(type=bad, name="x", value="y")]
                ),
                metadata=tenant.metadata,
            )
        )
        assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "A, AAAA, CNAME, MX, TXT, SRV, PTR" in failure.field_violations["records[0].type"]
