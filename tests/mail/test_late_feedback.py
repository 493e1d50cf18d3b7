"""Feedback after the relay's answer: the pure rule (`outcomes.late_feedback`) and `LateFeedback`.

The rule decides what a bounce, delay or complaint does to a finished email (no I/O); the use
case applies it through the mail service's state-change write, on FerretDB, and is what test
mode calls directly (no return path involved): tenant checks, recipients the relay never
accepted, repeats, and emails still being delivered.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from azora.mail.v1 import mail_pb2

from services.core.errors import Conflict
from services.mail import outcomes
from services.mail.feedback.late_feedback import LateFeedback
from services.mail.feedback.suppression_store import SuppressionList
from services.mail.models import (
    Email,
    EmailStatus,
    EventType,
    FeedbackKind,
    Recipient,
    RecipientKind,
    RecipientStatus,
    SmtpReply,
)
from tests.conftest import Tenant
from tests.mail.conftest import LocalMail, Script, ScriptedRelay
from tests.mail.test_webhook_end_to_end import Start
from tests.support.emails import an_email

NOW = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
REPLY = SmtpReply(550, "5.1.1", "550 5.1.1 no such user")
E = mail_pb2


def finished(*statuses: RecipientStatus) -> Email:
    """A finished email with one recipient per status (r0@..., r1@...)."""
    recipients = [
        Recipient(f"r{i}@example.org", RecipientKind.TO, status)
        for i, status in enumerate(statuses)
    ]
    return an_email(
        at=NOW,
        id="e" * 24,
        domain_name="x.example",
        from_address="a@x.example",
        envelope_from="a@x.example",
        to=[r.address for r in recipients],
        message_id="m@x.example",
        recipients=recipients,
        status=outcomes.finished_status({r.status for r in recipients}),
        next_attempt_at=None,
    )


def late(
    email: Email, kind: FeedbackKind, recipient: str = "r0@example.org"
) -> outcomes.Transition | None:
    return outcomes.late_feedback(
        email, recipient=recipient, kind=kind, reply=REPLY, detail="by test", now=NOW
    )


@pytest.mark.parametrize(
    ("statuses", "after"),
    [
        ((RecipientStatus.SENT,), EmailStatus.BOUNCED),
        ((RecipientStatus.SENT, RecipientStatus.SENT), EmailStatus.PARTIALLY_SENT),
        ((RecipientStatus.SENT, RecipientStatus.BOUNCED), EmailStatus.BOUNCED),
        ((RecipientStatus.SENT, RecipientStatus.FAILED), EmailStatus.FAILED),
    ],
)
def test_a_late_bounce_makes_a_sent_recipient_bounced_and_the_status_follows(
    statuses: tuple[RecipientStatus, ...], after: EmailStatus
) -> None:
    # The relay's 250 is not final: the email's status is recomputed from its recipients.
    email = finished(*statuses)
    transition = late(email, FeedbackKind.BOUNCE)
    assert transition is not None
    assert (transition.old_status, transition.status) == (email.status, after)
    assert transition.recipients is not None
    assert transition.recipients[0].status is RecipientStatus.BOUNCED
    assert transition.recipients[0].last_reply == REPLY
    assert transition.recipients[1:] == tuple(email.recipients[1:])
    [event] = transition.events
    assert (event.type, event.recipient, event.reply) == (
        EventType.BOUNCED,
        "r0@example.org",
        REPLY,
    )
    # Applied, the same bounce changes nothing more.
    assert late(outcomes.apply(email, transition), FeedbackKind.BOUNCE) is None


@pytest.mark.parametrize(
    ("kind", "event_type"),
    [(FeedbackKind.DELAY, EventType.DEFERRED), (FeedbackKind.COMPLAINT, EventType.COMPLAINED)],
)
def test_delays_and_complaints_are_events_without_a_change_of_status(
    kind: FeedbackKind, event_type: EventType
) -> None:
    email = finished(RecipientStatus.SENT)
    transition = late(email, kind)
    assert transition is not None
    assert (transition.status, transition.recipients) == (None, None)
    assert [e.type for e in transition.events] == [event_type]
    assert late(outcomes.apply(email, transition), kind) is None


def test_a_different_delay_report_is_news_but_a_second_complaint_is_not() -> None:
    email = finished(RecipientStatus.SENT)
    first = late(email, FeedbackKind.DELAY)
    assert first is not None
    outcomes.apply(email, first)
    later = outcomes.late_feedback(
        email,
        recipient="r0@example.org",
        kind=FeedbackKind.DELAY,
        reply=SmtpReply(0, "4.4.7", "still trying after 24 hours"),
        detail="by test",
        now=NOW,
    )
    assert later is not None
    complaint = late(email, FeedbackKind.COMPLAINT)
    assert complaint is not None
    outcomes.apply(email, complaint)
    again = outcomes.late_feedback(
        email,
        recipient="r0@example.org",
        kind=FeedbackKind.COMPLAINT,
        reply=SmtpReply(0, "", ""),
        detail="another feedback loop",
        now=NOW,
    )
    assert again is None


@pytest.mark.parametrize(
    "status",
    [
        RecipientStatus.FAILED,
        RecipientStatus.SUPPRESSED,
        RecipientStatus.CANCELLED,
    ],
)
def test_recipients_the_relay_never_accepted_are_left_alone(status: RecipientStatus) -> None:
    # Only a message that was handed over can bounce or be complained about later.
    email = finished(status)
    for kind in FeedbackKind:
        assert late(email, kind) is None
    assert late(finished(RecipientStatus.SENT), FeedbackKind.BOUNCE, "stranger@example.org") is None


def test_a_delay_after_a_bounce_changes_nothing() -> None:
    email = finished(RecipientStatus.SENT)
    bounce = late(email, FeedbackKind.BOUNCE)
    assert bounce is not None
    assert late(outcomes.apply(email, bounce), FeedbackKind.DELAY) is None


def feedback_of(mail: LocalMail) -> LateFeedback:
    db = mail.app.running.database.db
    return LateFeedback(
        emails=mail.app.emails,
        suppressions=SuppressionList(db, clock=mail.clock, default_page_size=50, max_page_size=200),
        clock=mail.clock,
    )


async def test_apply_checks_the_tenant_and_says_why_nothing_was_done(
    local_mail: LocalMail, tenant: Tenant, other_tenant: Tenant, scripted_relay: Start
) -> None:
    # Test mode acts for a tenant: another tenant's email is as good as absent.
    relay: ScriptedRelay = await scripted_relay(Script())
    _, name = local_mail.add_domain(tenant, port=relay.port)
    email = await local_mail.send(tenant, from_address=f"s@{name}", to=["a@example.org"], text="x")
    assert await local_mail.worker().run_once() == 1
    feedback = feedback_of(local_mail)

    async def complain(**fields: str) -> tuple[bool, str]:
        result = await feedback.apply(
            **{
                "email_id": email.id,
                "recipient": "a@example.org",
                "kind": FeedbackKind.COMPLAINT,
                "source": "test mode",
                **fields,
            }  # type: ignore[arg-type]
        )
        return result.applied, result.outcome

    assert await complain(tenant_id=other_tenant.id) == (
        False,
        "ignored: the email is not stored (expired or deleted)",
    )
    assert await complain(email_id="f" * 24) == (
        False,
        "ignored: the email is not stored (expired or deleted)",
    )
    assert await complain(recipient="b@example.org") == (
        False,
        "ignored: b@example.org is not a recipient",
    )
    assert await complain(tenant_id=tenant.id) == (True, "applied: complained a@example.org")
    assert await complain() == (False, "already applied: complained a@example.org")
    got = await local_mail.get(tenant, email.id)
    assert [e.type for e in got.events].count(E.EVENT_TYPE_COMPLAINED) == 1
    assert got.status == E.EMAIL_STATUS_SENT


async def test_apply_refuses_while_the_email_is_being_delivered(
    local_mail: LocalMail, tenant: Tenant, scripted_relay: Start
) -> None:
    # A worker may still write the email: the report waits rather than racing it.
    relay: ScriptedRelay = await scripted_relay(Script(rcpt={"b@example.org": "450 4.2.0 busy"}))
    _, name = local_mail.add_domain(tenant, port=relay.port)
    email = await local_mail.send(
        tenant, from_address=f"s@{name}", to=["a@example.org", "b@example.org"], text="x"
    )
    assert await local_mail.worker().run_once() == 1
    feedback = feedback_of(local_mail)
    with pytest.raises(Conflict):
        await feedback.apply(
            email_id=email.id,
            recipient="a@example.org",
            kind=FeedbackKind.BOUNCE,
            status="5.1.1",
            diagnostic="550 5.1.1 gone",
            source="test mode",
        )
    got = await local_mail.get(tenant, email.id)
    assert got.status == E.EMAIL_STATUS_DEFERRED
    assert {r.address: r.status for r in got.recipients}["a@example.org"] == (
        E.RECIPIENT_STATUS_SENT
    )
