"""Inbound routes through the domain service: CRUD, validation, order, and recipient resolution.

Domains are made ACTIVE the real way (a TXT record in the tests' Knot zone, then VerifyDomain);
resolution is asked as the inbound SMTP server asks it, with a service token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
import pytest
from azora.domain.v1 import domain_pb2, domain_pb2_grpc, routes_pb2, routes_pb2_grpc

from services.core.auth import ServiceTokens
from services.core.settings import Settings
from services.domain.app import DomainApp
from tests.conftest import Tenant, new_tenant, unique_domain
from tests.support.dns_server import KnotServer
from tests.support.grpc_errors import failure_of

if TYPE_CHECKING:
    DomainStub = domain_pb2_grpc.DomainServiceAsyncStub
    RouteStub = routes_pb2_grpc.RouteServiceAsyncStub


@pytest.fixture
def routes_stub(domain_channel: grpc.aio.Channel) -> RouteStub:
    """RouteService client."""
    return routes_pb2_grpc.RouteServiceStub(domain_channel)


@pytest.fixture
def inbound_token(settings: Settings) -> tuple[tuple[str, str], ...]:
    """Call metadata of the inbound SMTP server (a service token; its tenant is not used)."""
    tokens = ServiceTokens.from_settings(
        settings, subject="service:inbound", scopes=["domains:read"]
    )
    return tokens.metadata("inbound")


async def active_domain(stub: DomainStub, tenant: Tenant, knot: KnotServer) -> domain_pb2.Domain:
    """A new domain of `tenant`, verified through the tests' DNS server."""
    name = unique_domain()
    domain = await stub.CreateDomain(
        domain_pb2.CreateDomainRequest(name=name), metadata=tenant.metadata
    )
    knot.set_zone(name, [("@", "TXT", f'"azora-verify={domain.verification_token}"')])
    result = await stub.VerifyDomain(
        domain_pb2.VerifyDomainRequest(id=domain.id), metadata=tenant.metadata
    )
    assert result.domain.status == domain_pb2.DOMAIN_STATUS_ACTIVE
    return result.domain


async def add(
    stub: RouteStub, tenant: Tenant, domain_id: str, **fields: object
) -> routes_pb2.Route:
    return await stub.CreateRoute(
        routes_pb2.CreateRouteRequest(domain_id=domain_id, **fields),  # type: ignore[arg-type]
        metadata=tenant.metadata,
    )


async def resolve(
    stub: RouteStub, metadata: tuple[tuple[str, str], ...], address: str
) -> routes_pb2.InboundRecipient:
    return await stub.ResolveInboundRecipient(
        routes_pb2.ResolveInboundRecipientRequest(address=address), metadata=metadata
    )


async def test_routes_crud_in_priority_order(
    domains_stub: DomainStub, routes_stub: RouteStub, tenant: Tenant, knot_server: KnotServer
) -> None:
    # Created routes are listed lowest priority first, can be read, replaced and deleted.
    domain = await active_domain(domains_stub, tenant, knot_server)
    catch_all = await add(routes_stub, tenant, domain.id, match="*", priority=500, action="store")
    support = await add(
        routes_stub, tenant, domain.id, match="Support", priority=10, action="store"
    )
    assert support.match == "Support"  # kept as typed, compared case-insensitively
    listed = await routes_stub.ListRoutes(
        routes_pb2.ListRoutesRequest(domain_id=domain.id), metadata=tenant.metadata
    )
    assert [r.id for r in listed.routes] == [support.id, catch_all.id]
    updated = await routes_stub.UpdateRoute(
        routes_pb2.UpdateRouteRequest(
            domain_id=domain.id,
            id=support.id,
            match="help",
            priority=600,
            action="reject",
            reject_text="No such desk",
        ),
        metadata=tenant.metadata,
    )
    assert (updated.match, updated.action, updated.reject_text) == (
        "help",
        "reject",
        "No such desk",
    )
    got = await routes_stub.GetRoute(
        routes_pb2.GetRouteRequest(domain_id=domain.id, id=support.id), metadata=tenant.metadata
    )
    assert got == updated
    await routes_stub.DeleteRoute(
        routes_pb2.DeleteRouteRequest(domain_id=domain.id, id=support.id),
        metadata=tenant.metadata,
    )
    failure = await failure_of(
        routes_stub.GetRoute(
            routes_pb2.GetRouteRequest(domain_id=domain.id, id=support.id),
            metadata=tenant.metadata,
        )
    )
    assert (failure.code, failure.reason) == (grpc.StatusCode.NOT_FOUND, "INBOUND_ROUTE_NOT_FOUND")


async def test_malformed_routes_are_refused_naming_the_field(
    domains_stub: DomainStub, routes_stub: RouteStub, tenant: Tenant, knot_server: KnotServer
) -> None:
    # Every bad field is named; nothing is stored.
    domain = await active_domain(domains_stub, tenant, knot_server)
    failure = await failure_of(
        add(routes_stub, tenant, domain.id, match="a b", priority=-1, action="bounce")
    )
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(failure.field_violations) == {"match", "priority", "action"}
    failure = await failure_of(
        add(routes_stub, tenant, domain.id, match="x@other.example", action="store")
    )
    assert "match" in failure.field_violations
    failure = await failure_of(
        add(routes_stub, tenant, domain.id, match="x", action="store", reject_text="no")
    )
    assert "rejectText" in failure.field_violations
    listed = await routes_stub.ListRoutes(
        routes_pb2.ListRoutesRequest(domain_id=domain.id), metadata=tenant.metadata
    )
    assert list(listed.routes) == []


async def test_webhook_and_forward_targets_are_checked_naming_the_field(
    domains_stub: DomainStub,
    routes_stub: RouteStub,
    tenant: Tenant,
    knot_server: KnotServer,
) -> None:
    # A webhook or forward route without a usable target is INVALID_ARGUMENT on that field.
    domain = await active_domain(domains_stub, tenant, knot_server)
    cases: list[tuple[dict[str, object], str]] = [
        ({"action": "webhook"}, "webhookId"),
        ({"action": "webhook", "webhook_id": "not-an-id"}, "webhookId"),
        ({"action": "webhook", "webhook_url": "https://hooks.example/in"}, "webhookUrl"),
        ({"action": "store", "webhook_id": "0" * 24}, "webhookId"),
        ({"action": "forward"}, "forwardTo"),
        ({"action": "forward", "forward_to": ["not-an-address"]}, "forwardTo[0]"),
        ({"action": "forward", "forward_to": [f"me@{domain.name}"]}, "forwardTo[0]"),
        ({"action": "forward", "forward_to": ["a@b.example", "A@b.example"]}, "forwardTo[1]"),
        ({"action": "forward", "forward_to": [f"a{i}@b.example" for i in range(11)]}, "forwardTo"),
        ({"action": "store", "forward_to": ["a@b.example"]}, "forwardTo"),
    ]
    for fields, field in cases:
        failure = await failure_of(add(routes_stub, tenant, domain.id, match="*", **fields))
        assert failure.code == grpc.StatusCode.INVALID_ARGUMENT, fields
        assert field in failure.field_violations, (fields, failure.field_violations)
    # A well-formed endpoint id is asked of the mail service (none in this test): UNAVAILABLE,
    # and nothing is written.
    failure = await failure_of(
        add(routes_stub, tenant, domain.id, match="*", action="webhook", webhook_id="0" * 24)
    )
    assert failure.code == grpc.StatusCode.UNAVAILABLE
    listed = await routes_stub.ListRoutes(
        routes_pb2.ListRoutesRequest(domain_id=domain.id), metadata=tenant.metadata
    )
    assert list(listed.routes) == []
    forward = await add(
        routes_stub,
        tenant,
        domain.id,
        match="team",
        action="forward",
        forward_to=["a@b.example", "c@d.example"],
    )
    got = await routes_stub.GetRoute(
        routes_pb2.GetRouteRequest(domain_id=domain.id, id=forward.id), metadata=tenant.metadata
    )
    assert list(got.forward_to) == ["a@b.example", "c@d.example"]


async def test_resolution_exact_pattern_catch_all_and_priority(
    domains_stub: DomainStub,
    routes_stub: RouteStub,
    tenant: Tenant,
    knot_server: KnotServer,
    inbound_token: tuple[tuple[str, str], ...],
) -> None:
    # The first route by priority whose match fits decides; local parts compare case-insensitively.
    domain = await active_domain(domains_stub, tenant, knot_server)
    exact = await add(
        routes_stub, tenant, domain.id, match=f"boss@{domain.name}", priority=1, action="store"
    )
    tickets = await add(
        routes_stub, tenant, domain.id, match="ticket-*", priority=5, action="store"
    )
    spam = await add(
        routes_stub,
        tenant,
        domain.id,
        match="*",
        priority=50,
        action="reject",
        reject_text="Go away",
    )
    found = await resolve(routes_stub, inbound_token, f"BOSS@{domain.name.upper()}")
    assert (found.tenant_id, found.domain_id, found.route.id) == (tenant.id, domain.id, exact.id)
    found = await resolve(routes_stub, inbound_token, f"Ticket-42@{domain.name}")
    assert found.route.id == tickets.id
    found = await resolve(routes_stub, inbound_token, f"anyone@{domain.name}")
    assert (found.route.id, found.route.reject_text) == (spam.id, "Go away")
    # "?" and "[" are not wildcards.
    await routes_stub.DeleteRoute(
        routes_pb2.DeleteRouteRequest(domain_id=domain.id, id=spam.id), metadata=tenant.metadata
    )
    await add(routes_stub, tenant, domain.id, match="a?c", action="store")
    failure = await failure_of(resolve(routes_stub, inbound_token, f"abc@{domain.name}"))
    assert (failure.code, failure.reason) == (grpc.StatusCode.NOT_FOUND, "NO_INBOUND_ROUTE")


async def test_unknown_pending_and_routeless_domains_resolve_to_nothing(
    domains_stub: DomainStub,
    routes_stub: RouteStub,
    tenant: Tenant,
    knot_server: KnotServer,
    inbound_token: tuple[tuple[str, str], ...],
) -> None:
    # No route: a domain not hosted here, a pending domain's routes, an active domain without any.
    pending = await domains_stub.CreateDomain(
        domain_pb2.CreateDomainRequest(name=unique_domain()), metadata=tenant.metadata
    )
    await add(routes_stub, tenant, pending.id, match="*", action="store")
    routeless = await active_domain(domains_stub, tenant, knot_server)
    for address in (
        "someone@not-hosted.example",
        f"someone@{pending.name}",
        f"someone@{routeless.name}",
    ):
        failure = await failure_of(resolve(routes_stub, inbound_token, address))
        assert (failure.code, failure.reason) == (grpc.StatusCode.NOT_FOUND, "NO_INBOUND_ROUTE")
    failure = await failure_of(resolve(routes_stub, inbound_token, "no-at-sign"))
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_resolution_is_internal_and_routes_are_per_tenant(
    domains_stub: DomainStub,
    routes_stub: RouteStub,
    tenant: Tenant,
    settings: Settings,
    knot_server: KnotServer,
) -> None:
    # Tenants cannot resolve recipients, nor see or change another tenant's routes.
    domain = await active_domain(domains_stub, tenant, knot_server)
    route = await add(routes_stub, tenant, domain.id, match="*", action="store")
    failure = await failure_of(resolve(routes_stub, tenant.metadata, f"x@{domain.name}"))
    assert failure.code == grpc.StatusCode.PERMISSION_DENIED
    other = new_tenant(settings)
    failure = await failure_of(
        routes_stub.GetRoute(
            routes_pb2.GetRouteRequest(domain_id=domain.id, id=route.id), metadata=other.metadata
        )
    )
    assert (failure.code, failure.reason) == (grpc.StatusCode.NOT_FOUND, "DOMAIN_NOT_FOUND")
    failure = await failure_of(add(routes_stub, other, domain.id, match="*", action="store"))
    assert failure.code == grpc.StatusCode.NOT_FOUND


async def test_deleting_a_domain_removes_its_routes(
    domains_stub: DomainStub,
    routes_stub: RouteStub,
    tenant: Tenant,
    knot_server: KnotServer,
    domain_app: DomainApp,
) -> None:
    # Routes go with their domain: none is left in the collection.
    domain = await active_domain(domains_stub, tenant, knot_server)
    for match in ("a", "b", "*"):
        await add(routes_stub, tenant, domain.id, match=match, action="store")
    routes = domain_app.running.database.db["inbound_routes"]
    assert await routes.count_documents({"domain_id": domain.id}) == 3
    await domains_stub.DeleteDomain(
        domain_pb2.DeleteDomainRequest(id=domain.id), metadata=tenant.metadata
    )
    assert await routes.count_documents({"domain_id": domain.id}) == 0
