"""The inbound SMTP server end to end: real clients (swaks, smtplib) against the real services.

Accepting only routed recipients of ACTIVE domains (never an open relay), the store action with
authentication results (SPF, DKIM, DMARC from the tests' Knot zone), the reject action, 250
only once stored and 451 when the mail service cannot store, idempotent retries, no AUTH,
opportunistic STARTTLS and the per-address message limit.
"""

from __future__ import annotations

import asyncio
import shutil
import smtplib
import ssl
import subprocess
from email.message import EmailMessage
from email.utils import make_msgid

import grpc
import pytest
from azora.domain.v1 import domain_pb2, domain_pb2_grpc
from azora.mail.v1 import inbound_pb2

from tests.conftest import Tenant, unique_domain
from tests.inbound.conftest import Inbound, SenderDomain, StartInbound
from tests.support.grpc_errors import failure_of
from tests.support.ports import closed_port


def message(sender: str, recipient: str, subject: str = "Hello") -> bytes:
    """A small multipart message (text and html) with an attachment, CRLF line ends."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = recipient
    msg["Subject"] = subject
    msg["Date"] = "Sat, 05 Dec 2026 09:00:00 +0000"
    msg["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2])
    msg.set_content("plain body\n")
    msg.add_alternative("<p>html body</p>\n", subtype="html")
    msg.add_attachment(b"%PDF-1.4 tiny", maintype="application", subtype="pdf", filename="a.pdf")
    return msg.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


async def swaks(inbound: Inbound, *args: str, data: bytes) -> str:
    """Run swaks against the inbound port (no AUTH) sending `data`; its transcript."""
    binary = shutil.which("swaks")
    if binary is None:
        pytest.fail("swaks is required (Debian package swaks)", pytrace=False)
    command = [binary, "--server", "127.0.0.1", "--port", str(inbound.port)]
    result = await asyncio.to_thread(
        subprocess.run,
        [*command, "--helo", "mx.sender.test", *args, "--data", "-"],
        input=data.decode(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


async def send_raw(
    inbound: Inbound, sender: str, recipients: list[str], raw: bytes
) -> dict[str, tuple[int, bytes]]:
    """Smtplib in a thread: the refused recipients, raising what smtplib raises."""

    def run() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", inbound.port, local_hostname="mx.sender.test") as client:
            return client.sendmail(sender, recipients, raw)

    return await asyncio.to_thread(run)


async def rcpt_reply(inbound: Inbound, sender: str, recipient: str) -> tuple[int, str]:
    """The reply to RCPT TO for one recipient."""

    def run() -> tuple[int, str]:
        with smtplib.SMTP("127.0.0.1", inbound.port, local_hostname="mx.sender.test") as client:
            client.ehlo()
            client.mail(sender)
            code, text = client.rcpt(recipient)
            return code, text.decode()

    return await asyncio.to_thread(run)


async def stored(inbound: Inbound) -> list[inbound_pb2.InboundMessage]:
    """The tenant's received messages."""
    page = await inbound.inbound.ListInboundMessages(
        inbound_pb2.ListInboundMessagesRequest(), metadata=inbound.tenant.metadata
    )
    return list(page.messages)


async def test_signed_message_is_stored_with_passing_authentication(
    inbound: Inbound, sender_domain: SenderDomain
) -> None:
    # swaks delivers a DKIM-signed message from an SPF-authorised address: stored, all pass.
    route = await inbound.add_route(match="support", action="store")
    recipient = f"support@{inbound.domain.name}"
    raw = sender_domain.sign(message(f"alice@{sender_domain.name}", recipient))
    transcript = await swaks(
        inbound, "--from", f"alice@{sender_domain.name}", "--to", recipient, data=raw
    )
    assert "250 2.0.0 Ok: stored as" in transcript
    [listed] = await stored(inbound)
    assert (listed.recipient, listed.route_id, listed.action, listed.outcome) == (
        recipient,
        route.id,
        "store",
        "stored",
    )
    auth = listed.authentication
    assert (auth.spf, auth.dkim, auth.dmarc) == ("pass", "pass", "pass")
    assert list(auth.dkim_domains) == [sender_domain.name]
    assert auth.from_domain == sender_domain.name
    got = await inbound.inbound.GetInboundMessage(
        inbound_pb2.GetInboundMessageRequest(id=listed.id), metadata=inbound.tenant.metadata
    )
    assert getattr(got, "from") == f"alice@{sender_domain.name}"
    assert list(got.to) == [recipient]
    assert got.subject == "Hello"
    assert got.text == "plain body\n"
    assert got.html == "<p>html body</p>\n"
    assert [(a.filename, a.content_type) for a in got.attachments] == [("a.pdf", "application/pdf")]
    body = await inbound.inbound.GetInboundMessageRaw(
        inbound_pb2.GetInboundMessageRawRequest(id=listed.id), metadata=inbound.tenant.metadata
    )
    assert body.content_type == "message/rfc822"
    assert body.data.startswith(b"Authentication-Results: mx.test;")
    assert raw.rstrip(b"\r\n") in body.data  # swaks ends the data with one more CRLF
    first = body.data.split(b"\r\n\r\n", 1)[0]
    for result in (b"spf=pass", b"dkim=pass header.d=", b"dmarc=pass"):
        assert result in first
    assert listed.size_bytes == len(body.data)


async def test_unsigned_message_from_an_unauthorised_address_fails_dmarc(
    inbound: Inbound, sender_domain: SenderDomain, knot_server: object
) -> None:
    # An unsigned message whose MAIL FROM domain forbids every address: spf fail, dkim none,
    # dmarc fail; it is still stored (routes decide, the results are for the tenant to judge).
    from tests.support.dns_server import KnotServer

    assert isinstance(knot_server, KnotServer)
    await inbound.add_route(match="*", action="store")
    knot_server.set_zone(
        sender_domain.name,
        [("@", "TXT", '"v=spf1 -all"'), ("_dmarc", "TXT", '"v=DMARC1; p=reject"')],
    )
    recipient = f"anyone@{inbound.domain.name}"
    refused = await send_raw(
        inbound,
        f"mallory@{sender_domain.name}",
        [recipient],
        message(f"ceo@{sender_domain.name}", recipient),
    )
    assert refused == {}
    [listed] = await stored(inbound)
    auth = listed.authentication
    assert (auth.spf, auth.dkim, auth.dmarc) == ("fail", "none", "fail")
    assert "spf=fail" in auth.header
    assert "dmarc=fail" in auth.header


async def test_never_an_open_relay(
    inbound: Inbound,
    domains_stub: domain_pb2_grpc.DomainServiceAsyncStub,
    tenant: Tenant,
) -> None:
    # Foreign domains, unknown domains, a pending domain and a routeless address: 550 5.7.1 at RCPT.
    await inbound.add_route(match="sales", action="store")
    pending = await domains_stub.CreateDomain(
        domain_pb2.CreateDomainRequest(name=unique_domain()), metadata=tenant.metadata
    )
    for sender, recipient in (
        (f"sales@{inbound.domain.name}", "victim@example.com"),
        ("spammer@example.net", "victim@gmail.com"),
        ("spammer@example.net", f"victim@{unique_domain()}"),
        ("spammer@example.net", f"victim@{pending.name}"),
        ("spammer@example.net", f"nobody@{inbound.domain.name}"),
        ("spammer@example.net", f'"sales@{inbound.domain.name}"@example.com'),
        ("spammer@example.net", f"sales%example.com@{inbound.domain.name}"),
    ):
        code, text = await rcpt_reply(inbound, sender, recipient)
        assert code == 550, (recipient, code, text)
        assert text.startswith("5.7.1"), text
    # Source routes and doubled "@" are refused as malformed before any lookup.
    for recipient in (
        f"sales@{inbound.domain.name}@example.com",
        f"@{inbound.domain.name}:victim@example.com",
    ):
        code, text = await rcpt_reply(inbound, "spammer@example.net", recipient)
        assert code in (501, 550, 553), (recipient, code, text)
    assert await stored(inbound) == []
    code, _ = await rcpt_reply(inbound, "x@example.net", f"Sales@{inbound.domain.name.upper()}")
    assert code == 250


async def test_reject_route_answers_550_with_its_text(inbound: Inbound) -> None:
    # The reject action refuses at RCPT with the configured text; nothing is stored.
    await inbound.add_route(
        match="noreply", action="reject", reject_text="This address is unattended"
    )
    code, text = await rcpt_reply(inbound, "x@example.net", f"noreply@{inbound.domain.name}")
    assert (code, text) == (
        550,
        f"5.7.1 <noreply@{inbound.domain.name}>: This address is unattended",
    )
    assert await stored(inbound) == []


async def test_451_when_the_message_cannot_be_stored(start_inbound: StartInbound) -> None:
    # The mail service unreachable: 451 4.3.0 after DATA (the sender keeps the message).
    inbound: Inbound = await start_inbound(
        mail_target=f"127.0.0.1:{closed_port()}", call_timeout=2.0
    )
    await inbound.add_route(match="*", action="store")
    recipient = f"a@{inbound.domain.name}"
    with pytest.raises(smtplib.SMTPDataError) as refused:
        await send_raw(inbound, "x@example.net", [recipient], message("x@example.net", recipient))
    assert refused.value.smtp_code == 451
    error: object = refused.value.smtp_error  # bytes, whatever typeshed says
    assert isinstance(error, bytes)
    assert error.startswith(b"4.3.0")
    assert await stored(inbound) == []


async def test_451_at_rcpt_when_routes_cannot_be_asked(start_inbound: StartInbound) -> None:
    # The domain service unreachable: 451 4.4.3 at RCPT (try later), never 550 nor a relay.
    inbound: Inbound = await start_inbound(
        domain_target=f"127.0.0.1:{closed_port()}", call_timeout=2.0
    )
    code, text = await rcpt_reply(inbound, "x@example.net", f"a@{inbound.domain.name}")
    assert (code, text[:5]) == (451, "4.4.3")


async def test_a_retried_message_is_stored_once(inbound: Inbound) -> None:
    # The same message sent twice (a sender that lost our 250) is one record with one id.
    await inbound.add_route(match="*", action="store")
    recipient = f"b@{inbound.domain.name}"
    raw = message("x@example.net", recipient)
    await send_raw(inbound, "x@example.net", [recipient], raw)
    await send_raw(inbound, "x@example.net", [recipient], raw)
    assert len(await stored(inbound)) == 1


async def test_no_auth_and_opportunistic_starttls(inbound: Inbound) -> None:
    # EHLO offers STARTTLS but never AUTH (also after TLS); mail is accepted with or without TLS.
    await inbound.add_route(match="*", action="store")
    recipient = f"c@{inbound.domain.name}"

    def run() -> tuple[bool, bool, bool]:
        with smtplib.SMTP("127.0.0.1", inbound.port, local_hostname="mx.sender.test") as client:
            client.ehlo()
            offers_tls = client.has_extn("starttls")
            auth_before = client.has_extn("auth")
            client.starttls(context=ssl.create_default_context(cafile=str(inbound.cafile)))
            client.ehlo()
            auth_after = client.has_extn("auth")
            code, _ = client.docmd("AUTH", "PLAIN AGFiAGM=")
            assert code == 502
            client.sendmail("x@example.net", [recipient], message("x@example.net", recipient))
        return offers_tls, auth_before, auth_after

    assert await asyncio.to_thread(run) == (True, False, False)
    [listed] = await stored(inbound)
    raw = await inbound.inbound.GetInboundMessageRaw(
        inbound_pb2.GetInboundMessageRawRequest(id=listed.id), metadata=inbound.tenant.metadata
    )
    assert b"with ESMTPS id" in raw.data


async def test_messages_per_address_are_limited(start_inbound: StartInbound) -> None:
    # Past the per-address budget of a window, MAIL FROM gets 451 4.7.1.
    inbound: Inbound = await start_inbound(max_messages_per_ip=2, message_window=3600.0)
    await inbound.add_route(match="*", action="store")
    recipient = f"d@{inbound.domain.name}"
    for n in range(2):
        await send_raw(
            inbound, "x@example.net", [recipient], message("x@example.net", recipient, f"n{n}")
        )
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        await send_raw(inbound, "x@example.net", [recipient], message("x@example.net", recipient))
    assert refused.value.smtp_code == 451
    assert len(await stored(inbound)) == 2


async def test_stored_messages_are_the_tenants_own(inbound: Inbound, settings: object) -> None:
    # Another tenant neither lists nor reads a stored message; StoreInboundMessage is internal.
    from services.core.settings import Settings
    from tests.conftest import new_tenant

    assert isinstance(settings, Settings)
    await inbound.add_route(match="*", action="store")
    recipient = f"e@{inbound.domain.name}"
    await send_raw(inbound, "x@example.net", [recipient], message("x@example.net", recipient))
    [listed] = await stored(inbound)
    other = new_tenant(settings)
    page = await inbound.inbound.ListInboundMessages(
        inbound_pb2.ListInboundMessagesRequest(), metadata=other.metadata
    )
    assert list(page.messages) == []
    failure = await failure_of(
        inbound.inbound.GetInboundMessage(
            inbound_pb2.GetInboundMessageRequest(id=listed.id), metadata=other.metadata
        )
    )
    assert (failure.code, failure.reason) == (
        grpc.StatusCode.NOT_FOUND,
        "INBOUND_MESSAGE_NOT_FOUND",
    )
    failure = await failure_of(
        inbound.inbound.StoreInboundMessage(
            inbound_pb2.StoreInboundMessageRequest(raw_message=b"x"),
            metadata=inbound.tenant.metadata,
        )
    )
    assert failure.code == grpc.StatusCode.PERMISSION_DENIED


async def test_a_looping_message_is_refused_at_50_hops(inbound: Inbound) -> None:
    # 50 Received headers (a forward loop between two domains) is 554 5.4.6; 49 is accepted.
    await inbound.add_route(match="*", action="store")
    recipient = f"loop@{inbound.domain.name}"

    def hops(count: int) -> bytes:
        lines = b"".join(
            b"Received: from hop%d by hop%d; now\r\n" % (n, n + 1) for n in range(count)
        )
        return lines + message("x@example.net", recipient)

    def send(raw: bytes) -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", inbound.port, local_hostname="mx.sender.test") as client:
            client.ehlo()
            client.mail("x@example.net")
            client.rcpt(recipient)
            return client.data(raw)

    code, text = await asyncio.to_thread(send, hops(50))
    assert (code, text) == (554, b"5.4.6 Too many hops (50 Received headers): mail loop?")
    assert await stored(inbound) == []
    code, _ = await asyncio.to_thread(send, hops(49))
    assert code == 250
