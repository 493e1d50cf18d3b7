"""The outcome rules: every change of an email's state and its recipients' states, decided here.

Pure functions, no I/O: given an email as stored (or as claimed) and what happened (a relay's
replies, a claim, a cancel, a reschedule, a note on the timeline), they return the next state
as a `Transition`. Storage applies a transition with one write of the email's document
(`services.mail.documents.transition_update`), so the state and the timeline entries that
explain it are never written apart.

Replies are classified per recipient: 2xx sent, 5xx bounced (no retry), 4xx and transport
failures (code 0: timeouts, dropped connections, TLS failures) deferred with exponential
backoff and jitter until the email's maximum lifetime, then failed. Our own permanent verdict
without a reply (code 0 with a ``5.x.x`` enhanced code, e.g. a relay without SMTPUTF8) fails
the recipient at once. The email's status follows from its recipients' (`decide`,
`finished_status`). Reports that come back after the relay's answer (a DSN or a complaint to
the message's return path) change a finished email by `late_feedback`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from services.mail.models import (
    OPEN_RECIPIENTS,
    Claimed,
    Email,
    EmailStatus,
    Event,
    EventType,
    FeedbackKind,
    Recipient,
    RecipientStatus,
    SmtpReply,
)

# Unfinished emails no worker is on: what the API may cancel or reschedule.
WAITING = frozenset({EmailStatus.QUEUED, EmailStatus.SCHEDULED, EmailStatus.DEFERRED})
# Statuses a worker takes once next_attempt_at has passed (SENDING: its lease expired).
CLAIMABLE = frozenset({*WAITING, EmailStatus.SENDING})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When to try again after a temporary failure."""

    min_backoff: timedelta = timedelta(minutes=5)
    max_backoff: timedelta = timedelta(seconds=4000)
    jitter: float = 0.2  # the delay is shortened by up to this fraction, at random
    max_lifetime: timedelta = timedelta(days=5)

    def delay(self, attempt: int, rng: random.Random) -> timedelta:
        """Wait after failed attempt number `attempt` (1-based): doubling, capped, jittered."""
        base = self.min_backoff * (2 ** max(0, min(attempt - 1, 30)))
        capped = min(base, self.max_backoff)
        factor: float = 1.0 - self.jitter * rng.random()
        return timedelta(seconds=capped.total_seconds() * factor)


@dataclass(frozen=True, slots=True)
class Schedule:
    """A new start of an email (reschedule): its send time and give-up time."""

    send_at: datetime | None
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class Transition:
    """One change of one email, written as one write of its document.

    Fields left None stay as stored. `status` set means `next_attempt_at` and ``updated_at``
    (the retention clock of finished mail) are written too; a note on the timeline alone moves
    neither. `old_status` is the stored status the change moves from (stats counts).
    """

    email_id: str
    time: datetime
    events: tuple[Event, ...]
    old_status: EmailStatus | None = None
    status: EmailStatus | None = None
    next_attempt_at: datetime | None = None
    recipients: tuple[Recipient, ...] | None = None
    attempts: int | None = None
    schedule: Schedule | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one delivery attempt changed (before the claim's own bookkeeping is added)."""

    recipients: list[Recipient]
    status: EmailStatus
    next_attempt_at: datetime | None
    events: list[Event]


def decide(
    claimed: Claimed,
    replies: dict[str, SmtpReply],
    *,
    now: datetime,
    policy: RetryPolicy,
    rng: random.Random,
    suppressed: Mapping[str, str] | None = None,
) -> Outcome:
    """Turn the replies of one attempt into recipient states, overall status and events.

    `suppressed` (address -> the suppression list entry's reason) are the open recipients
    found on the tenant's list at delivery time: not attempted, SUPPRESSED.
    """
    email = claimed.email
    recipients = [replace(r) for r in email.recipients]
    events: list[Event] = []
    expired = now >= email.expires_at
    for r in recipients:
        if r.status not in OPEN_RECIPIENTS:
            continue
        if suppressed and r.address in suppressed:
            events.append(_suppress(r, suppressed[r.address], now))
            continue
        reply = replies.get(r.address) or SmtpReply(0, "", "not attempted")
        # RFC 3464 Diagnostic-Code style when the relay answered; our own words otherwise.
        diagnostic = f"smtp; {reply.code} {reply.text}" if reply.code else reply.text
        r.attempts += 1
        r.last_reply = reply
        r.updated_at = now
        klass = reply.code // 100
        if klass == 2:
            r.status = RecipientStatus.SENT
            events.append(Event(EventType.SENT, now, r.address, reply))
        elif klass == 5:
            r.status = RecipientStatus.BOUNCED
            events.append(Event(EventType.BOUNCED, now, r.address, reply, diagnostic))
        elif reply.enhanced_code.startswith("5."):
            # Our own permanent verdict, without a relay reply (e.g. no SMTPUTF8): failed
            # at once with the reason, neither retried nor counted as the address's bounce.
            r.status = RecipientStatus.FAILED
            events.append(Event(EventType.FAILED, now, r.address, reply, diagnostic))
        elif expired:
            r.status = RecipientStatus.FAILED
            events.append(
                Event(
                    EventType.FAILED,
                    now,
                    r.address,
                    reply,
                    f"gave up after the maximum lifetime; last: {diagnostic}",
                )
            )
        else:
            r.status = RecipientStatus.DEFERRED
            events.append(Event(EventType.DEFERRED, now, r.address, reply, diagnostic))
    statuses = {r.status for r in recipients}
    next_at: datetime | None = None
    if RecipientStatus.DEFERRED in statuses or RecipientStatus.PENDING in statuses:
        status = EmailStatus.DEFERRED
        # Never past the give-up time, so the last attempt happens at the deadline.
        next_at = min(now + policy.delay(email.attempts, rng), email.expires_at)
    else:
        status = finished_status(statuses)
    return Outcome(recipients, status, next_at, events)


def finished_status(statuses: set[RecipientStatus]) -> EmailStatus:
    """The status of an email none of whose recipients waits for an attempt any more."""
    if statuses == {RecipientStatus.SENT}:
        return EmailStatus.SENT
    if RecipientStatus.SENT in statuses:
        return EmailStatus.PARTIALLY_SENT
    if RecipientStatus.FAILED in statuses:
        return EmailStatus.FAILED
    if RecipientStatus.BOUNCED in statuses:
        return EmailStatus.BOUNCED
    if statuses == {RecipientStatus.SUPPRESSED}:
        return EmailStatus.SUPPRESSED
    return EmailStatus.CANCELLED


# Recipients a report after the relay's answer can be about: the relay accepted the message
# for them (a later bounce of a SENT recipient is what such reports are for; BOUNCED ones may
# still complain or have their bounce reported twice).
_DELIVERED = frozenset({RecipientStatus.SENT, RecipientStatus.BOUNCED})


def late_feedback(
    email: Email,
    *,
    recipient: str,
    kind: FeedbackKind,
    reply: SmtpReply,
    detail: str,
    now: datetime,
) -> Transition | None:
    """A report about one recipient that came after the relay accepted the message.

    * bounce: the recipient becomes BOUNCED (even though the relay said 250) with a bounced
      event; the email's status follows from its recipients (`finished_status`);
    * delay: a deferred event, no change of status (the message is still on its way);
    * complaint: a complained event, no change of status.

    None when there is nothing to change: the recipient is not one the relay accepted, or the
    report was applied already (a bounced recipient; a complaint already recorded for it; the
    same delay, same reply and detail, already on the timeline), which makes applying the same
    report twice a no-op.
    """
    target = next((r for r in email.recipients if r.address == recipient), None)
    if target is None or target.status not in _DELIVERED:
        return None
    if kind is FeedbackKind.BOUNCE:
        if target.status is RecipientStatus.BOUNCED:
            return None
        recipients = tuple(
            replace(r, status=RecipientStatus.BOUNCED, last_reply=reply, updated_at=now)
            if r is target
            else r
            for r in email.recipients
        )
        return Transition(
            email_id=email.id,
            time=now,
            events=(Event(EventType.BOUNCED, now, recipient, reply, detail),),
            old_status=email.status,
            status=finished_status({r.status for r in recipients}),
            next_attempt_at=None,
            recipients=recipients,
        )
    event_type = EventType.DEFERRED if kind is FeedbackKind.DELAY else EventType.COMPLAINED
    if kind is FeedbackKind.DELAY and target.status is RecipientStatus.BOUNCED:
        return None  # bounced already: a late word that it is delayed changes nothing
    for e in email.events:
        if e.type is event_type and e.recipient == recipient and _repeats(e, kind, reply, detail):
            return None
    return note(email, event=Event(event_type, now, recipient, reply, detail))


def _repeats(event: Event, kind: FeedbackKind, reply: SmtpReply, detail: str) -> bool:
    """Whether a timeline entry of the same type and recipient already records this report.

    One complaint per recipient is recorded; delays are told apart by their reply and detail
    (a second, later delay report is news; the same one delivered twice is not).
    """
    if kind is FeedbackKind.COMPLAINT:
        return True
    return event.reply == reply and event.detail == detail


def _suppress(r: Recipient, reason: str, now: datetime) -> Event:
    r.status = RecipientStatus.SUPPRESSED
    r.updated_at = now
    return Event(EventType.SUPPRESSED, now, r.address, detail=reason)


def suppress_new(email: Email, suppressed: Mapping[str, str], *, now: datetime) -> list[str]:
    """Mark a new email's recipients found on the suppression list (before it is stored).

    `suppressed` maps an address to its list entry's reason. Each such recipient becomes
    SUPPRESSED with a suppressed event (detail: the reason); the others go on. An email whose
    recipients are all suppressed is SUPPRESSED, with no attempt due, so it never reaches a
    relay. Changes `email` in place.

    Returns:
        The suppressed addresses, in recipient order.
    """
    hit = [
        r
        for r in email.recipients
        if r.address in suppressed and r.status != RecipientStatus.SUPPRESSED
    ]
    for r in hit:
        email.events.append(_suppress(r, suppressed[r.address], now))
    if email.recipients and all(r.status == RecipientStatus.SUPPRESSED for r in email.recipients):
        email.status = EmailStatus.SUPPRESSED
        email.next_attempt_at = None
    return [r.address for r in hit]


def after_attempt(claimed: Claimed, outcome: Outcome, *, now: datetime) -> Transition:
    """The write of an attempt's outcome: its claim's events first, then the attempt's."""
    return Transition(
        email_id=claimed.email.id,
        time=now,
        events=(*claimed.events, *outcome.events),
        old_status=claimed.stored_status,
        status=outcome.status,
        next_attempt_at=outcome.next_attempt_at,
        recipients=tuple(outcome.recipients),
        attempts=claimed.email.attempts,
    )


def claim(
    email: Email,
    *,
    token: str,
    number: int,
    now: datetime,
    lease: timedelta,
    worker_id: str,
    taken_over: tuple[Event, ...] = (),
) -> Claimed:
    """A stored email as the worker that won claim `number` holds it.

    Nothing is written at claim time: the attempt (counted here) and the CLAIMED events (this
    one, and those of expired leases taken over on the way) are written with its outcome.
    """
    stored = email.status
    email.attempts += 1
    email.status = EmailStatus.SENDING
    events = (*taken_over, Event(EventType.CLAIMED, now, detail=worker_id))
    return Claimed(email, token, number, now + lease, events, stored)


def leased(email: Email, *, lease_expires: datetime) -> Email:
    """How the API shows an email a live lease holds: sending, until the lease's end."""
    email.status = EmailStatus.SENDING
    email.next_attempt_at = lease_expires
    return email


def cancel(email: Email, *, event: Event) -> Transition | None:
    """Cancel a waiting email: open recipients cancelled, no further attempt; None otherwise."""
    if email.status not in WAITING:
        return None
    recipients = tuple(
        replace(r, status=RecipientStatus.CANCELLED) if r.status in OPEN_RECIPIENTS else r
        for r in email.recipients
    )
    return Transition(
        email_id=email.id,
        time=event.time,
        events=(event,),
        old_status=email.status,
        status=EmailStatus.CANCELLED,
        next_attempt_at=None,
        recipients=recipients,
    )


def reschedule(
    email: Email, *, start: datetime, scheduled: bool, expires_at: datetime, event: Event
) -> Transition | None:
    """Move a waiting email to `start` (scheduled if in the future); None if it is not waiting."""
    if email.status not in WAITING:
        return None
    return Transition(
        email_id=email.id,
        time=event.time,
        events=(event,),
        old_status=email.status,
        status=EmailStatus.SCHEDULED if scheduled else EmailStatus.QUEUED,
        next_attempt_at=start,
        schedule=Schedule(start if scheduled else None, expires_at),
    )


def note(email: Email, *, event: Event) -> Transition:
    """An entry on the timeline that changes no state (e.g. RESENT on the original)."""
    return Transition(email_id=email.id, time=event.time, events=(event,))


def apply(email: Email, transition: Transition) -> Email:
    """`email` (changed in place) as it is stored once `transition` is written."""
    if transition.status is not None:
        email.status = transition.status
        email.next_attempt_at = transition.next_attempt_at
        email.updated_at = transition.time
    if transition.recipients is not None:
        email.recipients = list(transition.recipients)
    if transition.attempts is not None:
        email.attempts = transition.attempts
    if transition.schedule is not None:
        email.send_at = transition.schedule.send_at
        email.expires_at = transition.schedule.expires_at
    email.events.extend(transition.events)
    return email


__all__ = [
    "CLAIMABLE",
    "WAITING",
    "Outcome",
    "RetryPolicy",
    "Schedule",
    "Transition",
    "after_attempt",
    "apply",
    "cancel",
    "claim",
    "decide",
    "finished_status",
    "late_feedback",
    "leased",
    "note",
    "reschedule",
    "suppress_new",
]
