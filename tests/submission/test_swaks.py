"""swaks (Debian's SMTP test tool) submits through the server like any application would.

Over STARTTLS and over implicit TLS, AUTH PLAIN and LOGIN with an API key, a plain message and
one with an attachment: each is accepted with 250, delivered to the relay DKIM-signed (dkimpy
verifies it) with swaks's own headers as it sent them.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import dkim  # type: ignore[import-untyped]  # dkimpy ships no type information
import pytest

from tests.submission.conftest import Submission


def swaks(submission: Submission, *args: str) -> str:
    """Run swaks against the server; its transcript (stdout), failing on a non-zero exit."""
    binary = shutil.which("swaks")
    if binary is None:
        pytest.fail("swaks is required (Debian packages swaks, libnet-ssleay-perl)", pytrace=False)
    result = subprocess.run(
        [
            binary,
            "--server",
            "127.0.0.1",
            "--helo",
            "client.test",
            "--auth-user",
            "apikey",
            "--auth-password",
            submission.api_key,
            "--from",
            f"app@{submission.domain}",
            "--to",
            "jane@example.org",
            "--tls-verify",
            "--tls-ca-path",
            str(submission.cafile),
            "--tls-sni",
            "localhost",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def queued(transcript: str) -> str:
    """The email id of the final 250 in a swaks transcript."""
    [line] = [x for x in transcript.splitlines() if "Ok: queued as" in x]
    return line.rsplit(" ", 1)[1]


@pytest.mark.parametrize(
    ("mode", "mechanism"), [("--tls", "PLAIN"), ("--tlsc", "LOGIN")], ids=["starttls", "implicit"]
)
async def test_swaks_submits_over_tls_with_an_api_key(
    submission: Submission, tmp_path: Path, mode: str, mechanism: str
) -> None:
    port = submission.port if mode == "--tls" else submission.tls_port
    attachment = tmp_path / "report.csv"
    attachment.write_bytes(b"a,b\n1,2\n")
    extra = ["--attach", f"@{attachment}"] if mechanism == "LOGIN" else []
    transcript = await asyncio.to_thread(
        swaks,
        submission,
        mode,
        "--port",
        str(port),
        "--auth",
        mechanism,
        "--header",
        "Subject: swaks over TLS",
        *extra,
    )
    email_id = queued(transcript)
    stored = await submission.mail.get(submission.tenant, email_id)
    assert stored.subject == "swaks over TLS"
    assert stored.events[0].detail == "submission: SMTP; client: 127.0.0.1"
    if extra:
        assert [a.filename for a in stored.attachments] == ["report.csv"]
    assert await submission.deliver() == 1
    [(_, rcpt_to, data)] = submission.received
    assert rcpt_to == ["jane@example.org"]
    assert dkim.verify(data, dnsfunc=submission.dkim_dns)
    assert b"Subject: swaks over TLS" in data
    assert b"X-Mailer: swaks" in data
    # swaks wrote its own Message-ID and Date: kept.
    assert f"Message-Id: <{stored.message_id}>".lower().encode() in data.lower()
