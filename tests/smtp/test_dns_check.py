"""CheckDnsRecords against Knot: every expected record reported ok, missing or different."""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

from azora.domain.v1 import domain_pb2
from azora.smtp.v1 import smtp_pb2

from tests.conftest import Tenant, unique_domain
from tests.smtp.conftest import register
from tests.smtp.verifiers import quoted
from tests.support.dns_server import KnotServer

if TYPE_CHECKING:
    from azora.domain.v1 import domain_pb2_grpc
    from azora.smtp.v1 import smtp_pb2_grpc

    DomainStub = domain_pb2_grpc.DomainServiceAsyncStub
    Stub = smtp_pb2_grpc.SmtpServiceAsyncStub

OK = smtp_pb2.RECORD_CHECK_STATUS_OK
MISSING = smtp_pb2.RECORD_CHECK_STATUS_MISSING
DIFFERENT = smtp_pb2.RECORD_CHECK_STATUS_DIFFERENT
ERROR = smtp_pb2.RECORD_CHECK_STATUS_ERROR


async def check(stub: Stub, tenant: Tenant, domain_id: str) -> smtp_pb2.CheckDnsRecordsResponse:
    return await stub.CheckDnsRecords(
        smtp_pb2.CheckDnsRecordsRequest(domain_id=domain_id), metadata=tenant.metadata
    )


def by_purpose(response: smtp_pb2.CheckDnsRecordsResponse) -> dict[str, smtp_pb2.RecordCheck]:
    return {c.purpose: c for c in response.checks}


async def prepare(
    stub: Stub, tenant: Tenant, domain: domain_pb2.Domain, reports: str
) -> tuple[smtp_pb2.DkimKey, smtp_pb2.SpfRecord, smtp_pb2.DmarcRecord]:
    await stub.UpdateSmtpConfig(
        smtp_pb2.UpdateSmtpConfigRequest(domain_id=domain.id, host="192.0.2.77", port=587),
        metadata=tenant.metadata,
    )
    key = await stub.GenerateDkimKey(
        smtp_pb2.GenerateDkimKeyRequest(domain_id=domain.id, algorithm="ed25519"),
        metadata=tenant.metadata,
    )
    spf = await stub.GenerateSpfRecord(
        smtp_pb2.GenerateSpfRecordRequest(domain_id=domain.id), metadata=tenant.metadata
    )
    dmarc = await stub.GenerateDmarcRecord(
        smtp_pb2.GenerateDmarcRecordRequest(
            domain_id=domain.id,
            policy="reject",
            aggregate_report_uris=[f"mailto:dmarc@{reports}"],
        ),
        metadata=tenant.metadata,
    )
    return key, spf, dmarc


async def test_everything_published_is_ok(
    smtp_stub: Stub, domains_stub: DomainStub, tenant: Tenant, knot_server: KnotServer
) -> None:
    # The records the service generated, published as told: every check is ok.
    domain = await register(domains_stub, tenant)
    reports = f"reports{secrets.token_hex(4)}.example"
    key, spf, dmarc = await prepare(smtp_stub, tenant, domain, reports)
    knot_server.set_zone(
        domain.name,
        [
            ("@", "TXT", f'"azora-verify={domain.verification_token}"'),
            ("@", "TXT", quoted(spf.record_strings)),
            (f"{key.selector}._domainkey", "TXT", quoted(key.record_strings)),
            ("_dmarc", "TXT", quoted(dmarc.record_strings)),
            ("@", "MX", f"10 mx.{domain.name}."),
        ],
    )
    [authorization] = dmarc.external_authorizations
    knot_server.set_zone(reports, [(authorization.record_name + ".", "TXT", '"v=DMARC1"')])
    response = await check(smtp_stub, tenant, domain.id)
    assert [c.purpose for c in response.checks] == [
        "verification",
        "dkim",
        "spf",
        "dmarc",
        "dmarc_report_authorization",
        "mx",
    ]
    assert all(c.status == OK for c in response.checks), response
    assert response.all_ok
    checks = by_purpose(response)
    assert checks["dkim"].record_name == key.record_name
    assert list(checks["spf"].found) == [spf.record_value]
    assert checks["spf"].expected == spf.record_value
    assert list(checks["mx"].found) == [f"10 mx.{domain.name}"]
    assert checks["verification"].HasField("check_time")


async def test_missing_and_different_records_say_what_was_found(
    smtp_stub: Stub, domains_stub: DomainStub, tenant: Tenant, knot_server: KnotServer
) -> None:
    # Wrong token, a different SPF, another key under the selector, no DMARC, no MX, and a
    # report domain whose zone is served but has no authorization record.
    domain = await register(domains_stub, tenant)
    reports = f"reports{secrets.token_hex(4)}.example"
    key, _spf, _dmarc = await prepare(smtp_stub, tenant, domain, reports)
    knot_server.set_zone(
        domain.name,
        [
            ("@", "TXT", '"azora-verify=someone-elses"'),
            ("@", "TXT", '"v=spf1 include:_spf.google.com ~all"'),
            (f"{key.selector}._domainkey", "TXT", '"v=DKIM1; k=ed25519; p=AAAA"'),
        ],
    )
    knot_server.set_zone(reports, [("@", "TXT", '"v=spf1 -all"')])
    response = await check(smtp_stub, tenant, domain.id)
    checks = by_purpose(response)
    assert not response.all_ok
    assert checks["verification"].status == DIFFERENT
    assert list(checks["verification"].found) == ["azora-verify=someone-elses"]
    assert checks["spf"].status == DIFFERENT
    assert list(checks["spf"].found) == ["v=spf1 include:_spf.google.com ~all"]
    assert checks["dkim"].status == DIFFERENT
    assert list(checks["dkim"].found) == ["v=DKIM1; k=ed25519; p=AAAA"]
    assert checks["dmarc"].status == MISSING
    assert checks["mx"].status == MISSING
    assert checks["dmarc_report_authorization"].status == MISSING
    # The key's listing now carries the same DNS check result.
    listed = await smtp_stub.ListDkimKeys(
        smtp_pb2.ListDkimKeysRequest(domain_id=domain.id), metadata=tenant.metadata
    )
    assert listed.keys[0].dns_check.status == DIFFERENT


async def test_nothing_generated_yet_checks_the_basics(
    smtp_stub: Stub, domains_stub: DomainStub, tenant: Tenant, knot_server: KnotServer
) -> None:
    # Without generated SPF/DMARC any single valid record is ok; two SPF records are not.
    domain = await register(domains_stub, tenant)
    knot_server.set_zone(
        domain.name,
        [
            ("@", "TXT", '"v=spf1 mx -all"'),
            ("@", "TXT", '"v=spf1 a -all"'),
            ("_dmarc", "TXT", '"v=DMARC1; p=none"'),
        ],
    )
    checks = by_purpose(await check(smtp_stub, tenant, domain.id))
    assert "dkim" not in checks
    assert checks["verification"].status == MISSING
    assert checks["spf"].status == DIFFERENT
    assert "2 SPF records" in checks["spf"].detail
    assert checks["dmarc"].status == OK


async def test_a_zone_nobody_serves_is_an_error_not_missing(
    smtp_stub: Stub, domains_stub: DomainStub, tenant: Tenant, knot_server: KnotServer
) -> None:
    # REFUSED/SERVFAIL says nothing about the records: status ERROR with the lookup's reason,
    # which names the answer but never the resolver's address or port (internal topology).
    domain = await register(domains_stub, tenant, unique_domain("invalid"))
    response = await check(smtp_stub, tenant, domain.id)
    assert {c.status for c in response.checks} == {ERROR}
    assert all(c.detail for c in response.checks)
    for item in response.checks:
        assert "REFUSED" in item.detail, item.detail
        assert knot_server.host not in item.detail, item.detail
        assert f"{knot_server.port}" not in item.detail.replace(domain.name, ""), item.detail
