"""The mail service's view of relays and DKIM keys, against the real domain and SMTP services.

`GrpcRelayDirectory` calls the SMTP service's internal rpcs with a service token; the SMTP
service runs in-process with the SMTP tests' fixtures (imported here so both suites share
one way of starting it).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import grpc
import pytest
from azora.smtp.v1 import smtp_pb2
from google.protobuf import duration_pb2

from services.core.errors import FailedPrecondition, NotFound, Unavailable
from services.core.settings import Settings
from services.mail.relay_directory import (
    RELAY_NOT_CONFIGURED,
    GrpcRelayDirectory,
    InMemoryRelayDirectory,
    RelayDirectory,
    RelaySecurity,
    RelaySettings,
    SigningKey,
)
from tests.conftest import Tenant, new_tenant
from tests.smtp import conftest as smtp_fixtures
from tests.smtp.conftest import PASSWORD, USERNAME, register
from tests.smtp.verifiers import dkimpy_verifies, message, opendkim_verdict, quoted
from tests.support.dns_server import KnotServer, pick_free_port

if TYPE_CHECKING:
    from pathlib import Path

    from azora.domain.v1 import domain_pb2_grpc
    from azora.smtp.v1 import smtp_pb2_grpc

    DomainStub = domain_pb2_grpc.DomainServiceAsyncStub
    Stub = smtp_pb2_grpc.SmtpServiceAsyncStub

# The SMTP service and what it needs, started the way the SMTP tests start it.
tls_ca = smtp_fixtures.tls_ca
ca_file = smtp_fixtures.ca_file
smtp_clock = smtp_fixtures.smtp_clock
smtp_settings = smtp_fixtures.smtp_settings
smtp_app = smtp_fixtures.smtp_app
smtp_channel = smtp_fixtures.smtp_channel
smtp_stub = smtp_fixtures.smtp_stub


async def configure(stub: Stub, tenant: Tenant, domain_id: str, host: str) -> None:
    """Give the domain a relay with a password."""
    await stub.UpdateSmtpConfig(
        smtp_pb2.UpdateSmtpConfigRequest(
            domain_id=domain_id,
            host=host,
            port=2525,
            security="starttls_opportunistic",
            username=USERNAME,
            password=PASSWORD,
            client_hostname="mta.azora.example",
            timeout=duration_pb2.Duration(seconds=7),
        ),
        metadata=tenant.metadata,
    )


async def test_relay_for_returns_the_relay_with_its_password(
    smtp_stub: Stub,
    domains_stub: DomainStub,
    smtp_channel: grpc.aio.Channel,
    smtp_settings: Settings,
    tenant: Tenant,
) -> None:
    # The stored relay comes back as plain data with the password in clear, never in repr.
    domain = await register(domains_stub, tenant)
    await configure(smtp_stub, tenant, domain.id, "relay.example.com")
    directory: RelayDirectory = GrpcRelayDirectory(smtp_channel, smtp_settings)
    relay = await directory.relay_for(tenant_id=tenant.id, domain_id=domain.id)
    assert relay.domain_id == domain.id
    assert (relay.host, relay.port) == ("relay.example.com", 2525)
    assert relay.security is RelaySecurity.STARTTLS_OPPORTUNISTIC
    assert (relay.username, relay.password) == (USERNAME, PASSWORD)
    assert relay.client_hostname == "mta.azora.example"
    assert relay.timeout == 7.0
    assert PASSWORD not in repr(relay)


async def test_answers_are_cached_for_the_ttl(
    smtp_stub: Stub,
    domains_stub: DomainStub,
    smtp_channel: grpc.aio.Channel,
    smtp_settings: Settings,
    tenant: Tenant,
) -> None:
    # Within the TTL a changed relay is not seen (no call per message); a directory without
    # caching sees the change at once.
    domain = await register(domains_stub, tenant)
    await configure(smtp_stub, tenant, domain.id, "first.example.com")
    cached = GrpcRelayDirectory(smtp_channel, smtp_settings, cache_ttl=3600)
    uncached = GrpcRelayDirectory(smtp_channel, smtp_settings, cache_ttl=0)
    burst = await asyncio.gather(
        *(cached.relay_for(tenant_id=tenant.id, domain_id=domain.id) for _ in range(20))
    )
    assert {r.host for r in burst} == {"first.example.com"}
    await configure(smtp_stub, tenant, domain.id, "second.example.com")
    again = await cached.relay_for(tenant_id=tenant.id, domain_id=domain.id)
    assert again.host == "first.example.com"
    fresh = await uncached.relay_for(tenant_id=tenant.id, domain_id=domain.id)
    assert fresh.host == "second.example.com"


async def test_relay_exists_is_answered_without_credentials(
    domains_stub: DomainStub,
    smtp_stub: Stub,
    smtp_channel: grpc.aio.Channel,
    smtp_settings: Settings,
    tenant: Tenant,
) -> None:
    # Whether a relay exists: no relay, a relay, another tenant's domain, an unknown domain.
    domain = await register(domains_stub, tenant)
    assert not await GrpcRelayDirectory(smtp_channel, smtp_settings).relay_exists(
        tenant_id=tenant.id, domain_id=domain.id
    )
    await configure(smtp_stub, tenant, domain.id, "relay.example.net")
    directory = GrpcRelayDirectory(smtp_channel, smtp_settings)
    assert await directory.relay_exists(tenant_id=tenant.id, domain_id=domain.id)
    stranger = new_tenant(smtp_settings)
    assert not await directory.relay_exists(tenant_id=stranger.id, domain_id=domain.id)
    assert not await directory.relay_exists(tenant_id=tenant.id, domain_id="0" * 24)


async def test_missing_relay_and_foreign_domains(
    domains_stub: DomainStub,
    smtp_channel: grpc.aio.Channel,
    smtp_settings: Settings,
    tenant: Tenant,
) -> None:
    # No relay is FailedPrecondition(RELAY_NOT_CONFIGURED); another tenant's domain NotFound.
    domain = await register(domains_stub, tenant)
    directory = GrpcRelayDirectory(smtp_channel, smtp_settings)
    with pytest.raises(FailedPrecondition) as unconfigured:
        await directory.relay_for(tenant_id=tenant.id, domain_id=domain.id)
    assert unconfigured.value.reason == RELAY_NOT_CONFIGURED
    # The negative answer is cached too, and raised afresh each time.
    with pytest.raises(FailedPrecondition):
        await directory.relay_for(tenant_id=tenant.id, domain_id=domain.id)
    stranger = new_tenant(smtp_settings)
    with pytest.raises(NotFound):
        await directory.relay_for(tenant_id=stranger.id, domain_id=domain.id)
    assert await directory.signing_key(tenant_id=stranger.id, domain_id=domain.id) is None


async def test_signing_key_signs_mail_that_verifies(
    smtp_stub: Stub,
    domains_stub: DomainStub,
    smtp_channel: grpc.aio.Channel,
    smtp_settings: Settings,
    tenant: Tenant,
    knot_server: KnotServer,
    tmp_path: Path,
) -> None:
    # None until a key is active; then the active key, whose signer makes mail that dkimpy and
    # OpenDKIM verify against the record published in DNS.
    domain = await register(domains_stub, tenant)
    directory = GrpcRelayDirectory(smtp_channel, smtp_settings, cache_ttl=0)
    assert await directory.signing_key(tenant_id=tenant.id, domain_id=domain.id) is None
    key = await smtp_stub.GenerateDkimKey(
        smtp_pb2.GenerateDkimKeyRequest(domain_id=domain.id), metadata=tenant.metadata
    )
    knot_server.set_zone(
        domain.name, [(f"{key.selector}._domainkey", "TXT", quoted(key.record_strings))]
    )
    await smtp_stub.ActivateDkimKey(
        smtp_pb2.ActivateDkimKeyRequest(domain_id=domain.id, selector=key.selector),
        metadata=tenant.metadata,
    )
    signing = await directory.signing_key(tenant_id=tenant.id, domain_id=domain.id)
    assert signing is not None
    assert (signing.domain, signing.selector) == (domain.name, key.selector)
    assert signing.algorithm == "rsa-sha256"
    assert b"PRIVATE KEY" not in repr(signing).encode()
    payload = message(domain.name)
    signed = signing.signer().sign(payload) + payload
    assert dkimpy_verifies(knot_server, signed)
    verdict = await asyncio.to_thread(opendkim_verdict, knot_server, signed, tmp_path / "ok")
    assert verdict.endswith("succeeded"), verdict


async def test_unreachable_smtp_service_is_unavailable(
    smtp_settings: Settings, tenant: Tenant
) -> None:
    # Transport failures are Unavailable (the worker defers), and are not cached.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{pick_free_port()}") as channel:
        directory = GrpcRelayDirectory(channel, smtp_settings, timeout=2.0)
        for _ in range(2):
            with pytest.raises(Unavailable):
                await directory.relay_for(tenant_id=tenant.id, domain_id="0" * 24)
        with pytest.raises(Unavailable):
            await directory.signing_key(tenant_id=tenant.id, domain_id="0" * 24)


async def test_in_memory_directory_behaves_like_the_real_one() -> None:
    # The unit-test double keeps the same contract: relay, no relay, unknown domain, keys.
    directory = InMemoryRelayDirectory()
    relay = RelaySettings(
        domain_id="d1", host="127.0.0.1", port=2525, security=RelaySecurity.NONE, password="pw"
    )
    directory.add_relay(tenant_id="t1", relay=relay)
    assert await directory.relay_for(tenant_id="t1", domain_id="d1") is relay
    with pytest.raises(NotFound):
        await directory.relay_for(tenant_id="t2", domain_id="d1")
    key = SigningKey(
        domain_id="d2",
        domain="b.example",
        selector="s1",
        algorithm="ed25519-sha256",
        private_key_pem=b"-----BEGIN PRIVATE KEY-----",
    )
    directory.add_key(tenant_id="t1", key=key)
    with pytest.raises(FailedPrecondition) as unconfigured:
        await directory.relay_for(tenant_id="t1", domain_id="d2")
    assert unconfigured.value.reason == RELAY_NOT_CONFIGURED
    assert await directory.signing_key(tenant_id="t1", domain_id="d2") is key
    assert await directory.signing_key(tenant_id="t1", domain_id="d1") is None
    assert directory.calls == 5
    assert "pw" not in repr(relay)
    assert "PRIVATE" not in repr(key)
