"""The inbound server as a process: what it answered 250 for survives ``kill -9`` right after.

The 250 comes only once the mail service stored the message and set up its route's action, so
killing the inbound process at that moment loses nothing: the message is listed and
downloadable afterwards, a webhook route's message reaches the receiver (the dispatcher sends
it) and a forward route's message is queued and goes out (the worker sends it).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import smtplib
import subprocess
import sys
from pathlib import Path

from azora.mail.v1 import inbound_pb2, webhooks_pb2
from standardwebhooks import Webhook as Verifier

from services.core.smtp_tls import development_pair
from services.domain.app import DomainApp
from tests.conftest import REPO_ROOT, TEST_JWT_SECRET, TEST_SERVICE_TOKEN_SECRET
from tests.inbound.conftest import Inbound, dispatch, webhooks_of
from tests.inbound.test_inbound import message
from tests.support.settings import SuiteSettings
from tests.support.smtp_relay import StartRelay
from tests.support.webhook_receiver import Receiver


def start_process(
    inbound: Inbound, domain_app: DomainApp, settings: SuiteSettings, tls_dir: Path
) -> tuple[subprocess.Popen[bytes], int]:
    """``python -m services.inbound`` in front of the test's services; it and its SMTP port."""
    cert, key = development_pair(tls_dir, "mx.test")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AZORA_", "MONGODB"))},
        "AZORA_ENV": "test",
        "JWT_SECRET": TEST_JWT_SECRET,
        "AZORA_SERVICE_TOKEN_SECRET": TEST_SERVICE_TOKEN_SECRET,
        "LOG_LEVEL": "info",
        "AZORA_DOMAIN_SERVICE_TARGET": f"127.0.0.1:{domain_app.running.port}",
        "AZORA_MAIL_SERVICE_TARGET": f"127.0.0.1:{inbound.mail.app.running.port}",
        "AZORA_DNS_NAMESERVERS": ",".join(settings.dns_nameservers),
        "AZORA_DNS_PORT": str(settings.dns_port),
        "AZORA_INBOUND_PORT": "0",
        "AZORA_INBOUND_HEALTH_PORT": "0",
        "AZORA_INBOUND_HOSTNAME": "mx.test",
        "AZORA_INBOUND_CERT_FILE": str(cert),
        "AZORA_INBOUND_KEY_FILE": str(key),
        "AZORA_METRICS_PORT_INBOUND": "0",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "services.inbound"],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    for line in process.stderr:
        entry = json.loads(line)
        if entry.get("msg") == "serving" and "smtp" in entry:
            return process, int(entry["smtp"])
    raise AssertionError(f"the inbound server did not start: {process.wait()}")


async def send_and_kill(
    inbound: Inbound, settings: SuiteSettings, tmp_path: Path, recipient: str, raw: bytes
) -> None:
    """Deliver `raw` to a process started for the test and SIGKILL it right after its 250."""
    process, port = await asyncio.to_thread(
        start_process, inbound, inbound.domains, settings, tmp_path / "tls"
    )
    try:

        def send() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", port, local_hostname="mx.sender.test") as client:
                client.ehlo()
                client.mail("x@example.net")
                client.rcpt(recipient)
                reply = client.data(raw)
                os.kill(process.pid, signal.SIGKILL)
                return reply

        code, text = await asyncio.to_thread(send)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        await asyncio.to_thread(process.wait)
        if process.stderr is not None:
            process.stderr.close()
    assert code == 250, text
    assert process.returncode == -signal.SIGKILL


async def test_kill_9_after_250_loses_nothing(
    inbound: Inbound, settings: SuiteSettings, tmp_path: Path
) -> None:
    # 250 from the process, SIGKILL at once: the message is stored and retrievable.
    await inbound.add_route(match="*", action="store")
    recipient = f"kept@{inbound.domain.name}"
    raw = message("x@example.net", recipient, "survives")
    await send_and_kill(inbound, settings, tmp_path, recipient, raw)
    page = await inbound.inbound.ListInboundMessages(
        inbound_pb2.ListInboundMessagesRequest(), metadata=inbound.tenant.metadata
    )
    [stored] = page.messages
    assert stored.recipient == recipient
    body = await inbound.inbound.GetInboundMessageRaw(
        inbound_pb2.GetInboundMessageRawRequest(id=stored.id), metadata=inbound.tenant.metadata
    )
    assert body.data.endswith(raw)


async def test_kill_9_after_250_still_ends_in_the_webhook(
    inbound: Inbound, settings: SuiteSettings, tmp_path: Path, receiver: Receiver
) -> None:
    # The inbound process is gone; the dispatcher still POSTs the message (at least once).
    # Subscribed to routed mail only (no email events).
    endpoint = await webhooks_of(inbound).CreateWebhook(
        webhooks_pb2.CreateWebhookRequest(url=receiver.url, event_types=["inbound.received"]),
        metadata=inbound.tenant.metadata,
    )
    await inbound.add_route(match="*", action="webhook", webhook_id=endpoint.id)
    recipient = f"hook@{inbound.domain.name}"
    await send_and_kill(
        inbound, settings, tmp_path, recipient, message("x@example.net", recipient, "hooked")
    )
    await dispatch(inbound, receiver, 1)
    payload = Verifier(endpoint.secret).verify(
        receiver.requests[0].body, receiver.requests[0].headers
    )
    assert (payload["subject"], payload["envelope"]["to"]) == ("hooked", recipient)
    [record] = (
        await inbound.inbound.ListInboundMessages(
            inbound_pb2.ListInboundMessagesRequest(), metadata=inbound.tenant.metadata
        )
    ).messages
    assert record.outcome == "webhook_delivered"


async def test_kill_9_after_250_still_ends_in_the_forward(
    inbound: Inbound, settings: SuiteSettings, tmp_path: Path, start_smtp_relay: StartRelay
) -> None:
    # The inbound process is gone; the forwarded email is queued and the worker sends it.
    relay = await start_smtp_relay()
    inbound.mail.add_domain(inbound.tenant, port=relay.port, name=inbound.domain.name)
    await inbound.add_route(match="*", action="forward", forward_to=["far@elsewhere.example"])
    recipient = f"fwd@{inbound.domain.name}"
    raw = message("x@example.net", recipient, "forwarded")
    await send_and_kill(inbound, settings, tmp_path, recipient, raw)
    [record] = (
        await inbound.inbound.ListInboundMessages(
            inbound_pb2.ListInboundMessagesRequest(), metadata=inbound.tenant.metadata
        )
    ).messages
    assert record.outcome == "forward_queued"
    await inbound.mail.worker().run_once()
    [envelope] = relay.envelopes
    assert envelope.rcpt_tos == ["far@elsewhere.example"]
    assert raw.rstrip(b"\r\n") in envelope.content
