"""Ownership verification against a real authoritative DNS server (Knot) on loopback.

Also the domain lifecycle driven by a manual clock: expiry, re-checks, suspension, take-over.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import TYPE_CHECKING

import grpc
import pytest
from azora.domain.v1 import domain_pb2, domain_pb2_grpc

from services.core.clock import ManualClock
from services.core.settings import Settings
from services.domain.app import DomainApp, build_app
from tests.conftest import Tenant, make_settings, new_tenant, unique_domain
from tests.support.dns_server import KnotServer, SilentDnsServer
from tests.support.grpc_errors import failure_of

if TYPE_CHECKING:
    Stub = domain_pb2_grpc.DomainServiceAsyncStub
PENDING = domain_pb2.DOMAIN_STATUS_PENDING
ACTIVE = domain_pb2.DOMAIN_STATUS_ACTIVE
SUSPENDED = domain_pb2.DOMAIN_STATUS_SUSPENDED
EXPIRED = domain_pb2.DOMAIN_STATUS_EXPIRED


async def register(stub: Stub, tenant: Tenant, name: str) -> domain_pb2.Domain:
    return await stub.CreateDomain(
        domain_pb2.CreateDomainRequest(name=name), metadata=tenant.metadata
    )


async def verify(stub: Stub, tenant: Tenant, domain_id: str) -> domain_pb2.VerifyDomainResponse:
    return await stub.VerifyDomain(
        domain_pb2.VerifyDomainRequest(id=domain_id), metadata=tenant.metadata
    )


def publish(knot: KnotServer, name: str, *txt: str) -> None:
    records = [("@", "TXT", f'"{value}"') for value in txt] or [("www", "A", "192.0.2.1")]
    knot.set_zone(name, records)


async def test_matching_token_activates_the_domain(
    domains_stub: Stub, tenant: Tenant, knot_server: KnotServer
) -> None:
    # The published azora-verify record makes the domain active, with a timestamp.
    name = unique_domain()
    domain = await register(domains_stub, tenant, name)
    publish(knot_server, name, "v=spf1 -all", f"azora-verify={domain.verification_token}")
    result = await verify(domains_stub, tenant, domain.id)
    assert result.verified
    assert result.check.outcome == domain_pb2.VERIFICATION_OUTCOME_MATCHED
    assert result.check.found[0] == f"azora-verify={domain.verification_token}"
    assert result.domain.status == ACTIVE
    assert result.domain.HasField("verify_time")
    assert result.domain.HasField("next_check_time")


async def test_missing_record_keeps_pending_and_says_what_was_found(
    domains_stub: Stub, tenant: Tenant, knot_server: KnotServer
) -> None:
    # A zone without our record: still pending, and the answer lists what is there.
    name = unique_domain()
    domain = await register(domains_stub, tenant, name)
    publish(knot_server, name, "some-other=thing")
    result = await verify(domains_stub, tenant, domain.id)
    assert not result.verified
    assert result.check.outcome == domain_pb2.VERIFICATION_OUTCOME_NO_RECORD
    assert list(result.check.found) == ["some-other=thing"]
    assert result.domain.status == PENDING
    assert result.domain.last_check == result.check


async def test_no_txt_at_all_is_no_record(
    domains_stub: Stub, tenant: Tenant, knot_server: KnotServer
) -> None:
    # A name that exists without TXT records: NO_RECORD with nothing found.
    name = unique_domain()
    domain = await register(domains_stub, tenant, name)
    publish(knot_server, name)
    result = await verify(domains_stub, tenant, domain.id)
    assert result.check.outcome == domain_pb2.VERIFICATION_OUTCOME_NO_RECORD
    assert list(result.check.found) == []


async def test_wrong_token_is_reported(
    domains_stub: Stub, tenant: Tenant, knot_server: KnotServer
) -> None:
    # A different azora-verify token: WRONG_TOKEN, showing the token found.
    name = unique_domain()
    domain = await register(domains_stub, tenant, name)
    publish(knot_server, name, "azora-verify=somebody-elses-token")
    result = await verify(domains_stub, tenant, domain.id)
    assert result.check.outcome == domain_pb2.VERIFICATION_OUTCOME_WRONG_TOKEN
    assert list(result.check.found) == ["azora-verify=somebody-elses-token"]
    assert result.domain.status == PENDING


async def test_nxdomain_is_reported(
    domains_stub: Stub, tenant: Tenant, knot_server: KnotServer
) -> None:
    # A name that does not exist inside a served zone: NXDOMAIN.
    parent = unique_domain()
    publish(knot_server, parent, "parent-record")
    domain = await register(domains_stub, tenant, f"missing.{parent}")
    result = await verify(domains_stub, tenant, domain.id)
    assert result.check.outcome == domain_pb2.VERIFICATION_OUTCOME_NXDOMAIN
    assert result.domain.status == PENDING


async def test_refused_zone_is_an_error(
    domains_stub: Stub, tenant: Tenant, knot_server: KnotServer
) -> None:
    # A name the server is not authoritative for (REFUSED): ERROR, still pending. The detail
    # names the answer but never the resolver's address or port (internal topology).
    domain = await register(domains_stub, tenant, unique_domain("invalid"))
    result = await verify(domains_stub, tenant, domain.id)
    assert result.check.outcome == domain_pb2.VERIFICATION_OUTCOME_ERROR
    assert result.domain.status == PENDING
    detail = result.check.detail
    assert "REFUSED" in detail, detail
    assert knot_server.host not in detail, detail
    assert f"{knot_server.port}" not in detail.replace(domain.name, ""), detail


async def test_another_tenant_cannot_activate_a_verified_name(
    domains_stub: Stub, tenant: Tenant, settings: Settings, knot_server: KnotServer
) -> None:
    # Once one tenant's domain is active, another tenant proving the same name is refused.
    other = new_tenant(settings)
    name = unique_domain()
    mine = await register(domains_stub, tenant, name)
    theirs = await register(domains_stub, other, name)
    publish(
        knot_server,
        name,
        f"azora-verify={mine.verification_token}",
        f"azora-verify={theirs.verification_token}",
    )
    assert (await verify(domains_stub, tenant, mine.id)).verified
    failure = await failure_of(verify(domains_stub, other, theirs.id))
    assert failure.code == grpc.StatusCode.FAILED_PRECONDITION
    assert failure.reason == "DOMAIN_OWNED_BY_ANOTHER_TENANT"
    assert failure.precondition_types == ["OWNERSHIP"]
    still = await domains_stub.GetDomain(
        domain_pb2.GetDomainRequest(id=theirs.id), metadata=other.metadata
    )
    assert still.status == PENDING


async def test_deleting_the_owner_frees_the_name(
    domains_stub: Stub, tenant: Tenant, settings: Settings, knot_server: KnotServer
) -> None:
    # Deleting the verified domain releases its claim; another tenant can then activate it.
    other = new_tenant(settings)
    name = unique_domain()
    mine = await register(domains_stub, tenant, name)
    theirs = await register(domains_stub, other, name)
    publish(knot_server, name, f"azora-verify={mine.verification_token}")
    assert (await verify(domains_stub, tenant, mine.id)).verified
    await domains_stub.DeleteDomain(
        domain_pb2.DeleteDomainRequest(id=mine.id), metadata=tenant.metadata
    )
    publish(knot_server, name, f"azora-verify={theirs.verification_token}")
    assert (await verify(domains_stub, other, theirs.id)).verified


# --- lifecycle with its own service instance and clock ------------------------------------


@pytest.fixture(scope="module")
async def lifecycle(
    ferretdb: str, knot_server: KnotServer
) -> AsyncIterator[tuple[DomainApp, Stub, ManualClock, Settings]]:
    """A domain service with a clock the tests move, short windows, and its own database."""
    from datetime import UTC, datetime

    clock = ManualClock(datetime(2026, 1, 1, tzinfo=UTC))
    settings = make_settings(
        ferretdb,
        "azora_lifecycle",
        AZORA_DNS_NAMESERVERS=knot_server.host,
        AZORA_DNS_PORT=str(knot_server.port),
        AZORA_DNS_TIMEOUT="2",
        AZORA_VERIFICATION_WINDOW=str(3600),
        AZORA_RECHECK_INTERVAL=str(600),
        AZORA_SUSPENSION_GRACE=str(1800),
    )
    app = await build_app(settings, clock=clock, bind="127.0.0.1:0", run_lifecycle=False)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.running.port}") as channel:
        yield app, domain_pb2_grpc.DomainServiceStub(channel), clock, settings
    await app.running.stop(None)


async def test_pending_domain_expires_and_reverification_issues_a_new_token(
    lifecycle: tuple[DomainApp, Stub, ManualClock, Settings], knot_server: KnotServer
) -> None:
    # Not verified within the window -> expired; verifying again starts over with a new token.
    app, stub, clock, settings = lifecycle
    tenant = new_tenant(settings)
    domain = await register(stub, tenant, unique_domain())
    clock.advance(timedelta(minutes=59))
    await app.domains.run_lifecycle_once()
    got = await stub.GetDomain(domain_pb2.GetDomainRequest(id=domain.id), metadata=tenant.metadata)
    assert got.status == PENDING
    clock.advance(timedelta(minutes=2))
    expired, _ = await app.domains.run_lifecycle_once()
    assert expired >= 1
    got = await stub.GetDomain(domain_pb2.GetDomainRequest(id=domain.id), metadata=tenant.metadata)
    assert got.status == EXPIRED
    assert "not verified within 1 hours" in got.status_reason
    publish(knot_server, domain.name, f"azora-verify={domain.verification_token}")
    result = await verify(stub, tenant, domain.id)
    # The old token no longer counts: a new one was issued and must be published.
    assert result.domain.verification_token != domain.verification_token
    assert result.check.outcome == domain_pb2.VERIFICATION_OUTCOME_WRONG_TOKEN
    assert result.domain.status == PENDING
    publish(knot_server, domain.name, f"azora-verify={result.domain.verification_token}")
    assert (await verify(stub, tenant, domain.id)).verified


async def test_active_domain_losing_its_record_is_suspended_after_grace_and_recovers(
    lifecycle: tuple[DomainApp, Stub, ManualClock, Settings], knot_server: KnotServer
) -> None:
    # Re-checks: record gone -> still active within the grace period -> suspended with the
    # reason -> active again once the record is back.
    app, stub, clock, settings = lifecycle
    tenant = new_tenant(settings)
    domain = await register(stub, tenant, unique_domain())
    record = f"azora-verify={domain.verification_token}"
    publish(knot_server, domain.name, record)
    assert (await verify(stub, tenant, domain.id)).verified

    async def status_after(minutes: int) -> domain_pb2.Domain:
        clock.advance(timedelta(minutes=minutes))
        await app.domains.run_lifecycle_once()
        return await stub.GetDomain(
            domain_pb2.GetDomainRequest(id=domain.id), metadata=tenant.metadata
        )

    assert (await status_after(11)).status == ACTIVE  # re-checked, still there
    publish(knot_server, domain.name, "unrelated")
    first_miss = await status_after(11)
    assert first_miss.status == ACTIVE
    assert first_miss.last_check.outcome == domain_pb2.VERIFICATION_OUTCOME_NO_RECORD
    assert (await status_after(11)).status == ACTIVE  # 11 min into the 30 min grace
    suspended = await status_after(25)  # 36 min since the record vanished
    assert suspended.status == SUSPENDED
    assert record in suspended.status_reason
    assert suspended.HasField("suspend_time")
    publish(knot_server, domain.name, record)
    recovered = await status_after(11)
    assert recovered.status == ACTIVE
    assert not recovered.HasField("suspend_time")


async def test_failed_lookups_do_not_count_as_a_missing_record(
    lifecycle: tuple[DomainApp, Stub, ManualClock, Settings], knot_server: KnotServer
) -> None:
    # When the zone stops being served (REFUSED), re-checks record the error but never
    # start the suspension clock.
    app, stub, clock, settings = lifecycle
    tenant = new_tenant(settings)
    domain = await register(stub, tenant, unique_domain())
    publish(knot_server, domain.name, f"azora-verify={domain.verification_token}")
    assert (await verify(stub, tenant, domain.id)).verified
    knot_server.remove_zone(domain.name)
    for _ in range(5):
        clock.advance(timedelta(minutes=11))
        await app.domains.run_lifecycle_once()
    got = await stub.GetDomain(domain_pb2.GetDomainRequest(id=domain.id), metadata=tenant.metadata)
    assert got.status == ACTIVE
    assert got.last_check.outcome == domain_pb2.VERIFICATION_OUTCOME_ERROR


async def test_suspended_owner_can_be_taken_over(
    lifecycle: tuple[DomainApp, Stub, ManualClock, Settings], knot_server: KnotServer
) -> None:
    # A name whose owner was suspended (lost its proof) goes to whoever proves ownership now.
    app, stub, clock, settings = lifecycle
    old_owner, new_owner = new_tenant(settings), new_tenant(settings)
    name = unique_domain()
    old = await register(stub, old_owner, name)
    publish(knot_server, name, f"azora-verify={old.verification_token}")
    assert (await verify(stub, old_owner, old.id)).verified
    new = await register(stub, new_owner, name)
    publish(knot_server, name, f"azora-verify={new.verification_token}")
    for _ in range(5):  # 55 minutes of re-checks: past the 30 minute grace
        clock.advance(timedelta(minutes=11))
        await app.domains.run_lifecycle_once()
    got = await stub.GetDomain(domain_pb2.GetDomainRequest(id=old.id), metadata=old_owner.metadata)
    assert got.status == SUSPENDED
    assert (await verify(stub, new_owner, new.id)).verified


async def test_dns_server_not_answering_is_a_timeout(
    ferretdb: str, silent_dns_server: SilentDnsServer
) -> None:
    # A nameserver that never answers: TIMEOUT after the configured timeout, still pending.
    settings = make_settings(
        ferretdb,
        "azora_silent_dns",
        AZORA_DNS_NAMESERVERS=silent_dns_server.host,
        AZORA_DNS_PORT=str(silent_dns_server.port),
        AZORA_DNS_TIMEOUT="1",
    )
    app = await build_app(settings, bind="127.0.0.1:0", run_lifecycle=False)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.running.port}") as channel:
            stub = domain_pb2_grpc.DomainServiceStub(channel)
            tenant = new_tenant(settings)
            domain = await register(stub, tenant, unique_domain())
            result = await verify(stub, tenant, domain.id)
            assert result.check.outcome == domain_pb2.VERIFICATION_OUTCOME_TIMEOUT
            assert "1s" in result.check.detail
            assert result.domain.status == PENDING
    finally:
        await app.running.stop(None)
