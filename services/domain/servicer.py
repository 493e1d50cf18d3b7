"""gRPC servicer of azora.domain.v1.DomainService: translates, calls the manager, translates."""

from __future__ import annotations

from typing import Any

import grpc
from azora.domain.v1 import domain_pb2, domain_pb2_grpc
from google.api import httpbody_pb2
from google.protobuf import empty_pb2

from services.core.context import current_principal
from services.core.errors import InvalidArgument
from services.domain import mapping
from services.domain.manager import DomainManager
from services.domain.models import DomainStatus

Context = grpc.aio.ServicerContext[Any, Any]


class DomainServicer(domain_pb2_grpc.DomainServiceServicer):
    """DomainService over a `DomainManager`."""

    def __init__(self, manager: DomainManager) -> None:
        self._manager = manager

    async def ListDomains(
        self, request: domain_pb2.ListDomainsRequest, context: Context
    ) -> domain_pb2.ListDomainsResponse:
        """See the proto."""
        try:
            status = mapping.status_from_proto(request.status)
        except ValueError:
            raise InvalidArgument.single("status", "unknown status") from None
        page = await self._manager.list(
            tenant_id=current_principal().tenant_id,
            status=status,
            size=request.page_size,
            page_token=request.page_token,
        )
        return domain_pb2.ListDomainsResponse(
            domains=[mapping.domain_to_proto(d, self._manager.policy) for d in page.domains],
            next_page_token=page.next_page_token,
            total_size=page.total_size,
        )

    async def CreateDomain(
        self, request: domain_pb2.CreateDomainRequest, context: Context
    ) -> domain_pb2.Domain:
        """See the proto."""
        domain = await self._manager.create(
            tenant_id=current_principal().tenant_id, name=request.name
        )
        return mapping.domain_to_proto(domain, self._manager.policy)

    async def GetDomain(
        self, request: domain_pb2.GetDomainRequest, context: Context
    ) -> domain_pb2.Domain:
        """See the proto."""
        domain = await self._manager.get(
            tenant_id=current_principal().tenant_id, domain_id=request.id
        )
        return mapping.domain_to_proto(domain, self._manager.policy)

    async def UpdateDnsRecords(
        self, request: domain_pb2.UpdateDnsRecordsRequest, context: Context
    ) -> domain_pb2.Domain:
        """See the proto."""
        domain = await self._manager.replace_records(
            tenant_id=current_principal().tenant_id,
            domain_id=request.id,
            records=mapping.records_from_proto(request.records),
        )
        return mapping.domain_to_proto(domain, self._manager.policy)

    async def VerifyDomain(
        self, request: domain_pb2.VerifyDomainRequest, context: Context
    ) -> domain_pb2.VerifyDomainResponse:
        """See the proto."""
        domain, check = await self._manager.verify(
            tenant_id=current_principal().tenant_id, domain_id=request.id
        )
        return domain_pb2.VerifyDomainResponse(
            domain=mapping.domain_to_proto(domain, self._manager.policy),
            check=mapping.check_to_proto(check),
            verified=domain.status is DomainStatus.ACTIVE,
        )

    async def DeleteDomain(
        self, request: domain_pb2.DeleteDomainRequest, context: Context
    ) -> empty_pb2.Empty:
        """See the proto."""
        await self._manager.delete(tenant_id=current_principal().tenant_id, domain_id=request.id)
        return empty_pb2.Empty()

    async def ExportZoneFile(
        self, request: domain_pb2.ExportZoneFileRequest, context: Context
    ) -> httpbody_pb2.HttpBody:
        """See the proto."""
        text = await self._manager.zone_file(
            tenant_id=current_principal().tenant_id, domain_id=request.id
        )
        return httpbody_pb2.HttpBody(content_type="text/dns; charset=utf-8", data=text.encode())
