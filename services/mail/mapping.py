"""Translation between the mail service's models and its protobuf messages."""

from __future__ import annotations

from azora.mail.v1 import mail_pb2

from services.core.errors import InvalidArgument
from services.core.protobuf import from_timestamp, to_timestamp
from services.mail.compose import AttachmentInput, SendInput
from services.mail.manager import DeliveryHealth
from services.mail.models import (
    Email,
    EmailFilter,
    EmailStats,
    EmailStatus,
    Event,
    Recipient,
    SmtpReply,
)


def status_to_proto(status: EmailStatus) -> mail_pb2.EmailStatus.ValueType:
    """Model status -> proto enum."""
    return mail_pb2.EmailStatus.Value(f"EMAIL_STATUS_{status.name}")


def status_from_proto(value: int) -> EmailStatus | None:
    """Proto enum -> model status (None for UNSPECIFIED = any).

    Raises:
        InvalidArgument: unknown number (field ``status``).
    """
    if value == mail_pb2.EMAIL_STATUS_UNSPECIFIED:
        return None
    try:
        name = mail_pb2.EmailStatus.Name(value)  # type: ignore[arg-type]
    except ValueError:
        raise InvalidArgument.single("status", "unknown status") from None
    return EmailStatus[name.removeprefix("EMAIL_STATUS_")]


def send_from_proto(request: mail_pb2.SendEmailRequest) -> SendInput:
    """A send request as plain data."""
    return SendInput(
        from_address=request.from_address,
        to=list(request.to),
        cc=list(request.cc),
        bcc=list(request.bcc),
        reply_to=list(request.reply_to),
        subject=request.subject,
        text=request.text,
        html=request.html,
        attachments=[
            AttachmentInput(a.filename, a.content_type, a.content, a.content_id, a.inline)
            for a in request.attachments
        ],
        headers=[(h.name, h.value) for h in request.headers],
        tags=list(request.tags),
        metadata=dict(request.metadata),
        send_at=from_timestamp(request.send_at) if request.HasField("send_at") else None,
        idempotency_key=request.idempotency_key,
    )


def filter_from_proto(request: mail_pb2.ListEmailsRequest) -> EmailFilter:
    """ListEmails filters as plain data."""
    return EmailFilter(
        status=status_from_proto(request.status),
        domain_id=request.domain_id or None,
        recipient=request.recipient.strip().lower() or None,
        tag=request.tag or None,
        start=from_timestamp(request.start_time) if request.HasField("start_time") else None,
        end=from_timestamp(request.end_time) if request.HasField("end_time") else None,
    )


def _reply(reply: SmtpReply | None) -> mail_pb2.SmtpReply | None:
    if reply is None:
        return None
    return mail_pb2.SmtpReply(code=reply.code, enhanced_code=reply.enhanced_code, text=reply.text)


def _recipient(r: Recipient) -> mail_pb2.Recipient:
    return mail_pb2.Recipient(
        address=r.address,
        kind=mail_pb2.RecipientKind.Value(f"RECIPIENT_KIND_{r.kind.name}"),
        status=mail_pb2.RecipientStatus.Value(f"RECIPIENT_STATUS_{r.status.name}"),
        last_reply=_reply(r.last_reply),
        attempts=r.attempts,
        update_time=to_timestamp(r.updated_at),
    )


def _event(e: Event) -> mail_pb2.EmailEvent:
    return mail_pb2.EmailEvent(
        type=mail_pb2.EventType.Value(f"EVENT_TYPE_{e.type.name}"),
        time=to_timestamp(e.time),
        recipient=e.recipient,
        reply=_reply(e.reply),
        detail=e.detail,
    )


def email_to_proto(email: Email) -> mail_pb2.Email:
    """An email as a proto (never its content)."""
    waiting = email.status in (EmailStatus.QUEUED, EmailStatus.SCHEDULED, EmailStatus.DEFERRED)
    return mail_pb2.Email(
        id=email.id,
        domain_id=email.domain_id,
        from_address=email.from_address,
        to=email.to,
        cc=email.cc,
        bcc=email.bcc,
        subject=email.subject,
        status=status_to_proto(email.status),
        recipients=[_recipient(r) for r in email.recipients],
        attempts=email.attempts,
        # While SENDING the stored time is the lease expiry, not a planned attempt.
        next_attempt_time=to_timestamp(email.next_attempt_at) if waiting else None,
        events=[_event(e) for e in email.events],
        message_id=email.message_id,
        tags=email.tags,
        metadata=email.metadata,
        send_at=to_timestamp(email.send_at),
        attachments=[
            mail_pb2.Attachment(
                filename=a.filename,
                content_type=a.content_type,
                content_id=a.content_id,
                inline=a.inline,
                size_bytes=a.size,
            )
            for a in email.attachments
        ],
        size_bytes=email.size,
        resent_from_id=email.resent_from_id,
        create_time=to_timestamp(email.created_at),
        update_time=to_timestamp(email.updated_at),
    )


def stats_to_proto(stats: EmailStats) -> mail_pb2.EmailStats:
    """Statistics as a proto (statuses in enum order)."""

    def counts(values: dict[EmailStatus, int]) -> list[mail_pb2.StatusCount]:
        return [
            mail_pb2.StatusCount(status=status_to_proto(s), count=values[s])
            for s in EmailStatus
            if s in values
        ]

    return mail_pb2.EmailStats(
        start_time=to_timestamp(stats.start),
        end_time=to_timestamp(stats.end),
        counts=counts(stats.counts),
        domains=[
            mail_pb2.DomainStats(domain_id=d, counts=counts(c))
            for d, c in sorted(stats.per_domain.items())
        ],
        queue_depth=stats.queue_depth,
        oldest_due_age_seconds=stats.oldest_due_age_seconds,
    )


def delivery_health_to_proto(health: DeliveryHealth) -> mail_pb2.DeliveryHealth:
    """The mail service's part of the suite health report as a proto."""
    return mail_pb2.DeliveryHealth(
        queue_depth=health.queue_depth,
        oldest_due_age_seconds=health.oldest_due_age_seconds,
        relays=[
            mail_pb2.RelayHealth(
                relay=r.relay,
                last_outcome=r.outcome,
                last_code=r.code,
                last_attempt_time=to_timestamp(r.at),
                reachable=r.reachable,
            )
            for r in health.relays
        ],
    )
