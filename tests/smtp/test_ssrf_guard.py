"""The SSRF guard with private hosts forbidden (production's default).

A second SMTP service instance runs with AZORA_SMTP_ALLOW_PRIVATE_HOSTS=false. Names resolve
through the test Knot server; no test here makes a connection leave the machine: every host
used is refused before anything connects.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
import pytest
from azora.smtp.v1 import smtp_pb2, smtp_pb2_grpc

from services.core.clock import ManualClock
from services.core.netguard import AddressPolicy, SystemHostResolver, classify
from services.smtp.app import build_app
from tests.conftest import Tenant
from tests.smtp.conftest import StartServer, register
from tests.support.dns_server import KnotServer
from tests.support.grpc_errors import failure_of
from tests.support.settings import SuiteSettings

if TYPE_CHECKING:
    from azora.domain.v1 import domain_pb2_grpc

    DomainStub = domain_pb2_grpc.DomainServiceAsyncStub
    Stub = smtp_pb2_grpc.SmtpServiceAsyncStub


@pytest.fixture(scope="module")
async def guarded_stub(
    smtp_settings: SuiteSettings, smtp_clock: ManualClock
) -> AsyncIterator[smtp_pb2_grpc.SmtpServiceAsyncStub]:
    """An SMTP service that refuses non-public relays."""
    app = await build_app(
        smtp_settings.with_overrides(smtp_allow_private_hosts=False),
        clock=smtp_clock,
        bind="127.0.0.1:0",
        run_lifecycle=False,
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.running.port}") as channel:
        yield smtp_pb2_grpc.SmtpServiceStub(channel)
    await app.running.stop(None)


@pytest.fixture(scope="module")
def hostile_zone(knot_server: KnotServer) -> str:
    """A zone whose names point at addresses a relay must never be."""
    zone = f"ssrf{secrets.token_hex(4)}.example"
    knot_server.set_zone(
        zone,
        [
            ("loop", "A", "127.0.0.1"),
            ("meta", "A", "169.254.169.254"),
            ("meta6", "AAAA", "fd00:ec2::254"),
            ("private", "A", "10.20.30.40"),
            ("cgnat", "A", "100.64.1.1"),
            ("mapped", "AAAA", "::ffff:192.168.1.1"),
            ("nat64", "AAAA", "64:ff9b::7f00:1"),
            # A rebinding-style answer: one public and one private address.
            ("mixed", "A", "198.51.100.7"),
            ("mixed", "A", "10.0.0.7"),
        ],
    )
    return zone


def test_classify_names_every_forbidden_range() -> None:
    # Each kind of non-public address is recognised, including IPv4 hidden in IPv6.
    cases = {
        "127.0.0.1": "loopback",
        "::1": "loopback",
        "10.1.2.3": "private",
        "172.16.0.1": "private",
        "192.168.0.1": "private",
        "fd12::1": "private",
        "169.254.10.10": "link-local",
        "fe80::1": "link-local",
        "100.64.0.1": "carrier-grade NAT",
        "169.254.169.254": "metadata",
        "fd00:ec2::254": "metadata",
        "0.0.0.0": "unspecified",  # noqa: S104 - an address under test, not a bind
        "224.0.0.1": "multicast",
        "240.0.0.1": "reserved",
        "::ffff:127.0.0.1": "loopback",
        "64:ff9b::a00:1": "private",
        "2002:c0a8:101::1": "private",
    }
    for text, expected in cases.items():
        reason = classify(ipaddress.ip_address(text))
        assert reason is not None, text
        assert expected in reason, (text, reason)
    for public in ("8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"):
        assert classify(ipaddress.ip_address(public)) is None


def test_policy_allows_everything_when_told_to() -> None:
    # Development and tests allow private relays explicitly.
    assert AddressPolicy(allow_private=True).refusal(ipaddress.ip_address("127.0.0.1")) is None
    refusal = AddressPolicy(allow_private=False).refusal(ipaddress.ip_address("127.0.0.1"))
    assert refusal is not None
    assert "AZORA_SMTP_ALLOW_PRIVATE_HOSTS" in refusal


@pytest.mark.parametrize(
    ("label", "reason"),
    [
        ("loop", "loopback"),
        ("meta", "metadata"),
        ("meta6", "metadata"),
        ("private", "private"),
        ("cgnat", "carrier-grade NAT"),
        ("mapped", "private"),
        ("nat64", "loopback"),
        ("mixed", "private"),
    ],
)
async def test_names_resolving_to_forbidden_addresses_are_refused_at_resolve(
    guarded_stub: Stub, tenant: Tenant, hostile_zone: str, label: str, reason: str
) -> None:
    # The resolve step fails with the reason; no connect step is ever attempted.
    report = await guarded_stub.TestSmtpConnection(
        smtp_pb2.TestSmtpConnectionRequest(
            config=smtp_pb2.UpdateSmtpConfigRequest(
                host=f"{label}.{hostile_zone}",
                port=25,
                security="none",
            )
        ),
        metadata=tenant.metadata,
    )
    assert not report.ok
    assert [s.name for s in report.steps] == ["resolve"]
    assert report.failed_step == "resolve"
    assert reason in report.steps[0].detail
    assert list(report.steps[0].addresses)


async def test_forbidden_address_literals_are_invalid_in_configs_and_tests(
    guarded_stub: Stub, domains_stub: DomainStub, tenant: Tenant
) -> None:
    # An address literal is judged at once: storing or testing it is INVALID_ARGUMENT on host
    # (config.host in a test, where the settings are the request's `config`).
    domain = await register(domains_stub, tenant)
    for host in ("127.0.0.1", "169.254.169.254", "[::ffff:10.0.0.1]", "100.100.100.200"):
        request = smtp_pb2.UpdateSmtpConfigRequest(domain_id=domain.id, host=host, port=25)
        failure = await failure_of(guarded_stub.UpdateSmtpConfig(request, metadata=tenant.metadata))
        assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "host" in failure.field_violations
        failure = await failure_of(
            guarded_stub.TestSmtpConnection(
                smtp_pb2.TestSmtpConnectionRequest(config=request), metadata=tenant.metadata
            )
        )
        assert "config.host" in failure.field_violations


async def test_the_same_relay_is_allowed_when_private_hosts_are(
    smtp_stub: Stub, tenant: Tenant, hostile_zone: str, start_smtpd: StartServer
) -> None:
    # With the setting on (development, tests), a name resolving to loopback is connected to.
    server = await start_smtpd()
    report = await smtp_stub.TestSmtpConnection(
        smtp_pb2.TestSmtpConnectionRequest(
            config=smtp_pb2.UpdateSmtpConfigRequest(
                host=f"loop.{hostile_zone}", port=server.port, security="none"
            )
        ),
        metadata=tenant.metadata,
    )
    assert report.ok, report
    assert report.steps[1].addresses == ["127.0.0.1"]


async def test_system_resolver_reads_the_hosts_file() -> None:
    # Without AZORA_DNS_NAMESERVERS relay names go through the OS (here: /etc/hosts, no network).
    addresses = await SystemHostResolver().resolve("localhost")
    assert ipaddress.ip_address("127.0.0.1") in addresses
    assert addresses == sorted(addresses, key=lambda a: a.version)
