"""Use cases of the mail service: send, track, cancel/delete, resend, statistics.

Submitting validates, finds the sender's active domain and its relay, builds the message once
and stores it durably before answering; delivery happens later, in the workers
(`services.mail.delivery`, on the queue engine `services.mail.queue`). Idempotency is
insert-first: the key's record reserves the email's id, and the email itself is inserted under
that id, so concurrent duplicates meet on a unique ``_id`` twice and exactly one email exists
per key (same key + different request: ALREADY_EXISTS, HTTP 409, like a conflicting resource). A
request that fails after reserving its key and before its email is stored gives the key back, so
the corrected retry is accepted. A batch checks and builds every message first, then stores the
valid ones together (`EmailRepository.insert_many`); its one idempotency key is covered by
`services.mail.batch`.

Test mode: a test API key's emails (``test``) go through every step above like any other; only
the worker answers them with simulated replies instead of a relay's (`services.mail.simulation`),
and ``suppressed@`` of the test domain is suppressed here as a listed address would be. A test
email's idempotency fingerprint differs from a live one's, so a key never answers a live
request with a test email or the other way round.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from services.core.clock import Clock
from services.core.errors import (
    AlreadyExists,
    AzoraError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PreconditionViolation,
)
from services.core.ids import check_id, decode_page_token, encode_page_token, new_id, page_size
from services.core.metrics import EMAILS_ACCEPTED
from services.core.tracing import trace_carrier
from services.mail import raw_message, simulation
from services.mail.batch import (
    MAX_BATCH,
    BatchMessage,
    BatchRecord,
    BatchRepository,
    BatchResult,
    batch_error,
    batch_fingerprint,
    send_fingerprint,
)
from services.mail.compose import (
    MAX_IDEMPOTENCY_KEY,
    Limits,
    Mailbox,
    SendInput,
    ValidRequest,
    build_message,
    content_type_of,
    parse_mailbox,
    validate,
)
from services.mail.feedback.suppression_store import SuppressionList
from services.mail.inbound.parsed import parse_message
from services.mail.models import (
    AttachmentInfo,
    Email,
    EmailFilter,
    EmailPage,
    EmailStats,
    EmailStatus,
    Event,
    EventType,
    Recipient,
    RecipientKind,
    RecipientStatus,
)
from services.mail.outcomes import RetryPolicy, suppress_new
from services.mail.raw_message import SubmitInput
from services.mail.relay_health import RelayHealthStore, RelayOutcome
from services.mail.relay_lookup import RelayLookup
from services.mail.repository import EmailRepository, IdempotencyRecord, IdempotencyRepository
from services.mail.senders import SenderDirectory, SenderDomain
from services.mail.tallies import FINEST, ceil_to
from services.mail.template_manager import RenderedForSend, TemplateManager, TemplateUse

log = logging.getLogger(__name__)
RESENDABLE = frozenset({EmailStatus.FAILED, EmailStatus.BOUNCED, EmailStatus.PARTIALLY_SENT})
_MESSAGE_ID_RE = re.compile(rb"^Message-ID: [^\r\n]*\r\n", re.MULTILINE | re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class DeliveryHealth:
    """What the suite health report needs from the mail service."""

    queue_depth: int
    oldest_due_age_seconds: float
    relays: list[RelayOutcome]


@dataclass(frozen=True, slots=True)
class _Prepared:
    """A send request checked and ready to build: rendered, validated, its domain found."""

    request: SendInput
    valid: ValidRequest
    domain: SenderDomain
    template: RenderedForSend | None


@dataclass(frozen=True, slots=True)
class MailPolicy:
    """Rules of the mail service from settings."""

    limits: Limits
    retry: RetryPolicy
    idempotency_ttl: timedelta = timedelta(hours=24)
    default_page_size: int = 50
    max_page_size: int = 200
    # How long finished emails are kept after they finished, and per-tenant exceptions.
    retention: timedelta = timedelta(days=30)
    tenant_retention: dict[str, timedelta] = field(default_factory=dict)
    # How long finished test emails are kept (whatever their tenant's retention).
    test_retention: timedelta = timedelta(days=1)

    def retention_of(self, tenant_id: str) -> timedelta:
        """How long the tenant's finished emails are kept."""
        return self.tenant_retention.get(tenant_id, self.retention)


class MailManager:
    """The mail service's use cases."""

    def __init__(
        self,
        *,
        emails: EmailRepository,
        relay_health: RelayHealthStore,
        idempotency: IdempotencyRepository,
        senders: SenderDirectory,
        relays: RelayLookup,
        clock: Clock,
        policy: MailPolicy,
        templates: TemplateManager | None = None,
        batches: BatchRepository | None = None,
        suppressions: SuppressionList | None = None,
    ) -> None:
        self._templates = templates
        self._suppressions = suppressions
        self._batches = batches
        self._emails = emails
        self._relay_health = relay_health
        self._idempotency = idempotency
        self._senders = senders
        self._relays = relays
        self._clock = clock
        self._policy = policy

    async def send(
        self,
        *,
        tenant_id: str,
        request: SendInput,
        template: TemplateUse | None = None,
        test: bool = False,
    ) -> Email:
        """Accept an email: validate, store the built message, answer queued or scheduled.

        With `template`, its rendered subject, html and text are the email's content (and
        the request may hold none of the three). With `test` it is a test email (simulated).

        Raises:
            InvalidArgument: a field is invalid (each violation names it), a template variable
                is missing (``variables.<name>``) or the template failed to render.
            NotFound: the template or its version does not exist.
            FailedPrecondition: the sender's domain is not an active domain of the tenant, or
                it has no relay (subject ``from``); the template was never published.
            AlreadyExists: the idempotency key was used with a different request.
            Unavailable: the domain or SMTP service cannot answer.
        """
        now = self._clock.now()
        fingerprint = _mode(test) + send_fingerprint(request, template)
        prepared = await self._prepare(
            tenant_id=tenant_id, request=request, template=template, now=now, domains={}
        )

        async def store(email_id: str) -> Email:
            email = self._build(
                prepared, tenant_id=tenant_id, email_id=email_id, now=now, test=test
            )
            if not await self._emails.insert(email=email, screen=self._screen):
                # A concurrent duplicate (same key, same request) stored it first.
                return await self._emails.get(tenant_id=tenant_id, email_id=email_id)
            EMAILS_ACCEPTED.labels(domain=email.domain_name).inc()
            email.content = None
            return email

        return await self._idempotent(
            tenant_id=tenant_id,
            key=request.idempotency_key,
            fingerprint=lambda: fingerprint,
            now=now,
            store=store,
        )

    async def send_batch(
        self,
        *,
        tenant_id: str,
        messages: Sequence[BatchMessage],
        all_or_nothing: bool,
        idempotency_key: str,
        field_name: Callable[[str], str] = str,
        test: bool = False,
    ) -> list[BatchResult]:
        """Accept up to `MAX_BATCH` emails; one result per message, in order.

        Each message is checked as `send` checks one; the valid ones are stored together
        (a few insert commands, not one per message) unless `all_or_nothing` and any is
        invalid. The idempotency key covers the whole batch: the same batch again within the
        window gets the first answer, same ids. `field_name` spells a message's field paths
        in the per-message errors (`batch_error`).

        Raises:
            InvalidArgument: no messages, too many, a bad idempotency key, or (with
                `all_or_nothing`) every invalid message's fields, named ``messages[i]....``.
            AlreadyExists: the idempotency key was used with a different batch.
            Unavailable: the domain or SMTP service cannot answer.
        """
        if not messages:
            raise InvalidArgument.single("messages", "at least one message is needed")
        if len(messages) > MAX_BATCH:
            raise InvalidArgument.single(
                "messages", f"at most {MAX_BATCH} messages per batch; got {len(messages)}"
            )
        if len(idempotency_key) > MAX_IDEMPOTENCY_KEY:
            raise InvalidArgument.single(
                "idempotency_key", f"at most {MAX_IDEMPOTENCY_KEY} characters"
            )
        now = self._clock.now()
        ids = [new_id() for _ in messages]
        fingerprint = _mode(test) + batch_fingerprint(messages, all_or_nothing)
        if idempotency_key:
            if self._batches is None:  # pragma: no cover - wired in app.py
                raise RuntimeError("batch idempotency store not configured")
            record = await self._batches.reserve(
                record=BatchRecord(
                    tenant_id,
                    idempotency_key,
                    fingerprint,
                    ids,
                    now + self._policy.idempotency_ttl,
                ),
                now=now,
            )
            if record.fingerprint != fingerprint:
                raise AlreadyExists(
                    "IdempotencyKey",
                    idempotency_key,
                    message="this idempotency key was used with a different batch "
                    "in the last 24 hours",
                )
            if record.results is not None:
                return record.results
            ids = record.email_ids
        results: list[BatchResult] = []
        emails: list[Email] = []
        domains: dict[str, SenderDomain | None] = {}
        relays: set[str] = set()
        for i, message in enumerate(messages):
            try:
                if isinstance(message, AzoraError):
                    raise message
                request, template = message
                if request.idempotency_key:
                    raise InvalidArgument.single(
                        "idempotency_key", "set the batch's idempotencyKey instead"
                    )
                prepared = await self._prepare(
                    tenant_id=tenant_id,
                    request=request,
                    template=template,
                    now=now,
                    domains=domains,
                    relays=relays,
                )
                email = self._build(
                    prepared, tenant_id=tenant_id, email_id=ids[i], now=now, test=test
                )
            except (InvalidArgument, NotFound, FailedPrecondition) as exc:
                results.append(BatchResult(i, error=batch_error(exc, f"messages[{i}]", field_name)))
                continue
            emails.append(email)
            results.append(BatchResult(i, email_id=email.id, status=email.status))
        if all_or_nothing and any(r.error is not None for r in results):
            raise InvalidArgument(
                [v for r in results if r.error is not None for v in r.error.violations],
                message="the batch is refused (all_or_nothing): "
                + "; ".join(
                    f"messages[{r.index}]: {r.error.message}"
                    for r in results
                    if r.error is not None
                ),
            )
        await self._screen(emails)
        statuses = {e.id: e.status for e in emails}
        results = [replace(r, status=statuses[r.email_id]) if r.email_id else r for r in results]
        # Duplicates (a retried batch whose first attempt stored some) count as stored: the
        # ids are the batch's own.
        await self._emails.insert_many(emails=emails)
        for email in emails:
            EMAILS_ACCEPTED.labels(domain=email.domain_name).inc()
        if idempotency_key and self._batches is not None:
            await self._batches.finish(tenant_id=tenant_id, key=idempotency_key, results=results)
        return results

    async def _screen(self, emails: Sequence[Email]) -> None:
        """Apply the suppression list to new emails right before they are stored.

        The one send-time check of every way in (SendEmail, batches, SMTP submission,
        resends). A single email hands this to `EmailRepository.insert`, which calls it once
        for the group of emails it writes together, so concurrent sends share one lookup per
        tenant; a batch calls it for all its messages. Then `outcomes.suppress_new` per email
        (a suppressed recipient is SUPPRESSED with its entry's reason, as of the email's
        creation; all suppressed: the email is, and no relay is ever contacted for it). A test
        email's ``suppressed@`` recipients of the test domain count as listed
        (`simulation.suppression`).
        """
        tenants: dict[str, list[Email]] = {}
        for email in emails:
            tenants.setdefault(email.tenant_id, []).append(email)
        for tenant_id, group in tenants.items():
            found: dict[str, str] = {}
            if self._suppressions is not None:
                addresses = sorted({r.address for e in group for r in e.recipients})
                entries = await self._suppressions.suppressed(tenant_id, addresses)
                found = {address: entry.reason.value for address, entry in entries.items()}
            for email in group:
                hits = {r.address: found[r.address] for r in email.recipients if r.address in found}
                if email.test:
                    simulated = {
                        r.address: reason
                        for r in email.recipients
                        if (reason := simulation.suppression(r.address)) is not None
                    }
                    hits = {**simulated, **hits}
                if hits:
                    suppress_new(email, hits, now=email.created_at)

    async def _idempotent(
        self,
        *,
        tenant_id: str,
        key: str,
        fingerprint: Callable[[], str],
        now: datetime,
        store: Callable[[str], Awaitable[Email]],
    ) -> Email:
        """Run `store` under the idempotency key, if any (insert-first reservation).

        A duplicate of a request that stored its email gets that email; a request that fails
        gives its key back (see `_give_back`), so the corrected retry is not refused.

        Raises:
            AlreadyExists: the key was used with a different request in its window.
        """
        email_id = new_id()
        if not key:
            return await store(email_id)
        mine = IdempotencyRecord(
            tenant_id, key, fingerprint(), email_id, now + self._policy.idempotency_ttl
        )
        record = await self._idempotency.reserve(record=mine, now=now)
        if record.email_id != email_id:
            # Another request holds the key: the same request (answer its email) or not.
            if record.fingerprint != mine.fingerprint:
                raise AlreadyExists(
                    "IdempotencyKey",
                    key,
                    message="this idempotency key was used with a different request "
                    "in the last 24 hours",
                )
            try:
                return await self._emails.get(tenant_id=tenant_id, email_id=record.email_id)
            except NotFound:
                pass  # first request still in flight or crashed before storing: store it
            return await store(record.email_id)
        try:
            return await store(email_id)
        except Exception:
            await self._give_back(tenant_id, mine)
            raise

    async def _give_back(self, tenant_id: str, record: IdempotencyRecord) -> None:
        """Free the key of a request that failed, unless its email got stored after all.

        Errors here are logged, never raised: the request's own error is the one to report.
        """
        try:
            await self._emails.get(tenant_id=tenant_id, email_id=record.email_id)
        except NotFound:
            # Nothing was stored under the key. (A concurrent duplicate of the same request
            # storing it right now could still do so; that email stays the only one for its
            # request, but a later different request may then reuse the key.)
            pass
        except Exception as exc:
            # The database cannot say: keep the key reserved (a duplicate is worse than a
            # refused retry, which works again once the window ends).
            log.warning("idempotency key kept", extra={"fields": {"error": str(exc)[:200]}})
            return
        else:
            return  # stored after all: the key answers with that email
        try:
            await self._idempotency.release(record=record)
        except Exception as exc:
            log.warning("idempotency key kept", extra={"fields": {"error": str(exc)[:200]}})

    async def _prepare(
        self,
        *,
        tenant_id: str,
        request: SendInput,
        template: TemplateUse | None,
        now: datetime,
        domains: dict[str, SenderDomain | None],
        relays: set[str] | None = None,
    ) -> _Prepared:
        """Render, validate and find the sender's domain and relay: everything but storing.

        `domains` and `relays` remember, across the messages of one batch, the domains looked
        up and those whose relay was found (one lookup per sending domain, not per message).
        """
        used: RenderedForSend | None = None
        if template is not None:
            clash = [
                FieldViolation(name, "not allowed together with template")
                for name, value in (
                    ("subject", request.subject),
                    ("text", request.text),
                    ("html", request.html),
                )
                if value
            ]
            if clash:
                raise InvalidArgument(clash)
            if self._templates is None:  # pragma: no cover - wired in app.py
                raise RuntimeError("templates not configured")
            used = await self._templates.render_for_send(tenant_id=tenant_id, use=template)
            request = replace(
                request,
                subject=used.rendered.subject,
                html=used.rendered.html,
                text=used.rendered.text,
            )
        valid = validate(request, limits=self._policy.limits, now=now)
        domain = await self._sending_domain(
            tenant_id=tenant_id,
            name=valid.sender.domain,
            field="from",
            domains=domains,
            relays=relays,
        )
        return _Prepared(request, valid, domain, used)

    def _build(
        self,
        prepared: _Prepared,
        *,
        tenant_id: str,
        email_id: str,
        now: datetime,
        test: bool = False,
    ) -> Email:
        """The email to store: built message, recipients, first events (a test email's)."""
        request, valid, domain = prepared.request, prepared.valid, prepared.domain
        content, message_id = build_message(valid, email_id=email_id, domain=domain.name, now=now)
        if len(content) > self._policy.limits.max_message_size:
            raise InvalidArgument.single(
                "attachments",
                f"the message is {len(content)} bytes; at most "
                f"{self._policy.limits.max_message_size} allowed",
            )
        scheduled = request.send_at is not None and request.send_at > now
        start = request.send_at if scheduled and request.send_at else now
        events = [Event(EventType.ACCEPTED, now)]
        if scheduled:
            events.append(Event(EventType.SCHEDULED, now, detail=start.isoformat()))
        recipients = (
            [Recipient(m.addr_spec, RecipientKind.TO, updated_at=now) for m in valid.to]
            + [Recipient(m.addr_spec, RecipientKind.CC, updated_at=now) for m in valid.cc]
            + [Recipient(m.addr_spec, RecipientKind.BCC, updated_at=now) for m in valid.bcc]
        )
        return Email(
            id=email_id,
            tenant_id=tenant_id,
            domain_id=domain.id,
            domain_name=domain.name,
            from_address=valid.sender.header,
            envelope_from=valid.sender.addr_spec,
            to=[m.header for m in valid.to],
            cc=[m.header for m in valid.cc],
            bcc=[m.header for m in valid.bcc],
            reply_to=[m.header for m in valid.reply_to],
            subject=request.subject,
            message_id=message_id.strip("<>"),
            size=len(content),
            recipients=_dedupe(recipients),
            status=EmailStatus.SCHEDULED if scheduled else EmailStatus.QUEUED,
            created_at=now,
            updated_at=now,
            next_attempt_at=start,
            expires_at=start + self._policy.retry.max_lifetime,
            tags=list(request.tags),
            metadata=dict(request.metadata),
            attachments=[
                AttachmentInfo(
                    a.filename,
                    content_type_of(a),
                    len(a.content),
                    a.content_id.strip("<>"),
                    a.inline,
                )
                for a in request.attachments
            ],
            send_at=request.send_at if scheduled else None,
            events=events,
            idempotency_key=request.idempotency_key,
            content=content,
            trace_context=trace_carrier(),
            template_id=prepared.template.template_id if prepared.template else "",
            template_version=prepared.template.version if prepared.template else 0,
            test=test,
        )

    async def _sending_domain(
        self,
        *,
        tenant_id: str,
        name: str,
        field: str,
        domains: dict[str, SenderDomain | None] | None = None,
        relays: set[str] | None = None,
    ) -> SenderDomain:
        """The tenant's active domain called `name`, which must have a relay.

        `domains` and `relays` remember, across the messages of one batch, the domains looked
        up and those whose relay was found (one lookup per sending domain, not per message).

        Raises:
            FailedPrecondition: not an active domain of the tenant, or no relay (subject
                `field`; metadata ``domain`` names it).
        """
        if domains is not None and name in domains:
            domain = domains[name]
        else:
            domain = await self._senders.active_domain(tenant_id=tenant_id, name=name)
            if domains is not None:
                domains[name] = domain
        if domain is None:
            raise FailedPrecondition(
                f"{name} is not an active domain of this tenant",
                reason="SENDER_DOMAIN_NOT_ACTIVE",
                violations=[
                    PreconditionViolation(
                        "DOMAIN_NOT_ACTIVE",
                        field,
                        "the sender's domain must be registered, verified and active",
                    )
                ],
                metadata={"field": field, "domain": name},
            )
        if relays is not None and domain.id in relays:
            return domain
        if not await self._relays.has_relay(tenant_id=tenant_id, domain_id=domain.id):
            raise FailedPrecondition(
                f"{domain.name} has no SMTP relay configured",
                reason="RELAY_NOT_CONFIGURED",
                violations=[
                    PreconditionViolation(
                        "RELAY_NOT_CONFIGURED",
                        field,
                        "configure the domain's relay (PUT /api/v1/domains/{id}/smtp) first",
                    )
                ],
                metadata={"field": field, "domainId": domain.id, "domain": domain.name},
            )
        if relays is not None:
            relays.add(domain.id)
        return domain

    async def submit(self, *, tenant_id: str, submission: SubmitInput, test: bool = False) -> Email:
        """Accept a whole message from the SMTP submission server, under SendEmail's rules.

        With `test` (a test key authenticated the SMTP session) it is a test email.

        The envelope sender's domain and the From header's domain must both be active domains
        of the tenant with a relay; the email belongs to the From domain (DKIM d= aligns with
        From). Recipients are the envelope's; a recipient named in neither To nor Cc is a Bcc.
        The message is stored as sent (see `raw_message`).

        Raises:
            InvalidArgument: reason MESSAGE_MALFORMED, MESSAGE_TOO_LARGE, TOO_MANY_RECIPIENTS,
                INVALID_RECIPIENT, INVALID_SENDER or INVALID_CONTROL_HEADER, field named.
            FailedPrecondition: a sender domain is not active or has no relay.
            AlreadyExists: the idempotency key was used with a different message.
        """
        now = self._clock.now()
        limits = self._policy.limits
        if len(submission.raw) > limits.max_message_size:
            raise _too_large(len(submission.raw), limits.max_message_size)
        message = raw_message.parse(submission.raw)
        try:
            sender = parse_mailbox(submission.envelope_from, "envelope_from")
        except InvalidArgument as exc:
            raise InvalidArgument(exc.violations, reason="INVALID_SENDER") from None
        if not submission.envelope_to:
            raise InvalidArgument(
                [FieldViolation("envelope_to", "at least one recipient is needed")],
                reason="INVALID_RECIPIENT",
            )
        if len(submission.envelope_to) > limits.max_recipients:
            raise InvalidArgument(
                [
                    FieldViolation(
                        "envelope_to",
                        f"{len(submission.envelope_to)} recipients; at most "
                        f"{limits.max_recipients} allowed",
                    )
                ],
                reason="TOO_MANY_RECIPIENTS",
            )
        boxes = []
        for i, address in enumerate(submission.envelope_to):
            try:
                boxes.append(parse_mailbox(address, f"envelope_to[{i}]"))
            except InvalidArgument as exc:
                raise InvalidArgument(exc.violations, reason="INVALID_RECIPIENT") from None
        from_display, from_address = raw_message.from_mailbox(message)
        try:
            author = parse_mailbox(from_address, "From")
        except InvalidArgument as exc:
            raise InvalidArgument(exc.violations, reason="MESSAGE_MALFORMED") from None
        send_at = message.controls.send_at
        if send_at is not None and send_at > now + limits.schedule_horizon:
            raise InvalidArgument(
                [
                    FieldViolation(
                        "X-Azora-Send-At",
                        f"at most {int(limits.schedule_horizon.total_seconds())} seconds "
                        "in the future",
                    )
                ],
                reason="INVALID_CONTROL_HEADER",
            )
        domain = await self._sending_domain(tenant_id=tenant_id, name=author.domain, field="From")
        if sender.domain != author.domain:
            await self._sending_domain(
                tenant_id=tenant_id, name=sender.domain, field="envelope_from"
            )
        key = message.controls.idempotency_key

        async def store(email_id: str) -> Email:
            kept_id = message.first("Message-ID")
            message_id = kept_id.value if kept_id is not None else f"<{email_id}@{domain.name}>"
            content = message.content(message_id=message_id, now=now)
            if len(content) > limits.max_message_size:
                raise _too_large(len(content), limits.max_message_size)
            to, cc = message.addresses("To"), message.addresses("Cc")

            def kind(box: Mailbox) -> RecipientKind:
                address = box.addr_spec.lower()
                if address in to:
                    return RecipientKind.TO
                return RecipientKind.CC if address in cc else RecipientKind.BCC

            recipients = [Recipient(b.addr_spec, kind(b), updated_at=now) for b in boxes]
            scheduled = send_at is not None and send_at > now
            start = send_at if scheduled and send_at else now
            client = submission.client_address or "unknown"
            events = [Event(EventType.ACCEPTED, now, detail=f"submission: SMTP; client: {client}")]
            if scheduled:
                events.append(Event(EventType.SCHEDULED, now, detail=start.isoformat()))
            email = Email(
                id=email_id,
                tenant_id=tenant_id,
                domain_id=domain.id,
                domain_name=domain.name,
                from_address=from_display,
                envelope_from=sender.addr_spec,
                to=to,
                cc=cc,
                bcc=[r.address for r in recipients if r.kind == RecipientKind.BCC],
                reply_to=message.addresses("Reply-To"),
                subject=message.subject(),
                message_id=message_id.strip().strip("<>"),
                size=len(content),
                recipients=_dedupe(recipients),
                status=EmailStatus.SCHEDULED if scheduled else EmailStatus.QUEUED,
                created_at=now,
                updated_at=now,
                next_attempt_at=start,
                expires_at=start + self._policy.retry.max_lifetime,
                tags=list(message.controls.tags),
                metadata=dict(message.controls.metadata),
                attachments=raw_message.attachments(content),
                send_at=send_at if scheduled else None,
                events=events,
                idempotency_key=key,
                content=content,
                trace_context=trace_carrier(),
                test=test,
            )
            if not await self._emails.insert(email=email, screen=self._screen):
                # A concurrent duplicate (same key, same message) stored it first.
                return await self._emails.get(tenant_id=tenant_id, email_id=email_id)
            EMAILS_ACCEPTED.labels(domain=domain.name).inc()
            email.content = None
            return email

        return await self._idempotent(
            tenant_id=tenant_id,
            key=key,
            fingerprint=lambda: (
                _mode(test)
                + raw_message.fingerprint(
                    submission.raw, submission.envelope_from, submission.envelope_to
                )
            ),
            now=now,
            store=store,
        )

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
        """Queue a received message, byte for byte, to `recipients` (a forward route's action).

        Not `submit`: the message is somebody else's (its From domain is not the tenant's, and
        must not be rewritten, or the original DKIM signature would break). It goes out through
        the relay of `domain_name`, the tenant's domain that received it, with `envelope_from`
        as given (the caller's SRS address at that domain, or "" for a null sender). The
        workers sign it with the domain's DKIM key as every email (one more signature on top;
        the original one still verifies). Suppression applies as at every send. Idempotent: an
        email with `email_id` already stored is returned as it is.

        Raises:
            InvalidArgument: a recipient is not an address (field ``forward_to[i]``).
            FailedPrecondition: `domain_name` is not an active domain of the tenant with a
                relay.
        """
        now = self._clock.now()
        try:
            return await self._emails.get(tenant_id=tenant_id, email_id=email_id)
        except NotFound:
            pass
        boxes = [parse_mailbox(a, f"forward_to[{i}]") for i, a in enumerate(recipients)]
        domain = await self._sending_domain(
            tenant_id=tenant_id, name=domain_name, field="forward_to"
        )
        parsed = parse_message(content)
        email = Email(
            id=email_id,
            tenant_id=tenant_id,
            domain_id=domain.id,
            domain_name=domain.name,
            from_address=parsed.from_address,
            envelope_from=envelope_from,
            to=parsed.to,
            cc=parsed.cc,
            bcc=[b.addr_spec for b in boxes],
            reply_to=[],
            subject=parsed.subject,
            message_id=parsed.message_id.strip().strip("<>"),
            size=len(content),
            recipients=_dedupe(
                [Recipient(b.addr_spec, RecipientKind.BCC, updated_at=now) for b in boxes]
            ),
            status=EmailStatus.QUEUED,
            created_at=now,
            updated_at=now,
            next_attempt_at=now,
            expires_at=now + self._policy.retry.max_lifetime,
            metadata=dict(metadata),
            attachments=raw_message.attachments(content),
            events=[Event(EventType.ACCEPTED, now, detail=detail)],
            content=content,
            trace_context=trace_carrier(),
        )
        if not await self._emails.insert(email=email, screen=self._screen):
            return await self._emails.get(tenant_id=tenant_id, email_id=email_id)
        EMAILS_ACCEPTED.labels(domain=domain.name).inc()
        email.content = None
        return email

    async def get(self, *, tenant_id: str, email_id: str) -> Email:
        """The tenant's email.

        Raises:
            InvalidArgument: malformed id.
            NotFound: no such email in this tenant.
        """
        check_id(email_id)
        return await self._emails.get(tenant_id=tenant_id, email_id=email_id, now=self._clock.now())

    async def list_emails(
        self, *, tenant_id: str, filter: EmailFilter, size: int, page_token: str
    ) -> EmailPage:
        """A page of the tenant's emails, newest first.

        Raises:
            InvalidArgument: bad page size, page token or filter.
        """
        if filter.domain_id:
            check_id(filter.domain_id, field="domain_id")
        limit = page_size(
            size, default=self._policy.default_page_size, maximum=self._policy.max_page_size
        )
        query = {
            "status": filter.status.value if filter.status else "",
            "domain": filter.domain_id or "",
            "recipient": filter.recipient or "",
            "tag": filter.tag or "",
            "start": filter.start.isoformat() if filter.start else "",
            "end": filter.end.isoformat() if filter.end else "",
            "test": "1" if filter.test else "",
        }
        after = decode_page_token(page_token, query)
        emails = await self._emails.page(
            tenant_id=tenant_id, filter=filter, before_id=after, limit=limit + 1
        )
        next_token = ""
        if len(emails) > limit:
            emails = emails[:limit]
            next_token = encode_page_token(emails[-1].id, query)
        return EmailPage(emails, next_token)

    async def delete(self, *, tenant_id: str, email_id: str) -> None:
        """Cancel an unfinished email (recorded on its timeline) or remove a finished one.

        Raises:
            NotFound: no such email in this tenant.
            FailedPrecondition: a worker is delivering it right now (retry shortly).
        """
        check_id(email_id)
        now = self._clock.now()
        cancelled = await self._emails.cancel(
            tenant_id=tenant_id,
            email_id=email_id,
            event=Event(EventType.CANCELLED, now, detail="cancelled by the API"),
        )
        if cancelled is not None:
            return
        if await self._emails.delete(tenant_id=tenant_id, email_id=email_id) is not None:
            return
        email = await self._emails.get(tenant_id=tenant_id, email_id=email_id, now=now)
        raise FailedPrecondition(
            f"email {email.id} is being delivered right now; try again in a moment",
            reason="EMAIL_BEING_DELIVERED",
            violations=[PreconditionViolation("EMAIL_SENDING", "id", "a worker holds it")],
        )

    async def cancel_domain(self, *, tenant_id: str, domain_id: str) -> tuple[int, int]:
        """Cancel every unfinished email of a deleted domain, recording why on each.

        Returns:
            (cancelled, in delivery): emails cancelled now, and emails a worker held at that
            moment (their attempt finishes; without the domain's relay a deferral ends in
            failure at the maximum lifetime, recorded like any other).

        Raises:
            InvalidArgument: malformed domain id.
        """
        check_id(domain_id, field="domain_id")
        cancelled = in_delivery = 0
        for email_id in await self._emails.unfinished_ids(tenant_id=tenant_id, domain_id=domain_id):
            event = Event(
                EventType.CANCELLED,
                self._clock.now(),
                detail=f"cancelled: its domain {domain_id} was deleted",
            )
            if await self._emails.cancel(tenant_id=tenant_id, email_id=email_id, event=event):
                cancelled += 1
            else:
                in_delivery += 1  # held by a worker (or finished in between)
        return cancelled, in_delivery

    async def reschedule(self, *, tenant_id: str, email_id: str, send_at: datetime | None) -> Email:
        """Move an unfinished email that no worker holds to `send_at` (past: now).

        Its give-up time moves with it (the maximum lifetime counts from the new start).

        Raises:
            InvalidArgument: malformed id, `send_at` missing or beyond the horizon.
            NotFound: no such email in this tenant.
            FailedPrecondition: finished or cancelled, or being delivered right now.
        """
        check_id(email_id)
        if send_at is None:
            raise InvalidArgument.single("send_at", "required")
        now = self._clock.now()
        horizon = self._policy.limits.schedule_horizon
        if send_at > now + horizon:
            raise InvalidArgument.single(
                "send_at", f"at most {int(horizon.total_seconds())} seconds in the future"
            )
        start = max(send_at, now)
        event = Event(EventType.RESCHEDULED, now, detail=start.isoformat())
        moved = await self._emails.reschedule(
            tenant_id=tenant_id,
            email_id=email_id,
            start=start,
            scheduled=send_at > now,
            expires_at=start + self._policy.retry.max_lifetime,
            event=event,
        )
        if moved is not None:
            return moved
        email = await self._emails.get(tenant_id=tenant_id, email_id=email_id, now=now)
        if email.status == EmailStatus.SENDING:
            raise FailedPrecondition(
                f"email {email.id} is being delivered right now; try again in a moment",
                reason="EMAIL_BEING_DELIVERED",
                violations=[PreconditionViolation("EMAIL_SENDING", "id", "a worker holds it")],
            )
        raise FailedPrecondition(
            f"only scheduled, queued or deferred emails can be rescheduled; this one is "
            f"{email.status.value}",
            reason="EMAIL_NOT_RESCHEDULABLE",
            violations=[PreconditionViolation("EMAIL_STATUS", "id", email.status.value)],
        )

    async def resend(self, *, tenant_id: str, email_id: str, test: bool = False) -> Email:
        """A new delivery of a failed, bounced or partially sent email to its unsent recipients.

        The new email has its own id and Message-ID, links to the original (`resent_from_id`),
        and both timelines get a RESENT event. `test` is the caller's mode (a test key), which
        must be the email's: a test key never sends live, a live key never simulates.

        Raises:
            NotFound: no such email in this tenant.
            FailedPrecondition: the email is not failed, bounced or partially sent, or it is a
                test email and the caller live (or the other way round).
        """
        check_id(email_id)
        original = await self._emails.get(tenant_id=tenant_id, email_id=email_id)
        if original.test != test:
            kind = (
                "a test email with a live key" if original.test else "a live email with a test key"
            )
            raise FailedPrecondition(
                f"cannot resend {kind}: a test key never sends live and a live key never simulates",
                reason="TEST_MODE_MISMATCH",
                violations=[PreconditionViolation("TEST_MODE", "id", kind)],
            )
        if original.status not in RESENDABLE:
            raise FailedPrecondition(
                f"only failed, bounced or partially sent emails can be resent; this one is "
                f"{original.status.value}",
                reason="EMAIL_NOT_RESENDABLE",
                violations=[PreconditionViolation("EMAIL_STATUS", "id", original.status.value)],
            )
        now = self._clock.now()
        new_email_id = new_id()
        message_id = f"{new_email_id}@{original.domain_name}"
        content = await self._emails.content(email=original)
        # Same message, new Message-ID: receivers must not drop it as a duplicate.
        content = _MESSAGE_ID_RE.sub(
            f"Message-ID: <{message_id}>\r\n".encode().replace(b"\\", b"\\\\"), content, count=1
        )
        recipients = [
            Recipient(r.address, r.kind, updated_at=now)
            for r in original.recipients
            if r.status != RecipientStatus.SENT
        ]
        email = Email(
            id=new_email_id,
            tenant_id=tenant_id,
            domain_id=original.domain_id,
            domain_name=original.domain_name,
            from_address=original.from_address,
            envelope_from=original.envelope_from,
            to=original.to,
            cc=original.cc,
            bcc=original.bcc,
            reply_to=original.reply_to,
            subject=original.subject,
            message_id=message_id,
            size=len(content),
            recipients=recipients,
            status=EmailStatus.QUEUED,
            created_at=now,
            updated_at=now,
            next_attempt_at=now,
            expires_at=now + self._policy.retry.max_lifetime,
            tags=original.tags,
            metadata=original.metadata,
            attachments=original.attachments,
            events=[
                Event(EventType.ACCEPTED, now),
                Event(EventType.RESENT, now, detail=f"resend of {original.id}"),
            ],
            resent_from_id=original.id,
            content=content,
            test=original.test,
        )
        await self._emails.insert(email=email, screen=self._screen)
        EMAILS_ACCEPTED.labels(domain=original.domain_name).inc()
        await self._emails.add_event(
            tenant_id=tenant_id,
            email_id=original.id,
            event=Event(EventType.RESENT, now, detail=f"resent as {new_email_id}"),
        )
        email.content = None
        return email

    async def stats(
        self,
        *,
        tenant_id: str,
        start: datetime | None,
        end: datetime | None,
        domain_id: str | None,
        test: bool = False,
    ) -> EmailStats:
        """Counts per status and per domain of emails accepted in the window, plus the queue.

        Live emails only; with `test`, test emails only.

        Raises:
            InvalidArgument: the window is empty or reversed, or the domain id is malformed.
        """
        if domain_id:
            check_id(domain_id, field="domain_id")
        now = self._clock.now()
        # Without an end: up to the next whole minute (no email is created after now), so the
        # default window is whole minutes and answered from the counts alone.
        end = end or ceil_to(now, int(FINEST.total_seconds()))
        start = start or end - timedelta(hours=24)
        if start >= end:
            # Field paths reach clients in the JSON names (startTime); so does the other field.
            raise InvalidArgument.single("start_time", "must be before endTime")
        rows = await self._emails.stats(
            tenant_id=tenant_id, start=start, end=end, domain_id=domain_id, test=test
        )
        counts: dict[EmailStatus, int] = {}
        per_domain: dict[str, dict[EmailStatus, int]] = {}
        for row_domain, status, n in rows:
            s = EmailStatus(status)
            counts[s] = counts.get(s, 0) + n
            per_domain.setdefault(row_domain, {})[s] = n
        depth, oldest = await self._emails.queue(
            tenant_id=tenant_id, now=now, domain_id=domain_id, test=test
        )
        age = (now - oldest).total_seconds() if oldest is not None else 0.0
        return EmailStats(start, end, counts, per_domain, depth, max(age, 0.0))

    async def delivery_health(self) -> DeliveryHealth:
        """Queue depth and oldest due age over all tenants, and the relays' last outcomes."""
        depth, age = await self._emails.queue_health(now=self._clock.now())
        return DeliveryHealth(depth, age, await self._relay_health.recent())

    async def sweep_idempotency(self) -> int:
        """Forget idempotency keys older than their window (and old claim bookkeeping)."""
        now = self._clock.now()
        await self._emails.sweep_claims(before=now - timedelta(hours=1))
        return await self._idempotency.sweep(now=now)

    async def sweep_retention(self) -> int:
        """Remove finished emails past their tenant's retention, and stats counts nobody needs.

        Returns:
            How many emails were removed.
        """
        now = self._clock.now()
        policy = self._policy
        retentions = [policy.retention, *policy.tenant_retention.values()]
        removed = await self._emails.sweep_finished(
            now=now, retention=policy.retention_of, shortest=min(retentions)
        )
        removed += await self._emails.sweep_test(now=now, retention=policy.test_retention)
        # Counts of a bucket matter while an email created in it may exist: it is scheduled
        # at most the horizon ahead, finishes at most the maximum lifetime after that, and is
        # kept for the longest retention once finished (a day more for clock skew).
        oldest = policy.limits.schedule_horizon + policy.retry.max_lifetime + max(retentions)
        await self._emails.sweep_tallies(before=now - oldest - timedelta(days=1))
        return removed


def _mode(test: bool) -> str:
    """What an idempotency fingerprint starts with: test and live requests never match."""
    return "test:" if test else ""


def _too_large(size: int, limit: int) -> InvalidArgument:
    return InvalidArgument(
        [FieldViolation("raw_message", f"the message is {size} bytes; at most {limit} allowed")],
        reason="MESSAGE_TOO_LARGE",
    )


def _dedupe(recipients: list[Recipient]) -> list[Recipient]:
    # One envelope recipient per address (RCPT TO twice would deliver twice).
    seen: set[str] = set()
    out = []
    for r in recipients:
        key = r.address.lower()
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


__all__ = ["RESENDABLE", "DeliveryHealth", "MailManager", "MailPolicy"]
