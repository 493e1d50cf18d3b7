"""Plain data of the mail service: emails, recipients, timeline events (no bson, no protobuf)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime


class EmailStatus(enum.StrEnum):
    """Overall state of an email (stored as these strings)."""

    QUEUED = "queued"
    SCHEDULED = "scheduled"
    SENDING = "sending"
    DEFERRED = "deferred"
    SENT = "sent"
    PARTIALLY_SENT = "partially_sent"
    BOUNCED = "bounced"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # Every recipient was on the tenant's suppression list: no relay was contacted.
    SUPPRESSED = "suppressed"


# States a worker may still pick up (SENDING only once its lease has expired).
UNFINISHED = frozenset(
    {EmailStatus.QUEUED, EmailStatus.SCHEDULED, EmailStatus.SENDING, EmailStatus.DEFERRED}
)
FINISHED = frozenset(set(EmailStatus) - UNFINISHED)


class RecipientKind(enum.StrEnum):
    """Which header a recipient came from."""

    TO = "to"
    CC = "cc"
    BCC = "bcc"


class RecipientStatus(enum.StrEnum):
    """Delivery state of one recipient."""

    PENDING = "pending"
    DEFERRED = "deferred"
    SENT = "sent"
    BOUNCED = "bounced"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # On the tenant's suppression list: not delivered.
    SUPPRESSED = "suppressed"


# Recipients a delivery attempt still has to try.
OPEN_RECIPIENTS = frozenset({RecipientStatus.PENDING, RecipientStatus.DEFERRED})


class EventType(enum.StrEnum):
    """Kinds of timeline entries."""

    ACCEPTED = "accepted"
    SCHEDULED = "scheduled"
    CLAIMED = "claimed"
    SENT = "sent"
    DEFERRED = "deferred"
    BOUNCED = "bounced"
    FAILED = "failed"
    CANCELLED = "cancelled"
    RESENT = "resent"
    RESCHEDULED = "rescheduled"
    SUPPRESSED = "suppressed"
    # The recipient complained (an ARF report came back to the return path).
    COMPLAINED = "complained"


class FeedbackKind(enum.StrEnum):
    """What a report that came after the relay's answer says about one recipient."""

    BOUNCE = "bounce"  # permanently undeliverable after all (a DSN with Action: failed)
    DELAY = "delay"  # still being retried further on (a DSN with Action: delayed)
    COMPLAINT = "complaint"  # the recipient reported the message (ARF)


@dataclass(frozen=True, slots=True)
class SmtpReply:
    """A relay's answer (code 0 = no answer: connection failure or timeout)."""

    code: int
    enhanced_code: str
    text: str


@dataclass(slots=True)
class Recipient:
    """One envelope recipient and its delivery state."""

    address: str  # addr-spec with an A-label domain: what RCPT TO gets
    kind: RecipientKind
    status: RecipientStatus = RecipientStatus.PENDING
    last_reply: SmtpReply | None = None
    attempts: int = 0
    updated_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Event:
    """One timeline entry."""

    type: EventType
    time: datetime
    recipient: str = ""
    reply: SmtpReply | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class AttachmentInfo:
    """What is kept about an attachment once it is inside the built message."""

    filename: str
    content_type: str
    size: int
    content_id: str = ""
    inline: bool = False


@dataclass(slots=True)
class Email:
    """An accepted email: its envelope, built message reference and delivery state."""

    id: str
    tenant_id: str
    domain_id: str
    domain_name: str  # A-label; the DKIM d= and Message-ID domain
    from_address: str  # as written in the From header
    envelope_from: str  # addr-spec for MAIL FROM
    to: list[str]
    cc: list[str]
    bcc: list[str]
    reply_to: list[str]
    subject: str
    message_id: str
    size: int
    recipients: list[Recipient]
    status: EmailStatus
    created_at: datetime
    updated_at: datetime
    next_attempt_at: datetime | None
    # When retries stop: the acceptance (or scheduled) time plus the maximum lifetime.
    expires_at: datetime
    tags: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    attachments: list[AttachmentInfo] = field(default_factory=list)
    send_at: datetime | None = None
    attempts: int = 0
    events: list[Event] = field(default_factory=list)
    resent_from_id: str = ""
    idempotency_key: str = ""
    # Built message: inline bytes, or the GridFS file id when large.
    content: bytes | None = None
    content_file_id: str = ""
    # W3C trace context of the request that accepted the email, so delivery attempts made
    # later by a worker (any process) join the same trace.
    trace_context: dict[str, str] = field(default_factory=dict)
    # The template (and its version) the content was rendered from; "" and 0 for none.
    template_id: str = ""
    template_version: int = 0
    # Sent with a test API key: never handed to a relay, its replies simulated
    # (`services.mail.simulation`); listed, counted and kept apart from live mail.
    test: bool = False


@dataclass(frozen=True, slots=True)
class Claimed:
    """An email a worker holds: the lease it won and what to record with the attempt.

    The lease is claim number `claim_no` of the email (see
    `services.mail.queue.MongoDeliveryQueue.claim_batch`); `events` are the timeline entries of
    the claim itself (this one, and claims of workers whose lease expired before they recorded
    anything), written together with the attempt's outcome.
    """

    email: Email
    lease_token: str
    claim_no: int = 0
    lease_expires: datetime | None = None
    events: tuple[Event, ...] = ()
    # The status stored in the email's document when it was claimed (`email.status` says
    # SENDING): what the stats counts move the attempt's outcome from.
    stored_status: EmailStatus | None = None
    # Open recipients found on the tenant's suppression list when claimed -> the entry's
    # reason: not attempted (an address suppressed after the email was accepted).
    suppressed: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EmailFilter:
    """ListEmails filters (None = any)."""

    status: EmailStatus | None = None
    domain_id: str | None = None
    recipient: str | None = None
    tag: str | None = None
    start: datetime | None = None
    end: datetime | None = None
    # Test emails instead of live ones (never both).
    test: bool = False


@dataclass(frozen=True, slots=True)
class EmailPage:
    """One page of emails."""

    emails: list[Email]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class EmailStats:
    """Counts over a window plus queue health."""

    start: datetime
    end: datetime
    counts: dict[EmailStatus, int]
    per_domain: dict[str, dict[EmailStatus, int]]
    queue_depth: int
    oldest_due_age_seconds: float
