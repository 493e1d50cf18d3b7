"""The outcome rules: retry schedule, replies, claims, cancels, reschedules (pure, no I/O)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from services.mail import outcomes
from services.mail.documents import transition_update
from services.mail.models import (
    Claimed,
    Email,
    EmailStatus,
    Event,
    EventType,
    Recipient,
    RecipientKind,
    RecipientStatus,
    SmtpReply,
)
from services.mail.outcomes import RetryPolicy, decide


def seeded(seed: int) -> random.Random:
    """A reproducible generator (jitter only; nothing secret)."""
    return random.Random(seed)  # noqa: S311


NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
POLICY = RetryPolicy(
    min_backoff=timedelta(minutes=5),
    max_backoff=timedelta(seconds=4000),
    jitter=0.0,
    max_lifetime=timedelta(days=5),
)


def claimed(*addresses: str, attempts: int = 1, expires: datetime | None = None) -> Claimed:
    email = Email(
        id="e" * 24,
        tenant_id="t",
        domain_id="d" * 24,
        domain_name="x.example",
        from_address="a@x.example",
        envelope_from="a@x.example",
        to=list(addresses),
        cc=[],
        bcc=[],
        reply_to=[],
        subject="s",
        message_id="m@x.example",
        size=10,
        recipients=[Recipient(a, RecipientKind.TO) for a in addresses],
        status=EmailStatus.SENDING,
        created_at=NOW,
        updated_at=NOW,
        next_attempt_at=None,
        expires_at=expires or NOW + timedelta(days=5),
        attempts=attempts,
    )
    return Claimed(email, "token")


def test_default_schedule_follows_postfix() -> None:
    # 300 s doubling (Postfix minimal_backoff_time) up to 4000 s (maximal_backoff_time).
    rng = seeded(1)
    waits = [POLICY.delay(n, rng).total_seconds() for n in range(1, 7)]
    assert waits == [300, 600, 1200, 2400, 4000, 4000]


@pytest.mark.parametrize("seed", range(5))
def test_jitter_only_shortens_within_its_fraction(seed: int) -> None:
    # With 20 % jitter every wait lies in [80 %, 100 %] of the unjittered one.
    policy = RetryPolicy(jitter=0.2)
    rng = seeded(seed)
    for attempt in range(1, 8):
        wait = policy.delay(attempt, rng).total_seconds()
        full = min(300 * 2 ** (attempt - 1), 4000)
        assert 0.8 * full <= wait <= full


@pytest.mark.parametrize(
    ("codes", "status"),
    [
        ((250, 250), EmailStatus.SENT),
        ((550, 554), EmailStatus.BOUNCED),
        ((250, 550), EmailStatus.PARTIALLY_SENT),
        ((250, 451), EmailStatus.DEFERRED),
        ((550, 0), EmailStatus.DEFERRED),
    ],
)
def test_overall_status_from_recipient_replies(codes: tuple[int, int], status: EmailStatus) -> None:
    # Per-recipient classes combine into one status; anything temporary keeps it in the queue.
    c = claimed("a@y.example", "b@y.example")
    replies = {
        r.address: SmtpReply(code, "", "x")
        for r, code in zip(c.email.recipients, codes, strict=True)
    }
    outcome = decide(c, replies, now=NOW, policy=POLICY, rng=seeded(0))
    assert outcome.status == status
    assert (outcome.next_attempt_at is not None) == (status == EmailStatus.DEFERRED)


def test_temporary_failure_after_the_lifetime_fails_with_the_last_diagnostic() -> None:
    # Past expires_at a 4xx is final: FAILED, with the relay's words in the event.
    c = claimed("a@y.example", expires=NOW)
    outcome = decide(
        c,
        {"a@y.example": SmtpReply(451, "4.3.0", "4.3.0 try later")},
        now=NOW,
        policy=POLICY,
        rng=seeded(0),
    )
    assert outcome.status == EmailStatus.FAILED
    assert outcome.recipients[0].status == RecipientStatus.FAILED
    assert outcome.events[0].type == EventType.FAILED
    assert "smtp; 451 4.3.0 try later" in outcome.events[0].detail


def test_next_attempt_never_passes_the_give_up_time() -> None:
    # A wait that would end after expires_at is cut to it, so the last try happens on time.
    c = claimed("a@y.example", attempts=6, expires=NOW + timedelta(minutes=10))
    outcome = decide(
        c,
        {"a@y.example": SmtpReply(0, "", "timeout")},
        now=NOW,
        policy=POLICY,
        rng=seeded(0),
    )
    assert outcome.next_attempt_at == NOW + timedelta(minutes=10)


def test_decided_recipients_are_left_alone() -> None:
    # A recipient already sent in an earlier attempt is neither retried nor counted again.
    c = claimed("a@y.example", "b@y.example")
    c.email.recipients[0].status = RecipientStatus.SENT
    c.email.recipients[0].attempts = 1
    outcome = decide(
        c,
        {"b@y.example": SmtpReply(250, "", "ok")},
        now=NOW,
        policy=POLICY,
        rng=seeded(0),
    )
    assert outcome.status == EmailStatus.SENT
    assert [r.attempts for r in outcome.recipients] == [1, 1]
    assert [e.recipient for e in outcome.events] == ["b@y.example"]


def waiting(status: EmailStatus, *addresses: str) -> Email:
    """A stored email in `status` (not claimed), its first recipient already sent."""
    email = claimed(*addresses).email
    email.status = status
    email.recipients[0].status = RecipientStatus.SENT
    return email


def test_cancel_decides_only_for_waiting_emails_and_open_recipients() -> None:
    # Queued, scheduled or deferred: cancelled, open recipients cancelled, sent ones kept.
    event = Event(EventType.CANCELLED, NOW, detail="by the API")
    for status in (EmailStatus.SENT, EmailStatus.SENDING, EmailStatus.CANCELLED):
        assert outcomes.cancel(waiting(status, "a@x.org", "b@x.org"), event=event) is None
    email = waiting(EmailStatus.DEFERRED, "a@x.org", "b@x.org")
    change = outcomes.cancel(email, event=event)
    assert change is not None
    assert change.old_status == EmailStatus.DEFERRED
    assert change.status == EmailStatus.CANCELLED
    assert change.recipients is not None
    assert [r.status for r in change.recipients] == [
        RecipientStatus.SENT,
        RecipientStatus.CANCELLED,
    ]
    after = outcomes.apply(email, change)
    assert after.next_attempt_at is None
    assert after.events[-1] == event
    assert after.updated_at == NOW


def test_one_write_records_state_and_timeline_together() -> None:
    # The update of a transition sets its fields and appends its events; a note moves no state
    # (and not the retention clock, updated_at).
    email = waiting(EmailStatus.QUEUED, "a@x.org")
    later = NOW + timedelta(hours=1)
    moved = outcomes.reschedule(
        email,
        start=later,
        scheduled=True,
        expires_at=later + timedelta(days=5),
        event=Event(EventType.RESCHEDULED, NOW),
    )
    assert moved is not None
    update = transition_update(moved)
    assert update["$set"]["status"] == EmailStatus.SCHEDULED.value
    assert update["$set"]["next_attempt_at"] == later
    assert update["$set"]["send_at"] == later
    assert [e["type"] for e in update["$push"]["events"]["$each"]] == ["rescheduled"]
    note = transition_update(outcomes.note(email, event=Event(EventType.RESENT, NOW)))
    assert "$set" not in note
    assert [e["type"] for e in note["$push"]["events"]["$each"]] == ["resent"]


def test_an_attempt_records_its_claims_then_its_outcome() -> None:
    # The claim's own events (a taken-over lease, then this claim) go first, with the count.
    email = waiting(EmailStatus.QUEUED, "a@x.org")
    email.recipients[0].status = RecipientStatus.PENDING
    taken = outcomes.claim(
        email,
        token="t",
        number=1,
        now=NOW,
        lease=timedelta(minutes=2),
        worker_id="w2",
        taken_over=(Event(EventType.CLAIMED, NOW, detail="w1 (lease expired)"),),
    )
    assert taken.email.status == EmailStatus.SENDING
    assert taken.stored_status == EmailStatus.QUEUED
    ok = {"a@x.org": SmtpReply(250, "2.0.0", "ok")}
    outcome = decide(taken, ok, now=NOW, policy=POLICY, rng=seeded(1))
    change = outcomes.after_attempt(taken, outcome, now=NOW)
    assert [e.type for e in change.events] == [EventType.CLAIMED, EventType.CLAIMED, EventType.SENT]
    assert change.attempts == 2
    assert change.old_status == EmailStatus.QUEUED
    assert change.status == EmailStatus.SENT


def test_suppressed_recipients_are_not_attempted_and_all_suppressed_is_suppressed() -> None:
    # At delivery: the suppressed one gets SUPPRESSED with the entry's reason, the other its
    # reply's verdict; every one suppressed ends SUPPRESSED with nothing due.
    held = claimed("a@x.org", "b@x.org")
    ok = {"b@x.org": SmtpReply(250, "2.0.0", "ok")}
    outcome = decide(
        held, ok, now=NOW, policy=POLICY, rng=seeded(1), suppressed={"a@x.org": "manual"}
    )
    assert [r.status for r in outcome.recipients] == [
        RecipientStatus.SUPPRESSED,
        RecipientStatus.SENT,
    ]
    assert outcome.status == EmailStatus.PARTIALLY_SENT
    assert [(e.type, e.recipient, e.detail) for e in outcome.events] == [
        (EventType.SUPPRESSED, "a@x.org", "manual"),
        (EventType.SENT, "b@x.org", ""),
    ]
    both = {"a@x.org": "hard_bounce", "b@x.org": "complaint"}
    alone = decide(
        claimed("a@x.org", "b@x.org"), {}, now=NOW, policy=POLICY, rng=seeded(1), suppressed=both
    )
    assert (alone.status, alone.next_attempt_at) == (EmailStatus.SUPPRESSED, None)


def state(email: Email) -> tuple[EmailStatus, datetime | None]:
    return email.status, email.next_attempt_at


def test_a_new_email_with_suppressed_recipients() -> None:
    # Before storing: the suppressed ones are marked with an event each (once); the email
    # stays due while one recipient is left, and is SUPPRESSED with nothing due once none is.
    email = claimed("a@x.org", "b@x.org").email
    email.status, email.next_attempt_at = EmailStatus.QUEUED, NOW
    assert outcomes.suppress_new(email, {"a@x.org": "manual"}, now=NOW) == ["a@x.org"]
    assert state(email) == (EmailStatus.QUEUED, NOW)
    assert [(e.type, e.recipient, e.detail) for e in email.events] == [
        (EventType.SUPPRESSED, "a@x.org", "manual")
    ]
    assert outcomes.suppress_new(email, {"b@x.org": "manual"}, now=NOW) == ["b@x.org"]
    assert state(email) == (EmailStatus.SUPPRESSED, None)
    everyone = claimed("a@x.org").email
    everyone.status, everyone.next_attempt_at = EmailStatus.QUEUED, NOW
    outcomes.suppress_new(everyone, {"a@x.org": "hard_bounce"}, now=NOW)
    assert state(everyone) == (EmailStatus.SUPPRESSED, None)
