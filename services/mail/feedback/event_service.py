"""gRPC servicer of azora.mail.v1.EventService, and the event document's proto/JSON form."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import grpc
from azora.mail.v1 import events_pb2, events_pb2_grpc

from services.core.context import current_principal
from services.core.mongo import Document
from services.core.protobuf import from_timestamp, to_timestamp
from services.mail.feedback.event_log import metadata_of
from services.mail.feedback.event_store import EventFilter, EventStore

Context = grpc.aio.ServicerContext[Any, Any]


def event_to_proto(doc: Document) -> events_pb2.Event:
    """The API form of an event document (field names of the events contract)."""
    occurred: datetime = doc["occurredAt"]
    event = events_pb2.Event(
        id=doc["_id"],
        type=doc["type"],
        occurred_at=to_timestamp(occurred if occurred.tzinfo else occurred.replace(tzinfo=UTC)),
        tenant_id=doc["tenantId"],
        email_id=doc.get("emailId", ""),
        recipient=doc.get("recipient", ""),
        domain=doc.get("domain", ""),
        tags=doc.get("tags", []),
        metadata=metadata_of(doc),
        reason=doc.get("reason", ""),
        webhook_id=doc.get("webhookId", ""),
        test=bool(doc.get("test", False)),
    )
    smtp = doc.get("smtp")
    if smtp:
        event.smtp.CopyFrom(
            events_pb2.EventSmtpReply(
                code=int(smtp.get("code", 0)),
                enhanced_code=smtp.get("enhancedCode", ""),
                message=smtp.get("message", ""),
            )
        )
    return event


class EventServicer(events_pb2_grpc.EventServiceServicer):
    """EventService over an `EventStore`."""

    def __init__(self, store: EventStore) -> None:
        self._store = store

    async def ListEvents(
        self, request: events_pb2.ListEventsRequest, context: Context
    ) -> events_pb2.ListEventsResponse:
        """See the proto."""
        page = await self._store.page(
            tenant_id=current_principal().tenant_id,
            filter=EventFilter(
                type=request.type,
                email_id=request.email_id,
                recipient=request.recipient,
                domain=request.domain,
                tag=request.tag,
                start=from_timestamp(request.start_time)
                if request.HasField("start_time")
                else None,
                end=from_timestamp(request.end_time) if request.HasField("end_time") else None,
            ),
            size=request.page_size,
            page_token=request.page_token,
        )
        return events_pb2.ListEventsResponse(
            events=[event_to_proto(e) for e in page.events],
            next_page_token=page.next_page_token,
        )
