"""The submission server as a process, and outages behind it.

* ``kill -9`` in the middle of DATA: the client sees a dropped connection and nothing is stored;
  after a 250, the email is delivered even if the process dies right then (it was stored).
* The database unreachable behind the mail service: the reply is 451 4.3.0 (the client keeps
  the message and retries) and nothing is half-stored.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import secrets
import signal
import subprocess
import sys
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from azora.mail.v1 import mail_pb2
from pymongo import AsyncMongoClient

from services.core.embedded_db import EmbeddedFerretDB, find_ferretdb_binary
from services.core.smtp_tls import development_pair
from services.mail.repository import EMAILS
from services.submission import replies
from tests.conftest import REPO_ROOT, TEST_JWT_SECRET, TEST_SERVICE_TOKEN_SECRET, make_settings
from tests.submission.conftest import (
    RawClient,
    Submission,
    mail_app_like,
    submission_in_front_of,
)
from tests.submission.test_refusals import message, stored_count
from tests.support.settings import SuiteSettings

E = mail_pb2


class SubmissionProcess:
    """``python -m services.submission`` in front of the test's services."""

    def __init__(self, submission: Submission, domain_port: int, tls_dir: Path) -> None:
        cert, key = development_pair(tls_dir, "submission.test")
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("AZORA_", "MONGODB"))},
            "AZORA_ENV": "test",
            "JWT_SECRET": TEST_JWT_SECRET,
            "AZORA_SERVICE_TOKEN_SECRET": TEST_SERVICE_TOKEN_SECRET,
            "LOG_LEVEL": "info",
            "AZORA_DOMAIN_SERVICE_TARGET": f"127.0.0.1:{domain_port}",
            "AZORA_MAIL_SERVICE_TARGET": f"127.0.0.1:{submission.mail.app.running.port}",
            "AZORA_SUBMISSION_PORT": "0",
            "AZORA_SUBMISSION_TLS_PORT": "0",
            "AZORA_SUBMISSION_HEALTH_PORT": "0",
            "AZORA_SUBMISSION_HOSTNAME": "submission.test",
            "AZORA_SUBMISSION_CERT_FILE": str(cert),
            "AZORA_SUBMISSION_KEY_FILE": str(key),
            "AZORA_METRICS_PORT_SUBMISSION": "0",
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.submission"],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stderr is not None
        self.ports: dict[str, int] = {}
        for line in self.proc.stderr:
            entry = json.loads(line)
            if entry.get("msg") == "serving" and "tls" in entry:
                self.ports = {"starttls": entry["starttls"], "tls": entry["tls"]}
                break
        if not self.ports:
            raise AssertionError(f"the submission server did not start: {self.proc.wait()}")

    def kill(self) -> None:
        """SIGKILL: no chance to finish anything."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        """Make sure the process is gone."""
        if self.proc.poll() is None:
            self.kill()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def process(
    submission: Submission, domain_app: object, tmp_path: Path
) -> Iterator[SubmissionProcess]:
    """A submission server process next to the in-process one's mail service."""
    from services.domain.app import DomainApp

    assert isinstance(domain_app, DomainApp)
    started = SubmissionProcess(submission, domain_app.running.port, tmp_path / "tls")
    yield started
    started.stop()


async def test_kill_9_in_the_middle_of_data_stores_nothing(
    submission: Submission, process: SubmissionProcess
) -> None:
    client = await RawClient.connect(process.ports["tls"], submission.client_context())
    try:
        assert (await client.login(submission.api_key)).startswith("235")
        sender = f"app@{submission.domain}"
        assert (await client.command(f"MAIL FROM:<{sender}>")).startswith("250")
        assert (await client.command("RCPT TO:<jane@example.org>")).startswith("250")
        assert (await client.command("DATA")).startswith("354")
        await client.send(message(sender)[:40])  # half a message, no end of data
        await asyncio.to_thread(process.kill)
        try:
            reply = await client.reply()
        except (ConnectionError, OSError):
            reply = ""  # reset or EOF: either way the connection dropped without a reply
        assert reply == ""
    finally:
        await client.close()
    assert await stored_count(submission) == 0


async def test_after_250_the_email_is_delivered_even_if_the_process_dies(
    submission: Submission, process: SubmissionProcess
) -> None:
    client = await RawClient.connect(process.ports["tls"], submission.client_context())
    sender = f"app@{submission.domain}"
    try:
        assert (await client.login(submission.api_key)).startswith("235")
        assert (await client.command(f"MAIL FROM:<{sender}>")).startswith("250")
        assert (await client.command("RCPT TO:<jane@example.org>")).startswith("250")
        assert (await client.command("DATA")).startswith("354")
        await client.send(message(sender, "survives") + b".\r\n")
        final = await client.reply()
        await asyncio.to_thread(process.kill)
    finally:
        await client.close()
    assert final.startswith("250 2.0.0 Ok: queued as "), final
    assert await submission.deliver() == 1
    [(_, _, data)] = submission.received
    assert b"Subject: survives" in data
    email = await submission.mail.get(submission.tenant, final.rsplit(" ", 1)[1])
    assert email.status == E.EMAIL_STATUS_SENT


@pytest.fixture
async def own_ferretdb(tmp_path: Path) -> AsyncIterator[EmbeddedFerretDB]:
    """A FerretDB of this test alone (the test stops it)."""
    server = EmbeddedFerretDB(
        binary=find_ferretdb_binary(REPO_ROOT), data_dir=tmp_path / "ferretdb"
    )
    server.start()
    yield server
    server.stop()


async def test_database_down_is_451_4_3_0_and_nothing_is_stored(
    submission: Submission,
    own_ferretdb: EmbeddedFerretDB,
    domain_app: object,
) -> None:
    # A mail service on a database that then goes away: the submission answer is 451 4.3.0;
    # once the database is back, the tenant has no email.
    from services.domain.app import DomainApp

    assert isinstance(domain_app, DomainApp)
    settings: SuiteSettings = make_settings(
        own_ferretdb.uri,
        f"azora_down_{secrets.token_hex(4)}",
        AZORA_DOMAIN_SERVICE_TARGET=f"127.0.0.1:{domain_app.running.port}",
        AZORA_MONGODB_REQUEST_TIMEOUT="2",
    )
    mail = await mail_app_like(submission, settings)
    app = await submission_in_front_of(submission, mail, settings)
    try:
        await asyncio.to_thread(own_ferretdb.stop)
        client = await RawClient.connect(app.ports["tls"], submission.client_context())
        sender = f"app@{submission.domain}"
        try:
            assert (await client.login(submission.api_key)).startswith("235")
            assert (await client.command(f"MAIL FROM:<{sender}>")).startswith("250")
            assert (await client.command("RCPT TO:<jane@example.org>")).startswith("250")
            assert (await client.command("DATA")).startswith("354")
            await client.send(message(sender) + b".\r\n")
            assert await client.reply() == replies.TEMPORARY_FAILURE
        finally:
            await client.close()
        uri = await asyncio.to_thread(own_ferretdb.start)
        client_again: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(uri)
        try:
            db = client_again[settings.mongodb_database]
            assert await db[EMAILS].count_documents({}) == 0
        finally:
            await client_again.close()
    finally:
        await app.stop(0)
        await mail.running.stop(None)
        # The driver may hold a socket of the killed server until it is collected: collect it
        # here, where its ResourceWarning is expected, not in some later test.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
