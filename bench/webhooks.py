"""Webhook pipeline throughput and lag: events in, signed requests out, on one machine.

Starts an embedded FerretDB (bin/ferretdb), an aiohttp receiver on loopback, one endpoint
subscribed to every event, and `--dispatchers` dispatcher processes
(`python -m services.mail.feedback.webhook_dispatcher`). Inserts `--events` events into the
events collection at `--rate` per second (as the mail service records them), then waits until
every event has reached the receiver. Prints delivered/s, the lag from an event's occurrence to
its receipt (p50, p99, max, per tenth of the run: a lag that grows over the run means the
pipeline does not keep up), and duplicates. No mail is sent: this is the webhook half of the
issue's suite row, measurable before the mail service records events.

    .venv/bin/python -m bench.webhooks [--events 2000] [--rate 200] [--dispatchers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pathlib
import sys
import tempfile
import time
from datetime import UTC, datetime

from aiohttp import web
from pymongo import AsyncMongoClient

from bench.harness import percentile
from services.core.clock import SystemClock
from services.core.embedded_db import EmbeddedFerretDB, find_ferretdb_binary
from services.core.ids import new_ulid
from services.core.mongo import Document, ensure_indexes
from services.mail.feedback.webhook_manager import WebhookInput
from services.mail.feedback.webhook_servicer import webhook_manager
from services.mail.feedback.webhook_store import WEBHOOK_INDEXES
from services.mail.settings import MailSettings

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TENANT = "t-bench"


async def run(events: int, rate: float, dispatchers: int, uri: str) -> None:
    """One run; prints its figures."""
    received: dict[str, list[float]] = {}
    lags: list[tuple[float, float]] = []  # (insert offset, lag)
    occurred: dict[str, float] = {}
    everything = asyncio.Event()

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        now = time.time()
        event_id = request.headers["webhook-id"]
        received.setdefault(event_id, []).append(now)
        if len(received[event_id]) == 1 and event_id in occurred:
            lags.append((occurred[event_id], now - occurred[event_id]))
        if len(received) >= events:
            everything.set()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hooks", handle)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AZORA_")},
        "AZORA_ENV": "development",
        "MONGODB_URI": uri,
        "AZORA_MONGODB_DATABASE": "bench_webhooks",
        "AZORA_WEBHOOK_DISPATCHER_HEALTH_PORT": "0",
        "AZORA_WEBHOOK_DISPATCHER_METRICS_PORT": "0",
        "AZORA_WEBHOOK_POLL_INTERVAL": "0.1",
        "LOG_LEVEL": "warning",
    }
    settings = MailSettings.from_env(env)
    client: AsyncMongoClient[Document] = AsyncMongoClient(uri)
    db = client["bench_webhooks"]
    await ensure_indexes(db, WEBHOOK_INDEXES)
    manager, _ = webhook_manager(settings, db, SystemClock(), pooled=False)
    await manager.create(
        tenant_id=TENANT,
        data=WebhookInput(f"http://127.0.0.1:{port}/hooks", [], [], None, "bench"),
    )
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.mail.feedback.webhook_dispatcher",
            cwd=REPO_ROOT,
            env=env,
        )
        for _ in range(dispatchers)
    ]
    try:
        started = time.time()
        for index in range(events):
            due = started + index / rate
            await asyncio.sleep(max(0.0, due - time.time()))
            now = datetime.now(UTC)
            event_id = f"evt_{new_ulid(now)}"
            occurred[event_id] = now.timestamp()
            await db["events"].insert_one(
                {
                    "_id": event_id,
                    "tenantId": TENANT,
                    "type": "sent",
                    "occurredAt": now,
                    "emailId": "e" * 24,
                    "recipient": "someone@example.org",
                    "domain": "bench.example",
                    "tags": [],
                    "metadata": {},
                }
            )
        inserted = time.time()
        with contextlib.suppress(TimeoutError):  # a bound for a stuck run, reported as missing
            await asyncio.wait_for(everything.wait(), 300)
        finished = time.time()
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            await process.wait()
        await client.close()
        await runner.cleanup()
    samples = [lag for _, lag in lags]
    duplicates = sum(len(times) - 1 for times in received.values())
    print(f"events {events} at {rate:g}/s, {dispatchers} dispatcher(s)")
    print(f"arrived {len(received)} of {events}, duplicates {duplicates}")
    print(f"insert rate {events / max(inserted - started, 1e-9):.1f}/s")
    print(f"delivered/s over the run {len(received) / max(finished - started, 1e-9):.1f}")
    print(
        "lag s: p50 {:.3f}  p99 {:.3f}  max {:.3f}".format(
            percentile(samples, 50), percentile(samples, 99), max(samples, default=float("nan"))
        )
    )
    tenths = []
    for part in range(10):
        low = started + part * (inserted - started) / 10
        high = started + (part + 1) * (inserted - started) / 10
        window = [lag for at, lag in lags if low <= at < high]
        tenths.append(f"{percentile(window, 99):.2f}")
    print("lag p99 per tenth of the run: " + " ".join(tenths))


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--dispatchers", type=int, default=1)
    args = parser.parse_args()
    server = EmbeddedFerretDB(
        binary=find_ferretdb_binary(REPO_ROOT), data_dir=pathlib.Path(tempfile.mkdtemp())
    )
    uri = server.start()
    try:
        asyncio.run(run(args.events, args.rate, args.dispatchers, uri))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
