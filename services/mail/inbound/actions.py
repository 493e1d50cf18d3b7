"""A route's action on a stored message: a webhook delivery, or a forwarded email.

Durability. `InboundStore.store` inserts the message record first, marked ``pending`` for these
two actions, then calls `InboundActions.carry_out`, whose writes are idempotent (their ids
come from the stored record), and only then marks the record ``done`` and answers; the inbound
server says 250 after that answer. So once a client has our 250 the action's own record exists: the
pending webhook delivery (``webhook_deliveries``, sent and retried by the webhook dispatcher
like any event's), or the queued email (sent by the delivery workers). Killing the inbound
server then changes nothing. If the mail service dies between the two writes, the client got
no 250 and sends again (the retry meets the stored record and carries out its action again,
creating nothing twice); and `InboundStore.finish_pending`, run periodically, carries out the
action of any record still pending after `PENDING_GRACE`, for a client that never came back.

Outcomes are read, not copied: a listing asks the delivery (by id) and the email (by id) where
they stand, so the dispatcher and the workers need not know about received messages.

Webhook JSON (compact, UTF-8, signed with the endpoint's secrets by the dispatcher):
``type`` ``inbound.received``, ids, ``envelope``, ``headers``, ``from``/``to``/``cc``/``subject``,
``text``/``html``, ``attachments`` (name, type, size, and ``content`` base64 while all of them
together are within AZORA_INBOUND_WEBHOOK_ATTACHMENT_LIMIT bytes), ``rawUrl`` (the API path of
the raw message, for whatever was left out), ``authentication`` and
``authenticationResults`` (the header value, unfolded). A document still over `MAX_BODY_BYTES` drops
text and html too (``contentIncluded`` false): a delivery document must stay well inside
MongoDB's 16 MB.
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Sequence
from typing import Any, Protocol

from services.core.clock import Clock
from services.core.errors import FailedPrecondition, InvalidArgument, NotFound
from services.core.srs import SrsRewriter
from services.mail.feedback.webhook_models import (
    INBOUND_EVENT,
    Delivery,
    DeliveryState,
    delivery_id,
)
from services.mail.feedback.webhook_signing import body_of, rfc3339
from services.mail.feedback.webhook_store import WebhookStore
from services.mail.inbound.parsed import parse_message
from services.mail.inbound.store import ActionResult, InboundRecord, Outcome
from services.mail.models import Email, EmailStatus

log = logging.getLogger(__name__)

_FOLD = re.compile(r"\r?\n[ \t]+")
# A webhook document over this many bytes leaves out text and html as well (see above).
MAX_BODY_BYTES = 8 * 1024 * 1024
# Outcomes of the forwarded email, by its status.
_FORWARD_OUTCOMES = {
    EmailStatus.QUEUED: "forward_queued",
    EmailStatus.SCHEDULED: "forward_queued",
    EmailStatus.SENDING: "forward_queued",
    EmailStatus.DEFERRED: "forward_queued",
    EmailStatus.SENT: "forwarded",
    EmailStatus.PARTIALLY_SENT: "forward_partially_sent",
    EmailStatus.BOUNCED: "forward_bounced",
    EmailStatus.SUPPRESSED: "forward_suppressed",
    EmailStatus.FAILED: "forward_failed",
    EmailStatus.CANCELLED: "forward_failed",
}
_WEBHOOK_OUTCOMES = {
    DeliveryState.PENDING: "webhook_pending",
    DeliveryState.SUCCEEDED: "webhook_delivered",
    DeliveryState.FAILED: "webhook_failed",
}


class Forwarder(Protocol):
    """The mail service's queue, as forwarding uses it (`MailManager`)."""

    async def forward_received(
        self,
        *,
        tenant_id: str,
        email_id: str,
        domain_name: str,
        content: bytes,
        envelope_from: str,
        recipients: Sequence[str],
        detail: str,
        metadata: dict[str, str],
    ) -> Email:
        """Queue the message (idempotent by `email_id`).

        Raises:
            InvalidArgument: a recipient is not an address.
            FailedPrecondition: the domain cannot send (not active, no relay).
        """
        ...

    async def get(self, *, tenant_id: str, email_id: str) -> Email:
        """The tenant's email.

        Raises:
            NotFound: no such email (expired).
        """
        ...


class InboundActions:
    """Carries out webhook and forward actions and reads their outcomes."""

    def __init__(
        self,
        *,
        webhooks: WebhookStore,
        forwarder: Forwarder,
        srs: SrsRewriter,
        clock: Clock,
        attachment_limit: int,
    ) -> None:
        self._webhooks = webhooks
        self._forwarder = forwarder
        self._srs = srs
        self._clock = clock
        self._attachment_limit = attachment_limit

    async def carry_out(self, record: InboundRecord) -> ActionResult:
        """Create the action's own record (idempotent); failed when it cannot ever be done.

        Raises:
            Exception: whatever a transient failure raises (database, domain service): the
                record stays pending and the action is tried again.
        """
        action = record.received.action
        if action == "webhook":
            return await self._webhook(record)
        if action == "forward":
            return await self._forward(record)
        return ActionResult("done")

    async def outcomes(self, records: Sequence[InboundRecord]) -> dict[str, Outcome]:
        """The current outcome of each record's action, by record id."""
        delivery_ids = [r.webhook_delivery_id for r in records if r.webhook_delivery_id]
        deliveries = await self._webhooks.deliveries_by_id(delivery_ids) if delivery_ids else {}
        found: dict[str, Outcome] = {}
        for record in records:
            if record.action_state != "done":
                found[record.id] = Outcome(record.action_state, record.action_detail)
            elif record.received.action == "bounce":
                # A report to a return path: what the bounce mailbox did with it, as recorded.
                found[record.id] = Outcome(record.outcome)
            elif record.webhook_delivery_id:
                found[record.id] = _webhook_outcome(deliveries.get(record.webhook_delivery_id))
            elif record.forward_email_id:
                found[record.id] = await self._forward_outcome(record)
            else:
                found[record.id] = Outcome("stored")
        return found

    async def _webhook(self, record: InboundRecord) -> ActionResult:
        received = record.received
        hook = await self._webhooks.get_webhook(
            webhook_id=received.webhook_id, tenant_id=record.tenant_id
        )
        if hook is None:
            return ActionResult("failed", "the route's webhook endpoint no longer exists")
        event_id = webhook_event_id(record)
        now = self._clock.now()
        delivery = Delivery(
            id=delivery_id(event_id, hook.id),
            tenant_id=record.tenant_id,
            webhook_id=hook.id,
            event_id=event_id,
            event_type=INBOUND_EVENT,
            body=body_of(webhook_payload(record, event_id, self._attachment_limit)),
            state=DeliveryState.PENDING,
            create_time=now,
            next_attempt_time=now,
            occurred_time=record.received_at,
        )
        # A unique _id: a second call (a retried message, the pending sweep) creates nothing.
        await self._webhooks.add_deliveries([delivery])
        return ActionResult("done", webhook_delivery_id=delivery.id)

    async def _forward(self, record: InboundRecord) -> ActionResult:
        received = record.received
        domain = received.recipient.rpartition("@")[2].lower()
        # SPF at the destination then checks the receiving domain, whose relay sends it.
        sender = self._srs.forward(received.envelope_from, alias_domain=domain)
        try:
            email = await self._forwarder.forward_received(
                tenant_id=record.tenant_id,
                # Chosen when the record was stored: a second call finds the email it queued.
                email_id=record.forward_email_id,
                domain_name=domain,
                content=record.content,
                envelope_from=sender,
                recipients=received.forward_to,
                detail=f"forward of inbound message {record.id} to {received.recipient}",
                metadata={"inboundMessageId": record.id},
            )
        except (InvalidArgument, FailedPrecondition) as exc:
            # Never possible for this message (until the route or domain changes): recorded,
            # the message stays retrievable.
            return ActionResult("failed", f"not forwarded: {exc}")
        return ActionResult("done", forward_email_id=email.id)

    async def _forward_outcome(self, record: InboundRecord) -> Outcome:
        try:
            email = await self._forwarder.get(
                tenant_id=record.tenant_id, email_id=record.forward_email_id
            )
        except NotFound:
            return Outcome("forward_unknown", "the forwarded email has expired")
        recipients = ", ".join(f"{r.address}: {r.status.value}" for r in email.recipients)
        return Outcome(_FORWARD_OUTCOMES.get(email.status, "forward_queued"), recipients)


def webhook_event_id(record: InboundRecord) -> str:
    """The webhook-id of a record's delivery: ``evt_`` + the ULID of its receive time."""
    return f"evt_{record.seq[:26]}"


def _webhook_outcome(delivery: Delivery | None) -> Outcome:
    if delivery is None:
        return Outcome(
            "webhook_unknown",
            "the delivery is no longer in the endpoint's log (deleted or expired)",
        )
    detail = ""
    if delivery.attempts:
        last = delivery.attempts[-1]
        detail = f"{len(delivery.attempts)} attempt(s); last: " + (
            f"HTTP {last.status_code}" if last.status_code else last.error
        )
    return Outcome(_WEBHOOK_OUTCOMES[delivery.state], detail)


def webhook_payload(record: InboundRecord, event_id: str, attachment_limit: int) -> dict[str, Any]:
    """The JSON document a webhook route POSTs (see the module docstring)."""
    received, auth = record.received, record.received.authentication
    parsed = parse_message(record.content)
    inline = sum(len(a.content) for a in parsed.attachments) <= attachment_limit
    attachments: list[dict[str, Any]] = []
    for attachment in parsed.attachments:
        item: dict[str, Any] = {
            "filename": attachment.filename,
            "contentType": attachment.content_type,
            "size": len(attachment.content),
        }
        if inline:
            item["content"] = base64.b64encode(attachment.content).decode("ascii")
        attachments.append(item)
    payload: dict[str, Any] = {
        "id": event_id,
        "type": INBOUND_EVENT,
        "occurredAt": rfc3339(record.received_at),
        "tenantId": record.tenant_id,
        "inboundMessageId": record.id,
        "domainId": received.domain_id,
        "routeId": received.route_id,
        "envelope": {
            "from": received.envelope_from,
            "to": received.recipient,
            "clientAddress": received.client_address,
            "helo": received.helo,
        },
        "headers": [{"name": n, "value": v} for n, v in parsed.headers],
        "from": parsed.from_address,
        "to": parsed.to,
        "cc": parsed.cc,
        "subject": parsed.subject,
        "messageId": parsed.message_id,
        "text": parsed.text,
        "html": parsed.html,
        "attachments": attachments,
        "attachmentsIncluded": inline,
        "contentIncluded": True,
        "rawUrl": f"/api/v1/inbound/{record.id}/raw",
        "size": record.size,
        "authentication": {
            "spf": auth.spf,
            "spfDomain": auth.spf_domain,
            "dkim": auth.dkim,
            "dkimDomains": list(auth.dkim_domains),
            "dmarc": auth.dmarc,
            "fromDomain": auth.from_domain,
        },
        # Unfolded (RFC 5322 3.2.2): one line, as a header value is read.
        "authenticationResults": _FOLD.sub(" ", auth.header),
    }
    if len(body_of(payload)) > MAX_BODY_BYTES:
        payload.update(text="", html="", contentIncluded=False)
        for item in attachments:
            item.pop("content", None)
        payload["attachmentsIncluded"] = False
    return payload


__all__ = [
    "MAX_BODY_BYTES",
    "Forwarder",
    "InboundActions",
    "webhook_event_id",
    "webhook_payload",
]
