"""Proves the loopback DNS fixtures: Knot serves set_zone data; the silent server times out."""

from __future__ import annotations

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver
import pytest

from tests.support.dns_fixtures import knot_server, silent_dns_server  # noqa: F401
from tests.support.dns_server import KnotServer, SilentDnsServer


def _resolver(host: str, port: int, lifetime: float = 3.0) -> dns.resolver.Resolver:
    # configure=False: never read /etc/resolv.conf; talk only to the test server.
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [host]
    resolver.port = port
    resolver.lifetime = lifetime
    resolver.timeout = lifetime
    return resolver


def _txt_values(answer: dns.resolver.Answer) -> list[str]:
    return sorted(b"".join(rdata.strings).decode() for rdata in answer)


def test_serves_txt_and_a_records(knot_server: KnotServer) -> None:  # noqa: F811
    # Records passed to set_zone are served authoritatively right after it returns.
    knot_server.set_zone(
        "serve.azora.test",
        [("@", "TXT", '"azora-verify=tok123"'), ("www", "A", "192.0.2.1")],
    )
    resolver = _resolver(knot_server.host, knot_server.port)

    assert _txt_values(resolver.resolve("serve.azora.test", "TXT")) == ["azora-verify=tok123"]
    assert [r.address for r in resolver.resolve("www.serve.azora.test", "A")] == ["192.0.2.1"]


def test_update_is_visible_immediately(knot_server: KnotServer) -> None:  # noqa: F811
    # A second set_zone replaces the records and the very next query sees them.
    resolver = _resolver(knot_server.host, knot_server.port)
    knot_server.set_zone("update.azora.test", [("@", "TXT", '"azora-verify=old"')])
    assert _txt_values(resolver.resolve("update.azora.test", "TXT")) == ["azora-verify=old"]

    knot_server.set_zone(
        "update.azora.test",
        [("@", "TXT", '"azora-verify=new"'), ("mail", "A", "192.0.2.25")],
    )

    assert _txt_values(resolver.resolve("update.azora.test", "TXT")) == ["azora-verify=new"]
    assert [r.address for r in resolver.resolve("mail.update.azora.test", "A")] == ["192.0.2.25"]


def test_serial_increases_on_every_set_zone(knot_server: KnotServer) -> None:  # noqa: F811
    # Every set_zone bumps the SOA serial, so secondaries/caches would see a change.
    resolver = _resolver(knot_server.host, knot_server.port)
    knot_server.set_zone("serial.azora.test", [])
    first = resolver.resolve("serial.azora.test", "SOA")[0].serial
    knot_server.set_zone("serial.azora.test", [])
    second = resolver.resolve("serial.azora.test", "SOA")[0].serial
    assert second > first


def test_missing_name_in_zone_is_nxdomain(knot_server: KnotServer) -> None:  # noqa: F811
    # Names absent from a served zone get an authoritative NXDOMAIN.
    knot_server.set_zone("nx.azora.test", [("www", "A", "192.0.2.1")])
    resolver = _resolver(knot_server.host, knot_server.port)

    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve("missing.nx.azora.test", "A")


def test_removed_zone_is_refused(knot_server: KnotServer) -> None:  # noqa: F811
    # After remove_zone the server is not authoritative: REFUSED (NoNameservers in dnspython).
    knot_server.set_zone("gone.azora.test", [("@", "TXT", '"azora-verify=tok123"')])
    knot_server.remove_zone("gone.azora.test")

    query = dns.message.make_query("gone.azora.test", dns.rdatatype.TXT)
    response = dns.query.udp(query, knot_server.host, port=knot_server.port, timeout=3)
    assert response.rcode() == dns.rcode.REFUSED
    with pytest.raises(dns.resolver.NoNameservers):
        _resolver(knot_server.host, knot_server.port).resolve("gone.azora.test", "TXT")


def test_removed_zone_can_be_added_again(knot_server: KnotServer) -> None:  # noqa: F811
    # Re-adding a removed zone serves the new content, not anything remembered from before.
    knot_server.set_zone("again.azora.test", [("@", "TXT", '"azora-verify=first"')])
    knot_server.remove_zone("again.azora.test")
    knot_server.set_zone("again.azora.test", [("@", "TXT", '"azora-verify=second"')])

    resolver = _resolver(knot_server.host, knot_server.port)
    assert _txt_values(resolver.resolve("again.azora.test", "TXT")) == ["azora-verify=second"]


def test_tcp_queries_are_answered(knot_server: KnotServer) -> None:  # noqa: F811
    # The server listens on TCP at the same port too (clients fall back to TCP on truncation).
    knot_server.set_zone("tcp.azora.test", [("@", "TXT", '"azora-verify=tok123"')])
    query = dns.message.make_query("tcp.azora.test", dns.rdatatype.TXT)
    response = dns.query.tcp(query, knot_server.host, port=knot_server.port, timeout=3)
    assert response.rcode() == dns.rcode.NOERROR
    assert [b"".join(r.strings) for r in response.answer[0]] == [b"azora-verify=tok123"]


def test_invalid_records_are_rejected_before_reaching_knot(knot_server: KnotServer) -> None:  # noqa: F811
    # Bad rdata fails fast with ValueError instead of a load failure hidden in knot.log.
    with pytest.raises(ValueError, match=r"invalid records for zone bad\.azora\.test"):
        knot_server.set_zone("bad.azora.test", [("www", "A", "not-an-address")])


def test_silent_server_times_out(silent_dns_server: SilentDnsServer) -> None:  # noqa: F811
    # A server that never answers makes dnspython give up with LifetimeTimeout: the query
    # arrived (the server counted it) and no answer, refusal or reset came back.
    resolver = _resolver(silent_dns_server.host, silent_dns_server.port, lifetime=1.0)
    before = silent_dns_server.udp_queries
    with pytest.raises(dns.resolver.LifetimeTimeout):
        resolver.resolve("anything.azora.test", "A")
    assert silent_dns_server.udp_queries > before


def test_silent_server_times_out_over_tcp(silent_dns_server: SilentDnsServer) -> None:  # noqa: F811
    # TCP connections are accepted but never answered, so TCP clients time out too.
    query = dns.message.make_query("anything.azora.test", dns.rdatatype.A)
    with pytest.raises(dns.exception.Timeout):
        dns.query.tcp(query, silent_dns_server.host, port=silent_dns_server.port, timeout=0.5)
