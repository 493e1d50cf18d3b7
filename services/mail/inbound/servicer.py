"""gRPC servicer of azora.mail.v1.InboundService, and the parsed view of a received message."""

from __future__ import annotations

from email import policy
from email.headerregistry import AddressHeader
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any

import grpc
from azora.mail.v1 import inbound_pb2, inbound_pb2_grpc
from google.api import httpbody_pb2

from services.core.context import current_principal
from services.core.protobuf import to_timestamp
from services.mail.inbound.bounce_mailbox import BounceMailbox
from services.mail.inbound.store import Authentication, InboundRecord, InboundStore, Received

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


def _addresses(message: EmailMessage, name: str) -> list[str]:
    header = message.get(name)
    if isinstance(header, AddressHeader):
        return [str(a.addr_spec) for a in header.addresses]
    return []


def record_to_proto(record: InboundRecord, *, parsed: bool) -> inbound_pb2.InboundMessage:
    """The API form; `parsed` adds headers, bodies and attachments (one message only)."""
    r, auth = record.received, record.received.authentication
    out = inbound_pb2.InboundMessage(
        id=record.id,
        domain_id=r.domain_id,
        envelope_from=r.envelope_from,
        recipient=r.recipient,
        route_id=r.route_id,
        action=r.action,
        outcome=record.outcome,
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
    message = BytesParser(policy=policy.default).parsebytes(record.content)
    assert isinstance(message, EmailMessage)
    from_addresses = _addresses(message, "From")
    setattr(out, "from", from_addresses[0] if from_addresses else str(message.get("From", "")))
    out.to.extend(_addresses(message, "To"))
    out.cc.extend(_addresses(message, "Cc"))
    out.subject = str(message.get("Subject", ""))
    out.message_id = str(message.get("Message-ID", "")).strip()
    for name, value in message.items():
        out.headers.append(inbound_pb2.InboundHeader(name=name, value=str(value)))
    for kind in ("plain", "html"):
        part = message.get_body(preferencelist=(kind,))
        if part is not None and isinstance(part, EmailMessage):
            try:
                body = part.get_content()
            except (LookupError, ValueError):
                body = part.get_payload(decode=True)
            text = body if isinstance(body, str) else bytes(body or b"").decode("utf-8", "replace")
            # The parsed view uses newlines; the wire's CRLFs stay in the raw download.
            text = text.replace("\r\n", "\n")
            if kind == "plain":
                out.text = text
            else:
                out.html = text
    for attachment in message.iter_attachments():
        payload = attachment.get_payload(decode=True)
        out.attachments.append(
            inbound_pb2.InboundAttachment(
                filename=attachment.get_filename() or "",
                content_type=attachment.get_content_type(),
                size_bytes=len(payload) if isinstance(payload, bytes) else 0,
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
            messages=[record_to_proto(r, parsed=False) for r in page.records],
            next_page_token=page.next_page_token,
        )

    async def GetInboundMessage(
        self, request: inbound_pb2.GetInboundMessageRequest, context: Context
    ) -> inbound_pb2.InboundMessage:
        """See the proto."""
        record = await self._store.get(
            tenant_id=current_principal().tenant_id, record_id=request.id
        )
        return record_to_proto(record, parsed=True)

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
            ),
        )
        return record_to_proto(record, parsed=False)

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
        return record_to_proto(record, parsed=False)


__all__ = ["InboundServicer", "record_to_proto"]
