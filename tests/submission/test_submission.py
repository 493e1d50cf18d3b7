"""SMTP submission end to end: smtplib over STARTTLS and implicit TLS, into the real pipeline.

Each accepted message must come out at the relay as it was sent (same header fields, same body,
X-Azora-* control headers and Bcc removed, Message-ID and Date kept or added), DKIM-signed so
that dkimpy verifies it, and its email must show the SMTP submission on its timeline.
"""

from __future__ import annotations

import asyncio
import email
import smtplib
from datetime import timedelta
from email import policy
from email.message import EmailMessage
from pathlib import Path

import dkim  # type: ignore[import-untyped]  # dkimpy ships no type information
from azora.mail.v1 import mail_pb2

from services.mail.return_paths import ReturnPaths
from tests.smtp.verifiers import opendkim_verdict, quoted
from tests.submission.conftest import SELECTOR, Submission
from tests.support.dns_server import KnotServer

E = mail_pb2


def header_lines(message: bytes) -> list[bytes]:
    """The header fields of a message, unfolded, in order (DKIM-Signature left out)."""
    head = message.split(b"\r\n\r\n", 1)[0]
    unfolded = head.replace(b"\r\n ", b" ").replace(b"\r\n\t", b"\t")
    return [line for line in unfolded.split(b"\r\n") if not line.startswith(b"DKIM-Signature:")]


def transact(
    client: smtplib.SMTP, sender: str, recipients: list[str], data: bytes, options: list[str]
) -> tuple[int, bytes]:
    """One transaction; returns the final reply to DATA."""
    code, reply = client.mail(sender, options)
    assert code == 250, reply
    for rcpt in recipients:
        code, reply = client.rcpt(rcpt)
        assert code == 250, reply
    return client.data(data)


async def submit(
    submission: Submission,
    data: bytes,
    *,
    sender: str | None = None,
    recipients: list[str] | None = None,
    implicit_tls: bool = False,
    options: tuple[str, ...] = (),
) -> tuple[int, str]:
    """Log in with the API key and send one message; the final reply to DATA."""

    def run() -> tuple[int, bytes]:
        client = submission.tls_client() if implicit_tls else submission.starttls_client()
        try:
            client.login("apikey", submission.api_key)
            return transact(
                client,
                sender or f"app@{submission.domain}",
                recipients or ["jane@example.org"],
                data,
                list(options),
            )
        finally:
            client.quit()

    code, reply = await asyncio.to_thread(run)
    return code, reply.decode()


def queued_id(reply: str) -> str:
    """The email id of a "250 2.0.0 Ok: queued as <id>" reply."""
    assert reply.startswith("2.0.0 Ok: queued as "), reply
    return reply.rsplit(" ", 1)[1]


async def test_ehlo_advertises_the_extensions_and_auth_only_after_tls(
    submission: Submission,
) -> None:
    # Before STARTTLS: no AUTH (TLS required); after: AUTH PLAIN LOGIN; always the extensions.
    def run() -> tuple[dict[str, str], dict[str, str]]:
        client = smtplib.SMTP("127.0.0.1", submission.port, local_hostname="client.test")
        client.ehlo()
        before = dict(client.esmtp_features)
        client.starttls(context=submission.client_context())
        client.ehlo()
        after = dict(client.esmtp_features)
        client.quit()
        return before, after

    before, after = await asyncio.to_thread(run)
    assert "auth" not in before
    assert "starttls" in before
    assert set(after["auth"].split()) == {"PLAIN", "LOGIN"}
    for extension in ("pipelining", "8bitmime", "smtputf8", "enhancedstatuscodes"):
        assert extension in after, after
    assert after["size"] == str(submission.settings.mail_max_message_size)


async def test_plain_message_over_starttls_is_stored_then_delivered_as_sent_and_signed(
    submission: Submission, knot_server: KnotServer, tmp_path: Path
) -> None:
    # The client's own Message-ID and Date are kept; every header reaches the relay unchanged;
    # dkimpy and OpenDKIM (key record served by Knot) verify the signature.
    raw = (
        f"From: App <app@{submission.domain}>\r\n"
        "To: Jane <jane@example.org>\r\n"
        "Subject: Plain hello\r\n"
        "Date: Sat, 05 Dec 2026 10:00:00 +0000\r\n"
        f"Message-ID: <own-1@{submission.domain}>\r\n"
        "X-Custom: kept\r\n"
        "\r\n"
        "Hello over SMTP.\r\n"
        ".leading dot survives\r\n"
    ).encode()
    code, reply = await submit(submission, raw)
    assert code == 250, reply
    email_id = queued_id(reply)
    stored = await submission.mail.get(submission.tenant, email_id)
    assert stored.status == E.EMAIL_STATUS_QUEUED
    assert stored.message_id == f"own-1@{submission.domain}"
    assert stored.subject == "Plain hello"
    accepted = stored.events[0]
    assert accepted.type == E.EVENT_TYPE_ACCEPTED
    assert accepted.detail == "submission: SMTP; client: 127.0.0.1"
    assert await submission.deliver() == 1
    [(mail_from, rcpt_to, data)] = submission.received
    # The envelope sender is the email's return path for this recipient (VERP), not the
    # client's MAIL FROM: bounces come back to us.
    token = ReturnPaths.from_settings(submission.settings).parse(mail_from)
    assert token is not None
    assert (token.email_id, token.names("jane@example.org")) == (email_id, True)
    assert rcpt_to == ["jane@example.org"]
    assert data.startswith(b"DKIM-Signature:")
    assert header_lines(data) == header_lines(raw)
    assert data.split(b"\r\n\r\n", 1)[1] == raw.split(b"\r\n\r\n", 1)[1]
    assert dkim.verify(data, dnsfunc=submission.dkim_dns)
    record = submission.dkim_dns(f"{SELECTOR}._domainkey.{submission.domain}".encode()).decode()
    knot_server.set_zone(
        submission.domain,
        [
            (
                f"{SELECTOR}._domainkey",
                "TXT",
                quoted([record[i : i + 250] for i in range(0, len(record), 250)]),
            )
        ],
    )
    verdict = await asyncio.to_thread(opendkim_verdict, knot_server, data, tmp_path / "opendkim")
    assert verdict.endswith("succeeded"), verdict
    sent = await submission.mail.get(submission.tenant, email_id)
    assert sent.status == E.EMAIL_STATUS_SENT


async def test_html_text_attachment_and_utf8_subject_over_implicit_tls(
    submission: Submission,
) -> None:
    # A message built by Python's email package (multipart/mixed with an alternative part and a
    # PDF), UTF-8 subject; Message-ID and Date missing, so added; Bcc by envelope only.
    msg = EmailMessage()
    msg["From"] = f"Zoë App <app@{submission.domain}>"
    msg["To"] = "jane@example.org"
    msg["Subject"] = "Rapport trimestriel — état ✓"
    msg.set_content("Texte brut.\n")
    msg.add_alternative("<p>Texte <b>riche</b>.</p>\n", subtype="html")
    msg.add_attachment(b"%PDF-1.4 fake\r\n", "application", "pdf", filename="r\u00e9sum\u00e9.pdf")
    raw = msg.as_bytes(policy=policy.SMTP)
    code, reply = await submit(
        submission,
        raw,
        recipients=["jane@example.org", "hidden@example.net"],
        implicit_tls=True,
    )
    assert code == 250, reply
    email_id = queued_id(reply)
    stored = await submission.mail.get(submission.tenant, email_id)
    assert stored.subject == "Rapport trimestriel — état ✓"
    assert [a.filename for a in stored.attachments] == ["résumé.pdf"]
    assert list(stored.bcc) == ["hidden@example.net"]
    assert {r.address: r.kind for r in stored.recipients} == {
        "jane@example.org": E.RECIPIENT_KIND_TO,
        "hidden@example.net": E.RECIPIENT_KIND_BCC,
    }
    assert await submission.deliver() == 1
    # One transaction per recipient (each with its own return path), the same signed message.
    got = submission.received
    assert sorted(rcpt for _, rcpt_to, _ in got for rcpt in rcpt_to) == [
        "hidden@example.net",
        "jane@example.org",
    ]
    assert all(len(rcpt_to) == 1 for _, rcpt_to, _ in got)
    data = got[0][2]
    assert all(other == data for _, _, other in got)
    assert dkim.verify(data, dnsfunc=submission.dkim_dns)
    received = email.message_from_bytes(data, policy=policy.default)
    assert received["Message-ID"] == f"<{stored.message_id}>"
    assert received["Date"] is not None
    assert b"hidden@example.net" not in data
    # Everything the client wrote comes after the two added fields, unchanged.
    assert header_lines(data)[2:] == header_lines(raw)
    assert data.split(b"\r\n\r\n", 1)[1] == raw.split(b"\r\n\r\n", 1)[1]
    [attachment] = list(received.iter_attachments())
    assert attachment.get_payload(decode=True) == b"%PDF-1.4 fake\r\n"


async def test_smtputf8_message_with_utf8_headers_and_idn_recipient(
    submission: Submission,
) -> None:
    # RFC 6531/6532: raw UTF-8 in the header, an IDN recipient domain (delivered as A-label).
    raw = (
        f"From: Zoë <app@{submission.domain}>\r\n"
        "To: Jürgen <j@bücher.example>\r\n"
        "Subject: Grüße aus Köln\r\n"
        "\r\n"
        "Schöne Grüße.\r\n"
    ).encode()
    code, reply = await submit(
        submission, raw, recipients=["j@bücher.example"], options=("SMTPUTF8", "BODY=8BITMIME")
    )
    assert code == 250, reply
    stored = await submission.mail.get(submission.tenant, queued_id(reply))
    assert stored.subject == "Grüße aus Köln"
    assert await submission.deliver() == 1
    [(_, rcpt_to, data)] = submission.received
    assert rcpt_to == ["j@xn--bcher-kva.example"]
    assert "Subject: Grüße aus Köln".encode() in data
    assert dkim.verify(data, dnsfunc=submission.dkim_dns)


async def test_control_headers_are_read_and_removed(submission: Submission) -> None:
    # Tags, metadata and scheduling come from X-Azora-* headers, which never reach the relay.
    raw = (
        f"From: app@{submission.domain}\r\n"
        "To: jane@example.org\r\n"
        "Subject: tagged\r\n"
        "X-Azora-Tag: welcome\r\n"
        "X-Azora-Tag: onboarding\r\n"
        "X-Azora-Metadata-userId: 42\r\n"
        "X-Azora-Send-At: 2026-11-23T13:00:00Z\r\n"
        "\r\n"
        "body\r\n"
    ).encode()
    code, reply = await submit(submission, raw)
    assert code == 250, reply
    stored = await submission.mail.get(submission.tenant, queued_id(reply))
    assert list(stored.tags) == ["welcome", "onboarding"]
    assert dict(stored.metadata) == {"userId": "42"}
    assert stored.status == E.EMAIL_STATUS_SCHEDULED
    assert stored.send_at.ToJsonString() == "2026-11-23T13:00:00Z"
    submission.mail.clock.advance(timedelta(hours=2))
    assert await submission.deliver() == 1
    [(_, _, data)] = submission.received
    assert b"X-Azora" not in data


async def test_idempotency_key_header(submission: Submission) -> None:
    # The same key and message twice: one email, the same id; another message: 550 5.6.0.
    def message(body: str) -> bytes:
        return (
            f"From: app@{submission.domain}\r\nTo: jane@example.org\r\nSubject: once\r\n"
            f"X-Azora-Idempotency-Key: order-7\r\n\r\n{body}\r\n"
        ).encode()

    first = await submit(submission, message("one"))
    again = await submit(submission, message("one"))
    assert first[0] == again[0] == 250
    assert queued_id(first[1]) == queued_id(again[1])
    code, reply = await submit(submission, message("two"))
    assert (code, reply.split(" ", 1)[0]) == (550, "5.6.0"), reply


async def test_smtputf8_local_parts_reach_the_relay_in_an_smtputf8_transaction(
    submission: Submission,
) -> None:
    # RFC 6531: UTF-8 local parts in the envelope (sender and recipient) and in the header. The
    # relay offers SMTPUTF8, so the delivery is an SMTPUTF8 transaction carrying the addresses
    # exactly as the client wrote them, the message unchanged and signed.
    sender, recipient = f"zoë.müller@{submission.domain}", "jürgen@example.org"
    raw = (
        f"From: Zoë <{sender}>\r\n"
        f"To: Jürgen <{recipient}>\r\n"
        "Subject: Grüße\r\n"
        "\r\n"
        "Schöne Grüße.\r\n"
    ).encode()
    code, reply = await submit(
        submission,
        raw,
        sender=sender,
        recipients=[recipient],
        options=("SMTPUTF8", "BODY=8BITMIME"),
    )
    assert code == 250, reply
    stored = await submission.mail.get(submission.tenant, queued_id(reply))
    assert [r.address for r in stored.recipients] == [recipient]
    assert await submission.deliver() == 1
    [envelope] = submission.relay.envelopes
    assert envelope.smtp_utf8
    assert envelope.mail_from.endswith(f"@bounces.{submission.domain}")
    assert envelope.rcpt_tos == [recipient]
    # Everything the client wrote comes after the two added fields (Message-ID, Date).
    assert header_lines(envelope.content)[2:] == header_lines(raw)
    assert envelope.content.split(b"\r\n\r\n", 1)[1] == raw.split(b"\r\n\r\n", 1)[1]
    assert dkim.verify(envelope.content, dnsfunc=submission.dkim_dns)
    sent = await submission.mail.get(submission.tenant, stored.id)
    assert sent.status == E.EMAIL_STATUS_SENT
