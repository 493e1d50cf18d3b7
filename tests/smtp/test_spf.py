"""SPF records: built from the relay and the caller's mechanisms, evaluated by pyspf.

pyspf is an independent SPF implementation. It looks records up with dnspython's default
resolver, which the tests point at the Knot server (a resolver configuration, no patching of
pyspf itself), so the records it evaluates are the ones published in real DNS.
"""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import dns.resolver
import grpc
import pytest
import spf  # type: ignore[import-untyped]  # pyspf ships no type information
from azora.smtp.v1 import smtp_pb2

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

FAIL = "-"


@pytest.fixture
def pyspf_uses_knot(knot_server: KnotServer) -> Iterator[None]:
    """Point dnspython's default resolver (what pyspf queries through) at Knot."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [knot_server.host]
    resolver.port = knot_server.port
    resolver.lifetime = 5
    saved = dns.resolver.default_resolver
    dns.resolver.default_resolver = resolver
    yield
    dns.resolver.default_resolver = saved


def evaluate(ip: str, domain: str) -> str:
    """The verdict of pyspf for mail from `domain` sent by `ip`."""
    with warnings.catch_warnings():
        # pyspf 2.0.14 calls dnspython's deprecated resolver.query(); not our code to fix.
        warnings.simplefilter("ignore", DeprecationWarning)
        result, _explanation = spf.check2(i=ip, s=f"sender@{domain}", h=f"mta.{domain}")
    return str(result)


def mechanism(kind: str, value: str = "", qualifier: str = "") -> smtp_pb2.SpfMechanism:
    return smtp_pb2.SpfMechanism(kind=kind, value=value, qualifier=qualifier)


async def build(
    stub: Stub, tenant: Tenant, domain_id: str, *mechanisms: smtp_pb2.SpfMechanism, **fields: object
) -> smtp_pb2.SpfRecord:
    request = smtp_pb2.GenerateSpfRecordRequest(
        domain_id=domain_id,
        mechanisms=mechanisms,
        **fields,  # type: ignore[arg-type]
    )
    return await stub.GenerateSpfRecord(request, metadata=tenant.metadata)


async def configure_relay(stub: Stub, tenant: Tenant, domain_id: str, host: str) -> None:
    await stub.UpdateSmtpConfig(
        smtp_pb2.UpdateSmtpConfigRequest(domain_id=domain_id, host=host, port=587),
        metadata=tenant.metadata,
    )


@pytest.mark.usefixtures("pyspf_uses_knot")
async def test_record_built_from_the_relay_passes_pyspf_for_the_relay_address(
    smtp_stub: Stub, domains_stub: DomainStub, tenant: Tenant, knot_server: KnotServer
) -> None:
    # relay host + include + ip4: pyspf passes the relay and the included network, not others.
    domain = await register(domains_stub, tenant)
    provider = f"esp{secrets.token_hex(4)}.example"
    knot_server.set_zone(provider, [("_spf", "TXT", '"v=spf1 ip4:198.51.100.0/24 -all"')])
    await configure_relay(smtp_stub, tenant, domain.id, f"relay.{domain.name}")
    record = await build(
        smtp_stub,
        tenant,
        domain.id,
        mechanism("include", f"_spf.{provider}"),
        mechanism("ip6", "2001:db8:25::/48"),
        all=FAIL,
    )
    assert record.record_name == domain.name
    assert record.record_value == (
        f"v=spf1 a:relay.{domain.name} include:_spf.{provider} ip6:2001:db8:25::/48 -all"
    )
    assert record.dns_lookups == 2
    knot_server.set_zone(
        domain.name,
        [("relay", "A", "192.0.2.25"), ("@", "TXT", quoted(record.record_strings))],
    )
    assert evaluate("192.0.2.25", domain.name) == "pass"
    assert evaluate("198.51.100.77", domain.name) == "pass"
    assert evaluate("2001:db8:25::1", domain.name) == "pass"
    assert evaluate("203.0.113.9", domain.name) == "fail"


@pytest.mark.usefixtures("pyspf_uses_knot")
async def test_relay_given_as_an_address_becomes_ip4_and_softfail_is_the_default(
    smtp_stub: Stub, domains_stub: DomainStub, tenant: Tenant, knot_server: KnotServer
) -> None:
    # An IP relay needs no lookup; without an explicit all the record ends in ~all.
    domain = await register(domains_stub, tenant)
    await configure_relay(smtp_stub, tenant, domain.id, "192.0.2.61")
    record = await build(smtp_stub, tenant, domain.id, mechanism("mx"))
    assert record.record_value == "v=spf1 ip4:192.0.2.61 mx ~all"
    assert record.dns_lookups == 1
    knot_server.set_zone(domain.name, [("@", "TXT", quoted(record.record_strings))])
    assert evaluate("192.0.2.61", domain.name) == "pass"
    assert evaluate("192.0.2.62", domain.name) == "softfail"


async def test_redirect_replaces_all(
    smtp_stub: Stub, domains_stub: DomainStub, tenant: Tenant, knot_server: KnotServer
) -> None:
    # redirect= ends the record instead of all, and its target's lookups are counted.
    domain = await register(domains_stub, tenant)
    provider = f"esp{secrets.token_hex(4)}.example"
    knot_server.set_zone(provider, [("@", "TXT", '"v=spf1 a mx -all"')])
    record = await build(smtp_stub, tenant, domain.id, redirect=provider, exclude_relay=True)
    assert record.record_value == f"v=spf1 redirect={provider}"
    assert record.dns_lookups == 3


async def test_more_than_ten_lookups_counting_nested_includes_is_refused(
    smtp_stub: Stub, domains_stub: DomainStub, tenant: Tenant, knot_server: KnotServer
) -> None:
    # Lookups inside included records count: 1 + 6 + 1 + 4 = 12 > 10 is INVALID_ARGUMENT.
    domain = await register(domains_stub, tenant)
    provider = f"esp{secrets.token_hex(4)}.example"
    six = " ".join(f"a:h{i}.{provider}" for i in range(6))
    knot_server.set_zone(
        provider,
        [
            ("big", "TXT", f'"v=spf1 {six} include:more.{provider} -all"'),
            ("more", "TXT", '"v=spf1 mx mx:a.example mx:b.example mx:c.example -all"'),
            ("small", "TXT", '"v=spf1 a -all"'),
        ],
    )
    failure = await failure_of(
        build(smtp_stub, tenant, domain.id, mechanism("include", f"big.{provider}"))
    )
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "12 DNS lookups" in failure.field_violations["mechanisms"]
    # The same include tree within the budget is accepted with its exact cost.
    record = await build(smtp_stub, tenant, domain.id, mechanism("include", f"small.{provider}"))
    assert record.dns_lookups == 2


async def test_include_without_spf_record_is_refused(
    smtp_stub: Stub, domains_stub: DomainStub, tenant: Tenant, knot_server: KnotServer
) -> None:
    # Including a domain that publishes no SPF record would be a permerror at receivers.
    domain = await register(domains_stub, tenant)
    provider = f"esp{secrets.token_hex(4)}.example"
    knot_server.set_zone(provider, [("@", "TXT", '"not spf"')])
    failure = await failure_of(
        build(
            smtp_stub,
            tenant,
            domain.id,
            mechanism("ip4", "192.0.2.1"),
            mechanism("mx"),
            mechanism("include", provider),
        )
    )
    assert "publishes no SPF record" in failure.field_violations["mechanisms[2].value"]


async def test_more_than_one_published_spf_record_is_a_warning(
    smtp_stub: Stub, domains_stub: DomainStub, tenant: Tenant, knot_server: KnotServer
) -> None:
    # Two SPF records at the domain: the builder warns and lists what is published.
    domain = await register(domains_stub, tenant)
    knot_server.set_zone(
        domain.name, [("@", "TXT", '"v=spf1 mx -all"'), ("@", "TXT", '"v=spf1 a -all"')]
    )
    record = await build(smtp_stub, tenant, domain.id, mechanism("mx"))
    assert sorted(record.published_records) == ["v=spf1 a -all", "v=spf1 mx -all"]
    assert any("2 SPF records" in w for w in record.warnings)


async def test_macros_are_accepted_and_flagged(
    smtp_stub: Stub, domains_stub: DomainStub, tenant: Tenant
) -> None:
    # A valid macro domain-spec is kept as written; its lookups cannot be counted ahead.
    domain = await register(domains_stub, tenant)
    record = await build(
        smtp_stub,
        tenant,
        domain.id,
        mechanism("exists", "%{i}._spf.%{d}"),
        mechanism("a", "/24"),
        mechanism("mx", "mail.example.com//64"),
        exclude_relay=True,
    )
    assert record.record_value == "v=spf1 exists:%{i}._spf.%{d} a/24 mx:mail.example.com//64 ~all"
    assert record.dns_lookups == 3


@pytest.mark.parametrize(
    ("mechanisms", "fields", "field"),
    [
        ([("ptr", "")], {}, "mechanisms[0].kind"),
        ([("all", "")], {}, "mechanisms[0].kind"),
        ([("redirect", "x.example.com")], {}, "mechanisms[0].kind"),
        ([("ip4", "300.1.1.1")], {}, "mechanisms[0].value"),
        ([("ip4", "192.0.2.0/33")], {}, "mechanisms[0].value"),
        ([("ip4", "2001:db8::1")], {}, "mechanisms[0].value"),
        ([("ip6", "192.0.2.1")], {}, "mechanisms[0].value"),
        ([("include", "")], {}, "mechanisms[0].value"),
        ([("include", "exa mple.com")], {}, "mechanisms[0].value"),
        ([("include", "localhost")], {}, "mechanisms[0].value"),
        ([("a", "example.com/40")], {}, "mechanisms[0].value"),
        ([("exists", "%{z}.example.com")], {}, "mechanisms[0].value"),
        ([("mx", ""), ("a", ""), ("ip4", "1.2.3")], {}, "mechanisms[2].value"),
        ([], {"redirect": "not a domain"}, "redirect"),
        ([], {"redirect": "example.com", "all": FAIL}, "all"),
        ([], {"all": "+"}, "all"),
        ([], {"all": "9"}, "all"),
        ([("mx", "", "9")], {}, "mechanisms[0].qualifier"),
    ],
)
async def test_bad_mechanisms_are_invalid_argument_naming_the_field(
    smtp_stub: Stub,
    domains_stub: DomainStub,
    tenant: Tenant,
    mechanisms: list[tuple[Any, ...]],
    fields: dict[str, object],
    field: str,
) -> None:
    # Every syntax error names the mechanism (by index) and its part, or the field.
    domain = await register(domains_stub, tenant)
    terms = [mechanism(m[0], m[1], m[2] if len(m) > 2 else "") for m in mechanisms]
    failure = await failure_of(build(smtp_stub, tenant, domain.id, *terms, **fields))
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in failure.field_violations, failure.field_violations
