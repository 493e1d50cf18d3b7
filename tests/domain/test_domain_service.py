"""DomainService end to end over gRPC against FerretDB: every rpc and its error paths."""

from __future__ import annotations

from typing import TYPE_CHECKING

import dns.zone
import grpc
import pytest
from azora.domain.v1 import domain_pb2, domain_pb2_grpc

from tests.conftest import Tenant, unique_domain
from tests.support.grpc_errors import failure_of

if TYPE_CHECKING:
    Stub = domain_pb2_grpc.DomainServiceAsyncStub
A, MX, TXT, CNAME = "A", "MX", "TXT", "CNAME"


async def create(stub: Stub, tenant: Tenant, name: str | None = None) -> domain_pb2.Domain:
    return await stub.CreateDomain(
        domain_pb2.CreateDomainRequest(name=name or unique_domain()), metadata=tenant.metadata
    )


async def test_create_returns_pending_domain_with_verification_record(
    domains_stub: Stub, tenant: Tenant
) -> None:
    # Registering tells the user the exact ownership record and the other records needed.
    name = unique_domain("com")
    domain = await create(domains_stub, tenant, f"  {name.upper()}. ")
    assert domain.name == name
    assert domain.status == domain_pb2.DOMAIN_STATUS_PENDING
    assert len(domain.verification_token) == 32
    verification = domain.required_records[0]
    assert verification.purpose == "verification"
    assert verification.required
    assert verification.type == domain_pb2.DNS_RECORD_TYPE_TXT  # RequiredRecord keeps the enum
    assert verification.name == name
    assert verification.value == f"azora-verify={domain.verification_token}"
    assert {r.purpose for r in domain.required_records} == {
        "verification",
        "dkim",
        "spf",
        "dmarc",
        "bounce-mx",
        "bounce-spf",
    }
    dmarc = next(r for r in domain.required_records if r.purpose == "dmarc")
    assert dmarc.name == f"_dmarc.{name}"
    # The bounce domain of the envelope senders: an MX to the inbound server, and SPF (checked
    # on the MAIL FROM domain) authorising what the domain's own record authorises.
    records = {r.purpose: r for r in domain.required_records}
    assert (records["bounce-mx"].type, records["bounce-mx"].name) == (
        domain_pb2.DNS_RECORD_TYPE_MX,
        f"bounces.{name}",
    )
    assert records["bounce-mx"].value
    assert (records["bounce-spf"].name, records["bounce-spf"].value) == (
        f"bounces.{name}",
        f"v=spf1 include:{name} ~all",
    )
    assert not records["bounce-mx"].required
    assert domain.verification_expire_time.ToSeconds() - domain.create_time.ToSeconds() == 72 * 3600


async def test_create_normalises_internationalised_names(
    domains_stub: Stub, tenant: Tenant
) -> None:
    # Unicode names are stored as IDNA A-labels and shown as U-labels.
    label = "bücher" + unique_domain().split(".")[0]
    domain = await create(domains_stub, tenant, f"{label}.example")
    assert domain.name.startswith("xn--")
    assert domain.unicode_name == f"{label}.example"


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "empty"),
        ("localhost", "single label"),
        ("a" * 64 + ".example", "label over 63 octets"),
        (("a" * 60 + ".") * 5 + "com", "name over 253 octets"),
        ("bad_name!.example", "forbidden characters"),
        ("-leading.example", "leading hyphen"),
        ("192.0.2.1", "IP address"),
        ("example.123", "numeric TLD"),
    ],
)
async def test_create_rejects_invalid_names(
    domains_stub: Stub, tenant: Tenant, name: str, why: str
) -> None:
    # Every kind of bad name is INVALID_ARGUMENT on the `name` field, and nothing is stored.
    failure = await failure_of(
        domains_stub.CreateDomain(
            domain_pb2.CreateDomainRequest(name=name), metadata=tenant.metadata
        )
    )
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT, why
    assert "name" in failure.field_violations, why
    assert failure.domain == "domain.azora.dev"
    listed = await domains_stub.ListDomains(
        domain_pb2.ListDomainsRequest(), metadata=tenant.metadata
    )
    assert listed.total_size == 0


async def test_create_same_name_twice_is_already_exists(domains_stub: Stub, tenant: Tenant) -> None:
    # The same domain twice in one tenant is ALREADY_EXISTS with the resource named.
    name = unique_domain()
    await create(domains_stub, tenant, name)
    failure = await failure_of(create(domains_stub, tenant, name.upper()))
    assert failure.code == grpc.StatusCode.ALREADY_EXISTS
    assert failure.reason == "DOMAIN_ALREADY_EXISTS"
    assert failure.resource == ("Domain", name)


async def test_two_tenants_may_register_the_same_name(
    domains_stub: Stub, tenant: Tenant, settings: object
) -> None:
    # Registration is per tenant; only activation is exclusive.
    from tests.conftest import new_tenant

    other = new_tenant(settings)  # type: ignore[arg-type]
    name = unique_domain()
    first = await create(domains_stub, tenant, name)
    second = await create(domains_stub, other, name)
    assert first.id != second.id
    assert first.verification_token != second.verification_token


async def test_get_returns_the_domain(domains_stub: Stub, tenant: Tenant) -> None:
    # Get returns what Create returned.
    created = await create(domains_stub, tenant)
    fetched = await domains_stub.GetDomain(
        domain_pb2.GetDomainRequest(id=created.id), metadata=tenant.metadata
    )
    assert fetched == created


async def test_get_unknown_and_malformed_ids(domains_stub: Stub, tenant: Tenant) -> None:
    # An unknown id is NOT_FOUND; a malformed one is INVALID_ARGUMENT on `id`.
    missing = await failure_of(
        domains_stub.GetDomain(domain_pb2.GetDomainRequest(id="0" * 24), metadata=tenant.metadata)
    )
    assert missing.code == grpc.StatusCode.NOT_FOUND
    assert missing.resource == ("Domain", "0" * 24)
    for bad in ("", "xyz", "0" * 25, '{"$ne": null}'):
        malformed = await failure_of(
            domains_stub.GetDomain(domain_pb2.GetDomainRequest(id=bad), metadata=tenant.metadata)
        )
        assert malformed.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "id" in malformed.field_violations


async def test_list_pages_through_all_domains_in_creation_order(
    domains_stub: Stub, tenant: Tenant
) -> None:
    # page_size/page_token walk every domain exactly once, oldest first.
    created = [(await create(domains_stub, tenant)).id for _ in range(5)]
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await domains_stub.ListDomains(
            domain_pb2.ListDomainsRequest(page_size=2, page_token=token), metadata=tenant.metadata
        )
        assert page.total_size == 5
        seen.extend(d.id for d in page.domains)
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == created
    assert pages == 3


async def test_list_filters_by_status(domains_stub: Stub, tenant: Tenant) -> None:
    # The status filter returns only matching domains.
    await create(domains_stub, tenant)
    pending = await domains_stub.ListDomains(
        domain_pb2.ListDomainsRequest(status=domain_pb2.DOMAIN_STATUS_PENDING),
        metadata=tenant.metadata,
    )
    active = await domains_stub.ListDomains(
        domain_pb2.ListDomainsRequest(status=domain_pb2.DOMAIN_STATUS_ACTIVE),
        metadata=tenant.metadata,
    )
    assert len(pending.domains) == 1
    assert len(active.domains) == 0


async def test_list_rejects_bad_paging_arguments(domains_stub: Stub, tenant: Tenant) -> None:
    # Negative sizes, forged tokens, tokens reused with another filter and unknown enum values
    # are INVALID_ARGUMENT naming the field.
    await create(domains_stub, tenant)
    await create(domains_stub, tenant)
    first = await domains_stub.ListDomains(
        domain_pb2.ListDomainsRequest(page_size=1), metadata=tenant.metadata
    )
    cases = [
        (domain_pb2.ListDomainsRequest(page_size=-1), "pageSize"),
        (domain_pb2.ListDomainsRequest(page_token="not-a-token"), "pageToken"),
        (
            domain_pb2.ListDomainsRequest(
                page_token=first.next_page_token, status=domain_pb2.DOMAIN_STATUS_ACTIVE
            ),
            "pageToken",
        ),
        (domain_pb2.ListDomainsRequest(status=42), "status"),  # type: ignore[arg-type]
    ]
    for request, field in cases:
        failure = await failure_of(domains_stub.ListDomains(request, metadata=tenant.metadata))
        assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
        assert field in failure.field_violations


async def test_list_caps_page_size(domains_stub: Stub, tenant: Tenant) -> None:
    # A huge page size is capped, not an error.
    await create(domains_stub, tenant)
    page = await domains_stub.ListDomains(
        domain_pb2.ListDomainsRequest(page_size=1_000_000), metadata=tenant.metadata
    )
    assert len(page.domains) == 1


async def test_update_dns_records_replaces_the_set(domains_stub: Stub, tenant: Tenant) -> None:
    # A valid set is stored normalised (FQDN names, split TXT) and replaces the previous set.
    domain = await create(domains_stub, tenant)
    long_txt = "v=DKIM1; k=rsa; p=" + "A" * 400
    updated = await domains_stub.UpdateDnsRecords(
        domain_pb2.UpdateDnsRecordsRequest(
            id=domain.id,
            records=[
                domain_pb2.DnsRecord(type=A, name="@", value="192.0.2.10"),
                domain_pb2.DnsRecord(type=MX, name="", value="MX.Example.NET.", priority=10),
                domain_pb2.DnsRecord(type=TXT, name="sel._domainkey", value=long_txt, ttl=300),
                domain_pb2.DnsRecord(type=CNAME, name="www", value="target.example.org"),
            ],
        ),
        metadata=tenant.metadata,
    )
    records = {(r.type, r.name): r for r in updated.dns_records}
    assert records[(A, domain.name)].ttl == 3600
    assert records[(MX, domain.name)].value == "mx.example.net"
    txt = records[(TXT, f"sel._domainkey.{domain.name}")]
    assert [len(s) for s in txt.txt_strings] == [255, len(long_txt) - 255]
    assert "".join(txt.txt_strings) == long_txt
    assert records[(CNAME, f"www.{domain.name}")].value == "target.example.org"
    replaced = await domains_stub.UpdateDnsRecords(
        domain_pb2.UpdateDnsRecordsRequest(
            id=domain.id, records=[domain_pb2.DnsRecord(type=A, name="api", value="192.0.2.11")]
        ),
        metadata=tenant.metadata,
    )
    assert [r.name for r in replaced.dns_records] == [f"api.{domain.name}"]
    fetched = await domains_stub.GetDomain(
        domain_pb2.GetDomainRequest(id=domain.id), metadata=tenant.metadata
    )
    assert fetched.dns_records == replaced.dns_records


async def test_update_dns_records_rejects_the_whole_set_and_writes_nothing(
    domains_stub: Stub, tenant: Tenant
) -> None:
    # One violation per bad record, and the stored set stays what it was.
    domain = await create(domains_stub, tenant)
    good = domain_pb2.DnsRecord(type=A, name="ok", value="192.0.2.1")
    await domains_stub.UpdateDnsRecords(
        domain_pb2.UpdateDnsRecordsRequest(id=domain.id, records=[good]), metadata=tenant.metadata
    )
    failure = await failure_of(
        domains_stub.UpdateDnsRecords(
            domain_pb2.UpdateDnsRecordsRequest(
                id=domain.id,
                records=[
                    domain_pb2.DnsRecord(type=A, name="a", value="300.1.1.1"),
                    domain_pb2.DnsRecord(type=MX, name="@", value="mx.example.net", priority=70000),
                    domain_pb2.DnsRecord(type=A, name="t", value="192.0.2.1", ttl=5),
                    domain_pb2.DnsRecord(type=CNAME, name="c", value="x.example.org"),
                    domain_pb2.DnsRecord(type=TXT, name="c", value="beside a cname"),
                    domain_pb2.DnsRecord(name="u", value="192.0.2.1"),
                    domain_pb2.DnsRecord(type=A, name="outside.example.org.", value="192.0.2.1"),
                ],
            ),
            metadata=tenant.metadata,
        )
    )
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(failure.field_violations) >= {
        "records[0].value",
        "records[1].priority",
        "records[2].ttl",
        "records[5].type",
        "records[6].name",
    }
    assert any(f.startswith(("records[3]", "records[4]")) for f in failure.field_violations)
    fetched = await domains_stub.GetDomain(
        domain_pb2.GetDomainRequest(id=domain.id), metadata=tenant.metadata
    )
    assert [r.name for r in fetched.dns_records] == [f"ok.{domain.name}"]


async def test_update_dns_records_of_unknown_domain(domains_stub: Stub, tenant: Tenant) -> None:
    # Records for a domain that does not exist: NOT_FOUND.
    failure = await failure_of(
        domains_stub.UpdateDnsRecords(
            domain_pb2.UpdateDnsRecordsRequest(id="f" * 24), metadata=tenant.metadata
        )
    )
    assert failure.code == grpc.StatusCode.NOT_FOUND


async def test_export_zone_file_parses_as_a_zone(domains_stub: Stub, tenant: Tenant) -> None:
    # The zone-file export is a valid RFC 1035 master file holding the stored records.
    domain = await create(domains_stub, tenant)
    await domains_stub.UpdateDnsRecords(
        domain_pb2.UpdateDnsRecordsRequest(
            id=domain.id,
            records=[
                domain_pb2.DnsRecord(type=A, name="@", value="192.0.2.10"),
                domain_pb2.DnsRecord(type=TXT, name="@", value="hello world"),
            ],
        ),
        metadata=tenant.metadata,
    )
    body = await domains_stub.ExportZoneFile(
        domain_pb2.ExportZoneFileRequest(id=domain.id), metadata=tenant.metadata
    )
    assert body.content_type.startswith("text/dns")
    zone = dns.zone.from_text(body.data.decode(), origin=domain.name, check_origin=False)
    apex = zone.get_node("@")
    assert apex is not None
    assert {rdataset.rdtype.name for rdataset in apex.rdatasets} == {"A", "TXT"}


async def test_export_zone_file_carries_the_ownership_record(
    domains_stub: Stub, tenant: Tenant
) -> None:
    # The ownership TXT record has to stay published (the periodic re-check suspends a domain
    # without it), so the export a user imports into their DNS host carries it, exactly once
    # also when the user stored it among their own records.
    domain = await create(domains_stub, tenant)
    ownership = f"azora-verify={domain.verification_token}"

    async def apex_txt() -> list[str]:
        body = await domains_stub.ExportZoneFile(
            domain_pb2.ExportZoneFileRequest(id=domain.id), metadata=tenant.metadata
        )
        text = body.data.decode()
        # A parsed rdataset is a set (it would hide a duplicate line), so count in the text.
        assert text.count(f'"{ownership}"') == 1
        zone = dns.zone.from_text(text, origin=domain.name, check_origin=False)
        node = zone.get_node("@")
        assert node is not None
        rdatasets = [r for r in node.rdatasets if r.rdtype.name == "TXT"]
        return sorted(b"".join(rd.strings).decode() for rs in rdatasets for rd in rs)

    assert await apex_txt() == [ownership]
    await domains_stub.UpdateDnsRecords(
        domain_pb2.UpdateDnsRecordsRequest(
            id=domain.id,
            records=[
                domain_pb2.DnsRecord(type=TXT, name="@", value=ownership),
                domain_pb2.DnsRecord(type=TXT, name="@", value="v=spf1 -all"),
            ],
        ),
        metadata=tenant.metadata,
    )
    assert await apex_txt() == [ownership, "v=spf1 -all"]


async def test_delete_removes_the_domain(domains_stub: Stub, tenant: Tenant) -> None:
    # After Delete the domain is gone: Get and a second Delete are NOT_FOUND.
    domain = await create(domains_stub, tenant)
    await domains_stub.DeleteDomain(
        domain_pb2.DeleteDomainRequest(id=domain.id), metadata=tenant.metadata
    )
    for call in (
        domains_stub.GetDomain(domain_pb2.GetDomainRequest(id=domain.id), metadata=tenant.metadata),
        domains_stub.DeleteDomain(
            domain_pb2.DeleteDomainRequest(id=domain.id), metadata=tenant.metadata
        ),
    ):
        assert (await failure_of(call)).code == grpc.StatusCode.NOT_FOUND
    listed = await domains_stub.ListDomains(
        domain_pb2.ListDomainsRequest(), metadata=tenant.metadata
    )
    assert domain.id not in [d.id for d in listed.domains]


async def test_request_id_is_echoed(domains_stub: Stub, tenant: Tenant) -> None:
    # A caller's x-request-id comes back in the initial metadata; without one we make one.
    call = domains_stub.ListDomains(
        domain_pb2.ListDomainsRequest(),
        metadata=(*tenant.metadata, ("x-request-id", "req-123")),
    )
    await call
    assert ("x-request-id", "req-123") in tuple(await call.initial_metadata())
    call = domains_stub.ListDomains(domain_pb2.ListDomainsRequest(), metadata=tenant.metadata)
    await call
    generated = dict(await call.initial_metadata())["x-request-id"]
    assert len(generated) == 16
