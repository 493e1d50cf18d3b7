"""Benchmark: submit N emails over gRPC and have them delivered, DKIM-signed, to a loopback sink.

Not a test: it prints figures. What runs, all on this machine:

* the database: FerretDB 1.24 started here (or ``MONGODB_URI`` when set, e.g. MongoDB 7);
* the mail service in this process (gRPC API + in-process delivery workers), with the sender
  domain and its relay/DKIM key (RSA-2048) given directly rather than fetched from the domain
  and SMTP services (their answers are cached in production, so they are off the hot path);
* Postfix's ``smtp-sink`` on 127.0.0.1 as the relay (``apt-get install postfix``); without it
  a tiny asyncio sink in a child process stands in, and the output says so.

Printed: accepted/s (submit), delivered/s end to end, p50/p99 submit latency, peak RSS of this
process (API + workers), of the sink and of FerretDB.

Usage: ``.venv/bin/python bench/mail_pipeline.py --emails 500 --concurrency 32``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from azora.mail.v1 import mail_pb2, mail_pb2_grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from services.core.clock import SystemClock  # noqa: E402
from services.core.embedded_db import EmbeddedFerretDB, find_ferretdb_binary  # noqa: E402
from services.core.ids import new_id  # noqa: E402
from services.core.settings import DEV_TENANT_ID  # noqa: E402
from services.mail.app import build_app  # noqa: E402
from services.mail.relay_directory import (  # noqa: E402
    InMemoryRelayDirectory,
    RelaySecurity,
    RelaySettings,
    SigningKey,
)
from services.mail.relay_lookup import DirectoryRelayLookup  # noqa: E402
from services.mail.senders import SenderDomain, StaticSenderDirectory  # noqa: E402
from services.mail.settings import MailSettings  # noqa: E402

DOMAIN = "bench.example"
BODY = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 32)[:1800]

FALLBACK_SINK = r"""
import asyncio, sys
async def serve(reader, writer):
    writer.write(b"220 sink ESMTP\r\n")
    while line := await reader.readline():
        verb = line[:4].upper()
        if verb == b"DATA":
            writer.write(b"354 go\r\n")
            while (chunk := await reader.readline()) not in (b".\r\n", b""):
                pass
            writer.write(b"250 2.0.0 ok\r\n")
        elif verb == b"QUIT":
            writer.write(b"221 bye\r\n"); await writer.drain(); break
        else:
            writer.write(b"250 ok\r\n")
        await writer.drain()
    writer.close()
async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", int(sys.argv[1]))
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_sink(port: int) -> tuple[subprocess.Popen[bytes], str]:
    """smtp-sink if installed, else the asyncio stand-in."""
    binary = shutil.which("smtp-sink", path="/usr/sbin:/usr/bin:/usr/lib/postfix/sbin")
    if binary:
        # smtp-sink refuses to run as root without a user to drop to.
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        command = [binary, *user, "-c", f"127.0.0.1:{port}", "1000"]
        # It prints a counter per message; keep the report readable.
        return subprocess.Popen(command, stdout=subprocess.DEVNULL), "smtp-sink"  # noqa: S603
    return (
        subprocess.Popen([sys.executable, "-c", FALLBACK_SINK, str(port)]),  # noqa: S603
        "asyncio stand-in (smtp-sink not installed)",
    )


def peak_rss_kib(pid: int) -> int:
    """VmHWM of a process in KiB (0 when unknown)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


async def run(args: argparse.Namespace) -> None:
    """Start everything, submit, wait for delivery, print."""
    ferret: EmbeddedFerretDB | None = None
    uri = os.environ.get("MONGODB_URI", "")
    if not uri:
        ferret = EmbeddedFerretDB(
            binary=find_ferretdb_binary(REPO), data_dir=Path(tempfile.mkdtemp(prefix="bench-"))
        )
        uri = ferret.start()
    sink_port = free_port()
    sink, sink_name = start_sink(sink_port)
    settings = MailSettings.from_env(
        {
            "MONGODB_URI": uri,
            "AZORA_MONGODB_DATABASE": f"bench_{secrets.token_hex(4)}",
            "LOG_LEVEL": "warn",
            "AZORA_MAIL_WORKER_CONCURRENCY": str(args.worker_concurrency),
            "AZORA_MAIL_RELAY_CONNECTIONS": str(args.relay_connections),
            "AZORA_MAIL_POLL_INTERVAL": "0.05",
        }
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
    app = await build_app(
        settings,
        clock=SystemClock(),
        bind="127.0.0.1:0",
        senders=senders,
        relays=DirectoryRelayLookup(directory),
        run_workers=True,
    )
    latencies: list[float] = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.running.port}") as channel:
            stub = mail_pb2_grpc.MailServiceStub(channel)
            queue: asyncio.Queue[int] = asyncio.Queue()
            for i in range(args.emails):
                queue.put_nowait(i)

            async def submitter() -> None:
                while not queue.empty():
                    i = queue.get_nowait()
                    request = mail_pb2.SendEmailRequest(
                        from_address=f"Bench <bench@{DOMAIN}>",
                        to=[f"user{i}@sink.example"],
                        subject=f"Benchmark message {i}",
                        text=BODY,
                    )
                    started = time.perf_counter()
                    await stub.SendEmail(request, timeout=60)
                    latencies.append(time.perf_counter() - started)

            t0 = time.perf_counter()
            await asyncio.gather(*(submitter() for _ in range(args.concurrency)))
            accepted_s = time.perf_counter() - t0
            db = app.running.database.db
            deadline = time.monotonic() + args.timeout
            while await db["email_queue"].count_documents({}, limit=1):
                if sink.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the sink died or delivery did not finish in time")
                await asyncio.sleep(0.2)
            delivered_s = time.perf_counter() - t0
            sent = await db["emails"].count_documents({"status": "sent"})
    finally:
        await app.running.stop(None)
        sink_rss = peak_rss_kib(sink.pid)
        sink.terminate()
        sink.wait(10)
        # EmbeddedFerretDB keeps its process private; read it for the figure only.
        ferret_proc = getattr(ferret, "_proc", None)
        ferret_rss = peak_rss_kib(ferret_proc.pid) if ferret_proc is not None else 0
        if ferret is not None:
            ferret.stop()
    latencies.sort()
    print(f"emails: {args.emails}  submit concurrency: {args.concurrency}  relay: {sink_name}")
    print(f"database: {'FerretDB 1.24 (SQLite)' if ferret else uri}")
    print(f"sent (status): {sent}")
    print(f"accepted/s: {args.emails / accepted_s:.1f}")
    print(f"delivered/s (end to end, DKIM RSA-2048): {args.emails / delivered_s:.1f}")
    print(f"submit latency p50: {statistics.median(latencies) * 1000:.1f} ms")
    print(f"submit latency p99: {latencies[int(len(latencies) * 0.99) - 1] * 1000:.1f} ms")
    print(f"peak RSS api+workers: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss} KiB")
    print(f"peak RSS sink: {sink_rss or 'n/a (exited)'} KiB")
    print(f"peak RSS FerretDB: {ferret_rss or 'n/a'} KiB")


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emails", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--worker-concurrency", type=int, default=16)
    parser.add_argument("--relay-connections", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for delivery")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
