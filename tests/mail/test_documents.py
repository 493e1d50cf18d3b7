"""The stored form of an email: what `email_doc` writes, `email_from_doc` reads back unchanged.

Fields at their empty value are left out of the document (the embedded database stores a type
schema beside every field and re-parses the whole document for each index key on every write),
so the reader must give back the same email from the short form, and still read documents an
earlier version wrote with every field present.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.mail.documents import email_doc, email_from_doc
from services.mail.models import (
    AttachmentInfo,
    Email,
    Event,
    EventType,
    Recipient,
    RecipientKind,
    RecipientStatus,
    SmtpReply,
)
from tests.support.emails import an_email

T0 = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


def plain() -> Email:
    """An email with nothing but what every email has."""
    return an_email(at=T0, to=["b@example.org"], events=[Event(EventType.ACCEPTED, T0)])


def everything() -> Email:
    """An email with every optional field set."""
    email = plain()
    reply = SmtpReply(451, "4.3.0", "try later")
    email.cc, email.bcc, email.reply_to = ["c@example.org"], ["d@example.org"], ["r@x.example"]
    email.recipients = [
        Recipient("b@example.org", RecipientKind.TO, RecipientStatus.DEFERRED, reply, 2, T0),
        Recipient("c@example.org", RecipientKind.CC),
    ]
    email.tags, email.metadata = ["welcome"], {"user$.id": "42"}
    email.attachments = [AttachmentInfo("a.pdf", "application/pdf", 10, "cid1", True)]
    email.send_at = T0 + timedelta(hours=1)
    email.attempts = 2
    email.events = [
        Event(EventType.ACCEPTED, T0),
        Event(EventType.DEFERRED, T0, "b@example.org", reply, "retry"),
    ]
    email.resent_from_id = "e0"
    email.idempotency_key = "k-1"
    email.content_file_id = "f" * 24
    email.trace_context = {"traceparent": "00-abc-def-01"}
    email.template_id, email.template_version = "tpl-1", 3
    email.test = True
    return email


def test_an_email_reads_back_unchanged_from_its_document() -> None:
    for email in (plain(), everything()):
        doc = email_doc(email)
        assert email_from_doc(doc) == email


def test_empty_fields_are_left_out_of_the_document() -> None:
    doc = email_doc(plain())
    for name in ("cc", "bcc", "reply_to", "tags", "metadata", "attachments", "send_at", "test"):
        assert name not in doc, name
    assert doc["events"] == [{"type": "accepted", "time": T0}]
    assert doc["recipients"] == [{"address": "b@example.org", "kind": "to", "status": "pending"}]
    # Every field that a set value fills is written.
    full = email_doc(everything())
    assert full["test"] is True
    assert full["template_version"] == 3
    assert full["cc"] == ["c@example.org"]


def test_a_document_with_every_field_written_out_still_reads() -> None:
    # The shape earlier versions stored: every field present, empty ones included.
    email = plain()
    doc = email_doc(email)
    doc.update(
        cc=[],
        bcc=[],
        reply_to=[],
        tags=[],
        metadata=[],
        attachments=[],
        send_at=None,
        resent_from_id="",
        idempotency_key="",
        content_file_id="",
        trace_context={},
        template_id="",
        template_version=0,
        test=False,
        lease_token="",
        claims=0,
    )
    doc["events"] = [{"type": "accepted", "time": T0, "recipient": "", "reply": None, "detail": ""}]
    doc["recipients"] = [
        {
            "address": "b@example.org",
            "kind": "to",
            "status": "pending",
            "last_reply": None,
            "attempts": 0,
            "updated_at": None,
        }
    ]
    assert email_from_doc(doc) == email
