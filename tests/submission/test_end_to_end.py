"""SMTP submission through the whole real suite, as a user would, checked by OpenDKIM and dkimpy.

A tenant registers a domain with the domain service, publishes its verification record and its
DKIM key's record in DNS (the test's Knot server), verifies the domain, activates the key and
configures its relay (aiosmtpd with STARTTLS, AUTH and SMTPUTF8) through the SMTP service's API,
and creates an API key with ``emails:send``. Its application then submits messages of every
shape — plain, HTML+text, attachments, a UTF-8 subject, SMTPUTF8 addresses — with Python's smtplib
and with swaks, over STARTTLS and over implicit TLS. The mail service (real, with its own delivery
workers) stores them and delivers them through the relay it learns from the SMTP service, signed
with the key the SMTP service holds. Each message reaches the relay with the client's header
fields and body exactly as sent, and OpenDKIM and dkimpy verify its signature against the record
Knot serves.

swaks (Debian's 20201014) cannot send the SMTPUTF8 MAIL parameter (it writes ``MAIL FROM:<a>``
and nothing else): it sends the UTF-8 addresses without it, which the server takes, as Postfix
does with ``smtputf8_enable``; the delivery to the relay is an SMTPUTF8 transaction all the same
(smtplib sends the parameter).
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import smtplib
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from pathlib import Path

import grpc
import pytest
from azora.domain.v1 import domain_pb2, domain_pb2_grpc
from azora.iam.v1 import api_keys_pb2_grpc
from azora.mail.v1 import mail_pb2, mail_pb2_grpc
from azora.smtp.v1 import smtp_pb2, smtp_pb2_grpc

from services.core.smtp_tls import development_pair, server_context
from services.domain.app import DomainApp
from services.mail.app import MailApp, build_app
from services.mail.return_paths import ReturnPaths
from services.smtp.app import SmtpApp
from services.submission.app import SubmissionApp
from services.submission.app import build_app as build_submission
from services.submission.settings import SubmissionSettings
from tests.conftest import Tenant, make_settings, unique_domain
from tests.smtp.conftest import (  # noqa: F401 - fixtures used by this module
    PASSWORD,
    USERNAME,
    authenticator,
    ca_file,
    server_tls,
    smtp_app,
    smtp_channel,
    smtp_clock,
    smtp_settings,
    smtp_stub,
    tls_ca,
)
from tests.smtp.verifiers import dkimpy_verifies, opendkim_verdict, quoted
from tests.submission.conftest import new_api_key
from tests.submission.test_submission import header_lines
from tests.support.dns_server import KnotServer
from tests.support.smtp_relay import Envelope, RunningRelay, start_relay

E = mail_pb2
# How long the mail service's own workers may take to deliver a handful of messages: a bound on
# the wait, not an assertion about speed.
DELIVERY_WAIT_SECONDS = 120.0


@dataclass
class Suite:
    """A verified domain with relay, DKIM key and API key; the mail and submission servers."""

    tenant: Tenant
    domain: str
    api_key: str
    relay: RunningRelay
    mail: mail_pb2_grpc.MailServiceAsyncStub
    submission: SubmissionApp
    cafile: Path
    return_paths: ReturnPaths

    def client_context(self) -> ssl.SSLContext:
        """A client TLS context trusting the submission server's certificate."""
        return ssl.create_default_context(cafile=str(self.cafile))

    async def email(self, email_id: str) -> mail_pb2.Email:
        """The email as `GET /api/v1/emails/{id}` shows it."""
        return await self.mail.GetEmail(
            E.GetEmailRequest(id=email_id), metadata=self.tenant.metadata
        )


@pytest.fixture
async def suite(
    ferretdb: str,
    domain_app: DomainApp,
    smtp_app: SmtpApp,  # noqa: F811
    domains_stub: domain_pb2_grpc.DomainServiceAsyncStub,
    smtp_stub: smtp_pb2_grpc.SmtpServiceAsyncStub,  # noqa: F811
    api_keys_stub: api_keys_pb2_grpc.ApiKeyServiceAsyncStub,
    knot_server: KnotServer,
    tenant: Tenant,
    server_tls: ssl.SSLContext,  # noqa: F811
    ca_file: Path,  # noqa: F811
    tmp_path: Path,
) -> AsyncIterator[Suite]:
    """The setup guide's steps through the services' APIs, then the mail and submission servers."""
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
    relay = await start_relay(
        starttls=server_tls, require_starttls=True, auth=authenticator(), smtputf8=True
    )
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
    api_key = await new_api_key(api_keys_stub, tenant, ["emails:send"])
    settings = make_settings(
        ferretdb,
        f"azora_submission_e2e_{secrets.token_hex(4)}",
        AZORA_DOMAIN_SERVICE_TARGET=f"127.0.0.1:{domain_app.running.port}",
        AZORA_SMTP_SERVICE_TARGET=f"127.0.0.1:{smtp_app.running.port}",
        AZORA_SMTP_CA_FILE=str(ca_file),
        AZORA_MAIL_POLL_INTERVAL="0.2",
    )
    mail: MailApp = await build_app(settings, bind="127.0.0.1:0", run_workers=True)
    cert, cert_key = development_pair(tmp_path / "tls", "submission.test")
    submission = await build_submission(
        settings.with_overrides(mail_service_target=f"127.0.0.1:{mail.running.port}"),
        SubmissionSettings(
            port=0, tls_port=0, health_port=0, hostname="submission.test", require_tls_for_auth=True
        ),
        context=server_context(cert, cert_key),
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{mail.running.port}") as channel:
            yield Suite(
                tenant,
                name,
                api_key,
                relay,
                mail_pb2_grpc.MailServiceStub(channel),
                submission,
                cert,
                ReturnPaths.from_settings(settings),
            )
    finally:
        await submission.stop(0)
        await mail.running.database.client.drop_database(settings.mongodb_database)
        await mail.running.stop(None)
        await relay.close()


@dataclass(frozen=True)
class Shape:
    """One kind of message an application sends, with the envelope it sends it in."""

    name: str
    sender: str
    recipients: tuple[str, ...]
    raw: bytes
    smtputf8: bool = False


def shapes(domain: str, tag: str) -> list[Shape]:
    """A message of each shape the issue lists, each with its own Message-ID and Date."""

    def head(msg: EmailMessage, sender: str, to: str, subject: str, kind: str) -> None:
        msg["From"] = sender
        msg["To"] = to
        msg["Subject"] = subject
        msg["Date"] = "Sat, 05 Dec 2026 10:00:00 +0000"
        msg["Message-ID"] = f"<{tag}-{kind}@{domain}>"

    sender = f"app@{domain}"
    plain = EmailMessage()
    head(plain, f"App <{sender}>", "Jane <jane@example.org>", f"Plain {tag}", "plain")
    plain.set_content("Hello over SMTP.\n.leading dot survives\n")
    html = EmailMessage()
    head(html, sender, "jane@example.org", f"HTML and text {tag}", "html")
    html.set_content("Text part.\n")
    html.add_alternative("<p>HTML <b>part</b>.</p>\n", subtype="html")
    attached = EmailMessage()
    head(attached, sender, "jane@example.org", f"Attachments {tag}", "attachments")
    attached.set_content("Two files attached.\n")
    attached.add_attachment(b"%PDF-1.4 fake\r\n", "application", "pdf", filename="report.pdf")
    attached.add_attachment("a,b\n1,2\n", subtype="csv", filename="data.csv")
    utf8_subject = EmailMessage()
    head(utf8_subject, sender, "jane@example.org", f"Rapport — état ✓ {tag}", "utf8-subject")
    utf8_subject.set_content("Sujet en UTF-8.\n")
    found = [
        Shape(s, sender, ("jane@example.org",), m.as_bytes(policy=policy.SMTP))
        for s, m in (
            ("plain", plain),
            ("html+text", html),
            ("attachments", attached),
            ("utf8-subject", utf8_subject),
        )
    ]
    # RFC 6531/6532: UTF-8 local parts in the envelope and raw UTF-8 in the header.
    utf8_sender, utf8_recipient = f"zoë.müller@{domain}", "jürgen@example.org"
    found.append(
        Shape(
            "smtputf8-address",
            utf8_sender,
            (utf8_recipient,),
            (
                f"From: Zoë <{utf8_sender}>\r\n"
                f"To: Jürgen <{utf8_recipient}>\r\n"
                f"Subject: Grüße {tag}\r\n"
                "Date: Sat, 05 Dec 2026 10:00:00 +0000\r\n"
                f"Message-ID: <{tag}-smtputf8@{domain}>\r\n"
                "\r\n"
                "Schöne Grüße.\r\n"
            ).encode(),
            smtputf8=True,
        )
    )
    return found


def submit_with_smtplib(
    suite: Suite, port: int, implicit_tls: bool, todo: list[Shape]
) -> list[str]:
    """One session (AUTH PLAIN with the API key), one transaction per shape; the 250 replies."""
    client: smtplib.SMTP
    if implicit_tls:
        client = smtplib.SMTP_SSL(
            "127.0.0.1", port, local_hostname="app.test", context=suite.client_context(), timeout=60
        )
    else:
        client = smtplib.SMTP("127.0.0.1", port, local_hostname="app.test", timeout=60)
        client.starttls(context=suite.client_context())
    replies: list[str] = []
    try:
        client.login("apikey", suite.api_key)
        for shape in todo:
            options = ["SMTPUTF8", "BODY=8BITMIME"] if shape.smtputf8 else []
            code, reply = client.mail(shape.sender, options)
            assert code == 250, reply
            for rcpt in shape.recipients:
                code, reply = client.rcpt(rcpt)
                assert code == 250, reply
            code, reply = client.data(shape.raw)
            assert code == 250, (shape.name, reply)
            replies.append(reply.decode())
    finally:
        client.quit()
    return replies


def submit_with_swaks(
    suite: Suite, port: int, implicit_tls: bool, todo: list[Shape], workdir: Path
) -> list[str]:
    """Run swaks once per shape (AUTH LOGIN with the API key), DATA from a file; the 250 replies."""
    binary = shutil.which("swaks")
    if binary is None:
        pytest.fail("swaks is required (Debian packages swaks, libnet-ssleay-perl)", pytrace=False)
    workdir.mkdir(parents=True, exist_ok=True)
    replies: list[str] = []
    for shape in todo:
        data = workdir / f"{shape.name}.eml"
        # swaks ends DATA with CRLF "." CRLF after the file's last byte (and dot-stuffs the
        # lines): a file without the final CRLF makes it send exactly `shape.raw`.
        data.write_bytes(shape.raw.removesuffix(b"\r\n"))
        result = subprocess.run(
            [
                binary,
                "--server",
                "127.0.0.1",
                "--port",
                str(port),
                "--tlsc" if implicit_tls else "--tls",
                "--tls-verify",
                "--tls-ca-path",
                str(suite.cafile),
                "--tls-sni",
                "localhost",
                "--helo",
                "app.test",
                "--auth",
                "LOGIN",
                "--auth-user",
                "apikey",
                "--auth-password",
                suite.api_key,
                "--from",
                shape.sender,
                "--to",
                ",".join(shape.recipients),
                "--data",
                f"@{data}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        [line] = [x for x in result.stdout.splitlines() if "Ok: queued as" in x]
        replies.append(line[line.index("2.0.0 ") :])  # swaks prefixes "<~  250 "
    return replies


async def delivered(suite: Suite, count: int) -> list[Envelope]:
    """Wait (bounded) until the relay has `count` messages; they, in arrival order."""
    for _ in range(int(DELIVERY_WAIT_SECONDS / 0.1)):
        if len(suite.relay.envelopes) >= count:
            break
        await asyncio.sleep(0.1)
    assert len(suite.relay.envelopes) == count, suite.relay.envelopes
    return list(suite.relay.envelopes)


@pytest.mark.parametrize("implicit_tls", [False, True], ids=["starttls", "implicit-tls"])
@pytest.mark.parametrize("client", ["smtplib", "swaks"])
async def test_every_shape_is_delivered_as_sent_and_verified_by_opendkim_and_dkimpy(
    suite: Suite, knot_server: KnotServer, tmp_path: Path, client: str, implicit_tls: bool
) -> None:
    port = suite.submission.ports["tls" if implicit_tls else "starttls"]
    tag = secrets.token_hex(3)
    todo = shapes(suite.domain, tag)
    if client == "swaks":
        replies = await asyncio.to_thread(
            submit_with_swaks, suite, port, implicit_tls, todo, tmp_path / "swaks"
        )
    else:
        replies = await asyncio.to_thread(submit_with_smtplib, suite, port, implicit_tls, todo)
    assert all(r.startswith("2.0.0 Ok: queued as ") for r in replies), replies
    ids = [r.rsplit(" ", 1)[1] for r in replies]
    by_message_id = {
        shape.raw.split(b"Message-ID: <", 1)[1].split(b">", 1)[0]: shape for shape in todo
    }
    # One transaction per recipient, each with the return path (VERP) naming it.
    envelopes = await delivered(suite, sum(len(shape.recipients) for shape in todo))
    unseen = {shape.name: set(shape.recipients) for shape in todo}
    for envelope in envelopes:
        message_id = envelope.content.split(b"\r\nMessage-ID: <", 1)[1].split(b">", 1)[0]
        shape = by_message_id[message_id]
        [rcpt] = envelope.rcpt_tos
        unseen[shape.name].remove(rcpt)
        token = suite.return_paths.parse(envelope.mail_from)
        assert token is not None, (shape.name, envelope.mail_from)
        assert token.email_id in ids, shape.name
        assert token.names(rcpt), shape.name
        assert envelope.smtp_utf8 == shape.smtputf8, shape.name
        assert envelope.content.startswith(b"DKIM-Signature:"), shape.name
        # Headers as sent: every field, in order, unchanged (the signature is the only addition);
        # the body byte for byte.
        assert header_lines(envelope.content) == header_lines(shape.raw), shape.name
        assert envelope.content.split(b"\r\n\r\n", 1)[1] == shape.raw.split(b"\r\n\r\n", 1)[1]
        assert dkimpy_verifies(knot_server, envelope.content), shape.name
        verdict = await asyncio.to_thread(
            opendkim_verdict, knot_server, envelope.content, tmp_path / "opendkim" / shape.name
        )
        assert verdict.endswith("succeeded"), (shape.name, verdict)
    assert not any(unseen.values()), unseen
    for email_id in ids:
        email = await suite.email(email_id)
        assert email.status == E.EMAIL_STATUS_SENT, email
        assert email.events[0].detail == "submission: SMTP; client: 127.0.0.1"


async def test_a_changed_body_fails_opendkim(
    suite: Suite, knot_server: KnotServer, tmp_path: Path
) -> None:
    # The verifiers can fail: the same delivered message with one body byte changed does not
    # verify (so the verdicts above are about these signatures, not a lenient verifier).
    [plain] = shapes(suite.domain, "x")[:1]
    await asyncio.to_thread(
        submit_with_smtplib, suite, suite.submission.ports["starttls"], False, [plain]
    )
    [envelope] = await delivered(suite, 1)
    tampered = envelope.content.replace(b"Hello over SMTP.", b"Hello over SMTQ.")
    assert not dkimpy_verifies(knot_server, tampered)
    verdict = await asyncio.to_thread(opendkim_verdict, knot_server, tampered, tmp_path)
    assert not verdict.endswith("succeeded"), verdict
