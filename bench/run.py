"""`make bench`: Postfix side by side with our suite, scale-out, gateway overhead; one table.

Phases (``--phases``, default all), everything on loopback, everything it starts stopped:

* ``postfix``: smtp-source -> smtp-sink (Postfix's own tools, the physical reference);
  smtp-source -> our counting sink; smtp-source -> a private Postfix -> sink; the same with
  OpenDKIM (RSA-2048) as a milter (bench/postfix.py). Skipped (and said so) when Postfix is
  not installed.
* ``grpc`` and ``rest``: our suite (bench/suite.py, mail service with its in-process workers)
  takes N emails (2 KB bodies, DKIM RSA-2048, unique recipients) from ghz over gRPC, or from a
  bounded aiohttp client through the local gateway, and delivers them to the sink.
* ``smtp``: the same N emails submitted over SMTP (STARTTLS + AUTH with an API key) to the
  submission server by aiosmtplib sessions (smtp-source has neither STARTTLS nor AUTH).
* ``webhooks``: the gRPC row again with one webhook endpoint subscribed to every event, a
  receiver in this process (aiohttp on loopback) and the webhook dispatcher process running:
  delivered/s next to the gRPC row, and the webhook lag (the event's ``occurredAt`` to its
  receipt, every ``accepted`` and ``sent`` webhook) p50/p99/max over the run, split into the
  time until the dispatcher created the delivery and the wait for a slot, and per quarter of
  the run by event time (bounded lag = the pipeline keeps up). The endpoint is deleted
  afterwards, so the other rows send no webhooks.
* ``batch``: the same N emails through SendEmailBatch, 100 per call, a few calls in flight;
  then again with every message rendered from a template (loop, filters, CSS inlining, text
  generated from the HTML), plus the engine's render time per email measured alone.
* ``scale``: the mail service without in-process workers; N emails queued first, then 1, 2 and
  4 worker processes (``python -m services.mail.worker``) drain them; py-spy profiles the
  single worker and the mail API process while it accepts (when py-spy can attach).
* ``gateway``: SendEmail and GetEmail directly over gRPC and through the gateway (REST), same
  client style (bounded async), same counts.

Every row of the main table (the Postfix, gRPC, REST, SMTP and batch rows) runs ``--runs``
times (``BENCH_RUNS``, default 3), the runs of different rows interleaved; the table shows the
median with min-max, the ratio of the median delivered/s to Postfix + OpenDKIM and to the
Postfix relay, and the 1-minute load average at the start and end of each run. A run ends when
the sink has received as many messages as were accepted: the harness counts the sink's log and
never polls our database while it measures (the database is read once afterwards, for the
exactly-once check). CPU is read from ``/proc/<pid>/stat`` (utime+stime, children included)
for every process of the row (FerretDB, each service, Postfix, OpenDKIM, the sink) and from
getrusage for the load generator (this process's clients and the ghz/smtp-source runs it
reaps), and printed per message per process. A row counts only if every message of every run
arrived exactly once at the sink (Message-IDs compared with the database). Scale-out and
gateway overhead run once. Prints the tables and writes everything to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from azora.iam.v1 import api_keys_pb2, api_keys_pb2_grpc
from azora.mail.v1 import mail_pb2, mail_pb2_grpc, webhooks_pb2, webhooks_pb2_grpc

from bench import postfix
from bench.harness import (
    ProcSampler,
    Result,
    Row,
    check_exactly_once,
    machine,
    percentile,
    rate_until,
    read_sink_log,
    render_cpu_table,
    render_table,
    write_json,
)
from bench.load import (
    RECEIPT_HTML,
    LoadResult,
    grpc_batch,
    grpc_get,
    grpc_send,
    receipt_variables,
    rest_get,
    rest_send,
    run_ghz,
    smtp_send,
    smtp_source,
)
from bench.suite import DATABASE, REPO, Suite
from services.core.embedded_db import pick_free_port
from services.core.smtp_tls import development_pair
from services.mail.rendering import TemplateEngine, TemplateSource

PHASES = ("postfix", "grpc", "rest", "smtp", "webhooks", "batch", "scale", "gateway")
POSTFIX_RELAY = "Postfix relay"
POSTFIX_DKIM = "Postfix relay + OpenDKIM"


def add_run(rows: dict[str, Row], result: Result) -> None:
    """File one run under its row (rows keep the order they first ran in)."""
    rows.setdefault(result.name, Row(result.name)).runs.append(result)


def env_int(name: str, default: int) -> int:
    """An integer parameter from the environment (make variables end up there)."""
    return int(os.environ.get(name) or default)


def git_commit() -> str:
    """The commit the tree is at (+ "-dirty" when services/ has uncommitted changes)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],  # noqa: S607
            cwd=REPO, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "services"],  # noqa: S607
            cwd=REPO, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def versions() -> dict[str, str]:
    """Versions of what was measured."""
    found = {"python": platform.python_version()}
    try:
        found["postfix"] = subprocess.run(
            ["/usr/sbin/postconf", "-d", "-h", "mail_version"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        found["opendkim"] = subprocess.run(
            ["/usr/sbin/opendkim", "-V"], capture_output=True, text=True, check=False
        ).stdout.splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        pass
    go = shutil.which("go") or "/usr/local/go/bin/go"
    for tool, module in (("ghz", "github.com/bojand/ghz"), ("ferretdb", "github.com/FerretDB")):
        try:
            info = subprocess.run(  # noqa: S603
                [go, "version", "-m", str(REPO / "bin" / tool)],
                capture_output=True, text=True, check=False,
            ).stdout  # fmt: skip
        except OSError:
            continue
        for line in info.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] in ("mod", "dep") and parts[1].startswith(module):
                found[tool] = parts[2]
                break
    return found


def wait_sink(log: Path, offset: int, count: int, timeout: float) -> list[tuple[float, str]]:
    """Wait until the sink logged `count` messages after `offset`; (arrival, Message-ID)."""
    deadline = time.monotonic() + timeout
    rows: list[tuple[float, str]] = []
    while True:
        new, offset = read_sink_log(log, offset)
        rows.extend((t, mid) for t, mid, _, _ in new)
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


# --------------------------------------------------------------------------- Postfix


def postfix_phase(args: argparse.Namespace, run_dir: Path) -> dict[str, Row]:
    """The Postfix reference rows, each `args.runs` times (runs of the rows interleaved)."""
    if not postfix.installed():
        print("postfix/opendkim not installed: Postfix rows skipped", file=sys.stderr)
        return {}
    rows: dict[str, Row] = {}
    variants: list[tuple[str, bool | None]] = [
        ("smtp-source -> bench sink", None),
        (POSTFIX_RELAY, False),
        (POSTFIX_DKIM, True),
    ]
    for run in range(1, args.runs + 1):
        print(f"phase postfix: run {run}/{args.runs}", file=sys.stderr)
        add_run(rows, smtp_sink_run(args))
        for name, dkim in variants:
            work = run_dir / f"{name.replace(' ', '_').replace('>', '').replace('+', '')}-{run}"
            add_run(rows, postfix_run(args, work, name, dkim))
    return rows


def smtp_sink_run(args: argparse.Namespace) -> Result:
    """T0: Postfix's own source into Postfix's own sink.

    smtp-sink keeps no Message-IDs (only its slow -d dumps would), so "counted" here means
    smtp-source got 250 for every message (it aborts on anything else).
    """
    n, sessions = args.postfix_messages, args.postfix_sessions
    sink_port = pick_free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    sink = subprocess.Popen(  # noqa: S603
        ["/usr/sbin/smtp-sink", *user, f"127.0.0.1:{sink_port}", "1024"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        postfix.wait_port(sink_port, 10)
        load_start = os.getloadavg()[0]
        with ProcSampler({"smtp-sink": sink.pid}, load_generator=True) as sampler:
            elapsed = smtp_source(sink_port, total=n, sessions=sessions)
        return Result(
            "smtp-source -> smtp-sink", n, n / elapsed, n / elapsed,
            cpu_s=sampler.cpu_seconds(), peak_rss_kib=sampler.peak_rss,
            exactly_once=True,
            delivery=f"smtp-source got 250 for all {n} (smtp-sink keeps no Message-IDs)",
            load_start=load_start, load_end=os.getloadavg()[0],
        )  # fmt: skip
    finally:
        sink.terminate()
        sink.wait(10)


def postfix_run(args: argparse.Namespace, work: Path, name: str, dkim: bool | None) -> Result:
    """One run of smtp-source -> [Postfix [+ OpenDKIM] ->] our counting sink."""
    n, sessions = args.postfix_messages, args.postfix_sessions
    work.mkdir(parents=True, exist_ok=True)
    sink_port = pick_free_port()
    sink_log = work / "sink.log"
    sink_log.touch()
    bench_sink = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "bench.sink", "--port", str(sink_port), "--log", str(sink_log)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    milter: postfix.OpenDkim | None = None
    instance: postfix.PrivatePostfix | None = None
    try:
        postfix.wait_port(sink_port, 10)
        pids = {"sink": bench_sink.pid}
        target = sink_port
        if dkim is not None:
            if dkim:
                milter = postfix.OpenDkim(work / "opendkim", pick_free_port(), "bench.example")
                milter.start()
                assert milter.proc is not None
                pids["opendkim"] = milter.proc.pid
            instance = postfix.PrivatePostfix(
                work / "postfix", pick_free_port(), sink_port,
                milter_port=milter.port if milter else 0,
            )  # fmt: skip
            instance.start()
            pids["postfix (all processes)"] = instance.master_pid()
            target = instance.port
        load_start = os.getloadavg()[0]
        with ProcSampler(pids, load_generator=True) as sampler:
            started = time.time()
            accept_s = smtp_source(target, total=n, sessions=sessions)
            rows = wait_sink(sink_log, 0, n, args.timeout)
        load_end = os.getloadavg()[0]
        ids = [mid for _, mid in rows]
        # smtp-source writes its own Message-Id (pid.session.count@host): unique per run.
        expected = ids if len(set(ids)) == n else [*set(ids)]
        delivery = check_exactly_once(expected, ids) if len(ids) == n else None
        last = max((t for t, _ in rows), default=time.time())
        result = Result(
            name, n, n / accept_s, len(rows) / max(last - started, 1e-9),
            delivered_99_per_s=rate_until([t for t, _ in rows], started, 0.99),
            cpu_s=sampler.cpu_seconds(), peak_rss_kib=sampler.peak_rss,
            exactly_once=bool(delivery and delivery.exactly_once),
            delivery=delivery.summary() if delivery else f"{len(rows)} of {n} arrived",
            load_start=load_start, load_end=load_end,
        )  # fmt: skip
        if instance is not None:
            delays = instance.delays()
            result.e2e_p50_ms = percentile(delays, 50) * 1000
            result.e2e_p99_ms = percentile(delays, 99) * 1000
            result.notes = "e2e latency = Postfix's own delay= (arrival to 250 at the sink)"
        if dkim:
            signed = sum(1 for r in read_sink_log(sink_log)[0] if r[3])
            result.notes += f"; {signed} of {len(rows)} DKIM-signed"
        return result
    finally:
        if instance is not None:
            instance.stop()
        if milter is not None:
            milter.stop()
        bench_sink.terminate()
        bench_sink.wait(10)


# --------------------------------------------------------------------------- our suite


async def wait_finished(suite: Suite, tag: str, count: int, wait_s: float) -> list[dict[str, Any]]:
    """Wait until `count` emails with `tag` are finished (not queued/sending/deferred).

    Polls the database every 0.5 s (the soak's drain uses it); the bench's rows wait on the
    sink instead (`measure`), so that the waiting adds nothing to the database's CPU.
    """
    deadline = time.monotonic() + wait_s
    while True:
        emails = await asyncio.to_thread(suite.emails, tag)
        unfinished = [
            e for e in emails if e["status"] in ("queued", "scheduled", "sending", "deferred")
        ]
        if (len(emails) >= count and not unfinished) or time.monotonic() > deadline:
            return emails
        await asyncio.sleep(0.5)


def suite_result(
    name: str,
    load: LoadResult,
    emails: list[dict[str, Any]],
    arrivals: list[tuple[float, str, str, bool]],
    started: float,
    sampler: ProcSampler,
) -> Result:
    """A row for our suite: delivery proven against the database's Message-IDs."""
    expected = [str(e["message_id"]) for e in emails]
    wanted = set(expected)
    mine = [(t, mid, signed) for t, mid, _, signed in arrivals if mid in wanted]
    delivery = check_exactly_once(expected, [mid for _, mid, _ in mine])
    created = {str(e["message_id"]): e["created_at"] for e in emails}
    e2e = [t - created[mid].replace(tzinfo=UTC).timestamp() for t, mid, _ in mine if mid in created]
    last = max((t for t, _, _ in mine), default=time.time())
    slow = sorted(
        ((t - created[mid].replace(tzinfo=UTC).timestamp(), mid) for t, mid, _ in mine),
        reverse=True,
    )[:3]
    events = {str(e["message_id"]): e.get("events", []) for e in emails}
    slowest = [
        {"message_id": mid, "e2e_s": round(s, 2), "events": events.get(mid, [])} for s, mid in slow
    ]
    stalled = sum(1 for x in e2e if x > 60)
    counted = delivery.exactly_once and load.ok == load.requests and len(expected) == load.ok
    return Result(
        name,
        load.requests,
        load.per_s,
        len(mine) / max(last - started, 1e-9),
        delivered_99_per_s=rate_until([t for t, _, _ in mine], started, 0.99),
        submit_p50_ms=load.p(50),
        submit_p99_ms=load.p(99),
        e2e_p50_ms=percentile(e2e, 50) * 1000,
        e2e_p99_ms=percentile(e2e, 99) * 1000,
        cpu_s=sampler.cpu_seconds(),
        peak_rss_kib=sampler.peak_rss,
        exactly_once=counted,
        delivery=delivery.summary(),
        errors=dict(load.errors),
        notes=f"{sum(1 for m in mine if m[2])} of {len(mine)} DKIM-signed"
        + (f"; {stalled} waited > 60 s (see `slowest`)" if stalled else ""),
        slowest=slowest,
    )


async def measure(
    suite: Suite,
    args: argparse.Namespace,
    label: str,
    tag: str,
    submit: Callable[[], Awaitable[LoadResult]],
    extra_pids: dict[str, int] | None = None,
) -> Result:
    """One run of a row of our suite: submit, wait until the sink has every message, check.

    The wait counts what the sink logged; the database is read once, after the measurement,
    for the Message-IDs the run stored (exactly once) and their creation times (e2e latency).
    """
    _, offset = read_sink_log(suite.sink_log)
    load_start = os.getloadavg()[0]
    with ProcSampler({**suite.pids(), **(extra_pids or {})}, load_generator=True) as sampler:
        started = time.time()
        load = await submit()
        await asyncio.to_thread(wait_sink, suite.sink_log, offset, load.ok, args.timeout)
    load_end = os.getloadavg()[0]
    emails = await asyncio.to_thread(suite.emails, tag)
    arrivals, _ = read_sink_log(suite.sink_log, offset)
    result = suite_result(label, load, emails, arrivals, started, sampler)
    result.load_start, result.load_end = load_start, load_end
    return result


async def submit_phase(suite: Suite, args: argparse.Namespace, via: str, run: int) -> Result:
    """N emails over gRPC (ghz) or REST (gateway), delivered by the in-process workers."""
    tag = f"{via}-{run}-{int(time.time())}"

    async def submit() -> LoadResult:
        if via == "grpc":
            return await asyncio.to_thread(
                run_ghz, suite.ports["mail"], total=args.messages,
                concurrency=args.concurrency, tag=tag,
            )  # fmt: skip
        return await rest_send(suite.ports["gateway"], args.messages, args.concurrency, tag)

    label = "ours: gRPC (ghz)" if via == "grpc" else "ours: REST via gateway"
    return await measure(suite, args, label, tag, submit)


async def smtp_phase(suite: Suite, args: argparse.Namespace, run_dir: Path, run: int) -> Result:
    """N emails submitted over SMTP (STARTTLS + AUTH with an API key), delivered to the sink.

    The submission server (``python -m services.submission``) is started here next to the
    suite; the mail service's in-process workers deliver to the same sink as the other rows.
    """
    cert, key = development_pair(run_dir / "submission-tls", "localhost")
    port = pick_free_port()
    proc = suite.start_process(
        "submission",
        "services.submission",
        AZORA_SUBMISSION_PORT=str(port),
        AZORA_SUBMISSION_TLS_PORT="-1",
        AZORA_SUBMISSION_HEALTH_PORT="0",
        AZORA_SUBMISSION_HOSTNAME="localhost",
        AZORA_SUBMISSION_CERT_FILE=str(cert),
        AZORA_SUBMISSION_KEY_FILE=str(key),
        AZORA_SUBMISSION_MAX_CONNECTIONS_PER_IP=str(args.concurrency + 1),
        AZORA_METRICS_PORT_SUBMISSION="0",
    )
    try:
        await asyncio.to_thread(postfix.wait_port, port, 30.0)
        # Development mode: the suite's tenant is the one of requests without credentials.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{suite.ports['domain']}") as channel:
            created = await api_keys_pb2_grpc.ApiKeyServiceStub(channel).CreateApiKey(
                api_keys_pb2.CreateApiKeyRequest(name="bench-smtp", scopes=["emails:send"])
            )
        tag = f"smtp-{run}-{int(time.time())}"

        async def submit() -> LoadResult:
            return await smtp_send(
                port, cafile=cert, api_key=created.secret, total=args.messages,
                sessions=args.concurrency, tag=tag,
            )  # fmt: skip

        # suite.pids() already has "submission" (started through the suite).
        return await measure(suite, args, "ours: SMTP submission (STARTTLS + AUTH)", tag, submit)
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 30)


class WebhookSink:
    """A loopback HTTP receiver that records when each webhook arrived (answers 204)."""

    def __init__(self) -> None:
        self.received: list[tuple[float, dict[str, Any]]] = []
        self.arrived = asyncio.Event()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Listen on 127.0.0.1:0."""
        app = web.Application()
        app.router.add_post("/hooks", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        port = pick_free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}/hooks"

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        self.received.append((time.time(), await request.json()))
        self.arrived.set()
        return web.Response(status=204)

    def sent_events(self, tag: str) -> list[tuple[float, dict[str, Any]]]:
        """Arrivals of `sent` events of the emails tagged `tag`."""
        return [(at, e) for at, e in self.events_of(tag).values() if e.get("type") == "sent"]

    def events_of(self, tag: str) -> dict[str, tuple[float, dict[str, Any]]]:
        """First arrival of each event of the emails tagged `tag`, by event id."""
        first: dict[str, tuple[float, dict[str, Any]]] = {}
        for at, event in self.received:
            if tag in event.get("tags", []):
                first.setdefault(event["id"], (at, event))
        return first


def webhook_lag(
    arrivals: dict[str, tuple[float, dict[str, Any]]], deliveries: list[dict[str, Any]]
) -> dict[str, Any]:
    """Lag of each webhook (the event's time to its first receipt), split where it was spent.

    Stages, from the delivery documents: ``found`` = the event's time to its delivery's
    creation (the publisher stored the event and the dispatcher read it), ``waited`` = from
    then to the first attempt (a free slot), ``received`` = the whole lag. Per quarter of the
    run by event time: in arrival order the last quarter would hold every late webhook by
    construction. Seconds; p50 / p99 / max.
    """
    by_event = {d["eventId"]: d for d in deliveries}
    rows = []
    for at, event in arrivals.values():
        occurred = datetime.fromisoformat(event["occurredAt"].replace("Z", "+00:00")).timestamp()
        delivery = by_event.get(event["id"], {})
        created = delivery.get("createTime")
        tried = (delivery.get("attempts") or [{}])[0].get("time")
        rows.append(
            (
                occurred,
                at - occurred,
                created.replace(tzinfo=UTC).timestamp() - occurred if created else math.nan,
                tried.replace(tzinfo=UTC).timestamp() - created.replace(tzinfo=UTC).timestamp()
                if tried and created
                else math.nan,
            )
        )
    rows.sort()

    def spread(values: list[float]) -> list[float]:
        known = [v for v in values if not math.isnan(v)]
        return [round(percentile(known, 50), 3), round(percentile(known, 99), 3),
                round(max(known, default=math.nan), 3)]  # fmt: skip

    quarters = [rows[len(rows) * q // 4 : len(rows) * (q + 1) // 4] for q in range(4)]
    return {
        "webhooks": len(rows),
        "received_s": spread([r[1] for r in rows]),
        "found_s": spread([r[2] for r in rows]),
        "waited_s": spread([r[3] for r in rows]),
        "received_per_quarter_s": [spread([r[1] for r in q]) for q in quarters],
    }


def lag_line(lag: dict[str, Any]) -> str:
    """One line of `webhook_lag`'s figures, in ms."""

    def ms(spread: list[float]) -> str:
        return " / ".join(f"{x * 1000:,.0f}" for x in spread)

    quarters = ", ".join(ms(q) for q in lag["received_per_quarter_s"])
    return (
        f"lag p50/p99/max {ms(lag['received_s'])} ms (found {ms(lag['found_s'])}, waited "
        f"for a slot {ms(lag['waited_s'])}); per quarter of event time: {quarters}"
    )


async def webhooks_phase(suite: Suite, args: argparse.Namespace, run: int) -> Result:
    """The gRPC row with one endpoint subscribed to every event and the dispatcher running."""
    sink = WebhookSink()
    await sink.start()
    proc = suite.start_process(
        "webhooks",
        "services.mail.feedback.webhook_dispatcher",
        AZORA_WEBHOOK_DISPATCHER_HEALTH_PORT=str(pick_free_port()),
        AZORA_WEBHOOK_DISPATCHER_METRICS_PORT="0",
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{suite.ports['mail']}")
    stub = webhooks_pb2_grpc.WebhookServiceStub(channel)
    # Development mode: the suite's tenant is the one of requests without credentials.
    endpoint = await stub.CreateWebhook(
        webhooks_pb2.CreateWebhookRequest(url=sink.url, description="bench: every event")
    )
    try:
        tag = f"webhooks-{run}-{int(time.time())}"

        async def submit() -> LoadResult:
            return await asyncio.to_thread(
                run_ghz, suite.ports["mail"], total=args.messages,
                concurrency=args.concurrency, tag=tag,
            )  # fmt: skip

        # suite.pids() already has "webhooks" (started through the suite): its CPU is counted.
        result = await measure(suite, args, "ours: gRPC + webhooks (every event)", tag, submit)
        # Until every email's `accepted` and `sent` events arrived (bounded: a missing one
        # shows in the notes).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(args.timeout):
                while len(sink.events_of(tag)) < 2 * result.messages:
                    sink.arrived.clear()
                    await sink.arrived.wait()
        with suite.mongo() as client:
            deliveries = list(
                client[DATABASE]["webhook_deliveries"].find(
                    {"webhookId": endpoint.id}, {"eventId": 1, "createTime": 1, "attempts": 1}
                )
            )
        result.webhook_lag = webhook_lag(sink.events_of(tag), deliveries)
        lag = result.webhook_lag
        result.notes += (
            f"; webhooks: {len(sink.sent_events(tag))} of {result.messages} sent events and "
            f"{lag['webhooks']} webhooks in all received; {lag_line(lag)}"
        )
        print(f"  webhooks run {run}: {lag_line(lag)}", flush=True)
        return result
    finally:
        await stub.DeleteWebhook(webhooks_pb2.DeleteWebhookRequest(id=endpoint.id))
        await channel.close()
        proc.terminate()
        await asyncio.to_thread(proc.wait, 30)
        suite.procs.pop("webhooks", None)
        await sink.stop()


BATCH_SIZE = 100


async def render_cost_ms(samples: int = 200) -> float:
    """Mean milliseconds the template engine takes for one receipt (render + CSS + text)."""
    engine = TemplateEngine()
    try:
        source = TemplateSource("Receipt for {{ name }}", RECEIPT_HTML, "", {})
        await engine.render(source, receipt_variables(0))  # warm-up: compile, threads
        started = time.perf_counter()
        for i in range(samples):
            await engine.render(source, receipt_variables(i))
        return (time.perf_counter() - started) * 1000 / samples
    finally:
        engine.close()


async def batch_phase(suite: Suite, args: argparse.Namespace, run: int) -> list[Result]:
    """N emails in batches of 100 over gRPC, plain and rendered from a template."""
    results: list[Result] = []
    template = f"bench-receipt-{run}-{int(time.time())}"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{suite.ports['mail']}") as channel:
        stub = mail_pb2_grpc.MailServiceStub(channel)
        await stub.CreateTemplate(
            mail_pb2.CreateTemplateRequest(
                name=template, subject="Receipt for {{ name }}", html=RECEIPT_HTML
            )
        )
        await stub.PublishTemplate(mail_pb2.PublishTemplateRequest(id=template))
    lanes = max(1, min(args.concurrency // 4, 4))
    for label, use in (
        (f"ours: gRPC batches of {BATCH_SIZE}", ""),
        (f"ours: gRPC batches of {BATCH_SIZE}, template", template),
    ):
        tag = f"batch{'-tpl' if use else ''}-{run}-{int(time.time())}"

        async def submit(tag: str = tag, use: str = use) -> LoadResult:
            return await grpc_batch(
                suite.ports["mail"], args.messages, BATCH_SIZE, lanes, tag, template=use
            )

        result = await measure(suite, args, label, tag, submit)
        result.notes += f"; {lanes} batch calls in flight; latency per batch call"
        if use:
            result.notes += f"; engine alone: {await render_cost_ms():.2f} ms per render"
        results.append(result)
    return results


def py_spy() -> str | None:
    """py-spy from the venv, if installed."""
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else shutil.which("py-spy")


def start_profile(pid: int, out: Path, seconds: int) -> list[subprocess.Popen[bytes]]:
    """py-spy record of `pid`: a flame graph (svg) and collapsed stacks (txt)."""
    spy = py_spy()
    if spy is None:
        return []
    procs = []
    for fmt, suffix in (("flamegraph", ".svg"), ("raw", ".txt")):
        procs.append(
            subprocess.Popen(  # noqa: S603
                [
                    spy,
                    "record",
                    "--pid",
                    str(pid),
                    "--duration",
                    str(seconds),
                    "--rate",
                    "50",
                    "--nonblocking",
                    "--format",
                    fmt,
                    "--output",
                    str(out.with_suffix(suffix)),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        )
    return procs


def finish_profile(procs: list[subprocess.Popen[bytes]]) -> list[str]:
    """Stop py-spy (SIGINT makes it write what it has); errors it reported."""
    problems = []
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if proc.returncode not in (0, -signal.SIGINT) and err:
            problems.append(err.decode(errors="replace")[-500:])
    return problems


def top_frames(collapsed: Path, limit: int = 15) -> list[tuple[str, float]]:
    """The functions with the most self time in a py-spy raw (collapsed stacks) file."""
    from collections import Counter

    selfs: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        selfs[stack.split(";")[-1]] += int(count)
        total += int(count)
    return [(frame, n / total) for frame, n in selfs.most_common(limit)] if total else []


async def scale_phase(suite: Suite, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """Queue N, then drain with 1, 2, 4 worker processes; profile the 1-worker drain."""
    # The mail service without in-process workers: only separate worker processes deliver.
    suite.signal("mail", signal.SIGTERM)
    suite.wait_exit("mail", 30)
    suite.start_process("mail", "services.mail", AZORA_MAIL_RUN_WORKERS="false")
    await suite.wait_ready_async(("mail",))
    rows: list[dict[str, Any]] = []
    profiles: list[str] = []
    for workers in args.workers:
        tag = f"scale{workers}-{int(time.time())}"
        profile_api = workers == args.workers[0] and not args.no_profile
        spy = (
            start_profile(suite.procs["mail"].pid, out_dir / "profile-mail-api", 600)
            if profile_api
            else []
        )
        load = await grpc_send(suite.ports["mail"], args.scale_messages, args.concurrency, tag)
        profiles += [] if not spy else [str(out_dir / "profile-mail-api.svg")]
        finish_profile(spy)
        _, offset = read_sink_log(suite.sink_log)
        names = [f"worker{i + 1}" for i in range(workers)]
        for name in names:
            suite.start_worker(name)
        # Rate = from the first delivery to the last, so that the workers' start-up (imports,
        # connections) does not count; the profile starts then too.
        first = await asyncio.to_thread(wait_sink, suite.sink_log, offset, 1, args.timeout)
        started = first[0][0] if first else time.time()
        spy = []
        if workers == 1 and not args.no_profile:
            spy = start_profile(suite.procs[names[0]].pid, out_dir / "profile-worker", 600)
            profiles.append(str(out_dir / "profile-worker.svg"))
        pids = {n: p for n, p in suite.pids().items() if n in (*names, "ferretdb", "sink", "smtp")}
        with ProcSampler(pids) as sampler:
            # Waits on the sink; the database is read once the workers are done.
            await asyncio.to_thread(wait_sink, suite.sink_log, offset, load.ok, args.timeout)
        emails = await asyncio.to_thread(suite.emails, tag)
        arrivals, _ = read_sink_log(suite.sink_log, offset)
        problems = finish_profile(spy)
        for name in names:
            suite.signal(name, signal.SIGTERM)
        for name in names:
            if suite.wait_exit(name, 30) is None:
                suite.signal(name, signal.SIGKILL)
        result = suite_result(f"{workers} worker(s)", load, emails, arrivals, started, sampler)
        rows.append(
            {
                "workers": workers,
                "messages": load.ok,
                "accepted_per_s": round(load.per_s, 2),
                "delivered_per_s": round(result.delivered_per_s, 2),
                "delivered_99_per_s": round(result.delivered_99_per_s, 2),
                "cpu_s": result.cpu_s,
                "peak_rss_kib": result.peak_rss_kib,
                "exactly_once": result.exactly_once,
                "delivery": result.delivery,
                "profile_errors": problems,
            }
        )
        print(
            f"  scale-out {workers} worker(s): {result.delivered_per_s:.1f} delivered/s, "
            f"CPU {result.cpu_s}, exactly once: {result.exactly_once}",
            file=sys.stderr,
        )
    tops = {}
    for name in ("profile-worker", "profile-mail-api"):
        raw = out_dir / f"{name}.txt"
        if raw.exists() and raw.stat().st_size:
            tops[name] = [(f, round(s, 4)) for f, s in top_frames(raw)]
    return {"rows": rows, "profiles": profiles, "top_self_time": tops}


async def gateway_phase(suite: Suite, args: argparse.Namespace) -> list[dict[str, Any]]:
    """SendEmail and GetEmail, gRPC directly vs REST through the gateway."""
    rows = []
    tag = f"gw-{int(time.time())}"
    n, c = args.gateway_requests, args.concurrency
    runs: list[tuple[str, str, LoadResult]] = []
    sent = await grpc_send(suite.ports["mail"], n, c, tag + "-grpc")
    runs.append(("SendEmail", "gRPC direct", sent))
    runs.append(
        ("SendEmail", "REST via gateway", await rest_send(suite.ports["gateway"], n, c, tag))
    )
    ids = sent.ids or ["missing"]
    gets = n * 4
    runs.append(("GetEmail", "gRPC direct", await grpc_get(suite.ports["mail"], gets, c, ids)))
    runs.append(
        ("GetEmail", "REST via gateway", await rest_get(suite.ports["gateway"], gets, c, ids))
    )
    for rpc, path, load in runs:
        rows.append(
            {
                "rpc": rpc,
                "path": path,
                "requests": load.requests,
                "ok": load.ok,
                "per_s": round(load.per_s, 2),
                "p50_ms": round(load.p(50), 2),
                "p99_ms": round(load.p(99), 2),
                "errors": dict(load.errors),
            }
        )
    return rows


def gateway_table(rows: list[dict[str, Any]]) -> str:
    """Printed gateway comparison."""
    lines = ["rpc        | path             | ok/requests | req/s   | p50 ms  | p99 ms"]
    for r in rows:
        lines.append(
            f"{r['rpc']:10} | {r['path']:16} | {r['ok']:>5}/{r['requests']:<5} | "
            f"{r['per_s']:7.1f} | {r['p50_ms']:7.1f} | {r['p99_ms']:7.1f}"
        )
    return "\n".join(lines)


async def suite_phases(args: argparse.Namespace, run_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Everything that needs our suite, on one instance (main-table rows `args.runs` times)."""
    rows: dict[str, Row] = {}
    found: dict[str, Any] = {"rows": rows}
    suite = Suite(run_dir / "suite")
    try:
        await asyncio.to_thread(suite.start)
        await suite.setup_domain()
        for run in range(1, args.runs + 1):
            for via in ("grpc", "rest"):
                if via in args.phases:
                    print(f"phase {via}: {args.messages} emails, run {run}/{args.runs}",
                          file=sys.stderr)  # fmt: skip
                    add_run(rows, await submit_phase(suite, args, via, run))
            if "smtp" in args.phases:
                print(f"phase smtp: {args.messages} emails, run {run}/{args.runs}", file=sys.stderr)
                add_run(rows, await smtp_phase(suite, args, run_dir, run))
            if "webhooks" in args.phases:
                print(f"phase webhooks: {args.messages} emails, run {run}/{args.runs}",
                      file=sys.stderr)  # fmt: skip
                add_run(rows, await webhooks_phase(suite, args, run))
            if "batch" in args.phases:
                print(f"phase batch: {args.messages} emails, twice, run {run}/{args.runs}",
                      file=sys.stderr)  # fmt: skip
                for result in await batch_phase(suite, args, run):
                    add_run(rows, result)
        if "scale" in args.phases:
            print(f"phase scale-out: {args.scale_messages} emails per run", file=sys.stderr)
            found["scale_out"] = await scale_phase(suite, args, out_dir)
        if "gateway" in args.phases:
            print(f"phase gateway: {args.gateway_requests} sends", file=sys.stderr)
            found["gateway"] = await gateway_phase(suite, args)
    finally:
        await asyncio.to_thread(suite.stop)
    return found


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset")
    parser.add_argument("--messages", type=int, default=env_int("BENCH_MESSAGES", 3000))
    parser.add_argument("--concurrency", type=int, default=env_int("BENCH_CONCURRENCY", 16))
    parser.add_argument(
        "--postfix-messages", type=int, default=env_int("BENCH_POSTFIX_MESSAGES", 3000)
    )
    parser.add_argument("--postfix-sessions", type=int, default=20)
    parser.add_argument("--scale-messages", type=int, default=env_int("BENCH_SCALE_MESSAGES", 200))
    parser.add_argument("--workers", default=os.environ.get("BENCH_WORKERS", "1,2,4"))
    parser.add_argument(
        "--gateway-requests", type=int, default=env_int("BENCH_GATEWAY_REQUESTS", 100)
    )
    parser.add_argument("--timeout", type=float, default=env_int("BENCH_TIMEOUT", 600))
    parser.add_argument(
        "--runs", type=int, default=env_int("BENCH_RUNS", 3), help="runs per main-table row"
    )
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--out", default=os.environ.get("BENCH_OUT", ""))
    args = parser.parse_args()
    args.phases = [p for p in args.phases.split(",") if p]
    args.workers = [int(w) for w in args.workers.split(",") if w]
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out) if args.out else REPO / "build" / "bench" / f"bench-{stamp}.json"
    out_dir = out.parent
    run_dir = REPO / "build" / "bench" / f"run-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    load_at_start = os.getloadavg()
    postfix_rows = postfix_phase(args, run_dir) if "postfix" in args.phases else {}
    found = asyncio.run(suite_phases(args, run_dir, out_dir))
    rows: list[Row] = [*postfix_rows.values(), *found["rows"].values()]
    references = [postfix_rows[n] for n in (POSTFIX_DKIM, POSTFIX_RELAY) if n in postfix_rows]
    print()
    print(
        f"make bench: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, commit {git_commit()}, "
        f"{args.runs} run(s) per row; load average (1/5/15 min) at start "
        f"{' '.join(f'{x:.2f}' for x in load_at_start)}, at end "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(render_table(rows, references))
    print()
    print(render_cpu_table(rows))
    print("Last run of each row:")
    for row in rows:
        last = row.runs[-1]
        print(f"  {row.name}: {last.delivery}{'; ' + last.notes if last.notes else ''}")
    scale = found.get("scale_out")
    if scale:
        print("\nscale-out (queue filled first, then drained by N worker processes):")
        for row in scale["rows"]:
            print(
                f"  {row['workers']} worker(s): {row['delivered_per_s']:.1f} delivered/s "
                f"({row['messages']} emails, exactly once: {row['exactly_once']}); CPU s: "
                f"{row['cpu_s']}"
            )
        for name, frames in scale["top_self_time"].items():
            print(f"  {name}: top self time: " + "; ".join(f"{f} {s:.0%}" for f, s in frames[:5]))
    if found.get("gateway"):
        print("\ngateway overhead (same bounded async client style on both paths):")
        print(gateway_table(found["gateway"]))
    payload = {
        "kind": "bench",
        "started": stamp,
        "seconds": round(time.monotonic() - started, 1),
        "git_commit": git_commit(),
        "machine": machine(),
        # Other work on the machine disturbs the figures; this says how busy it was.
        "load_average_at_start": load_at_start,
        "load_average_at_end": os.getloadavg(),
        "versions": versions(),
        "params": {k: v for k, v in vars(args).items() if k != "out"},
        # One entry per row with the medians (what bench/charts.py draws) ...
        "results": [row.summary().to_json() for row in rows],
        # ... and every run of every row, with medians and min-max of the main figures.
        "rows": [row.to_json() for row in rows],
        "reference_names": [row.name for row in references],
        "scale_out": scale,
        "gateway": found.get("gateway"),
    }
    print(f"\nJSON: {write_json(out, payload)}")


if __name__ == "__main__":
    main()
