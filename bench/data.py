"""Benchmark: API reads and delivery on a database full of stored mail, next to an empty one.

Not a test: it prints figures (`make bench-data`). What runs, all on this machine:

* one FerretDB 1.24 (SQLite) started here, or ``MONGODB_URI``; two databases on it: ``empty``
  and ``full`` (FerretDB/SQLite keeps each database in its own file, so the empty one's
  figures are not disturbed by the other's size);
* the full database is filled through the product's own storage code
  (`MongoEmailRepository.insert_many`, as a batch send writes: lookup keys, queue entries and
  emails in capped chunks, then the stats counts): ``--emails`` finished emails (sent,
  bounced, failed, partially sent, cancelled) created over the last 30 days across
  ``--tenants`` tenants with three domains each, plus ``--scheduled`` emails scheduled far
  in the future (they sit in the queue every poll looks at);
* the mail service (gRPC, in this process, workers off while reading) and the domain service
  (for ListDomains) on each database; a loopback SMTP sink for the delivery run (``smtp-sink``
  when installed).

Measured per database, ``--repeat`` times each, over gRPC as the development tenant (the
largest tenant of the fill): ListEmails first page and the fifth page, with status, domain,
recipient and tag filters; GetEmail; GetEmailStats for a day and for 30 days; ListDomains;
then delivered/s of ``--deliver`` emails submitted through SendEmail and delivered by one
in-process worker. Targets (issue "the data layer scales with stored mail"): every read within
2x of its empty-database figure and under 100 ms p50 (stats for 30 days: 500 ms); delivered/s
within 10 % of empty. The load average is printed with the figures: on a shared machine they
are indicative only.

Usage: ``.venv/bin/python -m bench.data --emails 10000 --scheduled 2000``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from azora.domain.v1 import domain_pb2, domain_pb2_grpc
from azora.mail.v1 import mail_pb2, mail_pb2_grpc
from google.protobuf import timestamp_pb2

from bench.harness import machine, percentile, write_json
from bench.mail_pipeline import BODY, free_port, start_sink
from services.core.clock import SystemClock
from services.core.embedded_db import EmbeddedFerretDB, find_ferretdb_binary
from services.core.ids import new_id
from services.core.settings import DEV_TENANT_ID
from services.domain.app import build_app as build_domain_app
from services.mail.app import MailApp, build_app, make_worker
from services.mail.models import (
    Email,
    EmailStatus,
    Event,
    EventType,
    Recipient,
    RecipientKind,
    RecipientStatus,
)
from services.mail.relay_directory import InMemoryRelayDirectory, RelaySecurity, RelaySettings
from services.mail.relay_health import RelayHealthStore
from services.mail.relay_lookup import DirectoryRelayLookup
from services.mail.senders import SenderDomain, StaticSenderDirectory
from tests.support.settings import SuiteSettings

REPO = Path(__file__).resolve().parent.parent
DOMAINS_PER_TENANT = 3
# Finished statuses of the fill, with their shares.
MIX = [
    (EmailStatus.SENT, 80),
    (EmailStatus.BOUNCED, 8),
    (EmailStatus.FAILED, 5),
    (EmailStatus.PARTIALLY_SENT, 4),
    (EmailStatus.CANCELLED, 3),
]
TAGS = [f"tag{i}" for i in range(20)]
# Filling: emails per `insert_many` call (written in capped chunks by the repository) and
# calls in flight (one writes while the next batch is built).
FILL_BATCH = 400
FILL_CONCURRENCY = 2
TARGET_P50_MS = 100.0
TARGET_STATS_30D_P50_MS = 500.0


def ts(value: datetime) -> timestamp_pb2.Timestamp:
    """A protobuf timestamp."""
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def domain_name(tenant: int, d: int) -> str:
    """The fill's domain names: tenant 0 is the development tenant the reads run as."""
    return f"d{d}.t{tenant}.bench.example"


def tenant_id(tenant: int) -> str:
    """Tenant 0 is the development tenant (requests without credentials)."""
    return DEV_TENANT_ID if tenant == 0 else f"bench-tenant-{tenant}"


def make_email(
    rng: random.Random,
    *,
    tenant: int,
    domain_ids: dict[tuple[int, int], str],
    created: datetime,
    status: EmailStatus,
    send_at: datetime | None = None,
) -> Email:
    """One stored email as the mail service writes it (about 3 KB)."""
    d = rng.randrange(DOMAINS_PER_TENANT)
    name = domain_name(tenant, d)
    to = [f"user{rng.randrange(2000)}@rcpt{rng.randrange(50)}.example"]
    if rng.random() < 0.2:
        to.append(f"user{rng.randrange(2000)}@rcpt{rng.randrange(50)}.example")
    email_id = new_id()
    finished = status not in (EmailStatus.SCHEDULED, EmailStatus.QUEUED)
    r_status = {
        EmailStatus.SENT: RecipientStatus.SENT,
        EmailStatus.BOUNCED: RecipientStatus.BOUNCED,
        EmailStatus.FAILED: RecipientStatus.FAILED,
        EmailStatus.CANCELLED: RecipientStatus.CANCELLED,
    }.get(status, RecipientStatus.PENDING)
    recipients = [Recipient(a, RecipientKind.TO, r_status, None, 1, created) for a in to]
    if status == EmailStatus.PARTIALLY_SENT and len(recipients) == 1:
        recipients.append(
            Recipient("x@rcpt.example", RecipientKind.TO, RecipientStatus.BOUNCED, None, 1)
        )
    if status == EmailStatus.PARTIALLY_SENT:
        recipients[0].status = RecipientStatus.SENT
    content = (
        f"From: Bench <bench@{name}>\r\nTo: {', '.join(to)}\r\nSubject: Bench {email_id}\r\n"
        f"Message-ID: <{email_id}@{name}>\r\n\r\n{BODY}\r\n"
    ).encode()
    events = [Event(EventType.ACCEPTED, created)]
    if finished:
        events.append(Event(EventType.SENT, created + timedelta(seconds=2), recipient=to[0]))
    start = send_at or created
    return Email(
        id=email_id,
        tenant_id=tenant_id(tenant),
        domain_id=domain_ids[(tenant, d)],
        domain_name=name,
        from_address=f"Bench <bench@{name}>",
        envelope_from=f"bench@{name}",
        to=to,
        cc=[],
        bcc=[],
        reply_to=[],
        subject=f"Bench {email_id}",
        message_id=f"{email_id}@{name}",
        size=len(content),
        recipients=recipients,
        status=status,
        created_at=created,
        updated_at=created + timedelta(seconds=2) if finished else created,
        next_attempt_at=None if finished else start,
        expires_at=start + timedelta(days=5),
        tags=rng.sample(TAGS, 2),
        send_at=send_at,
        attempts=1 if finished else 0,
        events=events,
        content=content,
    )


async def fill(
    app: MailApp, args: argparse.Namespace, domain_ids: dict[tuple[int, int], str]
) -> float:
    """Store the corpus through the repository; returns the seconds it took."""
    rng = random.Random(7)  # noqa: S311 - a reproducible corpus, not security
    now = datetime.now(UTC).replace(microsecond=0)
    statuses = [s for s, share in MIX for _ in range(share)]
    plan: list[tuple[int, EmailStatus, datetime, datetime | None]] = []
    for _ in range(args.emails):
        # Tenant 0 (the one measured) holds about 40 %, the others share the rest.
        tenant = 0 if rng.random() < 0.4 else rng.randrange(1, args.tenants)
        created = now - timedelta(seconds=rng.randrange(30 * 86400))
        plan.append((tenant, rng.choice(statuses), created, None))
    for _ in range(args.scheduled):
        tenant = rng.randrange(args.tenants)
        created = now - timedelta(seconds=rng.randrange(86400))
        # Far ahead: beyond any poll's reach for the whole run.
        send_at = now + timedelta(days=300 + rng.randrange(60))
        plan.append((tenant, EmailStatus.SCHEDULED, created, send_at))
    rng.shuffle(plan)
    batches = [plan[i : i + FILL_BATCH] for i in range(0, len(plan), FILL_BATCH)]
    started = time.perf_counter()
    done = 0
    reported = 0

    async def inserter() -> None:
        nonlocal done, reported
        while batches:
            batch = batches.pop()
            emails = [
                make_email(
                    rng,
                    tenant=tenant,
                    domain_ids=domain_ids,
                    created=created,
                    status=status,
                    send_at=send_at,
                )
                for tenant, status, created, send_at in batch
            ]
            stored = await app.emails.insert_many(emails=emails)
            if not all(stored):
                raise RuntimeError(f"{stored.count(False)} fill emails not stored (id taken)")
            done += len(batch)
            if done - reported >= 5000:
                reported = done
                rate = done / (time.perf_counter() - started)
                print(f"  filled {done}/{len(plan)} ({rate:.0f}/s)", flush=True)

    await asyncio.gather(*(inserter() for _ in range(FILL_CONCURRENCY)))
    return time.perf_counter() - started


async def timed(repeat: int, call: Callable[[], Awaitable[object]]) -> dict[str, float]:
    """p50/p99 in milliseconds of `repeat` sequential calls (after one warm-up call)."""
    await call()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - t0) * 1000)
    return {"p50_ms": percentile(samples, 50), "p99_ms": percentile(samples, 99), "n": repeat}


async def reads(
    mail: mail_pb2_grpc.MailServiceAsyncStub,
    domains: domain_pb2_grpc.DomainServiceAsyncStub,
    *,
    domain_id: str,
    repeat: int,
) -> dict[str, dict[str, float]]:
    """Every read of the benchmark, as the development tenant."""
    first = await mail.ListEmails(mail_pb2.ListEmailsRequest(page_size=20), timeout=120)
    token = first.next_page_token
    for _ in range(3):
        if not token:
            break
        token = (
            await mail.ListEmails(mail_pb2.ListEmailsRequest(page_size=20, page_token=token))
        ).next_page_token
    ids = [e.id for e in first.emails] or [new_id()]
    some = first.emails[0] if first.emails else None
    recipient = some.recipients[0].address if some and some.recipients else "user1@rcpt1.example"
    now = datetime.now(UTC)

    async def get_email() -> object:
        try:
            return await mail.GetEmail(mail_pb2.GetEmailRequest(id=random.choice(ids)))  # noqa: S311
        except grpc.aio.AioRpcError:
            return None

    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "ListEmails first page": lambda: mail.ListEmails(mail_pb2.ListEmailsRequest(page_size=20)),
        "ListEmails 5th page": lambda: mail.ListEmails(
            mail_pb2.ListEmailsRequest(page_size=20, page_token=token)
        ),
        "ListEmails status=bounced": lambda: mail.ListEmails(
            mail_pb2.ListEmailsRequest(page_size=20, status=mail_pb2.EMAIL_STATUS_BOUNCED)
        ),
        "ListEmails domain": lambda: mail.ListEmails(
            mail_pb2.ListEmailsRequest(page_size=20, domain_id=domain_id)
        ),
        "ListEmails recipient": lambda: mail.ListEmails(
            mail_pb2.ListEmailsRequest(page_size=20, recipient=recipient)
        ),
        "ListEmails tag": lambda: mail.ListEmails(
            mail_pb2.ListEmailsRequest(page_size=20, tag="tag3")
        ),
        "GetEmail": get_email,
        "GetEmailStats 1 day": lambda: mail.GetEmailStats(
            mail_pb2.GetEmailStatsRequest(start_time=ts(now - timedelta(days=1)), end_time=ts(now))
        ),
        "GetEmailStats 30 days": lambda: mail.GetEmailStats(
            mail_pb2.GetEmailStatsRequest(start_time=ts(now - timedelta(days=30)), end_time=ts(now))
        ),
        "ListDomains": lambda: domains.ListDomains(domain_pb2.ListDomainsRequest()),
    }
    out = {}
    for name, call in calls.items():
        out[name] = await timed(repeat, call)
        print(
            f"  {name}: p50 {out[name]['p50_ms']:.1f} ms, p99 {out[name]['p99_ms']:.1f} ms",
            flush=True,
        )
    return out


async def deliver(
    app: MailApp,
    stub: mail_pb2_grpc.MailServiceAsyncStub,
    lookup: DirectoryRelayLookup,
    count: int,
    settings: SuiteSettings,
    domain: str,
) -> float:
    """Submit `count` emails, then deliver them with one worker: delivered per second."""
    request = mail_pb2.SendEmailRequest(
        from_address=f"Bench <bench@{domain}>", to=["user@sink.example"], subject="x", text=BODY
    )
    sem = asyncio.Semaphore(16)

    async def send() -> None:
        async with sem:
            await stub.SendEmail(request, timeout=120)

    await asyncio.gather(*(send() for _ in range(count)))
    worker = make_worker(
        settings,
        emails=app.emails,
        relays=lookup,
        clock=SystemClock(),
        relay_health=RelayHealthStore(app.running.database.db, refresh=timedelta(seconds=60)),
    )
    attempts = 0
    started = time.perf_counter()
    while attempts < count:
        made = await worker.run_once()
        attempts += made
        if not made:
            await asyncio.sleep(0.05)
    return count / (time.perf_counter() - started)


async def measure(
    uri: str, database: str, args: argparse.Namespace, sink_port: int, *, full: bool
) -> dict[str, Any]:
    """Fill (if `full`) and measure one database."""
    settings = SuiteSettings.from_env(
        {
            "MONGODB_URI": uri,
            "AZORA_MONGODB_DATABASE": database,
            "LOG_LEVEL": "warn",
            "AZORA_MAIL_WORKER_CONCURRENCY": "16",
            "AZORA_MAIL_POLL_INTERVAL": "0.05",
            "RATE_LIMIT_MAX": "100000000",
            "AZORA_SEND_RATE_LIMIT_MAX": "100000000",
            "AZORA_QUOTA_EMAILS_PER_HOUR": "0",
            "AZORA_QUOTA_EMAILS_PER_DAY": "0",
            "AZORA_MONGODB_REQUEST_TIMEOUT": "120",
        }
    )
    domain_app = await build_domain_app(settings, bind="127.0.0.1:0", run_lifecycle=False)
    domain_ids: dict[tuple[int, int], str] = {}
    senders = StaticSenderDirectory()
    directory = InMemoryRelayDirectory()
    for t in range(args.tenants):
        for d in range(DOMAINS_PER_TENANT):
            if t == 0:
                created = await domain_app.domains.create(
                    tenant_id=DEV_TENANT_ID, name=domain_name(t, d)
                )
                domain_ids[(t, d)] = created.id
            else:
                domain_ids[(t, d)] = new_id()
            senders.domains[(tenant_id(t), domain_name(t, d))] = SenderDomain(
                domain_ids[(t, d)], domain_name(t, d)
            )
            directory.add_relay(
                tenant_id=tenant_id(t),
                relay=RelaySettings(domain_ids[(t, d)], "127.0.0.1", sink_port, RelaySecurity.NONE),
            )
    lookup = DirectoryRelayLookup(directory)
    app = await build_app(
        settings, bind="127.0.0.1:0", senders=senders, relays=lookup, run_workers=False
    )
    result: dict[str, Any] = {"database": database, "full": full}
    try:
        if full:
            print(
                f"filling {database}: {args.emails} emails + {args.scheduled} scheduled", flush=True
            )
            seconds = await fill(app, args, domain_ids)
            total = args.emails + args.scheduled
            result["fill"] = {"emails": total, "seconds": seconds, "per_second": total / seconds}
            print(f"  filled in {seconds:.0f} s ({total / seconds:.0f}/s)", flush=True)
        print(f"reads on {database} (load {os.getloadavg()[0]:.2f})", flush=True)
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{app.running.port}") as mail_channel,
            grpc.aio.insecure_channel(f"127.0.0.1:{domain_app.running.port}") as domain_channel,
        ):
            mail: mail_pb2_grpc.MailServiceAsyncStub = mail_pb2_grpc.MailServiceStub(mail_channel)
            domains: domain_pb2_grpc.DomainServiceAsyncStub = domain_pb2_grpc.DomainServiceStub(
                domain_channel
            )
            result["load_before"] = os.getloadavg()
            result["reads"] = await reads(
                mail, domains, domain_id=domain_ids[(0, 1)], repeat=args.repeat
            )
            rate = await deliver(app, mail, lookup, args.deliver, settings, domain_name(0, 0))
            result["delivered_per_s"] = rate
            result["load_after"] = os.getloadavg()
            print(f"  delivered/s ({args.deliver} emails): {rate:.1f}", flush=True)
    finally:
        await app.running.stop(None)
        await domain_app.running.stop(None)
    return result


def table(empty: dict[str, Any], full: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """The printed comparison and its rows."""
    rows: list[dict[str, Any]] = []
    lines = [
        f"{'read':28} {'empty p50/p99 ms':>18} {'full p50/p99 ms':>18} {'x empty':>8} "
        f"{'target p50':>10}  verdict"
    ]
    for name, e in empty["reads"].items():
        f = full["reads"][name]
        ratio = f["p50_ms"] / e["p50_ms"] if e["p50_ms"] else float("nan")
        target = TARGET_STATS_30D_P50_MS if name == "GetEmailStats 30 days" else TARGET_P50_MS
        ok = f["p50_ms"] < target and ratio <= 2.0
        rows.append(
            {
                "read": name,
                "empty": e,
                "full": f,
                "ratio": ratio,
                "target_p50_ms": target,
                "pass": ok,
            }
        )
        lines.append(
            f"{name:28} {e['p50_ms']:8.1f}/{e['p99_ms']:<9.1f} "
            f"{f['p50_ms']:8.1f}/{f['p99_ms']:<9.1f} {ratio:8.2f} {target:10.0f}  "
            f"{'PASS' if ok else 'FAIL'}"
        )
    ratio = full["delivered_per_s"] / empty["delivered_per_s"]
    ok = ratio >= 0.9
    rows.append(
        {
            "read": "delivered/s",
            "empty": empty["delivered_per_s"],
            "full": full["delivered_per_s"],
            "ratio": ratio,
            "pass": ok,
        }
    )
    lines.append(
        f"{'delivered/s':28} {empty['delivered_per_s']:18.1f} {full['delivered_per_s']:18.1f}"
        f" {ratio:8.2f} {'>=0.9x':>10}  {'PASS' if ok else 'FAIL'}"
    )
    return "\n".join(lines), rows


async def main_async(args: argparse.Namespace) -> None:
    """Start the database and the sink, measure empty then full, print and write JSON."""
    ferret: EmbeddedFerretDB | None = None
    uri = os.environ.get("MONGODB_URI", "")
    data_dir = Path(tempfile.mkdtemp(prefix="bench-data-"))
    if not uri:
        ferret = EmbeddedFerretDB(binary=find_ferretdb_binary(REPO), data_dir=data_dir)
        uri = ferret.start()
    sink_port = free_port()
    sink, sink_name = start_sink(sink_port)
    run = secrets.token_hex(3)
    try:
        empty = await measure(uri, f"bench_empty_{run}", args, sink_port, full=False)
        full = await measure(uri, f"bench_full_{run}", args, sink_port, full=True)
    finally:
        sink.terminate()
        sink.wait(10)
        if ferret is not None:
            ferret.stop()
        if args.keep_data and ferret is not None:
            print(f"data kept: {data_dir} (FerretDB data directory)", flush=True)
        else:
            # The full database takes about 1.2 GB per 120,000 emails.
            shutil.rmtree(data_dir, ignore_errors=True)
    text, rows = table(empty, full)
    print()
    print(
        f"stored: {args.emails} finished + {args.scheduled} scheduled emails, "
        f"{args.tenants} tenants x {DOMAINS_PER_TENANT} domains; {args.repeat} calls per read; "
        f"relay: {sink_name}"
    )
    print(f"database: {'FerretDB 1.24 (SQLite, local build)' if ferret else 'MONGODB_URI'}")
    print(
        f"load average before/after (1 min): {full['load_before'][0]:.2f} / "
        f"{full['load_after'][0]:.2f}"
    )
    print(text)
    path = write_json(
        Path(args.out),
        {
            "benchmark": "data",
            "machine": machine(),
            "args": vars(args),
            "empty": empty,
            "full": full,
            "rows": rows,
            "targets": {
                "read_p50_ms": TARGET_P50_MS,
                "stats_30d_p50_ms": TARGET_STATS_30D_P50_MS,
                "read_ratio_max": 2.0,
                "delivered_ratio_min": 0.9,
            },
        },
    )
    print(f"written: {path}")


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--emails", type=int, default=int(os.environ.get("BENCH_DATA_EMAILS", 100_000))
    )
    parser.add_argument(
        "--scheduled", type=int, default=int(os.environ.get("BENCH_DATA_SCHEDULED", 20_000))
    )
    parser.add_argument("--tenants", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=int(os.environ.get("BENCH_DATA_REPEAT", 50)))
    parser.add_argument("--deliver", type=int, default=1000)
    parser.add_argument("--out", default="build/bench/data.json")
    parser.add_argument(
        "--keep-data",
        action="store_true",
        help="keep the embedded database's data directory (to measure it again)",
    )
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
