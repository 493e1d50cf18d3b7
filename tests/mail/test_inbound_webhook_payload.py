"""The webhook route's JSON document: attachments inline within their bound, links beyond it."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from email.message import EmailMessage

from services.mail.feedback.webhook_signing import body_of
from services.mail.inbound.actions import MAX_BODY_BYTES, webhook_payload
from services.mail.inbound.store import Authentication, InboundRecord, Received


def record(text: str = "hi\n", attachment: bytes = b"0123456789") -> InboundRecord:
    """A stored message with one attachment."""
    msg = EmailMessage()
    msg["From"] = "a@example.org"
    msg["To"] = "in@example.com"
    msg["Subject"] = "s"
    msg.set_content(text)
    msg.add_attachment(attachment, maintype="application", subtype="octet-stream", filename="f")
    raw = msg.as_bytes().replace(b"\n", b"\r\n")
    now = datetime(2026, 12, 5, tzinfo=UTC)
    return InboundRecord(
        id="ab" * 12,
        tenant_id="t",
        received=Received(
            raw=raw,
            added_headers=b"Authentication-Results: mx; spf=pass\r\n",
            envelope_from="a@example.org",
            recipient="in@example.com",
            domain_id="d",
            route_id="r",
            action="webhook",
            client_address="192.0.2.1",
            helo="mx.example.org",
            authentication=Authentication(spf="pass", header="mx;\r\n\tspf=pass"),
            webhook_id="w",
        ),
        outcome="stored",
        received_at=now,
        expire_at=now,
        size=len(raw),
        seq="01JE0000000000000000000000-x",
    )


def test_attachments_are_inline_up_to_the_limit_and_linked_beyond() -> None:
    # Within the limit the content is base64; one byte over, none is, and rawUrl says where.
    within = webhook_payload(record(), "evt_1", attachment_limit=10)
    assert within["attachmentsIncluded"] is True
    assert base64.b64decode(within["attachments"][0]["content"]) == b"0123456789"
    assert within["authenticationResults"] == "mx; spf=pass"
    over = webhook_payload(record(), "evt_1", attachment_limit=9)
    assert over["attachmentsIncluded"] is False
    assert over["attachments"] == [
        {"filename": "f", "contentType": "application/octet-stream", "size": 10}
    ]
    assert over["rawUrl"] == f"/api/v1/inbound/{'ab' * 12}/raw"
    assert over["text"] == "hi\n"


def test_a_document_over_the_body_bound_leaves_the_bodies_to_the_raw_link() -> None:
    # Text that alone exceeds the bound: no text, html or attachment content, and it says so.
    big = webhook_payload(record(text="x" * MAX_BODY_BYTES), "evt_1", attachment_limit=10**9)
    assert (big["contentIncluded"], big["attachmentsIncluded"]) == (False, False)
    assert (big["text"], big["html"]) == ("", "")
    assert "content" not in big["attachments"][0]
    assert len(body_of(big)) < MAX_BODY_BYTES
