"""Bounce and complaint reports as real MTAs write them (samples in tests/mail/reports/).

Postfix, Exim (plain text, no delivery-status part), Microsoft 365 and Gmail bounces, a Postfix
delayed-delivery warning and an ARF abuse report: each gives the recipient, the permanence, the
RFC 3463 status and the remote server's reply; an out-of-office reply is unparsable, with the
reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from services.mail.inbound.reports import ReportKind, UnparsableReport, parse_report

SAMPLES = Path(__file__).parent / "reports"
VERP = "bounce-aeaqaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa@bounces.azora.test"


def sample(name: str) -> bytes:
    """A sample report with the CRLF line ends it has on the wire."""
    return (SAMPLES / name).read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


@pytest.mark.parametrize(
    ("name", "address", "status", "reply_start", "message_id"),
    [
        (
            "postfix_bounce.eml",
            "nosuchuser@example.org",
            "5.1.1",
            "550 5.1.1 <nosuchuser@example.org>: Recipient address rejected",
            "<order-1042@shop.example.net>",
        ),
        (
            "exim_bounce.eml",
            "gone@example.com",
            "5.1.1",
            "host mx.example.com [192.0.2.25] SMTP error from remote mail server",
            "<order-1044@shop.example.net>",
        ),
        (
            "microsoft_ndr.eml",
            "john@contoso.com",
            "5.1.10",
            "550 5.1.10 RESOLVER.ADR.RecipientNotFound",
            "<order-1045@shop.example.net>",
        ),
        (
            "gmail_bounce.eml",
            "missing.person@gmail.com",
            "5.1.1",
            "550-5.1.1 The email account that you tried to reach does not exist.",
            "<order-1046@shop.example.net>",
        ),
    ],
)
def test_hard_bounces(
    name: str, address: str, status: str, reply_start: str, message_id: str
) -> None:
    # Each MTA's bounce names the failed recipient, permanently, with its status and reply.
    report = parse_report(sample(name))
    assert report.kind is ReportKind.BOUNCE
    [recipient] = report.recipients
    assert (recipient.address, recipient.action, recipient.permanent) == (address, "failed", True)
    assert recipient.status == status
    assert recipient.diagnostic.startswith(reply_start), recipient.diagnostic
    assert report.original_message_id == message_id


def test_remote_mta_and_return_path_when_the_report_says_them() -> None:
    # Postfix names the remote MTA and returns the headers with our VERP Return-Path.
    report = parse_report(sample("postfix_bounce.eml"))
    assert report.reporting_mta == "mail.example.org"
    assert report.recipients[0].remote_mta == "mx1.example.org"
    assert report.original_return_path == VERP


def test_delayed_delivery_is_a_temporary_delay() -> None:
    # A "still being retried" warning is a delay, not a bounce: temporary, status 4.4.1.
    report = parse_report(sample("postfix_delayed.eml"))
    assert report.kind is ReportKind.DELAY
    [recipient] = report.recipients
    assert (recipient.address, recipient.action, recipient.permanent) == (
        "slow@example.com",
        "delayed",
        False,
    )
    assert recipient.status == "4.4.1"
    assert "Connection timed out" in recipient.diagnostic


def test_arf_abuse_report_is_a_complaint_of_the_original_recipient() -> None:
    # RFC 5965: feedback type, the complaining recipient, and what was reported.
    report = parse_report(sample("arf_abuse.eml"))
    assert report.kind is ReportKind.COMPLAINT
    assert report.feedback_type == "abuse"
    [recipient] = report.recipients
    assert (recipient.address, recipient.action) == ("reader@mailbox.example", "complained")
    assert report.original_message_id == "<order-1047@shop.example.net>"
    assert report.original_return_path == VERP
    assert report.reporting_mta == "mx.mailbox.example"


def test_arf_without_original_rcpt_to_uses_the_original_to() -> None:
    # Many feedback loops redact Original-Rcpt-To; the attached message's To names the recipient.
    raw = sample("arf_abuse.eml").replace(b"Original-Rcpt-To: <reader@mailbox.example>\r\n", b"")
    report = parse_report(raw)
    assert [r.address for r in report.recipients] == ["reader@mailbox.example"]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (sample("out_of_office.eml"), "no failed or delayed recipient found"),
        (b"", "empty message"),
        (
            b"Content-Type: multipart/report; report-type=feedback-report; boundary=x\r\n\r\n"
            b"--x\r\nContent-Type: text/plain\r\n\r\nhi\r\n--x--\r\n",
            "feedback report without a message/feedback-report part",
        ),
    ],
)
def test_unparsable_reports_say_why(raw: bytes, reason: str) -> None:
    # What is not a report is refused with a reason to store beside it, never silently dropped.
    with pytest.raises(UnparsableReport) as refused:
        parse_report(raw)
    assert refused.value.reason == reason


def test_a_success_notification_reports_nothing() -> None:
    # A DSN whose only recipient was delivered names no failure: nothing to record.
    raw = sample("postfix_bounce.eml")
    for failure, success in (
        (b"Action: failed", b"Action: delivered"),
        (b"Status: 5.1.1", b"Status: 2.0.0"),
        (b"550 5.1.1", b"250 2.0.0"),
        (b"User unknown in local", b"Delivered to the"),
        (b"could not\r\nbe delivered", b"was\r\ndelivered"),
    ):
        raw = raw.replace(failure, success)
    with pytest.raises(UnparsableReport) as refused:
        parse_report(raw)
    assert refused.value.reason == "no failed or delayed recipient found"
