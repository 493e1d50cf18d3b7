"""Every refusal of the submission server, with its exact reply and enhanced status code.

Authentication (no AUTH, AUTH before TLS, wrong key, JWT, key without emails:send, the key
service unreachable), the API's rules (another tenant's domain, size, recipients, invalid sender
and recipient, header injection and smuggling, idempotency), the mail service unreachable, and
the abuse limits (failed AUTH, connections, commands before AUTH, bad commands, idle time, each
logged with the client address), plus the graceful drain on shutdown. Nothing refused is stored.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import smtplib
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from azora.iam.v1 import api_keys_pb2_grpc
from azora.mail.v1 import mail_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.core.smtp_tls import server_context
from services.submission import replies
from services.submission.app import build_app
from services.submission.server import Identity
from tests.conftest import Tenant
from tests.submission.conftest import RawClient, Submission, new_api_key, submission_in_front_of
from tests.support.ports import closed_port

E = mail_pb2


def message(sender: str, subject: str = "hi") -> bytes:
    """A minimal message from `sender` to jane@example.org."""
    return f"From: {sender}\r\nTo: jane@example.org\r\nSubject: {subject}\r\n\r\nbody\r\n".encode()


async def stored_count(submission: Submission) -> int:
    """How many emails the tenant has."""
    page = await submission.mail.stub.ListEmails(
        E.ListEmailsRequest(page_size=100), metadata=submission.tenant.metadata
    )
    return len(page.emails)


async def auth_reply(submission: Submission, password: str, mechanism: str = "PLAIN") -> str:
    """Code and text of the reply to AUTH with `password`, over STARTTLS."""

    def run() -> str:
        client = submission.starttls_client()
        client.user, client.password = "apikey", password
        text: bytes | str
        try:
            method = client.auth_plain if mechanism == "PLAIN" else client.auth_login
            code, text = client.auth(mechanism, method)
        except smtplib.SMTPAuthenticationError as exc:
            code, text = exc.smtp_code, exc.smtp_error
        finally:
            client.close()
        return f"{code} {text.decode() if isinstance(text, bytes) else text}"

    return await asyncio.to_thread(run)


async def test_mail_before_auth_is_530_5_7_0(submission: Submission) -> None:
    # Submission needs AUTH: MAIL FROM without it is refused.
    def run() -> tuple[int, bytes]:
        client = submission.starttls_client()
        try:
            return client.mail(f"app@{submission.domain}")
        finally:
            client.close()

    assert await asyncio.to_thread(run) == (530, b"5.7.0 Authentication required")


async def test_auth_before_starttls_is_530_5_7_0(submission: Submission) -> None:
    # With AUTH only over TLS (production's rule), AUTH on the clear port is refused.
    def run() -> tuple[int, bytes]:
        client = smtplib.SMTP("127.0.0.1", submission.port, local_hostname="client.test")
        try:
            client.ehlo()
            token = base64.b64encode(f"\0apikey\0{submission.api_key}".encode()).decode()
            return client.docmd("AUTH", f"PLAIN {token}")
        finally:
            client.close()

    assert await asyncio.to_thread(run) == (530, b"5.7.0 Must issue a STARTTLS command first")


async def test_api_key_authenticates_with_plain_and_login(submission: Submission) -> None:
    # The user name is free text; the password is the API key.
    assert (await auth_reply(submission, submission.api_key)).startswith("235 2.7.0")
    assert (await auth_reply(submission, submission.api_key, "LOGIN")).startswith("235 2.7.0")


async def test_wrong_key_jwt_and_key_without_send_scope_are_535_5_7_8(
    submission: Submission,
    tenant: Tenant,
    api_keys_stub: api_keys_pb2_grpc.ApiKeyServiceAsyncStub,
) -> None:
    # Only a live API key with emails:send opens a session; a JWT is never accepted.
    read_only = await new_api_key(api_keys_stub, tenant, ["emails:read"])
    invalid = "535 5.7.8 Authentication credentials invalid"
    assert await auth_reply(submission, "azk_" + "x" * 43) == invalid
    assert await auth_reply(submission, tenant.token) == invalid
    assert await auth_reply(submission, read_only) == invalid
    assert await auth_reply(submission, read_only, "LOGIN") == invalid


async def submit_raw(
    submission: Submission,
    data: bytes,
    *,
    sender: str,
    recipients: tuple[str, ...] = ("jane@example.org",),
) -> str:
    """AUTH, MAIL, RCPT, DATA over implicit TLS, writing `data` as is; the final reply."""
    client = await RawClient.connect(submission.tls_port, submission.client_context())
    try:
        assert (await client.login(submission.api_key)).startswith("235")
        assert (await client.command(f"MAIL FROM:<{sender}>")).startswith("250")
        for rcpt in recipients:
            assert (await client.command(f"RCPT TO:<{rcpt}>")).startswith("250")
        assert (await client.command("DATA")).startswith("354")
        await client.send(data + b"\r\n.\r\n")
        return await client.reply()
    finally:
        await client.close()


async def test_another_tenants_domain_is_550_5_7_1_naming_it(
    submission: Submission, other_tenant: Tenant
) -> None:
    # Tenant isolation: a key of tenant A cannot send from tenant B's domain, neither as the
    # envelope sender nor in From; the reply names the domain and nothing is stored.
    _, foreign = submission.mail.add_domain(other_tenant, port=submission.relay.port)
    as_from = await submit_raw(
        submission, message(f"app@{foreign}"), sender=f"app@{submission.domain}"
    )
    assert as_from == f"550 5.7.1 Sender domain {foreign} is not an active domain of your account"
    as_envelope = await submit_raw(
        submission, message(f"app@{submission.domain}"), sender=f"bounce@{foreign}"
    )
    assert as_envelope == as_from
    assert await stored_count(submission) == 0


async def test_domain_without_relay_is_550_5_7_1(submission: Submission) -> None:
    _, bare = submission.mail.add_domain(submission.tenant, port=None)
    reply = await submit_raw(submission, message(f"app@{bare}"), sender=f"app@{bare}")
    assert reply == f"550 5.7.1 Sender domain {bare} has no SMTP relay configured"


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (b"From: {s}\r\nTo: jane@example.org\r\nSubject: hi\nBcc: x@example.org\r\n\r\nb", "LF"),
        (b"From: {s}\r\nTo: jane@example.org\r\nSubject: hi\rX: y\r\n\r\nbody", "CR"),
        (b"From: {s}\r\nTo: jane@example.org\r\nSubject: h\0i\r\n\r\nbody", "NUL"),
        (b"From: {s}\r\nTo: jane@example.org\r\nnot a header\r\n\r\nbody", "line 3"),
        (b"To: jane@example.org\r\nSubject: no sender\r\n\r\nbody", "From"),
        (b"From: {s}\r\nX-Azora-Colour: blue\r\n\r\nbody", "X-Azora-Colour"),
        (b"From: {s}\r\nX-Azora-Send-At: tomorrow\r\n\r\nbody", "X-Azora-Send-At"),
    ],
)
async def test_malformed_messages_are_550_5_6_0(
    submission: Submission, data: bytes, what: str
) -> None:
    # Header injection (bare CR/LF, NUL), a broken header, no From, unknown or bad control
    # headers: refused with the reason, nothing stored.
    sender = f"app@{submission.domain}"
    reply = await submit_raw(submission, data.replace(b"{s}", sender.encode()), sender=sender)
    assert reply.startswith("550 5.6.0 "), reply
    assert what in reply
    assert await stored_count(submission) == 0


async def test_smuggled_end_of_data_is_not_an_end(submission: Submission) -> None:
    # SMTP smuggling: "\n.\n" followed by a second transaction inside DATA. Only CRLF.CRLF ends
    # DATA, so the whole thing is one message, refused for its bare LF; nothing is stored.
    sender = f"app@{submission.domain}"
    smuggled = (
        message(sender)
        + b"\n.\nMAIL FROM:<"
        + sender.encode()
        + b">\r\nRCPT TO:<victim@example.org>\r\nDATA\r\nFrom: ceo@"
        + submission.domain.encode()
        + b"\r\n\r\nsmuggled"
    )
    reply = await submit_raw(submission, smuggled, sender=sender)
    assert reply.startswith("550 5.6.0 "), reply
    assert await stored_count(submission) == 0


async def test_too_large_is_552_5_3_4(start_submission: Callable[..., Any]) -> None:
    # SIZE is the mail service's limit: a declared size above it and a message above it.
    submission: Submission = await start_submission(mail_max_message_size=2000)
    sender = f"app@{submission.domain}"
    client = await RawClient.connect(submission.tls_port, submission.client_context())
    try:
        assert (await client.login(submission.api_key)).startswith("235")
        declared = await client.command(f"MAIL FROM:<{sender}> SIZE=5000")
        assert declared.startswith("552 5.3.4 "), declared
    finally:
        await client.close()
    big = message(sender) + (b"x" * 70 + b"\r\n") * 50
    reply = await submit_raw(submission, big, sender=sender)
    assert reply.startswith("552 5.3.4 "), reply
    assert await stored_count(submission) == 0


async def test_too_many_recipients_is_452_4_5_3(start_submission: Callable[..., Any]) -> None:
    submission: Submission = await start_submission(mail_max_recipients=2)
    client = await RawClient.connect(submission.tls_port, submission.client_context())
    try:
        assert (await client.login(submission.api_key)).startswith("235")
        assert (await client.command(f"MAIL FROM:<app@{submission.domain}>")).startswith("250")
        assert (await client.command("RCPT TO:<a@example.org>")).startswith("250 2.1.5")
        assert (await client.command("RCPT TO:<b@example.org>")).startswith("250 2.1.5")
        third = await client.command("RCPT TO:<c@example.org>")
        assert third == "452 4.5.3 Too many recipients (at most 2)"
    finally:
        await client.close()


async def test_failed_auth_is_refused_then_the_address_is_blocked(
    start_submission: Callable[..., Any],
) -> None:
    # Three wrong keys from one address: the third ends the session with 421, and new
    # connections from that address are refused until the window ends (a window of a year,
    # so that the three failures cannot straddle two windows).
    submission: Submission = await start_submission(
        auth_failures_before_block=3, auth_failure_window=365 * 86400.0
    )
    client = await RawClient.connect(submission.tls_port, submission.client_context())
    try:
        assert await client.login("azk_wrong1") == replies.AUTH_INVALID
        token = base64.b64encode(b"\0apikey\0azk_wrong2").decode()
        assert await client.command(f"AUTH PLAIN {token}") == replies.AUTH_INVALID
        token = base64.b64encode(b"\0apikey\0azk_wrong3").decode()
        assert await client.command(f"AUTH PLAIN {token}") == replies.AUTH_BLOCKED
        assert await client.reply() == ""  # closed
    finally:
        await client.close()
    again = await RawClient.connect(submission.tls_port, submission.client_context())
    try:
        assert await again.reply() == replies.AUTH_BLOCKED
    finally:
        await again.close()


async def test_connections_per_address_are_limited(start_submission: Callable[..., Any]) -> None:
    submission: Submission = await start_submission(max_connections_per_ip=2)
    clients = [await RawClient.connect(submission.port) for _ in range(2)]
    try:
        for client in clients:
            assert (await client.reply()).startswith("220 ")
        third = await RawClient.connect(submission.port)
        assert await third.reply() == replies.TOO_MANY_CONNECTIONS
        await third.close()
    finally:
        for client in clients:
            await client.close()


async def test_commands_before_auth_are_limited(start_submission: Callable[..., Any]) -> None:
    submission: Submission = await start_submission(max_commands_before_auth=3)
    client = await RawClient.connect(submission.port)
    try:
        await client.reply()
        assert (await client.command("EHLO client.test")).startswith("250")
        assert await client.command("NOOP") == "250 2.0.0 OK"
        assert await client.command("NOOP") == "250 2.0.0 OK"
        assert await client.command("NOOP") == replies.TOO_MANY_COMMANDS
    finally:
        await client.close()


async def test_bad_commands_end_the_session(start_submission: Callable[..., Any]) -> None:
    submission: Submission = await start_submission(max_bad_commands=3)
    client = await RawClient.connect(submission.port)
    try:
        await client.reply()
        assert (await client.command("FOO")).startswith("500 5.5.2 ")
        assert (await client.command("BAR")).startswith("500 5.5.2 ")
        assert (await client.command("BAZ")).startswith("500 5.5.2 ")
        assert await client.reply() == replies.TOO_MANY_BAD_COMMANDS
    finally:
        await client.close()


async def test_idle_session_gets_421_4_4_2(start_submission: Callable[..., Any]) -> None:
    submission: Submission = await start_submission(idle_timeout=0.2)
    client = await RawClient.connect(submission.port)
    try:
        assert (await client.reply()).startswith("220 ")
        assert await client.reply() == replies.IDLE_TIMEOUT
    finally:
        await client.close()


async def test_a_tls_session_already_closing_is_closed_without_a_write(
    submission: Submission,
) -> None:
    # The state a peer's close_notify leaves behind: asyncio's TLS shutdown has begun and
    # aiosmtpd has closed the writer as well. A shutdown or timeout reaching the session then
    # must not write its 421 (the doubly closed TLS transport raised AttributeError from a task
    # nobody awaited; its logged traceback, garbage-collected mid-way through another test's
    # ast.parse, once broke that test).
    client = await RawClient.connect(submission.tls_port, submission.client_context())
    try:
        assert (await client.reply()).startswith("220 ")
        (session,) = submission.app.listeners.limits.sessions
        assert session.transport is not None
        session.transport.close()
        session.transport.close()
        await session.close_with(replies.SHUTTING_DOWN)
        assert await client.reply() == ""
    finally:
        await client.close()


async def test_shutdown_finishes_the_transaction_in_progress_and_421s_the_rest(
    submission: Submission,
) -> None:
    # SIGTERM's drain: the idle session gets 421 at once; the one in a transaction may finish
    # (its 250 carries a stored email) and then gets 421; no new connection is accepted.
    busy = await RawClient.connect(submission.tls_port, submission.client_context())
    idle = await RawClient.connect(submission.tls_port, submission.client_context())
    assert (await busy.login(submission.api_key)).startswith("235")
    assert (await idle.login(submission.api_key)).startswith("235")
    sender = f"app@{submission.domain}"
    assert (await busy.command(f"MAIL FROM:<{sender}>")).startswith("250")
    stopping = asyncio.create_task(submission.app.stop(30.0))
    assert await idle.reply() == replies.SHUTTING_DOWN
    assert (await busy.command("RCPT TO:<jane@example.org>")).startswith("250")
    assert (await busy.command("DATA")).startswith("354")
    await busy.send(message(sender) + b".\r\n")
    final = await busy.reply()
    assert final.startswith("250 2.0.0 Ok: queued as "), final
    assert await busy.reply() == replies.SHUTTING_DOWN
    await stopping
    await busy.close()
    await idle.close()
    await idle.close()
    email_id = final.rsplit(" ", 1)[1]
    assert (await submission.mail.get(submission.tenant, email_id)).id == email_id
    with pytest.raises(ConnectionRefusedError):
        await RawClient.connect(submission.port)


async def test_revoked_key_is_refused_at_data_with_535(
    submission: Submission, tenant: Tenant
) -> None:
    # The mail service checks the key again: a key unknown to it by DATA time gets 535.
    client = await RawClient.connect(submission.tls_port, submission.client_context())
    try:
        assert (await client.login(submission.api_key)).startswith("235")
        # As if revoked: the session keeps its principal, the mail service knows no such key.
        [server] = submission.app.limits.sessions
        assert server.session is not None
        identity: object = server.session.auth_data
        assert isinstance(identity, Identity)
        session: Any = server.session  # aiosmtpd types auth_data as None
        session.auth_data = Identity(identity.principal, "azk_" + "r" * 43)
        assert (await client.command(f"MAIL FROM:<app@{submission.domain}>")).startswith("250")
        assert (await client.command("RCPT TO:<jane@example.org>")).startswith("250")
        assert (await client.command("DATA")).startswith("354")
        await client.send(message(f"app@{submission.domain}") + b".\r\n")
        assert await client.reply() == replies.AUTH_INVALID
    finally:
        await client.close()


async def test_session_time_limit_gets_421_4_4_2(start_submission: Callable[..., Any]) -> None:
    # A client that keeps talking is still cut off after the session time limit.
    submission: Submission = await start_submission(session_timeout=0.3)
    client = await RawClient.connect(submission.port)
    try:
        assert (await client.reply()).startswith("220 ")
        reply = ""
        while reply != replies.SESSION_TIMEOUT:
            reply = await client.command("NOOP")
            assert reply in ("250 2.0.0 OK", replies.SESSION_TIMEOUT), reply
            await asyncio.sleep(0.05)
    finally:
        await client.close()


async def test_pipelined_commands_are_answered_in_order(submission: Submission) -> None:
    # PIPELINING: MAIL, RCPT, DATA in one write; three replies in order, then the message.
    client = await RawClient.connect(submission.tls_port, submission.client_context())
    sender = f"app@{submission.domain}"
    try:
        assert (await client.login(submission.api_key)).startswith("235")
        await client.send(
            f"MAIL FROM:<{sender}>\r\nRCPT TO:<jane@example.org>\r\nDATA\r\n".encode()
        )
        assert (await client.reply()).startswith("250 2.1.0")
        assert (await client.reply()).startswith("250 2.1.5")
        assert (await client.reply()).startswith("354")
        await client.send(message(sender, "pipelined") + b".\r\nQUIT\r\n")
        assert (await client.reply()).startswith("250 2.0.0 Ok: queued as ")
        assert (await client.reply()).startswith("221")
    finally:
        await client.close()


async def test_refusals_are_logged_with_the_address_never_the_key(
    submission: Submission, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "azk_" + "s" * 43
    with caplog.at_level(logging.INFO):
        assert await auth_reply(submission, secret) == replies.AUTH_INVALID
        assert (await auth_reply(submission, submission.api_key)).startswith("235")
    refused = [r for r in caplog.records if r.getMessage() == "AUTH failed"]
    assert refused
    fields = getattr(refused[0], "fields", {})
    assert fields["client"] == "127.0.0.1"
    assert fields["reason"] == "unknown, revoked or expired API key"
    for record in caplog.records:
        text = record.getMessage() + repr(getattr(record, "fields", ""))
        assert secret not in text
        assert submission.api_key not in text


async def test_health_is_serving_until_shutdown(submission: Submission) -> None:
    # The probe target: SERVING while the listeners accept, NOT_SERVING once draining (while a
    # transaction in progress still holds the process).
    busy = await RawClient.connect(submission.tls_port, submission.client_context())
    idle = await RawClient.connect(submission.port)
    assert (await idle.reply()).startswith("220 ")
    assert (await busy.login(submission.api_key)).startswith("235")
    assert (await busy.command(f"MAIL FROM:<app@{submission.domain}>")).startswith("250")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{submission.app.health.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        check = stub.Check  # type: ignore[attr-defined]  # the stubs type only the sync API
        serving = await check(health_pb2.HealthCheckRequest(service=""))
        assert serving.status == health_pb2.HealthCheckResponse.SERVING
        stopping = asyncio.create_task(submission.app.stop(30.0))
        assert await idle.reply() == replies.SHUTTING_DOWN  # the drain has begun
        stopped = await check(health_pb2.HealthCheckRequest(service=""))
        assert stopped.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert await busy.command("RSET") == "250 2.0.0 OK"
    assert await busy.reply() == replies.SHUTTING_DOWN  # the transaction ended: nothing left
    await stopping
    await busy.close()
    await idle.close()


async def test_null_sender_is_550_5_1_7(submission: Submission) -> None:
    # MAIL FROM:<> (a bounce's sender) is no sender an application may submit as: the mail
    # service refuses it as INVALID_SENDER; nothing is stored.
    reply = await submit_raw(submission, message(f"app@{submission.domain}"), sender="")
    assert reply == "550 5.1.7 MAIL FROM: '<>' is not a valid email address"
    assert await stored_count(submission) == 0


async def test_undeliverable_recipient_is_550_5_1_3(submission: Submission) -> None:
    # An address SMTP's syntax allows but no mailbox can have (a domain without a dot): the mail
    # service refuses it as INVALID_RECIPIENT; the reply names the command the client used, not
    # the field of the mail service's request.
    reply = await submit_raw(
        submission,
        message(f"app@{submission.domain}"),
        sender=f"app@{submission.domain}",
        recipients=("jane@example.org", "root@localhost"),
    )
    assert reply == "550 5.1.3 RCPT TO: 'root@localhost' has an invalid domain"
    assert await stored_count(submission) == 0


async def test_key_service_unreachable_at_auth_is_454_4_7_0(submission: Submission) -> None:
    # The domain service (which resolves keys) cannot be reached: a temporary failure, not a
    # wrong credential (no 535, nothing counted against the address).
    settings = submission.settings.with_overrides(
        domain_service_target=f"127.0.0.1:{closed_port()}"
    )
    app = await submission_in_front_of(submission, submission.mail.app, settings)
    try:
        client = await RawClient.connect(app.ports["tls"], submission.client_context())
        try:
            assert await client.login(submission.api_key) == replies.AUTH_TEMPORARY
        finally:
            await client.close()
        assert not app.limits.blocked("127.0.0.1")
    finally:
        await app.stop(0)


async def test_mail_service_unreachable_is_451_4_3_0(submission: Submission) -> None:
    # The hand-over cannot happen (no mail service listening): the client keeps the message.
    settings = submission.settings.with_overrides(mail_service_target=f"127.0.0.1:{closed_port()}")
    app = await build_app(
        settings,
        submission.app.settings.with_overrides(submit_timeout=5.0),
        context=server_context(submission.cafile, submission.cafile.with_name("key.pem")),
    )
    sender = f"app@{submission.domain}"
    try:
        client = await RawClient.connect(app.ports["tls"], submission.client_context())
        try:
            assert (await client.login(submission.api_key)).startswith("235")
            assert (await client.command(f"MAIL FROM:<{sender}>")).startswith("250")
            assert (await client.command("RCPT TO:<jane@example.org>")).startswith("250")
            assert (await client.command("DATA")).startswith("354")
            await client.send(message(sender) + b".\r\n")
            assert await client.reply() == replies.TEMPORARY_FAILURE
        finally:
            await client.close()
    finally:
        await app.stop(0)
    assert await stored_count(submission) == 0


async def test_refusals_of_the_abuse_limits_are_logged_with_the_address(
    start_submission: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    # Each abuse refusal leaves a log line naming the client address (and no credentials).
    submission: Submission = await start_submission(max_connections_per_ip=1, max_bad_commands=1)
    chatty: Submission = await start_submission(max_commands_before_auth=1, idle_timeout=0.3)
    with caplog.at_level(logging.INFO):
        first = await RawClient.connect(submission.port)
        try:
            assert (await first.reply()).startswith("220 ")
            second = await RawClient.connect(submission.port)
            assert await second.reply() == replies.TOO_MANY_CONNECTIONS
            await second.close()
            assert (await first.command("FOO")).startswith("500 5.5.2 ")
            assert await first.reply() == replies.TOO_MANY_BAD_COMMANDS
        finally:
            await first.close()
        talker = await RawClient.connect(chatty.port)
        idler = await RawClient.connect(chatty.port)
        try:
            assert (await talker.reply()).startswith("220 ")
            assert await talker.command("NOOP") == "250 2.0.0 OK"
            assert await talker.command("NOOP") == replies.TOO_MANY_COMMANDS
            assert (await idler.reply()).startswith("220 ")
            assert await idler.reply() == replies.IDLE_TIMEOUT
        finally:
            await talker.close()
            await idler.close()
    logged = {r.getMessage(): getattr(r, "fields", {}) for r in caplog.records}
    for what in (
        "connection refused: too many connections from the address",
        "too many bad commands",
        "too many commands before authentication",
        "idle timeout",
    ):
        assert logged[what]["client"] == "127.0.0.1", logged
