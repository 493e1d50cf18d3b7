"""DMARC records: every tag, external report authorisation, parsed by checkdmarc.

checkdmarc (an independent parser) runs fully offline here: its DNS lookups (report
authorisation, MX of report domains) go to the test Knot server through the dnspython resolver
it accepts as a parameter, and its organisational-domain logic uses its bundled suffix list.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

import dns.resolver
import grpc
import pytest
from azora.smtp.v1 import smtp_pb2

# checkdmarc ships no type information.
from checkdmarc.dmarc import parse_dmarc_record  # type: ignore[import-untyped]
from checkdmarc.utils import DNS_CACHE  # type: ignore[import-untyped]

from tests.conftest import Tenant
from tests.smtp.conftest import register
from tests.smtp.verifiers import quoted
from tests.support.dns_server import KnotServer
from tests.support.grpc_errors import failure_of

if TYPE_CHECKING:
    from azora.domain.v1 import domain_pb2_grpc
    from azora.smtp.v1 import smtp_pb2_grpc

    DomainStub = domain_pb2_grpc.DomainServiceAsyncStub
    Stub = smtp_pb2_grpc.SmtpServiceAsyncStub


def knot_resolver(knot: KnotServer) -> dns.resolver.Resolver:
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [knot.host]
    resolver.port = knot.port
    resolver.lifetime = 5
    return resolver


async def build(stub: Stub, tenant: Tenant, domain_id: str, **fields: Any) -> smtp_pb2.DmarcRecord:
    request = smtp_pb2.GenerateDmarcRecordRequest(domain_id=domain_id, **fields)
    return await stub.GenerateDmarcRecord(request, metadata=tenant.metadata)


async def test_full_record_is_parsed_by_checkdmarc_with_external_reports_authorised(
    smtp_stub: Stub, domains_stub: DomainStub, tenant: Tenant, knot_server: KnotServer
) -> None:
    # Every tag set; the report domain publishes the authorisation record we were told to.
    domain = await register(domains_stub, tenant)
    reports = f"reports{secrets.token_hex(4)}.example"
    record = await build(
        smtp_stub,
        tenant,
        domain.id,
        policy="quarantine",
        subdomain_policy="reject",
        percent=50,
        dkim_alignment="s",
        spf_alignment="relaxed",
        aggregate_report_uris=[f"mailto:dmarc@{domain.name}", f"MAILTO:agg@{reports}!10m"],
        failure_report_uris=[f"mailto:forensic@{domain.name}"],
        failure_options="1:d",
        report_interval=3600,
    )
    assert record.record_name == f"_dmarc.{domain.name}"
    assert record.record_value == (
        f"v=DMARC1; p=quarantine; sp=reject; pct=50; adkim=s; aspf=r; "
        f"rua=mailto:dmarc@{domain.name},mailto:agg@{reports}!10m; "
        f"ruf=mailto:forensic@{domain.name}; fo=1:d; ri=3600"
    )
    [authorization] = record.external_authorizations
    assert authorization.record_name == f"{domain.name}._report._dmarc.{reports}"
    assert authorization.record_value == "v=DMARC1"
    assert authorization.report_domain == reports

    knot_server.set_zone(
        domain.name,
        [("_dmarc", "TXT", quoted(record.record_strings)), ("@", "MX", f"10 mx.{domain.name}.")],
    )
    knot_server.set_zone(
        reports,
        [
            ("@", "MX", f"10 mx.{reports}."),
            (f"{domain.name}._report._dmarc", "TXT", '"v=DMARC1"'),
        ],
    )
    parsed = parse_dmarc_record(
        record.record_value, domain.name, resolver=knot_resolver(knot_server)
    )
    tags = {name: tag["value"] for name, tag in parsed["tags"].items()}
    assert tags["p"] == "quarantine"
    assert tags["sp"] == "reject"
    assert tags["adkim"] == "s"
    assert tags["aspf"] == "r"
    assert tags["fo"] == "1:d"
    # checkdmarc follows RFC 9989, which dropped pct and ri: it parses them and says so, as
    # does our builder.
    removed = {w for w in parsed["warnings"] if "was removed in RFC 9989" in w}
    assert removed == {f"Support for the {t} tag was removed in RFC 9989" for t in ("pct", "ri")}
    assert any("RFC 9989" in w for w in record.warnings)
    assert [uri["address"] for uri in tags["rua"]] == [f"dmarc@{domain.name}", f"agg@{reports}"]
    assert not [w for w in parsed["warnings"] if "Authorization record not found" in w]

    # Without the authorisation record checkdmarc objects, which is what we warned about.
    knot_server.set_zone(reports, [("@", "MX", f"10 mx.{reports}.")])
    DNS_CACHE.clear()  # checkdmarc caches answers process-wide; we changed the zone
    parsed = parse_dmarc_record(
        record.record_value, domain.name, resolver=knot_resolver(knot_server)
    )
    assert [w for w in parsed["warnings"] if "Authorization record not found" in w]


async def test_minimal_record_and_its_warnings(
    smtp_stub: Stub, domains_stub: DomainStub, tenant: Tenant, knot_server: KnotServer
) -> None:
    # p=none alone is valid (checkdmarc agrees) and comes with advice about missing reports.
    domain = await register(domains_stub, tenant)
    record = await build(smtp_stub, tenant, domain.id, policy="none")
    assert record.record_value == "v=DMARC1; p=none"
    assert list(record.external_authorizations) == []
    assert any("rua" in w for w in record.warnings)
    parsed = parse_dmarc_record(
        record.record_value, domain.name, resolver=knot_resolver(knot_server)
    )
    assert parsed["tags"]["p"]["value"] == "none"


async def test_report_address_in_own_organisation_needs_no_authorisation(
    smtp_stub: Stub, domains_stub: DomainStub, tenant: Tenant
) -> None:
    # A subdomain of the same organisational domain receives reports without extra records.
    domain = await register(domains_stub, tenant)
    record = await build(
        smtp_stub,
        tenant,
        domain.id,
        policy="reject",
        aggregate_report_uris=[f"mailto:dmarc@reports.{domain.name}"],
    )
    assert list(record.external_authorizations) == []


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({}, "policy"),
        ({"policy": "block"}, "policy"),
        ({"subdomain_policy": "9"}, "subdomainPolicy"),
        ({"percent": 101}, "percent"),
        ({"dkim_alignment": "x"}, "dkimAlignment"),
        ({"aggregate_report_uris": ["dmarc@example.com"]}, "aggregateReportUris[0]"),
        ({"aggregate_report_uris": ["https://example.com/dmarc"]}, "aggregateReportUris[0]"),
        ({"aggregate_report_uris": ["mailto:a@example.com!10x"]}, "aggregateReportUris[0]"),
        ({"aggregate_report_uris": ["mailto:a;b@example.com"]}, "aggregateReportUris[0]"),
        ({"aggregate_report_uris": ["mailto:a@bad_domain"]}, "aggregateReportUris[0]"),
        (
            {"aggregate_report_uris": ["mailto:a@example.com", "mailto:a@example.com"]},
            "aggregateReportUris[1]",
        ),
        (
            {"failure_report_uris": ["mailto:ok@example.com", "mailto:not ok@example.com"]},
            "failureReportUris[1]",
        ),
        ({"failure_options": "2"}, "failureOptions"),
        ({"failure_options": "1:1"}, "failureOptions"),
        ({"report_interval": 0}, "reportInterval"),
    ],
)
async def test_bad_tags_are_invalid_argument_naming_the_field(
    smtp_stub: Stub,
    domains_stub: DomainStub,
    tenant: Tenant,
    fields: dict[str, Any],
    field: str,
) -> None:
    # Each invalid tag value is INVALID_ARGUMENT with a violation on its field.
    domain = await register(domains_stub, tenant)
    fields = {"policy": "reject", **fields} if field != "policy" else fields
    failure = await failure_of(build(smtp_stub, tenant, domain.id, **fields))
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in failure.field_violations, failure.field_violations
