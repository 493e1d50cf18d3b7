"""Translation between the mail service's models and its protobuf messages."""

from __future__ import annotations

from typing import Any

from azora.mail.v1 import mail_pb2
from google.protobuf import json_format, struct_pb2

from services.core.errors import AzoraError, FieldViolation, InvalidArgument
from services.core.protobuf import from_timestamp, to_timestamp
from services.mail.batch import BatchMessage, BatchResult
from services.mail.compose import AttachmentInput, SendInput
from services.mail.manager import DeliveryHealth
from services.mail.models import (
    Email,
    EmailFilter,
    EmailStats,
    EmailStatus,
    Event,
    EventType,
    Recipient,
    RecipientKind,
    RecipientStatus,
    SmtpReply,
)
from services.mail.rendering import Rendered
from services.mail.template_manager import TemplateDraft, TemplateUse
from services.mail.templates import Template, TemplateVersion

# Model enum -> proto enum number, by the names' shared spelling; built once (an email in a page
# of ListEmails converts a dozen of them).
_EMAIL_STATUS = {s: mail_pb2.EmailStatus.Value(f"EMAIL_STATUS_{s.name}") for s in EmailStatus}
_RECIPIENT_KIND = {
    k: mail_pb2.RecipientKind.Value(f"RECIPIENT_KIND_{k.name}") for k in RecipientKind
}
_RECIPIENT_STATUS = {
    s: mail_pb2.RecipientStatus.Value(f"RECIPIENT_STATUS_{s.name}") for s in RecipientStatus
}
_EVENT_TYPE = {t: mail_pb2.EventType.Value(f"EVENT_TYPE_{t.name}") for t in EventType}


def status_to_proto(status: EmailStatus) -> mail_pb2.EmailStatus.ValueType:
    """Model status -> proto enum."""
    return _EMAIL_STATUS[status]


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
        test=request.test,
    )


def _reply(reply: SmtpReply | None) -> mail_pb2.SmtpReply | None:
    if reply is None:
        return None
    return mail_pb2.SmtpReply(code=reply.code, enhanced_code=reply.enhanced_code, text=reply.text)


def _recipient(r: Recipient) -> mail_pb2.Recipient:
    return mail_pb2.Recipient(
        address=r.address,
        kind=_RECIPIENT_KIND[r.kind],
        status=_RECIPIENT_STATUS[r.status],
        last_reply=_reply(r.last_reply),
        attempts=r.attempts,
        update_time=to_timestamp(r.updated_at),
    )


def _event(e: Event) -> mail_pb2.EmailEvent:
    return mail_pb2.EmailEvent(
        type=_EVENT_TYPE[e.type],
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
        template_id=email.template_id,
        template_version=email.template_version,
        suppressed_recipients=[
            r.address for r in email.recipients if r.status == RecipientStatus.SUPPRESSED
        ],
        test=email.test,
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


def _plain(value: Any) -> Any:
    # Struct numbers are doubles: 3.0 means the integer 3 in a template ("{{ n }}" -> "3").
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def struct_to_dict(value: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as plain JSON-like data (integral numbers as ints)."""
    plain = _plain(json_format.MessageToDict(value))
    assert isinstance(plain, dict)
    return plain


def dict_to_struct(value: dict[str, Any]) -> struct_pb2.Struct:
    """Plain JSON-like data as a Struct."""
    out = struct_pb2.Struct()
    out.update(value)
    return out


def template_use_from_proto(request: mail_pb2.SendEmailRequest) -> TemplateUse | None:
    """The send's template, if it names one.

    Raises:
        InvalidArgument: template_version or variables without template.
    """
    if not request.template:
        stray = []
        if request.template_version:
            stray.append(FieldViolation("template_version", "only with template"))
        if request.HasField("variables"):
            stray.append(FieldViolation("variables", "only with template"))
        if stray:
            raise InvalidArgument(stray)
        return None
    return TemplateUse(
        ref=request.template,
        version=request.template_version,
        variables=struct_to_dict(request.variables) if request.HasField("variables") else {},
    )


def batch_from_proto(request: mail_pb2.SendEmailBatchRequest) -> list[BatchMessage]:
    """Each message of a batch as plain data, or the error that refused reading it."""
    out: list[BatchMessage] = []
    for message in request.messages:
        try:
            out.append((send_from_proto(message), template_use_from_proto(message)))
        except AzoraError as exc:
            out.append(exc)
    return out


def batch_result_to_proto(result: BatchResult) -> mail_pb2.BatchResult:
    """One message's outcome as a proto."""
    out = mail_pb2.BatchResult(index=result.index, id=result.email_id)
    if result.status is not None:
        out.status = status_to_proto(result.status)
    if result.error is not None:
        out.error.CopyFrom(
            mail_pb2.BatchError(
                code=result.error.code,
                reason=result.error.reason,
                message=result.error.message,
                field_violations=[
                    mail_pb2.FieldError(field=v.field, description=v.description)
                    for v in result.error.violations
                ],
            )
        )
    return out


def draft_from_proto(
    request: mail_pb2.CreateTemplateRequest | mail_pb2.UpdateTemplateRequest,
) -> TemplateDraft:
    """A template draft as plain data."""
    return TemplateDraft(
        name=request.name,
        subject=request.subject,
        html=request.html,
        text=request.text,
        defaults=struct_to_dict(request.default_variables)
        if request.HasField("default_variables")
        else {},
    )


def template_to_proto(template: Template) -> mail_pb2.Template:
    """A template as a proto."""
    return mail_pb2.Template(
        id=template.id,
        name=template.name,
        subject=template.subject,
        html=template.html,
        text=template.text,
        default_variables=dict_to_struct(template.defaults),
        published_version=template.published_version,
        create_time=to_timestamp(template.created_at),
        update_time=to_timestamp(template.updated_at),
    )


def version_to_proto(version: TemplateVersion) -> mail_pb2.TemplateVersion:
    """A template version as a proto."""
    return mail_pb2.TemplateVersion(
        template_id=version.template_id,
        version=version.version,
        subject=version.subject,
        html=version.html,
        text=version.text,
        default_variables=dict_to_struct(version.defaults),
        create_time=to_timestamp(version.created_at),
    )


def rendered_to_proto(rendered: Rendered, version: int) -> mail_pb2.RenderedTemplate:
    """A preview as a proto."""
    return mail_pb2.RenderedTemplate(
        subject=rendered.subject,
        html=rendered.html,
        text=rendered.text,
        warnings=rendered.warnings,
        version=version,
    )
