"""Benchmark: applications submit N emails over SMTP (STARTTLS + AUTH with an API key).

Not a test: it prints figures. Everything on this machine, on loopback:

* the database: FerretDB 1.24 started here (or ``MONGODB_URI`` when set);
* the domain service (API keys: the submission server and the mail service resolve the key
  through it, cached) and the mail service with its in-process delivery workers, both in this
  process; the sender domain and its relay/DKIM key (RSA-2048) given to the mail service
  directly, as in bench/mail_pipeline.py;
* the submission server (services.submission) in this process, STARTTLS with the development
  certificate;
* Postfix's ``smtp-sink`` as the relay when installed, else the asyncio stand-in.

Clients: ``--sessions`` aiosmtplib connections, each EHLO, STARTTLS, AUTH PLAIN once, then
transactions of 2 KB messages until N are submitted. Postfix's ``smtp-source`` cannot be the
client here: it has no STARTTLS and no AUTH.

Printed: accepted/s (250 received), delivered/s end to end, p50/p99 of the DATA round trip.

Usage: ``.venv/bin/python bench/submission.py --emails 500 --sessions 16``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import ssl
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import aiosmtplib
import grpc
from azora.iam.v1 import api_keys_pb2, api_keys_pb2_grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.mail_pipeline import BODY, DOMAIN, free_port, start_sink  # noqa: E402
from services.core.clock import SystemClock  # noqa: E402
from services.core.embedded_db import EmbeddedFerretDB, find_ferretdb_binary  # noqa: E402
from services.core.ids import new_id  # noqa: E402
from services.core.settings import DEV_TENANT_ID, Settings  # noqa: E402
from services.domain.app import build as build_domain  # noqa: E402
from services.mail.app import build_app as build_mail  # noqa: E402
from services.mail.relay_directory import (  # noqa: E402
    InMemoryRelayDirectory,
    RelaySecurity,
    RelaySettings,
    SigningKey,
)
from services.mail.relay_lookup import DirectoryRelayLookup  # noqa: E402
from services.mail.senders import SenderDomain, StaticSenderDirectory  # noqa: E402
from services.submission.app import build_app as build_submission  # noqa: E402
from services.submission.server import silence_protocol_log  # noqa: E402
from services.submission.settings import SubmissionSettings  # noqa: E402
from services.submission.tls import development_pair, server_context  # noqa: E402

# The body of bench/mail_pipeline.py in lines of at most 76 characters (SMTP's limit is 998).
LINES = "\r\n".join(textwrap.wrap(BODY, 76))


def message(i: int) -> bytes:
    """A 2 KB message to a unique recipient."""
    return (
        f"From: Bench <bench@{DOMAIN}>\r\nTo: user{i}@sink.example\r\n"
        f"Subject: Benchmark message {i}\r\n\r\n{LINES}\r\n"
    ).encode()


async def run(args: argparse.Namespace) -> None:
    """Start everything, submit over SMTP, wait for delivery, print."""
    ferret: EmbeddedFerretDB | None = None
    uri = os.environ.get("MONGODB_URI", "")
    if not uri:
        ferret = EmbeddedFerretDB(
            binary=find_ferretdb_binary(REPO), data_dir=Path(tempfile.mkdtemp(prefix="bench-"))
        )
        uri = ferret.start()
    sink_port = free_port()
    sink, sink_name = start_sink(sink_port)
    env = {
        "MONGODB_URI": uri,
        "AZORA_MONGODB_DATABASE": f"bench_{secrets.token_hex(4)}",
        "LOG_LEVEL": "warn",
        "AZORA_MAIL_WORKER_CONCURRENCY": str(args.worker_concurrency),
        "AZORA_MAIL_RELAY_CONNECTIONS": str(args.relay_connections),
        "AZORA_MAIL_POLL_INTERVAL": "0.05",
        "AZORA_SEND_RATE_LIMIT_MAX": "1000000",
        "AZORA_QUOTA_EMAILS_PER_HOUR": "0",
        "AZORA_QUOTA_EMAILS_PER_DAY": "0",
    }
    domain = await build_domain(Settings.from_env(env), bind="127.0.0.1:0", run_lifecycle=False)
    settings = Settings.from_env(
        {**env, "AZORA_DOMAIN_SERVICE_TARGET": f"127.0.0.1:{domain.running.port}"}
    )
    senders = StaticSenderDirectory({(DEV_TENANT_ID, DOMAIN): SenderDomain(new_id(), DOMAIN)})
    domain_id = senders.domains[(DEV_TENANT_ID, DOMAIN)].id
    directory = InMemoryRelayDirectory()
    directory.add_relay(
        tenant_id=DEV_TENANT_ID,
        relay=RelaySettings(domain_id, "127.0.0.1", sink_port, RelaySecurity.NONE),
    )
    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    directory.add_key(
        tenant_id=DEV_TENANT_ID, key=SigningKey(domain_id, DOMAIN, "bench", "rsa-sha256", pem)
    )
    mail = await build_mail(
        settings,
        clock=SystemClock(),
        bind="127.0.0.1:0",
        senders=senders,
        relays=DirectoryRelayLookup(directory),
        run_workers=True,
    )
    cert, key = development_pair(Path(tempfile.mkdtemp(prefix="bench-tls-")), "localhost")
    submission = await build_submission(
        settings.with_overrides(mail_service_target=f"127.0.0.1:{mail.running.port}"),
        SubmissionSettings(port=0, tls_port=-1, health_port=0, hostname="localhost"),
        context=server_context(cert, key),
    )
    # Development mode: a request without credentials acts as the development tenant.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{domain.running.port}") as channel:
        created = await api_keys_pb2_grpc.ApiKeyServiceStub(channel).CreateApiKey(
            api_keys_pb2.CreateApiKeyRequest(name="bench", scopes=["emails:send"])
        )
    client_tls = ssl.create_default_context(cafile=str(cert))
    latencies: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(args.emails):
        queue.put_nowait(i)

    async def session() -> None:
        client = aiosmtplib.SMTP(
            hostname="localhost",
            port=submission.ports["starttls"],
            start_tls=True,
            tls_context=client_tls,
            timeout=60,
        )
        await client.connect()
        await client.login("apikey", created.secret)
        while not queue.empty():
            i = queue.get_nowait()
            started = time.perf_counter()
            await client.sendmail(f"bench@{DOMAIN}", [f"user{i}@sink.example"], message(i))
            latencies.append(time.perf_counter() - started)
        await client.quit()

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(session() for _ in range(args.sessions)))
        accepted_s = time.perf_counter() - t0
        db = mail.running.database.db
        deadline = time.monotonic() + args.timeout
        while await db["email_queue"].count_documents({}, limit=1):
            if sink.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the sink died or delivery did not finish in time")
            await asyncio.sleep(0.2)
        delivered_s = time.perf_counter() - t0
        sent = await db["emails"].count_documents({"status": "sent"})
    finally:
        await submission.stop(5)
        await mail.running.stop(None)
        await domain.running.stop(None)
        sink.terminate()
        sink.wait(10)
        if ferret is not None:
            ferret.stop()
    latencies.sort()
    print(f"emails: {args.emails}  SMTP sessions: {args.sessions}  relay: {sink_name}")
    print(f"database: {'FerretDB 1.24 (SQLite)' if ferret else uri}")
    print(f"sent (status): {sent}")
    print(f"accepted/s (250 over STARTTLS + AUTH): {args.emails / accepted_s:.1f}")
    print(f"delivered/s (end to end, DKIM RSA-2048): {args.emails / delivered_s:.1f}")
    print(f"DATA round trip p50: {statistics.median(latencies) * 1000:.1f} ms")
    print(f"DATA round trip p99: {latencies[int(len(latencies) * 0.99) - 1] * 1000:.1f} ms")


def main() -> None:
    """Entry point."""
    silence_protocol_log()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emails", type=int, default=500)
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--worker-concurrency", type=int, default=16)
    parser.add_argument("--relay-connections", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for delivery")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
