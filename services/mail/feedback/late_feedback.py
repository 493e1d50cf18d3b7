"""Feedback that arrives after the relay's answer, applied to one recipient of one email.

The relay's 250 is not the end of a message's story: hours later the receiving system may send
a bounce (an RFC 3464 DSN, ``Action: failed``), a delayed-delivery warning (``Action:
delayed``) or, once the recipient read it, a complaint (an RFC 5965 ARF report). Each comes
back to the message's return path (services/mail/return_paths.py), which names the email and
the recipient; test mode simulates the same outcomes. `LateFeedback.apply` is the one place
any of them changes an email:

* ``bounce``: the recipient becomes BOUNCED, even though it was SENT, with a ``bounced`` event
  carrying the report's status and diagnostic; the email's status follows from its
  recipients (`outcomes.finished_status`: a one-recipient email becomes BOUNCED, one whose
  other recipients were delivered PARTIALLY_SENT); the suppression rules decide from the
  enhanced status code (`suppression_rules.bounce_suppresses`) whether the address is
  suppressed;
* ``delay``: a ``deferred`` event, no change of status;
* ``complaint``: a ``complained`` event and a suppression with reason ``complaint``.

The change goes through the mail service's one state-change write
(`MongoEmailRepository.change_finished` -> `documents.transition_update`, events announced and
pushed onto the email's outbox with the change, see `event_log`), so webhooks and the events API
hear of it like of any delivery outcome. The suppression entry is written after the change, naming
its event (a crash in between is repaired by the next application of the same report, see
below), exactly as the delivery queue does for a relay's 5xx.

Idempotent: the rule (`outcomes.late_feedback`) finds a report already applied (recipient
BOUNCED, the complaint or the same delay already on the timeline) and changes nothing, so the
same DSN delivered twice leaves one state change and one event; the suppression is then made
again from the recorded event (a no-op when it exists).

Only finished emails are changed: while a worker may still write an email (another recipient
is deferred) the report is refused with `Conflict` and its sender retries later (the inbound
server answers 451), rather than racing the worker's write.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

from services.core.clock import Clock
from services.core.mongo import Document
from services.mail import outcomes
from services.mail.feedback.suppression_rules import Reason
from services.mail.feedback.suppression_store import SuppressionList
from services.mail.models import Email, FeedbackKind, SmtpReply
from services.mail.repository import MongoEmailRepository

log = logging.getLogger(__name__)

# "550 5.1.1 text", "550-5.1.1 text", "550 text": the reply code a diagnostic starts with.
_REPLY_CODE = re.compile(r"^\s*([2-5]\d\d)[ -]")
_EVENT_TYPE = {
    FeedbackKind.BOUNCE: "bounced",
    FeedbackKind.DELAY: "deferred",
    FeedbackKind.COMPLAINT: "complained",
}


@dataclass(frozen=True, slots=True)
class FeedbackResult:
    """What `LateFeedback.apply` did."""

    applied: bool  # a change (and its event) was written by this call
    outcome: str  # for the record of the report: "applied: ...", "already applied: ..."...
    email: Email | None = None  # the email as stored afterwards (None: no such email)
    event_id: str = ""  # the event recording this feedback (new or from before), if any


class LateFeedback:
    """Applies feedback that arrives after the relay's answer (see the module docstring)."""

    def __init__(
        self,
        *,
        emails: MongoEmailRepository,
        suppressions: SuppressionList | None,
        clock: Clock,
    ) -> None:
        self._emails = emails
        self._suppressions = suppressions
        self._clock = clock

    async def apply(
        self,
        *,
        email_id: str,
        recipient: str,
        kind: FeedbackKind,
        status: str = "",
        diagnostic: str = "",
        source: str,
        tenant_id: str | None = None,
    ) -> FeedbackResult:
        """Apply one report about `recipient` of `email_id` (idempotent).

        Args:
            email_id: the email the report is about.
            recipient: the recipient as the email stores it (what RCPT TO got).
            kind: bounce, delay or complaint.
            status: the RFC 3463 enhanced status code the report gives ("5.1.1"), or "".
            diagnostic: the remote server's reply as reported ("550 5.1.1 <a@b>: unknown"),
                or "" (a complaint has none).
            source: who reported it, in words kept on the event (``dsn from mx.example``,
                ``arf abuse from feedback.example``, ``test mode``); part of what makes two
                delay reports the same one.
            tenant_id: when given, the email must be this tenant's (a caller acting for a
                tenant); None when the caller authenticated the email otherwise (a return
                path's token).

        Returns:
            The result; ``applied`` False with the reason in ``outcome`` when the email is not
            (or no longer) stored, the recipient is not one the relay accepted, or the report
            was applied before.

        Raises:
            Conflict: the email is still being delivered, or was changed concurrently: apply
                the report again later.
        """
        reply = _reply(status, diagnostic)
        detail = _detail(source, status, diagnostic)
        now = self._clock.now()
        changed = await self._emails.change_finished(
            email_id=email_id,
            now=now,
            change=lambda email: (
                None
                if tenant_id is not None and email.tenant_id != tenant_id
                else outcomes.late_feedback(
                    email, recipient=recipient, kind=kind, reply=reply, detail=detail, now=now
                )
            ),
        )
        if changed is None or (tenant_id is not None and changed.email.tenant_id != tenant_id):
            return FeedbackResult(False, "ignored: the email is not stored (expired or deleted)")
        email = changed.email
        target = next((r for r in email.recipients if r.address == recipient), None)
        what = f"{_EVENT_TYPE[kind]} {recipient}" + (f" ({status})" if status else "")
        if target is None:
            return FeedbackResult(False, f"ignored: {recipient} is not a recipient", email)
        event = _event_of(changed.written, kind, recipient)
        if event is not None:
            await self._suppress(email, event, kind, status, detail)
            log.info(
                "feedback after delivery applied",
                extra={"fields": {"email": email.id, "event": event["_id"], "kind": kind.value}},
            )
            return FeedbackResult(True, f"applied: {what}", email, str(event["_id"]))
        earlier = _event_of(changed.recorded, kind, recipient)
        if earlier is None:
            return FeedbackResult(
                False,
                f"ignored: {recipient} was not accepted by the relay ({target.status.value})",
                email,
            )
        # Applied before: make sure its suppression exists too (a crash after the change).
        await self._suppress(email, earlier, kind, status, detail)
        return FeedbackResult(False, f"already applied: {what}", email, str(earlier["_id"]))

    async def _suppress(
        self, email: Email, event: Document, kind: FeedbackKind, status: str, detail: str
    ) -> None:
        if self._suppressions is None or kind is FeedbackKind.DELAY:
            return
        if kind is FeedbackKind.BOUNCE:
            await self._suppressions.record_bounce(
                tenant_id=email.tenant_id,
                address=event["recipient"],
                enhanced_code=status,
                event_id=event["_id"],
                detail=detail,
            )
        else:
            await self._suppressions.add_automatic(
                tenant_id=email.tenant_id,
                address=event["recipient"],
                reason=Reason.COMPLAINT,
                event_id=event["_id"],
                detail=detail,
            )


def _reply(status: str, diagnostic: str) -> SmtpReply:
    """The report as an SMTP reply, recorded as a relay's is: code (0 if none), then the text.

    The code is the one the diagnostic starts with; the text is what follows it.
    """
    match = _REPLY_CODE.match(diagnostic)
    if match is None:
        return SmtpReply(0, status, diagnostic.strip()[:1000])
    return SmtpReply(int(match.group(1)), status, diagnostic[match.end() :].strip()[:1000])


def _detail(source: str, status: str, diagnostic: str) -> str:
    """The event's reason: who reported it, and what (the same report gives the same text)."""
    said = diagnostic.strip() or (f"status {status}" if status else "")
    return f"reported after delivery by {source}" + (f": {said}" if said else "")


def _event_of(feed: Sequence[Document], kind: FeedbackKind, recipient: str) -> Document | None:
    """The newest event of this kind about `recipient` in a list of event documents."""
    wanted = _EVENT_TYPE[kind]
    found = [e for e in feed if e.get("type") == wanted and e.get("recipient") == recipient]
    return found[-1] if found else None


__all__ = ["FeedbackKind", "FeedbackResult", "LateFeedback"]
