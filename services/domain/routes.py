"""Inbound routes of a domain: what happens to mail that arrives for its addresses.

The domain service owns routes (collection ``inbound_routes``, written only here) because a
route belongs to a domain and is resolved together with the domain's status: the inbound SMTP
server asks `RouteManager.resolve` at RCPT, and an address is accepted only if its domain is
ACTIVE here and one of the domain's routes matches it.

A ``webhook`` route names one of the tenant's webhook endpoints (owned by the mail service,
asked through `WebhookEndpoints` when the route is written), so the endpoint's URL, secrets,
delivery log and replay serve routed messages as they serve events. A ``forward`` route lists
1 to `MAX_FORWARD_TO` addresses, none at its own domain (that would route the message here
again).

A route's ``match`` is a whole address of the domain, a local part in which ``*`` stands for any
run of characters, or ``*`` alone (catch-all). Routes are tried by ``priority`` (lowest first),
then by creation (oldest first: ids are time-ordered); the first match decides. A domain has at
most `MAX_ROUTES_PER_DOMAIN` routes, so resolving reads one index-served, bounded list.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Protocol

from pymongo import ASCENDING
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from services.core.clock import Clock
from services.core.dns_names import normalize_domain_name
from services.core.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PreconditionViolation,
    ResourceExhausted,
)
from services.core.ids import check_id, new_id
from services.core.mongo import IndexSpec, chunked
from services.domain.models import Domain, DomainStatus
from services.domain.webhook_endpoints import EndpointState, WebhookEndpoints

Document = dict[str, Any]
log = logging.getLogger(__name__)

ROUTES = "inbound_routes"
CLAIMS = "domain_claims"  # name -> domain of the tenant that proved ownership (repository.py)
INDEXES = (IndexSpec(ROUTES, [("domain_id", ASCENDING), ("_id", ASCENDING)], "route_domain"),)
MAX_ROUTES_PER_DOMAIN = 100
MAX_PRIORITY = 10_000
DEFAULT_REJECT_TEXT = "Recipient rejected"
ACTIONS = ("store", "reject", "forward", "webhook")
MAX_FORWARD_TO = 10
_LOCAL_PATTERN = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}$")
_PRINTABLE = re.compile(r"^[\x20-\x7e]*$")


@dataclass(frozen=True, slots=True)
class Route:
    """One route of a domain (see the module docstring for `match`)."""

    id: str
    tenant_id: str
    domain_id: str
    match: str
    priority: int
    action: str
    forward_to: tuple[str, ...]
    webhook_url: str
    reject_text: str
    description: str
    created_at: datetime
    updated_at: datetime
    webhook_id: str = ""

    def matches(self, local_part: str, address: str) -> bool:
        """Whether the route applies to `address` (local part `local_part`)."""
        if "@" in self.match:
            return self.match.lower() == address.lower()
        # fnmatchcase with only "*" meaningful: "?" and "[" are escaped away.
        pattern = self.match.lower().replace("[", "[[]").replace("?", "[?]")
        return fnmatch.fnmatchcase(local_part.lower(), pattern)


@dataclass(frozen=True, slots=True)
class RouteInput:
    """What a client sets on a route."""

    match: str
    priority: int
    action: str
    forward_to: tuple[str, ...]
    webhook_url: str
    reject_text: str
    description: str
    webhook_id: str = ""


@dataclass(frozen=True, slots=True)
class Resolution:
    """Whose an inbound address is and which route takes it."""

    tenant_id: str
    domain_id: str
    domain_name: str
    route: Route


class RouteRepository(Protocol):
    """Storage of routes."""

    async def list(self, *, domain_id: str) -> list[Route]:
        """Every route of the domain, in no particular order."""
        ...

    async def insert(self, *, route: Route) -> None:
        """Store a new route."""
        ...

    async def replace(self, *, route: Route) -> bool:
        """Overwrite a route; False if it no longer exists."""
        ...

    async def delete(self, *, domain_id: str, route_id: str) -> bool:
        """Remove a route; False if there was none."""
        ...

    async def delete_domain(self, *, domain_id: str) -> int:
        """Remove every route of a domain; return how many."""
        ...


class DomainLookup(Protocol):
    """The domain data routes depend on (the domain repository and claims)."""

    async def get(self, *, tenant_id: str, domain_id: str) -> Domain:
        """One of the tenant's domains.

        Raises:
            NotFound: no such domain in this tenant.
        """
        ...

    async def active_by_name(self, *, name: str) -> Domain | None:
        """The ACTIVE domain called `name` (A-label), of whichever tenant holds its claim."""
        ...


class MongoRouteRepository:
    """`RouteRepository` on MongoDB; every query is by ``_id`` or by the domain index."""

    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self._routes = db[ROUTES]

    async def list(self, *, domain_id: str) -> list[Route]:
        """See `RouteRepository.list`."""
        cursor = self._routes.find({"domain_id": domain_id}).limit(MAX_ROUTES_PER_DOMAIN + 1)
        return [_from_doc(doc) async for doc in cursor]

    async def insert(self, *, route: Route) -> None:
        """See `RouteRepository.insert`."""
        await self._routes.insert_one(_to_doc(route))

    async def replace(self, *, route: Route) -> bool:
        """See `RouteRepository.replace`."""
        result = await self._routes.replace_one({"_id": route.id}, _to_doc(route))
        return result.matched_count == 1

    async def delete(self, *, domain_id: str, route_id: str) -> bool:
        """See `RouteRepository.delete`."""
        result = await self._routes.delete_one({"_id": route_id})
        return result.deleted_count == 1

    async def delete_domain(self, *, domain_id: str) -> int:
        """See `RouteRepository.delete_domain`.

        The ids are read through the domain index and deleted by ``_id`` in commands of at most
        `MAX_WRITE_BATCH` (a filtered delete_many would read the whole collection on FerretDB).
        """
        cursor = self._routes.find({"domain_id": domain_id}, {"_id": True})
        ids = [doc["_id"] async for doc in cursor]
        deleted = 0
        for batch in chunked(ids):
            result = await self._routes.delete_many({"_id": {"$in": list(batch)}})
            deleted += result.deleted_count
        return deleted


class MongoDomainLookup:
    """`DomainLookup` over the domain collections (reads only; the domain repository writes)."""

    def __init__(self, db: AsyncDatabase[Document], domains: Any) -> None:
        self._claims = db[CLAIMS]
        self._domains = domains

    async def get(self, *, tenant_id: str, domain_id: str) -> Domain:
        """See `DomainLookup.get`."""
        domain: Domain = await self._domains.get(tenant_id=tenant_id, domain_id=domain_id)
        return domain

    async def active_by_name(self, *, name: str) -> Domain | None:
        """See `DomainLookup.active_by_name`."""
        claim = await self._claims.find_one({"_id": name})
        if claim is None:
            return None
        domain: Domain | None = await self._domains.get_any(domain_id=claim["domain_id"])
        if domain is None or domain.status is not DomainStatus.ACTIVE:
            return None
        return domain


class RouteManager:
    """Use cases of routes: CRUD within a tenant's domain, and resolution of inbound addresses."""

    def __init__(
        self,
        *,
        routes: RouteRepository,
        domains: DomainLookup,
        endpoints: WebhookEndpoints,
        clock: Clock,
    ) -> None:
        self._routes = routes
        self._domains = domains
        self._endpoints = endpoints
        self._clock = clock

    async def list(self, *, tenant_id: str, domain_id: str) -> list[Route]:
        """The domain's routes in the order they are tried.

        Raises:
            InvalidArgument: malformed domain id.
            NotFound: no such domain in this tenant.
        """
        domain = await self._domain(tenant_id, domain_id)
        return _ordered(await self._routes.list(domain_id=domain.id))

    async def get(self, *, tenant_id: str, domain_id: str, route_id: str) -> Route:
        """One route.

        Raises:
            InvalidArgument: malformed id.
            NotFound: no such domain in this tenant, or no such route in the domain.
        """
        domain = await self._domain(tenant_id, domain_id)
        check_id(route_id)
        for route in await self._routes.list(domain_id=domain.id):
            if route.id == route_id:
                return route
        raise NotFound("InboundRoute", route_id)

    async def create(self, *, tenant_id: str, domain_id: str, data: RouteInput) -> Route:
        """Add a route.

        Raises:
            InvalidArgument: a field is malformed (each named), or the webhook endpoint is not
                one of the tenant's.
            FailedPrecondition: INBOUND_ACTION_NOT_AVAILABLE (the webhook endpoint is disabled).
            NotFound: no such domain in this tenant.
            ResourceExhausted: the domain has `MAX_ROUTES_PER_DOMAIN` routes.
            Unavailable: the mail service could not say whether the endpoint exists.
        """
        domain = await self._domain(tenant_id, domain_id)
        data = _validated(data, domain)
        await self._check_endpoint(tenant_id, data)
        if len(await self._routes.list(domain_id=domain.id)) >= MAX_ROUTES_PER_DOMAIN:
            raise ResourceExhausted(
                f"a domain has at most {MAX_ROUTES_PER_DOMAIN} routes",
                retry_after_seconds=0,
                reason="TOO_MANY_ROUTES",
            )
        now = self._clock.now()
        route = Route(
            id=new_id(),
            tenant_id=tenant_id,
            domain_id=domain.id,
            created_at=now,
            updated_at=now,
            **_fields(data),
        )
        await self._routes.insert(route=route)
        return route

    async def update(
        self, *, tenant_id: str, domain_id: str, route_id: str, data: RouteInput
    ) -> Route:
        """Replace a route's settings.

        Raises:
            InvalidArgument, FailedPrecondition, NotFound, Unavailable: as `create` and `get`.
        """
        current = await self.get(tenant_id=tenant_id, domain_id=domain_id, route_id=route_id)
        domain = await self._domain(tenant_id, domain_id)
        data = _validated(data, domain)
        await self._check_endpoint(tenant_id, data)
        route = replace(current, updated_at=self._clock.now(), **_fields(data))
        if not await self._routes.replace(route=route):
            raise NotFound("InboundRoute", route_id)
        return route

    async def delete(self, *, tenant_id: str, domain_id: str, route_id: str) -> None:
        """Remove a route.

        Raises:
            InvalidArgument, NotFound: as `get`.
        """
        await self.get(tenant_id=tenant_id, domain_id=domain_id, route_id=route_id)
        if not await self._routes.delete(domain_id=domain_id, route_id=route_id):
            raise NotFound("InboundRoute", route_id)

    async def purge_domain(self, domain: Domain) -> None:
        """A `DomainDeletedHook`: a deleted domain's routes go with it (nothing is left over).

        Never fails the deletion, which has happened: routes left behind by a database error
        are unreachable (a domain registered again gets a new id) and are logged.
        """
        try:
            await self._routes.delete_domain(domain_id=domain.id)
        except PyMongoError:
            log.warning(
                "routes of a deleted domain not removed",
                extra={"fields": {"domain_id": domain.id}},
                exc_info=True,
            )

    async def resolve(self, *, address: str) -> Resolution:
        """The route of an inbound recipient, across tenants.

        Raises:
            InvalidArgument: `address` is not an address.
            NotFound: NO_INBOUND_ROUTE (domain not hosted, not active, or no route matches).
        """
        local, at, raw_domain = address.strip().rpartition("@")
        if not at or not local or not raw_domain:
            raise InvalidArgument.single("address", "must be an address (local@domain)")
        name, _ = normalize_domain_name(raw_domain, field="address")
        domain = await self._domains.active_by_name(name=name)
        if domain is not None:
            normalized = f"{local.lower()}@{name}"
            for route in _ordered(await self._routes.list(domain_id=domain.id)):
                if route.matches(local, normalized):
                    return Resolution(domain.tenant_id, domain.id, domain.name, route)
        raise NotFound("InboundRecipient", address, reason="NO_INBOUND_ROUTE")

    async def _check_endpoint(self, tenant_id: str, data: RouteInput) -> None:
        """A webhook route's endpoint must be an enabled endpoint of the tenant."""
        if data.action != "webhook":
            return
        state = await self._endpoints.state(tenant_id=tenant_id, webhook_id=data.webhook_id)
        if state is EndpointState.MISSING:
            raise InvalidArgument.single(
                "webhook_id",
                "is not a webhook endpoint of yours (create one: POST /api/v1/webhooks)",
            )
        if state is EndpointState.DISABLED:
            raise FailedPrecondition(
                "the webhook endpoint is disabled; enable it before routing mail to it",
                reason="INBOUND_ACTION_NOT_AVAILABLE",
                violations=[
                    PreconditionViolation(
                        "WEBHOOK_DISABLED", "webhook_id", "the webhook endpoint is disabled"
                    )
                ],
                metadata={"action": data.action, "webhookId": data.webhook_id},
            )

    async def _domain(self, tenant_id: str, domain_id: str) -> Domain:
        return await self._domains.get(
            tenant_id=tenant_id, domain_id=check_id(domain_id, field="domain_id")
        )


def _ordered(routes: list[Route]) -> list[Route]:
    return sorted(routes, key=lambda r: (r.priority, r.id))


def _fields(data: RouteInput) -> dict[str, Any]:
    return {
        "match": data.match,
        "priority": data.priority,
        "action": data.action,
        "forward_to": data.forward_to,
        "webhook_url": data.webhook_url,
        "reject_text": data.reject_text,
        "description": data.description,
        "webhook_id": data.webhook_id,
    }


def _forward_problems(addresses: tuple[str, ...], domain: Domain) -> list[FieldViolation]:
    """What is wrong with a forward route's addresses (each named by its index)."""
    if not addresses:
        return [FieldViolation("forward_to", "at least one address is required for forward")]
    if len(addresses) > MAX_FORWARD_TO:
        return [FieldViolation("forward_to", f"at most {MAX_FORWARD_TO} addresses")]
    problems: list[FieldViolation] = []
    seen: set[str] = set()
    for index, address in enumerate(addresses):
        name = f"forward_to[{index}]"
        local, at, raw_domain = address.rpartition("@")
        try:
            domain_name, _ = normalize_domain_name(raw_domain, field=name) if at else ("", "")
        except InvalidArgument:
            domain_name = ""
        if not at or not _LOCAL_PATTERN.match(local) or not domain_name:
            problems.append(FieldViolation(name, "is not an address (local@domain)"))
        elif domain_name == domain.name:
            problems.append(
                FieldViolation(name, f"is at {domain.name} itself: the message would come back")
            )
        elif f"{local.lower()}@{domain_name}" in seen:
            problems.append(FieldViolation(name, "is repeated"))
        seen.add(f"{local.lower()}@{domain_name}")
    return problems


def _validated(data: RouteInput, domain: Domain) -> RouteInput:
    """`data` checked, with the domain of an address match as an A-label and defaults filled in.

    Raises:
        InvalidArgument: every malformed field, named.
    """
    problems: list[FieldViolation] = []
    match = data.match.strip()
    if not match:
        problems.append(FieldViolation("match", "is required"))
    elif "@" in match:
        local, _, raw_domain = match.rpartition("@")
        try:
            name, _ = normalize_domain_name(raw_domain, field="match")
        except InvalidArgument:
            name = ""
        if not _LOCAL_PATTERN.match(local) or "*" in local:
            problems.append(FieldViolation("match", "is not an address"))
        elif name != domain.name:
            problems.append(FieldViolation("match", f"must be an address of {domain.name}"))
        else:
            match = f"{local}@{name}"
    elif not _LOCAL_PATTERN.match(match):
        problems.append(FieldViolation("match", "must be an address, a local part (with *), or *"))
    priority = data.priority
    if not 0 <= priority <= MAX_PRIORITY:
        problems.append(FieldViolation("priority", f"must be 0 to {MAX_PRIORITY}"))
    if data.action not in ACTIONS:
        problems.append(FieldViolation("action", f"must be one of {', '.join(ACTIONS)}"))
    if data.action != "reject" and data.reject_text:
        problems.append(FieldViolation("reject_text", "only for the reject action"))
    if data.action != "forward" and data.forward_to:
        problems.append(FieldViolation("forward_to", "only for the forward action"))
    if data.action != "webhook" and data.webhook_id:
        problems.append(FieldViolation("webhook_id", "only for the webhook action"))
    if data.webhook_url:
        problems.append(
            FieldViolation(
                "webhook_url",
                "is not used: name one of your webhook endpoints with webhookId instead",
            )
        )
    if data.action == "forward":
        problems.extend(_forward_problems(data.forward_to, domain))
    if data.action == "webhook":
        if not data.webhook_id:
            problems.append(FieldViolation("webhook_id", "is required for the webhook action"))
        else:
            try:
                check_id(data.webhook_id, field="webhook_id")
            except InvalidArgument as exc:
                problems.extend(exc.violations)
    reject_text = data.reject_text
    if data.action == "reject":
        if len(reject_text) > 200 or not _PRINTABLE.match(reject_text):
            problems.append(FieldViolation("reject_text", "at most 200 printable ASCII characters"))
        reject_text = reject_text.strip() or DEFAULT_REJECT_TEXT
    if len(data.description) > 200:
        problems.append(FieldViolation("description", "at most 200 characters"))
    if problems:
        raise InvalidArgument(problems)
    return replace(data, match=match, reject_text=reject_text)


def _to_doc(route: Route) -> Document:
    return {
        "_id": route.id,
        "tenant_id": route.tenant_id,
        "domain_id": route.domain_id,
        "match": route.match,
        "priority": route.priority,
        "action": route.action,
        "forward_to": list(route.forward_to),
        "webhook_url": route.webhook_url,
        "reject_text": route.reject_text,
        "description": route.description,
        "webhook_id": route.webhook_id,
        "created_at": route.created_at,
        "updated_at": route.updated_at,
    }


def _from_doc(doc: Document) -> Route:
    return Route(
        id=doc["_id"],
        tenant_id=doc["tenant_id"],
        domain_id=doc["domain_id"],
        match=doc["match"],
        priority=int(doc["priority"]),
        action=doc["action"],
        forward_to=tuple(doc.get("forward_to") or ()),
        webhook_url=doc.get("webhook_url", ""),
        reject_text=doc.get("reject_text", ""),
        description=doc.get("description", ""),
        webhook_id=doc.get("webhook_id", ""),
        created_at=doc["created_at"],
        updated_at=doc["updated_at"],
    )


__all__ = [
    "INDEXES",
    "MongoDomainLookup",
    "MongoRouteRepository",
    "Resolution",
    "Route",
    "RouteInput",
    "RouteManager",
]
