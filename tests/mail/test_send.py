"""SendEmail: validation of every field, the stored message, idempotency and scheduling."""

from __future__ import annotations

import asyncio
import email
import secrets
from datetime import timedelta
from email import policy

import grpc
import idna
import pytest
from azora.mail.v1 import mail_pb2
from google.protobuf import timestamp_pb2

from services.mail.repository import CONTENTS, EMAILS
from tests.conftest import Tenant
from tests.mail.conftest import LocalMail
from tests.support.grpc_errors import failure_of

QUEUED = mail_pb2.EMAIL_STATUS_QUEUED
SCHEDULED = mail_pb2.EMAIL_STATUS_SCHEDULED


def ts(value: object) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)  # type: ignore[arg-type]
    return stamp


async def stored_message(mail: LocalMail, email_id: str) -> email.message.EmailMessage:
    """The built message as stored, parsed."""
    stored = await mail.app.emails.get(tenant_id=_tenant_of(mail, email_id), email_id=email_id)
    raw = await mail.app.emails.content(email=stored)
    parsed = email.message_from_bytes(raw, policy=policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    return parsed


def _tenant_of(mail: LocalMail, email_id: str) -> str:
    return mail.last_tenant  # type: ignore[attr-defined,no-any-return]


async def test_accepted_email_is_stored_built_and_queued(
    local_mail: LocalMail, tenant: Tenant
) -> None:
    # A full request: queued at once, the message built with every header, Bcc only in the
    # envelope, IDN domains as A-labels, alternative bodies and both kinds of attachments.
    name = f"bücher-{secrets.token_hex(4)}.example"
    a_label = idna.encode(name, uts46=True).decode()
    local_mail.add_domain(tenant, port=2525, name=name)
    local_mail.last_tenant = tenant.id  # type: ignore[attr-defined]
    sent = await local_mail.send(
        tenant,
        from_address=f"Bücher Team <noreply@{name}>",
        to=['"Doe, Jane" <jane@example.org>', "bob@exämple.org"],
        cc=["carol@example.org"],
        bcc=["secret@example.org"],
        reply_to=["help@example.org"],
        subject="Grüße",
        text="line one\nline two\rline three",
        html='<p>Hi <img src="cid:logo"></p>',
        attachments=[
            mail_pb2.Attachment(
                filename="logo.png", content=b"\x89PNG", content_id="logo", inline=True
            ),
            mail_pb2.Attachment(filename="report.pdf", content=b"%PDF-1.4"),
        ],
        headers=[mail_pb2.Header(name="X-Campaign", value="autumn")],
        tags=["welcome"],
        metadata={"user.id": "42", "$weird": "ok"},
    )
    assert sent.status == QUEUED
    assert sent.message_id == f"{sent.id}@{a_label}"
    assert sent.from_address == f"=?utf-8?q?B=C3=BCcher_Team?= <noreply@{a_label}>"
    assert [r.address for r in sent.recipients] == [
        "jane@example.org",
        "bob@xn--exmple-cua.org",
        "carol@example.org",
        "secret@example.org",
    ]
    assert [e.type for e in sent.events] == [mail_pb2.EVENT_TYPE_ACCEPTED]
    assert dict(sent.metadata) == {"user.id": "42", "$weird": "ok"}
    assert [(a.filename, a.content_type, a.size_bytes) for a in sent.attachments] == [
        ("logo.png", "image/png", 4),
        ("report.pdf", "application/pdf", 8),
    ]
    msg = await stored_message(local_mail, sent.id)
    assert msg["Message-ID"] == f"<{sent.message_id}>"
    assert msg["Bcc"] is None
    assert b"secret@example.org" not in msg.as_bytes()
    assert msg["From"].addresses[0].domain == a_label
    assert msg["From"].addresses[0].display_name == "Bücher Team"
    assert msg["To"].addresses[0].display_name == "Doe, Jane"
    assert str(msg["Subject"]) == "Grüße"
    assert msg["X-Campaign"] == "autumn"
    assert msg.get_content_type() == "multipart/mixed"
    alternative = next(msg.iter_parts())
    assert alternative.get_content_type() == "multipart/alternative"
    text, related = list(alternative.iter_parts())
    assert text.get_content() == "line one\r\nline two\r\nline three\r\n"
    assert related.get_content_type() == "multipart/related"
    _html, logo = list(related.iter_parts())
    assert logo["Content-ID"] == "<logo>"
    assert logo.get_content() == b"\x89PNG"
    attachment = list(msg.iter_attachments())[-1]
    assert attachment.get_filename() == "report.pdf"
    assert attachment.get_content() == b"%PDF-1.4"
    raw = msg.as_bytes()
    # Every line break on the wire is CRLF, never a bare CR or LF.
    stored = await local_mail.app.emails.get(tenant_id=tenant.id, email_id=sent.id)
    wire = await local_mail.app.emails.content(email=stored)
    assert b"\r\n" in wire
    assert wire.replace(b"\r\n", b"").count(b"\n") == 0
    assert wire.replace(b"\r\n", b"").count(b"\r") == 0
    assert raw


@pytest.mark.parametrize(
    ("fields", "field", "fragment"),
    [
        ({"from_address": "not-an-address"}, "from", "not a valid"),
        ({"from_address": "a@x.example\r\nBcc: victim@example.org"}, "from", "CR, LF"),
        ({"to": ["ok@example.org", "bad@@example.org"]}, "to[1]", ""),
        ({"to": ["a@example.org", "b@example.org", "Eve\n <e@example.org>"]}, "to[2]", "CR, LF"),
        ({"to": [], "cc": [], "bcc": []}, "to", "at least one recipient"),
        ({"cc": ["x@-bad-.example"]}, "cc[0]", "invalid domain"),
        ({"bcc": ["a@b.example, c@d.example"]}, "bcc[0]", "not a valid"),
        ({"reply_to": ["nope"]}, "replyTo[0]", ""),
        ({"subject": "Hi\r\nBcc: victim@example.org"}, "subject", "CR, LF"),
        ({"text": "", "html": ""}, "text", "text or html"),
        (
            {
                "headers": [
                    mail_pb2.Header(name="X-Ok", value="a"),
                    mail_pb2.Header(name="Bad Name:", value="b"),
                ]
            },
            "headers[1].name",
            "",
        ),
        (
            {"headers": [mail_pb2.Header(name="X-A", value="1\r\nBcc: x@y.example")]},
            "headers[0].value",
            "CR, LF",
        ),
        (
            {"headers": [mail_pb2.Header(name="Message-ID", value="<x@y>")]},
            "headers[0].name",
            "set by the service",
        ),
        (
            {"attachments": [mail_pb2.Attachment(filename="", content=b"x")]},
            "attachments[0].filename",
            "",
        ),
        (
            {
                "attachments": [
                    mail_pb2.Attachment(filename="a.bin", content_type="nonsense", content=b"x")
                ]
            },
            "attachments[0].contentType",
            "",
        ),
        ({"idempotency_key": "k" * 256}, "idempotencyKey", ""),
        ({"tags": ["ok", ""]}, "tags[1]", ""),
    ],
)
async def test_invalid_fields_are_named(
    local_mail: LocalMail, tenant: Tenant, fields: dict[str, object], field: str, fragment: str
) -> None:
    # Each malformed field is INVALID_ARGUMENT with a violation naming exactly that field.
    _, name = local_mail.add_domain(tenant, port=2525)
    request: dict[str, object] = {
        "from_address": f"sender@{name}",
        "to": ["rcpt@example.org"],
        "subject": "s",
        "text": "t",
        **fields,
    }
    failure = await failure_of(local_mail.send(tenant, **request))
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in failure.field_violations, failure.field_violations
    assert fragment in failure.field_violations[field]


async def test_recipient_limit_and_sizes_are_enforced(
    local_mail: LocalMail, tenant: Tenant
) -> None:
    # Over MAX recipients, an attachment over MAX_ATTACHMENT_SIZE, a message over the total.
    _, name = local_mail.add_domain(tenant, port=2525)
    limit = local_mail.settings.mail_max_recipients
    too_many = [f"r{i}@example.org" for i in range(limit + 1)]
    failure = await failure_of(
        local_mail.send(tenant, from_address=f"s@{name}", to=too_many, text="t")
    )
    assert "at most" in failure.field_violations["to"]
    big = b"x" * (local_mail.settings.max_attachment_size + 1)
    failure = await failure_of(
        local_mail.send(
            tenant,
            from_address=f"s@{name}",
            to=["a@example.org"],
            text="t",
            attachments=[
                mail_pb2.Attachment(filename="ok.txt", content=b"fine"),
                mail_pb2.Attachment(filename="big.bin", content=big),
            ],
        )
    )
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(failure.field_violations) >= {"attachments[1].content"}
    assert "attachments[0].content" not in failure.field_violations


async def test_total_message_size_limit(local_mail: LocalMail, tenant: Tenant) -> None:
    # Attachments each within the limit but together over the message limit.
    _, name = local_mail.add_domain(tenant, port=2525)
    part = b"y" * (local_mail.settings.max_attachment_size - 10)
    count = local_mail.settings.mail_max_message_size // len(part) + 1
    failure = await failure_of(
        local_mail.send(
            tenant,
            from_address=f"s@{name}",
            to=["a@example.org"],
            text="t",
            attachments=[
                mail_pb2.Attachment(filename=f"{i}.bin", content=part) for i in range(count)
            ],
        )
    )
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "attachments" in failure.field_violations


async def test_sender_domain_must_be_an_active_domain_of_the_tenant(
    local_mail: LocalMail, tenant: Tenant, other_tenant: Tenant
) -> None:
    # Unknown domain, another tenant's domain, a domain without relay: FAILED_PRECONDITION on
    # `from`.
    _, theirs = local_mail.add_domain(other_tenant, port=2525)
    _, no_relay = local_mail.add_domain(tenant, port=None)
    for sender, reason in (
        ("a@unknown-domain.example", "SENDER_DOMAIN_NOT_ACTIVE"),
        (f"a@{theirs}", "SENDER_DOMAIN_NOT_ACTIVE"),
        (f"a@{no_relay}", "RELAY_NOT_CONFIGURED"),
    ):
        failure = await failure_of(
            local_mail.send(tenant, from_address=sender, to=["x@example.org"], text="t")
        )
        assert failure.code == grpc.StatusCode.FAILED_PRECONDITION, sender
        assert failure.reason == reason
        assert failure.metadata["field"] == "from"


async def test_sending_asks_whether_a_relay_exists_never_for_its_credentials(
    local_mail: LocalMail, tenant: Tenant
) -> None:
    # Accepting needs to know that the domain has a relay; its password is delivery's business.
    _, name = local_mail.add_domain(tenant, port=2525)
    _, no_relay = local_mail.add_domain(tenant, port=None)
    sent = await local_mail.send(tenant, from_address=f"a@{name}", to=["x@example.org"], text="t")
    assert sent.id
    failure = await failure_of(
        local_mail.send(tenant, from_address=f"a@{no_relay}", to=["x@example.org"], text="t")
    )
    assert failure.reason == "RELAY_NOT_CONFIGURED"
    assert local_mail.relays.calls >= 2
    assert local_mail.relays.credential_reads == 0


async def test_large_content_goes_to_gridfs_not_the_queue_document(
    local_mail: LocalMail, tenant: Tenant
) -> None:
    # A 1 MB attachment: the queue document stays small, the content comes back intact.
    _, name = local_mail.add_domain(tenant, port=2525)
    local_mail.last_tenant = tenant.id  # type: ignore[attr-defined]
    blob = bytes(range(256)) * 4096
    sent = await local_mail.send(
        tenant,
        from_address=f"s@{name}",
        to=["a@example.org"],
        text="t",
        attachments=[mail_pb2.Attachment(filename="blob.bin", content=blob)],
    )
    db = local_mail.app.running.database.db
    doc = await db[EMAILS].find_one({"_id": sent.id})
    assert doc is not None
    assert "content" not in doc
    assert doc["content_file_id"]
    assert await db[CONTENTS].find_one({"_id": sent.id}) is None
    msg = await stored_message(local_mail, sent.id)
    assert next(iter(msg.iter_attachments())).get_content() == blob


async def test_content_is_stored_beside_the_email_and_read_from_either_place(
    local_mail: LocalMail, tenant: Tenant
) -> None:
    # A small message is not in the email's document (each state change rewrites that
    # whole on the embedded database) but in email_contents under the email's id; an email
    # stored before that collection, with its content inline, is still read.
    _, name = local_mail.add_domain(tenant, port=2525)
    local_mail.last_tenant = tenant.id  # type: ignore[attr-defined]
    sent = await local_mail.send(tenant, from_address=f"s@{name}", to=["a@example.org"], text="t")
    db = local_mail.app.running.database.db
    doc = await db[EMAILS].find_one({"_id": sent.id})
    assert doc is not None
    assert "content" not in doc
    assert not doc.get("content_file_id")
    body = await db[CONTENTS].find_one({"_id": sent.id})
    assert body is not None
    assert (await stored_message(local_mail, sent.id))["Message-ID"] == f"<{sent.message_id}>"
    await db[EMAILS].update_one({"_id": sent.id}, {"$set": {"content": body["content"]}})
    await db[CONTENTS].delete_one({"_id": sent.id})
    assert (await stored_message(local_mail, sent.id))["Message-ID"] == f"<{sent.message_id}>"


async def test_same_idempotency_key_and_request_returns_the_first_email(
    local_mail: LocalMail, tenant: Tenant, other_tenant: Tenant
) -> None:
    # Twenty concurrent identical requests make one email; a different request with the key is
    # ALREADY_EXISTS; another tenant's identical key is independent.
    _, name = local_mail.add_domain(tenant, port=2525)
    _, theirs = local_mail.add_domain(other_tenant, port=2525)
    request = {
        "from_address": f"s@{name}",
        "to": ["a@example.org"],
        "text": "t",
        "idempotency_key": "k1",
    }
    results = await asyncio.gather(*(local_mail.send(tenant, **request) for _ in range(20)))
    assert len({r.id for r in results}) == 1
    listed = await local_mail.stub.ListEmails(
        mail_pb2.ListEmailsRequest(), metadata=tenant.metadata
    )
    assert [e.id for e in listed.emails] == [results[0].id]
    failure = await failure_of(local_mail.send(tenant, **{**request, "text": "changed"}))
    assert failure.code == grpc.StatusCode.ALREADY_EXISTS
    assert failure.reason == "IDEMPOTENCY_KEY_ALREADY_EXISTS"
    theirs_email = await local_mail.send(other_tenant, **{**request, "from_address": f"s@{theirs}"})
    assert theirs_email.id != results[0].id


async def test_idempotency_key_expires_after_its_window(
    local_mail: LocalMail, tenant: Tenant
) -> None:
    # After 24 hours (and after the sweeper ran) the same key makes a new email.
    _, name = local_mail.add_domain(tenant, port=2525)
    request = {
        "from_address": f"s@{name}",
        "to": ["a@example.org"],
        "text": "t",
        "idempotency_key": "k",
    }
    first = await local_mail.send(tenant, **request)
    local_mail.clock.advance(timedelta(hours=23))
    assert (await local_mail.send(tenant, **request)).id == first.id
    local_mail.clock.advance(timedelta(hours=1, seconds=1))
    second = await local_mail.send(tenant, **request)
    assert second.id != first.id
    local_mail.clock.advance(timedelta(hours=25))
    assert await local_mail.app.mail.sweep_idempotency() == 1
    assert (await local_mail.send(tenant, **request)).id not in (first.id, second.id)


async def test_send_at_in_the_future_is_scheduled_within_the_horizon(
    local_mail: LocalMail, tenant: Tenant
) -> None:
    # A future sendAt is SCHEDULED with that next attempt; past the horizon it is refused.
    _, name = local_mail.add_domain(tenant, port=2525)
    when = local_mail.clock.now() + timedelta(hours=2)
    sent = await local_mail.send(
        tenant, from_address=f"s@{name}", to=["a@example.org"], text="t", send_at=ts(when)
    )
    assert sent.status == SCHEDULED
    assert sent.next_attempt_time.ToDatetime().replace(tzinfo=when.tzinfo) == when
    assert [e.type for e in sent.events] == [
        mail_pb2.EVENT_TYPE_ACCEPTED,
        mail_pb2.EVENT_TYPE_SCHEDULED,
    ]
    too_far = local_mail.clock.now() + timedelta(days=31)
    failure = await failure_of(
        local_mail.send(
            tenant, from_address=f"s@{name}", to=["a@example.org"], text="t", send_at=ts(too_far)
        )
    )
    assert "sendAt" in failure.field_violations
