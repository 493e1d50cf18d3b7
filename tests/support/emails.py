"""One builder of in-memory `Email` values for tests that need an email without storing it.

Every field of an email that a test does not care about gets a plain value here, so a test
names only what it is about: ``an_email(status=EmailStatus.SENT, to=["a@example.org"])``.
The recipients follow ``to`` unless given.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from services.mail.models import Email, EmailStatus, Recipient, RecipientKind

AT = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


def an_email(*, at: datetime = AT, **fields: Any) -> Email:
    """An accepted, queued email for one recipient at `at`; `fields` override any field."""
    to = list(fields.pop("to", ["a@example.org"]))
    defaults: dict[str, Any] = {
        "id": "0123456789abcdef01234567",
        "tenant_id": "t",
        "domain_id": "d" * 24,
        "domain_name": "sender.example",
        "from_address": "s@sender.example",
        "envelope_from": "s@sender.example",
        "to": to,
        "cc": [],
        "bcc": [],
        "reply_to": [],
        "subject": "s",
        "message_id": "<m@sender.example>",
        "size": 10,
        "recipients": [Recipient(address, RecipientKind.TO) for address in to],
        "status": EmailStatus.QUEUED,
        "created_at": at,
        "updated_at": at,
        "next_attempt_at": at,
        "expires_at": at + timedelta(days=5),
    }
    return Email(**{**defaults, **fields})
