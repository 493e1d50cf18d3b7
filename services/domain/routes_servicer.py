"""gRPC servicer of azora.domain.v1.RouteService: translates, calls the manager, translates."""

from __future__ import annotations

from typing import Any

import grpc
from azora.domain.v1 import routes_pb2, routes_pb2_grpc
from google.protobuf import empty_pb2

from services.core.context import current_principal
from services.core.protobuf import to_timestamp
from services.domain.routes import Route, RouteInput, RouteManager

Context = grpc.aio.ServicerContext[Any, Any]


def route_to_proto(route: Route) -> routes_pb2.Route:
    """The API form of a route."""
    return routes_pb2.Route(
        id=route.id,
        domain_id=route.domain_id,
        match=route.match,
        priority=route.priority,
        action=route.action,
        forward_to=list(route.forward_to),
        webhook_url=route.webhook_url,
        reject_text=route.reject_text,
        description=route.description,
        webhook_id=route.webhook_id,
        create_time=to_timestamp(route.created_at),
        update_time=to_timestamp(route.updated_at),
    )


def route_input(route: routes_pb2.CreateRouteRequest | routes_pb2.UpdateRouteRequest) -> RouteInput:
    """What the client set."""
    return RouteInput(
        match=route.match,
        priority=route.priority,
        action=route.action,
        forward_to=tuple(route.forward_to),
        webhook_url=route.webhook_url,
        reject_text=route.reject_text,
        description=route.description,
        webhook_id=route.webhook_id,
    )


class RouteServicer(routes_pb2_grpc.RouteServiceServicer):
    """RouteService over a `RouteManager`."""

    def __init__(self, manager: RouteManager) -> None:
        self._manager = manager

    async def ListRoutes(
        self, request: routes_pb2.ListRoutesRequest, context: Context
    ) -> routes_pb2.ListRoutesResponse:
        """See the proto."""
        routes = await self._manager.list(
            tenant_id=current_principal().tenant_id, domain_id=request.domain_id
        )
        return routes_pb2.ListRoutesResponse(routes=[route_to_proto(r) for r in routes])

    async def CreateRoute(
        self, request: routes_pb2.CreateRouteRequest, context: Context
    ) -> routes_pb2.Route:
        """See the proto."""
        route = await self._manager.create(
            tenant_id=current_principal().tenant_id,
            domain_id=request.domain_id,
            data=route_input(request),
        )
        return route_to_proto(route)

    async def GetRoute(
        self, request: routes_pb2.GetRouteRequest, context: Context
    ) -> routes_pb2.Route:
        """See the proto."""
        route = await self._manager.get(
            tenant_id=current_principal().tenant_id,
            domain_id=request.domain_id,
            route_id=request.id,
        )
        return route_to_proto(route)

    async def UpdateRoute(
        self, request: routes_pb2.UpdateRouteRequest, context: Context
    ) -> routes_pb2.Route:
        """See the proto."""
        route = await self._manager.update(
            tenant_id=current_principal().tenant_id,
            domain_id=request.domain_id,
            route_id=request.id,
            data=route_input(request),
        )
        return route_to_proto(route)

    async def DeleteRoute(
        self, request: routes_pb2.DeleteRouteRequest, context: Context
    ) -> empty_pb2.Empty:
        """See the proto."""
        await self._manager.delete(
            tenant_id=current_principal().tenant_id,
            domain_id=request.domain_id,
            route_id=request.id,
        )
        return empty_pb2.Empty()

    async def ResolveInboundRecipient(
        self, request: routes_pb2.ResolveInboundRecipientRequest, context: Context
    ) -> routes_pb2.InboundRecipient:
        """See the proto."""
        found = await self._manager.resolve(address=request.address)
        return routes_pb2.InboundRecipient(
            tenant_id=found.tenant_id,
            domain_id=found.domain_id,
            domain_name=found.domain_name,
            route=route_to_proto(found.route),
        )


__all__ = ["RouteServicer", "route_input", "route_to_proto"]
