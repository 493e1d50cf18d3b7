"""End to end through every real part: domain and SMTP services, Knot, aiosmtpd, subprocesses.

A domain is verified through DNS (Knot), gets a relay (aiosmtpd with STARTTLS from a test CA
and AUTH) and an active RSA-2048 DKIM key through the SMTP service's API; the mail service
finds both through its gRPC clients. The received message is checked header by header and its
DKIM signature verified by dkimpy and OpenDKIM against the record published in Knot.

Also: two workers on one database deliver each message exactly once, and a worker process
killed with SIGKILL mid-batch loses nothing (another process finishes the batch).
"""

from __future__ import annotations

import asyncio
import email
import os
import secrets
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email import policy
from pathlib import Path
from typing import Any

import grpc
import pytest
from azora.domain.v1 import domain_pb2, domain_pb2_grpc
from azora.mail.v1 import mail_pb2, mail_pb2_grpc
from azora.smtp.v1 import smtp_pb2, smtp_pb2_grpc

from services.core.clock import ManualClock
from services.core.runtime import Database
from services.domain.app import DomainApp
from services.mail.app import MailApp, build_app, make_worker
from services.mail.relay_lookup import smtp_service_relays
from services.mail.repository import EMAILS, MongoEmailRepository
from services.smtp.app import SmtpApp
from tests.conftest import REPO_ROOT, Tenant, make_settings, unique_domain
from tests.mail.conftest import RETRY_ENV, START
from tests.smtp.conftest import (  # noqa: F401 - fixtures used by this module
    PASSWORD,
    USERNAME,
    StartServer,
    authenticator,
    ca_file,
    server_tls,
    smtp_app,
    smtp_channel,
    smtp_clock,
    smtp_settings,
    smtp_stub,
    start_smtpd,
    tls_ca,
)
from tests.smtp.verifiers import dkimpy_verifies, opendkim_verdict, quoted
from tests.support.dns_server import KnotServer
from tests.support.settings import SuiteSettings
from tests.support.smtp_relay import RecordingHandler, RunningRelay, start_relay

E = mail_pb2


@dataclass
class EndToEnd:
    """A verified domain with relay and DKIM key, and a mail service that uses them."""

    app: MailApp
    stub: mail_pb2_grpc.MailServiceAsyncStub
    settings: SuiteSettings
    tenant: Tenant
    domain: str
    relay: RunningRelay
    handler: RecordingHandler
    clock: ManualClock

    @property
    def received(self) -> list[bytes]:
        """Messages the relay accepted, in order."""
        return self.handler.messages

    async def send(self, **fields: Any) -> mail_pb2.Email:
        request = {"from_address": f"App <app@{self.domain}>", "text": "hello", **fields}
        return await self.stub.SendEmail(
            E.SendEmailRequest(**request), metadata=self.tenant.metadata
        )


@pytest.fixture
async def e2e(
    ferretdb: str,
    domain_app: DomainApp,
    smtp_app: SmtpApp,  # noqa: F811
    domains_stub: domain_pb2_grpc.DomainServiceAsyncStub,
    smtp_stub: smtp_pb2_grpc.SmtpServiceAsyncStub,  # noqa: F811
    knot_server: KnotServer,
    tenant: Tenant,
    server_tls: Any,  # noqa: F811
    ca_file: Path,  # noqa: F811
) -> AsyncIterator[EndToEnd]:
    """Everything wired through the real services, relay = aiosmtpd (STARTTLS + AUTH)."""
    name = unique_domain()
    domain = await domains_stub.CreateDomain(
        domain_pb2.CreateDomainRequest(name=name), metadata=tenant.metadata
    )
    key = await smtp_stub.GenerateDkimKey(
        smtp_pb2.GenerateDkimKeyRequest(domain_id=domain.id), metadata=tenant.metadata
    )
    knot_server.set_zone(
        name,
        [
            ("@", "TXT", f'"azora-verify={domain.verification_token}"'),
            (f"{key.selector}._domainkey", "TXT", quoted(key.record_strings)),
        ],
    )
    verified = await domains_stub.VerifyDomain(
        domain_pb2.VerifyDomainRequest(id=domain.id), metadata=tenant.metadata
    )
    assert verified.domain.status == domain_pb2.DOMAIN_STATUS_ACTIVE
    await smtp_stub.ActivateDkimKey(
        smtp_pb2.ActivateDkimKeyRequest(domain_id=domain.id, selector=key.selector),
        metadata=tenant.metadata,
    )
    relay = await start_relay(starttls=server_tls, require_starttls=True, auth=authenticator())
    await smtp_stub.UpdateSmtpConfig(
        smtp_pb2.UpdateSmtpConfigRequest(
            domain_id=domain.id,
            host="127.0.0.1",
            port=relay.port,
            security="starttls",
            username=USERNAME,
            password=PASSWORD,
        ),
        metadata=tenant.metadata,
    )
    settings = make_settings(
        ferretdb,
        f"azora_mail_{secrets.token_hex(4)}",
        AZORA_DOMAIN_SERVICE_TARGET=f"127.0.0.1:{domain_app.running.port}",
        AZORA_SMTP_SERVICE_TARGET=f"127.0.0.1:{smtp_app.running.port}",
        AZORA_SMTP_CA_FILE=str(ca_file),
        **RETRY_ENV,
    )
    clock = ManualClock(START)
    app = await build_app(settings, clock=clock, bind="127.0.0.1:0", run_workers=False)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.running.port}") as channel:
        yield EndToEnd(
            app,
            mail_pb2_grpc.MailServiceStub(channel),
            settings,
            tenant,
            name,
            relay,
            relay.handler,
            clock,
        )
    await app.running.database.client.drop_database(settings.mongodb_database)
    await app.running.stop(None)
    await relay.close()


async def test_delivered_over_starttls_with_auth_signed_and_verified(
    e2e: EndToEnd, knot_server: KnotServer, tmp_path: Path
) -> None:
    # The relay gets exactly the message we built: headers, bodies, attachment, no Bcc, and a
    # DKIM signature that dkimpy and OpenDKIM verify (and that breaks when the body changes).
    sent = await e2e.send(
        to=["Jane <jane@example.org>"],
        bcc=["hidden@example.org"],
        subject="Quarterly report",
        text="See attached.\n.\nA line with a lone dot above.",
        html="<p>See attached.</p>",
        attachments=[E.Attachment(filename="r.csv", content=b"a,b\r\n1,2\r\n")],
        headers=[E.Header(name="X-Trace", value="t-1")],
    )
    assert (
        await make_worker(
            e2e.settings,
            emails=e2e.app.emails,
            relays=smtp_service_relays(e2e.settings)[0],
            clock=e2e.clock,
        ).run_once()
        == 1
    )
    got = await e2e.stub.GetEmail(E.GetEmailRequest(id=sent.id), metadata=e2e.tenant.metadata)
    assert got.status == E.EMAIL_STATUS_SENT, got
    # One transaction per recipient (each with its own return path), the same signed message.
    raw, other = e2e.received
    assert other == raw
    assert sorted(e.rcpt_tos[0] for e in e2e.handler.envelopes) == [
        "hidden@example.org",
        "jane@example.org",
    ]
    msg = email.message_from_bytes(raw, policy=policy.default)
    assert msg["Message-ID"] == f"<{sent.message_id}>"
    assert msg["Subject"] == "Quarterly report"
    assert msg["X-Trace"] == "t-1"
    assert msg["Bcc"] is None
    assert b"hidden@example.org" not in raw
    assert msg["DKIM-Signature"] is not None
    assert f"d={e2e.domain}" in msg["DKIM-Signature"].replace(" ", "")
    body = msg.get_body(("plain",))
    assert body is not None
    assert body.get_content().replace("\r\n", "\n") == (
        "See attached.\n.\nA line with a lone dot above.\n"
    )
    [attachment] = list(msg.iter_attachments())
    assert attachment.get_payload(decode=True) == b"a,b\r\n1,2\r\n"
    signed = raw.replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n")
    assert dkimpy_verifies(knot_server, signed)
    verdict = await asyncio.to_thread(opendkim_verdict, knot_server, signed, tmp_path / "ok")
    assert verdict.endswith("succeeded"), verdict
    assert not dkimpy_verifies(knot_server, signed.replace(b"See attached.", b"See attacked."))


async def test_two_workers_deliver_each_message_exactly_once(e2e: EndToEnd) -> None:
    # 2,000 emails, two workers (their production loop, batch claims) with their own database
    # clients racing for them: every Message-ID reaches the relay exactly once, every email
    # ends SENT, and each worker delivered a real share (told by the CLAIMED events).
    total = 2000
    ids: list[str] = []
    for start in range(0, total, 100):
        sent = await asyncio.gather(
            *(e2e.send(to=[f"r{i}@example.org"]) for i in range(start, start + 100))
        )
        ids.extend(e.message_id for e in sent)
    second = Database.connect(e2e.settings)
    db = e2e.app.running.database.db
    try:
        relays = smtp_service_relays(e2e.settings)
        workers = [
            make_worker(e2e.settings, emails=e2e.app.emails, relays=relays[0], clock=e2e.clock),
            make_worker(
                e2e.settings,
                emails=MongoEmailRepository(second.db, inline_limit=256 * 1024),
                relays=relays[0],
                clock=e2e.clock,
            ),
        ]
        running = [asyncio.create_task(w.run()) for w in workers]
        try:
            async with asyncio.timeout(900):  # a bound against hanging, not a speed check
                # Polling the database: there is no event to wait on across two workers.
                while await db[EMAILS].count_documents({"status": "sent"}) < total:  # noqa: ASYNC110
                    await asyncio.sleep(1)
        finally:
            for worker in workers:
                worker.stop()
            await asyncio.gather(*running)
        await relays[1].close()
    finally:
        await second.close()
    claims: Counter[str] = Counter()
    async for doc in db[EMAILS].find({}, {"events": 1}):
        claims.update(e["detail"] for e in doc["events"] if e["type"] == "claimed")
    assert sum(claims.values()) == total  # one claim per email: nothing delivered twice
    share = [claims[w.worker_id] for w in workers]
    assert min(share) >= total // 10, share
    received = Counter(
        email.message_from_bytes(m, policy=policy.default)["Message-ID"] for m in e2e.received
    )
    assert received == Counter(f"<{i}>" for i in ids)
    page = await e2e.stub.ListEmails(
        E.ListEmailsRequest(status=E.EMAIL_STATUS_SENT, page_size=60),
        metadata=e2e.tenant.metadata,
    )
    assert len(page.emails) == 60
    assert page.next_page_token


def _worker_process(settings: SuiteSettings, worker_id: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "AZORA_ENV": "test",
        "MONGODB_URI": settings.mongodb_uri,
        "AZORA_MONGODB_DATABASE": settings.mongodb_database,
        "JWT_SECRET": settings.jwt_secret,
        "AZORA_SERVICE_TOKEN_SECRET": settings.service_token_secret,
        "AZORA_SMTP_SERVICE_TARGET": settings.smtp_service_target,
        "AZORA_DOMAIN_SERVICE_TARGET": settings.domain_service_target,
        "AZORA_SMTP_CA_FILE": settings.smtp_ca_file,
        "AZORA_MAIL_LEASE": "2",
        "AZORA_MAIL_POLL_INTERVAL": "0.05",
        "AZORA_MAIL_WORKER_CONCURRENCY": "4",
        "AZORA_MAIL_WORKER_ID": worker_id,
        "LOG_LEVEL": "warn",
    }
    return subprocess.Popen([sys.executable, "-m", "services.mail.worker"], cwd=REPO_ROOT, env=env)


async def _wait_for(predicate: Any, seconds: float = 60.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached in time")


@pytest.mark.slow
async def test_killed_worker_process_loses_nothing(e2e: EndToEnd) -> None:
    # Worker A (a real process) is SIGKILLed mid-batch; worker B finishes after A's leases
    # expire. Every email ends SENT, every Message-ID arrives, and duplicates are at most the
    # deliveries A had in flight (its 4 loops), the window RFC 5321 leaves open.
    e2e_handler_messages = e2e.received
    ids = [(await e2e.send(to=[f"k{i}@example.org"])).message_id for i in range(120)]
    # Slow the relay a little so the kill lands mid-batch.
    e2e.handler.delay = 0.02
    a = _worker_process(e2e.settings, "worker-a")
    try:
        await _wait_for(lambda: _count_at_least(e2e_handler_messages, 20))
        a.send_signal(signal.SIGKILL)
        await asyncio.to_thread(a.wait, 10)
    finally:
        if a.poll() is None:
            a.kill()
    assert len(e2e_handler_messages) < 120, "the kill came too late to test anything"
    b = _worker_process(e2e.settings, "worker-b")
    try:
        await _wait_for(lambda: _all_sent(e2e), seconds=120)
        b.send_signal(signal.SIGTERM)
        # SIGTERM: B stops claiming and exits cleanly.
        assert await asyncio.to_thread(b.wait, 30) == 0
    finally:
        if b.poll() is None:
            b.kill()
    received = Counter(
        email.message_from_bytes(m, policy=policy.default)["Message-ID"]
        for m in e2e_handler_messages
    )
    assert set(received) == {f"<{i}>" for i in ids}
    duplicates = sum(n - 1 for n in received.values())
    assert duplicates <= 4


async def _count_at_least(messages: list[bytes], n: int) -> bool:
    return len(messages) >= n


async def _all_sent(e2e: EndToEnd) -> bool:
    db = e2e.app.running.database.db
    return await db["emails"].count_documents({"status": {"$ne": "sent"}}) == 0


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "process"))
            found[(sample.name, labels)] = sample.value
    return found


async def test_a_delivered_email_moves_the_right_counters(
    e2e: EndToEnd, domain_app: DomainApp
) -> None:
    # GET /metrics (SuiteHealthService.GetMetrics, parsed with Prometheus' text parser): one
    # delivered email adds one accepted, one sent and one DKIM signature, and no label carries
    # an address or an id.
    from azora.health.v1 import health_pb2, health_pb2_grpc

    async def scrape() -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{domain_app.running.port}") as channel:
            body = await health_pb2_grpc.SuiteHealthServiceStub(channel).GetMetrics(
                health_pb2.GetMetricsRequest()
            )
        assert body.content_type.startswith("text/plain")
        text = body.data.decode()
        return text, _samples(text)

    accepted = ("azora_emails_accepted_total", ())
    sent = ("azora_email_deliveries_total", (("outcome", "sent"),))
    signed = ("azora_dkim_signatures_total", (("outcome", "signed"),))
    _, before = await scrape()
    email_sent = await e2e.send(to=["jane@example.org"], subject="Counted", text="hi")
    worker = make_worker(
        e2e.settings,
        emails=e2e.app.emails,
        relays=smtp_service_relays(e2e.settings)[0],
        clock=e2e.clock,
    )
    assert await worker.run_once() == 1
    text, after = await scrape()
    for key in (accepted, sent, signed):
        assert after.get(key, 0) - before.get(key, 0) == 1, key
    assert "jane@example.org" not in text
    assert email_sent.id not in text
    # The sender domain labels the counters on the process's own scrape port (see
    # tests/mail/test_delivery.py), never on this merged, unauthenticated exposition.
    assert e2e.domain not in text
