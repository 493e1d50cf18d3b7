"""Unit tests of the submission pieces: settings, replies, raw messages, and the server alone.

The server-alone tests use in-memory fakes of our own interfaces (key resolver, mail submitter).
"""

from __future__ import annotations

import asyncio
import ssl
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from services.core.context import Principal
from services.core.errors import InvalidArgument
from services.core.settings import Settings, SettingsError
from services.core.smtp_tls import development_pair, server_context
from services.mail import raw_message
from services.submission import replies
from services.submission.app import build_app
from services.submission.server import ClientLimits, Identity
from services.submission.settings import SubmissionSettings
from tests.submission.conftest import RawClient

PRODUCTION = {
    "AZORA_ENV": "production",
    "JWT_SECRET": "p" * 40,
    "AZORA_SERVICE_TOKEN_SECRET": "s" * 40,
    "AZORA_SECRETS_KEY": "cHJvZHVjdGlvbi1zZWNyZXRzLWtleS0zMi1ieXRlcyE=",
}


def test_production_refuses_to_start_without_certificate_and_key() -> None:
    base = Settings.from_env(PRODUCTION)
    with pytest.raises(SettingsError, match="AZORA_SUBMISSION_CERT_FILE"):
        SubmissionSettings.from_env(PRODUCTION, base)
    env = {**PRODUCTION, "AZORA_SUBMISSION_CERT_FILE": "/c.pem", "AZORA_SUBMISSION_KEY_FILE": "/k"}
    settings = SubmissionSettings.from_env(env, base)
    assert (settings.port, settings.tls_port) == (587, 465)
    assert settings.require_tls_for_auth is True
    # Production's rule cannot be switched off.
    env["AZORA_SUBMISSION_REQUIRE_TLS_FOR_AUTH"] = "false"
    assert SubmissionSettings.from_env(env, base).require_tls_for_auth is True


def test_development_defaults_and_bad_values() -> None:
    base = Settings.from_env({})
    settings = SubmissionSettings.from_env({}, base)
    assert (settings.port, settings.tls_port) == (2587, 2465)
    assert settings.require_tls_for_auth is False
    with pytest.raises(SettingsError, match="AZORA_SUBMISSION_IDLE_TIMEOUT"):
        SubmissionSettings.from_env({"AZORA_SUBMISSION_IDLE_TIMEOUT": "soon"}, base)
    with pytest.raises(SettingsError, match="go together"):
        SubmissionSettings.from_env({"AZORA_SUBMISSION_CERT_FILE": "/c.pem"}, base)


def test_development_pair_is_generated_once_and_loads(tmp_path: Path) -> None:
    cert, key = development_pair(tmp_path, "submission.test")
    first = cert.read_bytes()
    assert development_pair(tmp_path, "other.test") == (cert, key)
    assert cert.read_bytes() == first  # reused, not regenerated
    assert key.stat().st_mode & 0o077 == 0  # the key is private to its owner
    assert server_context(cert, key) is not None


@pytest.mark.parametrize(
    ("code", "reason", "metadata", "expected"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, "MESSAGE_TOO_LARGE", {}, "552 5.3.4 boom"),
        (grpc.StatusCode.INVALID_ARGUMENT, "TOO_MANY_RECIPIENTS", {}, "550 5.5.3 boom"),
        (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_RECIPIENT", {}, "550 5.1.3 boom"),
        (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SENDER", {}, "550 5.1.7 boom"),
        (grpc.StatusCode.INVALID_ARGUMENT, "MESSAGE_MALFORMED", {}, "550 5.6.0 boom"),
        # The mail service's request fields are said as the SMTP commands the client sent.
        (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SENDER", {}, "550 5.1.7 MAIL FROM: boom"),
        (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_RECIPIENT", {}, "550 5.1.3 RCPT TO: boom"),
        (
            grpc.StatusCode.FAILED_PRECONDITION,
            "SENDER_DOMAIN_NOT_ACTIVE",
            {"domain": "x.example"},
            "550 5.7.1 Sender domain x.example is not an active domain of your account",
        ),
        (grpc.StatusCode.PERMISSION_DENIED, "MISSING_SCOPE", {}, "550 5.7.1 boom"),
        (grpc.StatusCode.UNAUTHENTICATED, "INVALID_API_KEY", {}, replies.AUTH_INVALID),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "SENDING_QUOTA_EXCEEDED", {}, "451 4.7.1 boom"),
        # Anything that is not a decision about this message is temporary.
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "", {}, replies.TEMPORARY_FAILURE),
        (grpc.StatusCode.UNAVAILABLE, "DEPENDENCY_UNAVAILABLE", {}, replies.TEMPORARY_FAILURE),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "", {}, replies.TEMPORARY_FAILURE),
        (grpc.StatusCode.INTERNAL, "", {}, replies.TEMPORARY_FAILURE),
        (grpc.StatusCode.NOT_FOUND, "", {}, replies.TEMPORARY_FAILURE),
    ],
)
def test_reply_table(
    code: grpc.StatusCode, reason: str, metadata: dict[str, str], expected: str
) -> None:
    text = "boom"
    if expected.endswith("MAIL FROM: boom"):
        text = "envelopeFrom: boom"
    elif expected.endswith("RCPT TO: boom"):
        text = "envelopeTo[3]: boom"
    failure = replies.Failure(code, f"{text}\r\nRCPT TO:<injected>", reason, metadata)
    reply = replies.for_failure(failure)
    # The service's message is flattened to one line: a reply never carries a line break.
    assert reply.replace(" RCPT TO:<injected>", "") == expected
    assert "\r" not in reply
    assert "\n" not in reply


def test_reply_leaves_out_the_api_field_name() -> None:
    # The mail service names the refused field (rawMessage); the SMTP client sent a message
    # after DATA, not that field, so its reply says only what is wrong with the message.
    failure = replies.Failure(
        grpc.StatusCode.INVALID_ARGUMENT,
        "rawMessage: bare CR or LF on line 1: every line must end with CRLF",
        "MESSAGE_MALFORMED",
    )
    assert replies.for_failure(failure) == (
        "550 5.6.0 bare CR or LF on line 1: every line must end with CRLF"
    )


def test_aiosmtpd_replies_get_enhanced_codes() -> None:
    assert replies.enhanced("250 OK") == "250 2.0.0 OK"
    assert replies.enhanced("500 Error: bad syntax") == "500 5.5.2 Error: bad syntax"
    assert replies.enhanced("503 Error: need RCPT command") == "503 5.5.1 Error: need RCPT command"
    assert replies.enhanced("552 Error: Too much mail data") == "552 5.3.4 Message too big"
    assert replies.enhanced("220 Ready to start TLS") == "220 2.0.0 Ready to start TLS"
    # Greetings, challenges, 354 and replies that have one already are left alone.
    for reply in ("220 host ESMTP", "334 VXNlcm5hbWU6", "354 End data", replies.AUTH_INVALID):
        assert replies.enhanced(reply) == reply


def test_raw_message_keeps_folded_fields_and_removes_bcc_and_controls() -> None:
    raw = (
        b"From: a@example.com\r\n"
        b"Subject: a long\r\n subject\r\n"
        b"Bcc: hidden@example.org,\r\n\tother@example.org\r\n"
        b"X-Azora-Tag: t1\r\n"
        b"X-Keep: yes\r\n"
        b"\r\n"
        b"Body\r\n"
    )
    parsed = raw_message.parse(raw)
    assert parsed.subject() == "a long subject"
    assert parsed.controls.tags == ["t1"]
    now = datetime(2026, 12, 5, 10, 0, tzinfo=UTC)
    content = parsed.content(message_id="<m@example.com>", now=now)
    assert content == (
        b"Message-ID: <m@example.com>\r\n"
        b"Date: Sat, 05 Dec 2026 10:00:00 +0000\r\n"
        b"From: a@example.com\r\n"
        b"Subject: a long\r\n subject\r\n"
        b"X-Keep: yes\r\n"
        b"\r\n"
        b"Body\r\n"
    )


def test_raw_message_without_body_and_header_errors() -> None:
    assert raw_message.parse(b"From: a@example.com\r\n").body == b""
    for bad, needle in (
        (b"", "empty"),
        (b" folded first\r\nFrom: a@example.com\r\n", "continuation"),
        (b"From: a@example.com\r\nFrom: b@example.com\r\n\r\nx", "exactly one From"),
        (b"From: a@example.com\r\nSubject: \xff\r\n\r\nx", "UTF-8"),
    ):
        with pytest.raises(InvalidArgument) as info:
            raw_message.parse(bad)
        assert info.value.reason == "MESSAGE_MALFORMED"
        assert needle in str(info.value.violations[0].description)


def test_encoded_display_names_with_commas_are_one_mailbox() -> None:
    # "Doe, John" encoded (RFC 2047): still one From mailbox, and one To address.
    raw = (
        b"From: =?utf-8?q?Doe=2C_J=C3=B6hn?= <john@example.com>\r\n"
        b"To: =?utf-8?q?Roe=2C_Jane?= <jane@example.org>\r\n\r\nx\r\n"
    )
    parsed = raw_message.parse(raw)
    assert raw_message.from_mailbox(parsed) == ("Doe, Jöhn <john@example.com>", "john@example.com")
    assert parsed.addresses("To") == ["jane@example.org"]


class StaticKeys:
    """`ApiKeyResolver` knowing one key (an in-memory fake of our own interface)."""

    def __init__(self, secret: str) -> None:
        self.secret = secret

    async def resolve(self, *, secret: str) -> Principal | None:
        """The one key's principal, else None."""
        if secret != self.secret:
            return None
        return Principal("t-slow", "apikey:1", frozenset({"emails:send"}))


class SlowMail:
    """`MailSubmitter` that takes `delay` seconds to store a message."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.stored: list[bytes] = []

    async def submit(
        self,
        *,
        identity: Identity,
        raw: bytes,
        envelope_from: str,
        envelope_to: list[str],
        client_address: str,
    ) -> str:
        """Store after the delay."""
        await asyncio.sleep(self.delay)
        self.stored.append(raw)
        return "e1"


async def test_waiting_for_the_hand_over_is_not_idle(tmp_path: Path) -> None:
    # Idle timeout 0.2 s, the mail service takes 0.6 s: the client still gets its 250.
    cert, key = development_pair(tmp_path, "submission.test")
    mail = SlowMail(0.6)
    app = await build_app(
        Settings.from_env({}),
        SubmissionSettings(port=-1, tls_port=0, health_port=0, idle_timeout=0.2),
        api_keys=StaticKeys("azk_slow"),
        mail=mail,
        context=server_context(cert, key),
    )
    try:
        client = await RawClient.connect(app.ports["tls"], ssl.create_default_context(cafile=cert))
        try:
            assert (await client.login("azk_slow")).startswith("235")
            assert (await client.command("MAIL FROM:<a@example.com>")).startswith("250")
            assert (await client.command("RCPT TO:<b@example.org>")).startswith("250")
            assert (await client.command("DATA")).startswith("354")
            await client.send(b"From: a@example.com\r\n\r\nx\r\n.\r\n")
            assert await client.reply() == "250 2.0.0 Ok: queued as e1"
        finally:
            await client.close()
    finally:
        await app.stop(0)
    assert len(mail.stored) == 1


def test_failed_auth_is_slowed_down_then_refused_until_the_window_ends() -> None:
    # From the 3rd wrong key on, answers are held back 1 s more per failure (at most 10 s); the
    # 5th refuses the address until the 100 s window ends (the suite's rate limiter counts).
    now = [1000.0]  # the start of a window (windows are aligned to multiples of 100 s)
    limits = ClientLimits.from_settings(
        SubmissionSettings(
            auth_failures_before_delay=3,
            auth_failure_delay=1.0,
            auth_failures_before_block=5,
            auth_failure_window=100.0,
        ),
        clock=lambda: now[0],
    )
    assert [limits.auth_failed("192.0.2.1") for _ in range(4)] == [0.0, 0.0, 1.0, 2.0]
    assert not limits.blocked("192.0.2.1")
    assert not limits.blocked("192.0.2.2")
    limits.auth_failed("192.0.2.1")
    assert limits.blocked("192.0.2.1")
    assert not limits.blocked("192.0.2.2")
    now[0] = 1099.0  # still the same window
    assert limits.blocked("192.0.2.1")
    now[0] = 1100.0  # the next window: refused no more, earlier failures forgotten
    assert not limits.blocked("192.0.2.1")
    assert limits.auth_failed("192.0.2.1") == 0.0


def test_delay_is_capped_at_ten_seconds() -> None:
    limits = ClientLimits.from_settings(
        SubmissionSettings(
            auth_failures_before_delay=1,
            auth_failure_delay=3.0,
            auth_failures_before_block=100,
            auth_failure_window=3600.0,
        ),
        clock=lambda: 0.0,
    )
    assert [limits.auth_failed("192.0.2.9") for _ in range(5)] == [3.0, 6.0, 9.0, 10.0, 10.0]


def test_the_removed_block_length_setting_is_refused_not_ignored() -> None:
    with pytest.raises(SettingsError, match="AZORA_SUBMISSION_AUTH_BLOCK_SECONDS is gone"):
        SubmissionSettings.from_env(
            {"AZORA_SUBMISSION_AUTH_BLOCK_SECONDS": "900"}, Settings.from_env({})
        )


def test_failed_auth_counts_of_ended_windows_are_forgotten() -> None:
    # The submission server runs no sync of its counts (they stay in the process): the windows
    # that ended must still go, or a long-running server keeps every address it ever counted.
    now = [0.0]
    limits = ClientLimits.from_settings(
        SubmissionSettings(auth_failures_before_block=100, auth_failure_window=10.0),
        clock=lambda: now[0],
    )
    for window in range(50):
        now[0] = window * 10.0
        for host in range(20):
            limits.auth_failed(f"192.0.2.{host}")
    counters = limits.failed_auth.counters
    assert len(counters._windows) == 1  # what is kept is the point here
