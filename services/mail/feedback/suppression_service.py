"""gRPC servicer of azora.mail.v1.SuppressionService: translates, calls the list, translates."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import grpc
from azora.mail.v1 import suppressions_pb2, suppressions_pb2_grpc
from google.protobuf import empty_pb2

from services.core.context import current_principal
from services.core.protobuf import from_timestamp, to_timestamp
from services.mail.feedback.suppression_store import Suppression, SuppressionList

Context = grpc.aio.ServicerContext[Any, Any]


def _utc(at: datetime | None) -> datetime | None:
    return at if at is None or at.tzinfo else at.replace(tzinfo=UTC)


def suppression_to_proto(entry: Suppression) -> suppressions_pb2.Suppression:
    """The API form of an entry."""
    return suppressions_pb2.Suppression(
        address=entry.address,
        domain=entry.domain,
        reason=entry.reason.value,
        event_id=entry.event_id,
        create_time=to_timestamp(_utc(entry.created_at)),
        expire_time=to_timestamp(_utc(entry.expires_at)),
        detail=entry.detail,
    )


class SuppressionServicer(suppressions_pb2_grpc.SuppressionServiceServicer):
    """SuppressionService over a `SuppressionList`."""

    def __init__(self, suppressions: SuppressionList) -> None:
        self._list = suppressions

    async def ListSuppressions(
        self, request: suppressions_pb2.ListSuppressionsRequest, context: Context
    ) -> suppressions_pb2.ListSuppressionsResponse:
        """See the proto."""
        page = await self._list.page(
            tenant_id=current_principal().tenant_id,
            reason=request.reason,
            domain=request.domain,
            address_prefix=request.address_prefix,
            size=request.page_size,
            page_token=request.page_token,
        )
        return suppressions_pb2.ListSuppressionsResponse(
            suppressions=[suppression_to_proto(e) for e in page.suppressions],
            next_page_token=page.next_page_token,
        )

    async def AddSuppressions(
        self, request: suppressions_pb2.AddSuppressionsRequest, context: Context
    ) -> suppressions_pb2.AddSuppressionsResponse:
        """See the proto."""
        entries, added = await self._list.add(
            tenant_id=current_principal().tenant_id,
            addresses=list(request.addresses),
            expires_at=from_timestamp(request.expire_time)
            if request.HasField("expire_time")
            else None,
        )
        return suppressions_pb2.AddSuppressionsResponse(
            suppressions=[suppression_to_proto(e) for e in entries], added_count=added
        )

    async def GetSuppression(
        self, request: suppressions_pb2.GetSuppressionRequest, context: Context
    ) -> suppressions_pb2.Suppression:
        """See the proto."""
        entry = await self._list.get(
            tenant_id=current_principal().tenant_id, address=request.address
        )
        return suppression_to_proto(entry)

    async def DeleteSuppression(
        self, request: suppressions_pb2.DeleteSuppressionRequest, context: Context
    ) -> empty_pb2.Empty:
        """See the proto."""
        await self._list.delete(tenant_id=current_principal().tenant_id, address=request.address)
        return empty_pb2.Empty()
