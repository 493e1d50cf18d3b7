"""gRPC servicer of azora.mail.v1.InboundService, and the parsed view of a received message."""

from __future__ import annotations

from typing import Any

import grpc
from azora.mail.v1 import inbound_pb2, inbound_pb2_grpc
from google.api import httpbody_pb2

from services.core.context import current_principal
from services.core.protobuf import to_timestamp
from services.mail.inbound.bounce_mailbox import BounceMailbox
from services.mail.inbound.parsed import parse_message
from services.mail.inbound.store import (
    Authentication,
    InboundRecord,
    InboundStore,
    Outcome,
    Received,
)

Context = grpc.aio.ServicerContext[Any, Any]


def authentication_from_proto(auth: inbound_pb2.AuthenticationResults) -> Authentication:
    """The checks as the inbound server reported them ("none" where it said nothing)."""
    return Authentication(
        spf=auth.spf or "none",
        spf_domain=auth.spf_domain,
        dkim=auth.dkim or "none",
        dkim_domains=tuple(auth.dkim_domains),
        dmarc=auth.dmarc or "none",
        from_domain=auth.from_domain,
        header=auth.header,
    )


def record_to_proto(
    record: InboundRecord, *, parsed: bool, outcome: Outcome | None = None
) -> inbound_pb2.InboundMessage:
    """The API form; `parsed` adds headers, bodies and attachments (one message only)."""
    r, auth = record.received, record.received.authentication
    outcome = outcome or Outcome(record.outcome)
    out = inbound_pb2.InboundMessage(
        id=record.id,
        domain_id=r.domain_id,
        envelope_from=r.envelope_from,
        recipient=r.recipient,
        route_id=r.route_id,
        action=r.action,
        outcome=outcome.outcome,
        outcome_detail=outcome.detail,
        webhook_id=r.webhook_id,
        webhook_delivery_id=record.webhook_delivery_id,
        forward_email_id=record.forward_email_id,
        forward_to=list(r.forward_to),
        client_address=r.client_address,
        helo=r.helo,
        authentication=inbound_pb2.AuthenticationResults(
            spf=auth.spf,
            spf_domain=auth.spf_domain,
            dkim=auth.dkim,
            dkim_domains=list(auth.dkim_domains),
            dmarc=auth.dmarc,
            from_domain=auth.from_domain,
            header=auth.header,
        ),
        size_bytes=record.size,
        receive_time=to_timestamp(record.received_at),
        expire_time=to_timestamp(record.expire_at),
    )
    if not parsed:
        return out
    message = parse_message(record.content)
    setattr(out, "from", message.from_address)
    out.to.extend(message.to)
    out.cc.extend(message.cc)
    out.subject = message.subject
    out.message_id = message.message_id
    for name, value in message.headers:
        out.headers.append(inbound_pb2.InboundHeader(name=name, value=value))
    out.text = message.text
    out.html = message.html
    for attachment in message.attachments:
        out.attachments.append(
            inbound_pb2.InboundAttachment(
                filename=attachment.filename,
                content_type=attachment.content_type,
                size_bytes=len(attachment.content),
            )
        )
    return out


class InboundServicer(inbound_pb2_grpc.InboundServiceServicer):
    """InboundService over an `InboundStore` and the bounce mailbox."""

    def __init__(self, store: InboundStore, mailbox: BounceMailbox) -> None:
        self._store = store
        self._mailbox = mailbox

    async def ListInboundMessages(
        self, request: inbound_pb2.ListInboundMessagesRequest, context: Context
    ) -> inbound_pb2.ListInboundMessagesResponse:
        """See the proto."""
        page = await self._store.list(
            tenant_id=current_principal().tenant_id,
            size=request.page_size,
            page_token=request.page_token,
        )
        return inbound_pb2.ListInboundMessagesResponse(
            messages=[
                record_to_proto(r, parsed=False, outcome=page.outcomes.get(r.id))
                for r in page.records
            ],
            next_page_token=page.next_page_token,
        )

    async def GetInboundMessage(
        self, request: inbound_pb2.GetInboundMessageRequest, context: Context
    ) -> inbound_pb2.InboundMessage:
        """See the proto."""
        record = await self._store.get(
            tenant_id=current_principal().tenant_id, record_id=request.id
        )
        outcomes = await self._store.outcomes([record])
        return record_to_proto(record, parsed=True, outcome=outcomes.get(record.id))

    async def GetInboundMessageRaw(
        self, request: inbound_pb2.GetInboundMessageRawRequest, context: Context
    ) -> httpbody_pb2.HttpBody:
        """See the proto."""
        record = await self._store.get(
            tenant_id=current_principal().tenant_id, record_id=request.id
        )
        return httpbody_pb2.HttpBody(content_type="message/rfc822", data=record.content)

    async def StoreInboundMessage(
        self, request: inbound_pb2.StoreInboundMessageRequest, context: Context
    ) -> inbound_pb2.InboundMessage:
        """See the proto."""
        record = await self._store.store(
            tenant_id=current_principal().tenant_id,
            received=Received(
                raw=request.raw_message,
                added_headers=request.added_headers,
                envelope_from=request.envelope_from,
                recipient=request.recipient,
                domain_id=request.domain_id,
                route_id=request.route_id,
                action=request.action,
                client_address=request.client_address,
                helo=request.helo,
                authentication=authentication_from_proto(request.authentication),
                webhook_id=request.webhook_id,
                forward_to=tuple(request.forward_to),
            ),
        )
        outcomes = await self._store.outcomes([record])
        return record_to_proto(record, parsed=False, outcome=outcomes.get(record.id))

    async def ReceiveBounceMessage(
        self, request: inbound_pb2.ReceiveBounceMessageRequest, context: Context
    ) -> inbound_pb2.InboundMessage:
        """See the proto. The tenant comes from the return path, not from the caller's token."""
        record = await self._mailbox.receive(
            Received(
                raw=request.raw_message,
                added_headers=request.added_headers,
                envelope_from=request.envelope_from,
                recipient=request.recipient,
                domain_id="",
                route_id="",
                action="",
                client_address=request.client_address,
                helo=request.helo,
                authentication=authentication_from_proto(request.authentication),
            )
        )
        outcomes = await self._store.outcomes([record])
        return record_to_proto(record, parsed=False, outcome=outcomes.get(record.id))


__all__ = ["InboundServicer", "record_to_proto"]
