"""DKIM rotation end to end with a manual clock: mail is verifiable at every moment.

pending -> active once published, a new key generated, it activates by itself once its record
is seen, the old key retiring for the overlap and retired after it. At every step a freshly
signed message (and the one signed before the switch) is verified by dkimpy against Knot.
The service instance has its own database and clock, so its lifecycle loop sees only the
keyrings made here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import grpc
import pytest
from azora.domain.v1 import domain_pb2
from azora.smtp.v1 import smtp_pb2, smtp_pb2_grpc
from google.protobuf import duration_pb2

from services.core.clock import ManualClock
from services.smtp.app import SmtpApp, build_app
from tests.conftest import Tenant
from tests.smtp.conftest import register
from tests.smtp.verifiers import dkimpy_verifies, message, quoted, sign
from tests.support.dns_server import KnotServer
from tests.support.grpc_errors import failure_of
from tests.support.settings import SuiteSettings

if TYPE_CHECKING:
    from azora.domain.v1 import domain_pb2_grpc

    DomainStub = domain_pb2_grpc.DomainServiceAsyncStub

OVERLAP = timedelta(days=2)
CHECK_INTERVAL = timedelta(minutes=10)
STATUS = smtp_pb2.DkimKeyStatus


@dataclass
class Rotation:
    """The rotation test's own SMTP service."""

    app: SmtpApp
    stub: smtp_pb2_grpc.SmtpServiceAsyncStub
    clock: ManualClock


@pytest.fixture(scope="module")
async def rotation(smtp_settings: SuiteSettings) -> AsyncIterator[Rotation]:
    """An SMTP service with its own database, clock, overlap and no domain cache."""
    clock = ManualClock(datetime(2027, 3, 1, 9, 0, tzinfo=UTC))
    settings = smtp_settings.with_overrides(
        mongodb_database="azora_smtp_rotation",
        dkim_rotation_overlap=OVERLAP.total_seconds(),
        dkim_check_interval=CHECK_INTERVAL.total_seconds(),
        domain_cache_ttl=0.0,
    )
    app = await build_app(settings, clock=clock, bind="127.0.0.1:0", run_lifecycle=False)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.running.port}") as channel:
        yield Rotation(app, smtp_pb2_grpc.SmtpServiceStub(channel), clock)
    await app.running.stop(None)


async def statuses(r: Rotation, tenant: Tenant, domain_id: str) -> dict[str, int]:
    listed = await r.stub.ListDkimKeys(
        smtp_pb2.ListDkimKeysRequest(domain_id=domain_id), metadata=tenant.metadata
    )
    return {k.selector: k.status for k in listed.keys}


async def signed_now(r: Rotation, tenant: Tenant, domain: domain_pb2.Domain, tag: str) -> bytes:
    key = await r.app.dkim.signing_key(tenant_id=tenant.id, domain_id=domain.id)
    assert key is not None, "no active key: mail would leave unsigned"
    return sign(key, message(domain.name, tag))


async def tick(r: Rotation, delta: timedelta) -> None:
    r.clock.advance(delta)
    await r.app.dkim.run_lifecycle_once()


async def test_rotation_never_leaves_mail_unsigned_or_unverifiable(
    rotation: Rotation, domains_stub: DomainStub, tenant: Tenant, knot_server: KnotServer
) -> None:
    # Walk a full rotation; after each step new and in-flight mail still verifies.
    r = rotation
    domain = await register(domains_stub, tenant)
    first = await r.stub.GenerateDkimKey(
        smtp_pb2.GenerateDkimKeyRequest(domain_id=domain.id, selector="k1"),
        metadata=tenant.metadata,
    )
    record_1 = (f"{first.selector}._domainkey", "TXT", quoted(first.record_strings))
    knot_server.set_zone(domain.name, [record_1])
    await r.stub.ActivateDkimKey(
        smtp_pb2.ActivateDkimKeyRequest(domain_id=domain.id, selector="k1"),
        metadata=tenant.metadata,
    )
    in_flight = await signed_now(r, tenant, domain, "before-rotation")
    assert dkimpy_verifies(knot_server, in_flight)

    # A new key that activates itself once published; until then k1 keeps signing.
    second = await r.stub.GenerateDkimKey(
        smtp_pb2.GenerateDkimKeyRequest(
            domain_id=domain.id,
            selector="k2",
            algorithm="ed25519",
            auto_activate=True,
        ),
        metadata=tenant.metadata,
    )
    await tick(r, CHECK_INTERVAL)
    assert await statuses(r, tenant, domain.id) == {
        "k1": STATUS.Value("DKIM_KEY_STATUS_ACTIVE"),
        "k2": STATUS.Value("DKIM_KEY_STATUS_PENDING"),
    }
    assert dkimpy_verifies(knot_server, await signed_now(r, tenant, domain, "k2-unpublished"))

    # Published: the next sweep activates k2 and starts k1's overlap.
    record_2 = (f"{second.selector}._domainkey", "TXT", quoted(second.record_strings))
    knot_server.set_zone(domain.name, [record_1, record_2])
    await tick(r, CHECK_INTERVAL)
    assert await statuses(r, tenant, domain.id) == {
        "k1": STATUS.Value("DKIM_KEY_STATUS_RETIRING"),
        "k2": STATUS.Value("DKIM_KEY_STATUS_ACTIVE"),
    }
    signed_by_2 = await signed_now(r, tenant, domain, "after-rotation")
    assert b"s=k2" in signed_by_2
    assert dkimpy_verifies(knot_server, signed_by_2)
    assert dkimpy_verifies(knot_server, in_flight)  # k1's record is still expected and served
    listed = await r.stub.ListDkimKeys(
        smtp_pb2.ListDkimKeysRequest(domain_id=domain.id), metadata=tenant.metadata
    )
    retiring = next(k for k in listed.keys if k.selector == "k1")
    assert retiring.replace_time.ToDatetime(tzinfo=UTC) == r.clock.now()
    assert retiring.scheduled_retire_time.ToDatetime(tzinfo=UTC) == r.clock.now() + OVERLAP
    checked = await r.stub.CheckDnsRecords(
        smtp_pb2.CheckDnsRecordsRequest(domain_id=domain.id), metadata=tenant.metadata
    )
    dkim_names = {c.record_name for c in checked.checks if c.purpose == "dkim"}
    assert dkim_names == {f"k1._domainkey.{domain.name}", f"k2._domainkey.{domain.name}"}

    # Not yet: one minute before the overlap ends k1 is still retiring.
    await tick(r, OVERLAP - timedelta(minutes=1))
    assert (await statuses(r, tenant, domain.id))["k1"] == STATUS.Value("DKIM_KEY_STATUS_RETIRING")
    await tick(r, timedelta(minutes=1))
    assert await statuses(r, tenant, domain.id) == {
        "k1": STATUS.Value("DKIM_KEY_STATUS_RETIRED"),
        "k2": STATUS.Value("DKIM_KEY_STATUS_ACTIVE"),
    }

    # Retired: its record may go; the DNS check stops expecting it; k2 keeps verifying.
    knot_server.set_zone(domain.name, [record_2])
    checked = await r.stub.CheckDnsRecords(
        smtp_pb2.CheckDnsRecordsRequest(domain_id=domain.id), metadata=tenant.metadata
    )
    assert {c.record_name for c in checked.checks if c.purpose == "dkim"} == {
        f"k2._domainkey.{domain.name}"
    }
    assert dkimpy_verifies(knot_server, await signed_now(r, tenant, domain, "after-retire"))
    failure = await failure_of(
        r.stub.ActivateDkimKey(
            smtp_pb2.ActivateDkimKeyRequest(domain_id=domain.id, selector="k1"),
            metadata=tenant.metadata,
        )
    )
    assert failure.code == grpc.StatusCode.FAILED_PRECONDITION
    assert failure.reason == "DKIM_KEY_RETIRED"


async def test_manual_rotation_and_rollback_to_a_retiring_key(
    rotation: Rotation, domains_stub: DomainStub, tenant: Tenant, knot_server: KnotServer
) -> None:
    # ActivateDkimKey with an explicit overlap; a retiring key can be made active again.
    r = rotation
    domain = await register(domains_stub, tenant)
    keys = [
        await r.stub.GenerateDkimKey(
            smtp_pb2.GenerateDkimKeyRequest(domain_id=domain.id, selector=s, algorithm="ed25519"),
            metadata=tenant.metadata,
        )
        for s in ("a", "b")
    ]
    knot_server.set_zone(
        domain.name,
        [(f"{k.selector}._domainkey", "TXT", quoted(k.record_strings)) for k in keys],
    )
    for selector in ("a", "b"):
        await r.stub.ActivateDkimKey(
            smtp_pb2.ActivateDkimKeyRequest(
                domain_id=domain.id, selector=selector, overlap=duration_pb2.Duration(seconds=3600)
            ),
            metadata=tenant.metadata,
        )
    listed = await r.stub.ListDkimKeys(
        smtp_pb2.ListDkimKeysRequest(domain_id=domain.id), metadata=tenant.metadata
    )
    a = next(k for k in listed.keys if k.selector == "a")
    assert a.status == STATUS.Value("DKIM_KEY_STATUS_RETIRING")
    assert a.scheduled_retire_time.ToSeconds() - a.replace_time.ToSeconds() == 3600
    back = await r.stub.ActivateDkimKey(
        smtp_pb2.ActivateDkimKeyRequest(domain_id=domain.id, selector="a"),
        metadata=tenant.metadata,
    )
    assert back.status == STATUS.Value("DKIM_KEY_STATUS_ACTIVE")
    assert (await statuses(r, tenant, domain.id))["b"] == STATUS.Value("DKIM_KEY_STATUS_RETIRING")
    signing = await r.app.dkim.signing_key(tenant_id=tenant.id, domain_id=domain.id)
    assert signing is not None
    assert signing.selector == "a"


async def test_deleted_domains_lose_their_keys_and_relay(
    rotation: Rotation, domains_stub: DomainStub, tenant: Tenant
) -> None:
    # After the domain service deletes a domain, the lifecycle loop removes its SMTP data.
    r = rotation
    domain = await register(domains_stub, tenant)
    await r.stub.UpdateSmtpConfig(
        smtp_pb2.UpdateSmtpConfigRequest(
            domain_id=domain.id, host="smtp.example.com", port=587, username="u", password="pw"
        ),
        metadata=tenant.metadata,
    )
    await r.stub.GenerateDkimKey(
        smtp_pb2.GenerateDkimKeyRequest(domain_id=domain.id, algorithm="ed25519"),
        metadata=tenant.metadata,
    )
    db = r.app.running.database.db
    assert await db["dkim_keyrings"].count_documents({"_id": domain.id}) == 1
    await domains_stub.DeleteDomain(
        domain_pb2.DeleteDomainRequest(id=domain.id), metadata=tenant.metadata
    )
    await tick(r, CHECK_INTERVAL)
    assert await db["dkim_keyrings"].count_documents({"_id": domain.id}) == 0
    assert await db["smtp_configs"].count_documents({"_id": domain.id}) == 0
