"""Benchmark: API reads and delivery on a database full of stored mail, next to small and empty.

Not a test: it prints figures (`make bench-data`). What runs, all on this machine:

* one FerretDB 1.24 (SQLite) started here, or ``MONGODB_URI``; three databases on it
  (FerretDB/SQLite keeps each database in its own file, so one's size does not disturb the
  others' figures):
  - ``empty``: nothing stored (the issue's baseline; its pages come back empty, so its reads
    are bare round trips);
  - ``page``: ``--baseline-emails`` stored (default 2,000), enough that every read returns
    full pages, so it does the same work per request as the full one; the fair baseline for
    "does the cost grow with what is stored";
  - ``full``: ``--emails`` finished emails (sent, bounced, failed, partially sent, cancelled)
    created over the last 30 days plus ``--scheduled`` emails scheduled far in the future
    (they sit in the queue every poll looks at);
  each filled through the product's own storage code (`MongoEmailRepository.insert_many`, as a
  batch send writes: hints, queue entries, contents and emails in capped chunks, then the stats
  counts) across ``--tenants`` tenants with three domains each;
* the mail service (gRPC, in this process, workers off while reading) and the domain service
  (for ListDomains) on each database; a loopback SMTP sink for the delivery runs (``smtp-sink``
  when installed).

Measured over gRPC as the development tenant (the largest tenant of the fill): ListEmails
first page and the fifth page, with status, domain, recipient and tag filters; GetEmail;
GetEmailStats for a day and for 30 days; ListDomains; then delivered/s of ``--deliver`` emails
submitted through SendEmail and delivered by one in-process worker. The three databases are
measured **interleaved**: each of the ``--repeat`` rounds of a read calls all three in a
shuffled order, and the ``--delivery-rounds`` delivery runs alternate between them, so a
shared machine's changing load falls on all three alike and the ratios stay meaningful even
when the absolute figures do not. Targets (issue "the data layer scales with stored mail"):
every read within 2x of its empty-database figure and under 100 ms p50 (stats for 30 days:
500 ms); delivered/s within 10 % of empty. Both ratios are printed: to ``empty`` as the issue
words it and to ``page``. The load average is printed with the figures.

Usage: ``.venv/bin/python -m bench.data --emails 10000 --scheduled 2000``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
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
    app: MailApp,
    *,
    emails: int,
    scheduled: int,
    tenants: int,
    domain_ids: dict[tuple[int, int], str],
    label: str,
) -> float:
    """Store a corpus through the repository; returns the seconds it took."""
    rng = random.Random(7)  # noqa: S311 - a reproducible corpus, not security
    now = datetime.now(UTC).replace(microsecond=0)
    statuses = [s for s, share in MIX for _ in range(share)]
    plan: list[tuple[int, EmailStatus, datetime, datetime | None]] = []
    for _ in range(emails):
        # Tenant 0 (the one measured) holds about 40 %, the others share the rest.
        tenant = 0 if rng.random() < 0.4 else rng.randrange(1, tenants)
        created = now - timedelta(seconds=rng.randrange(30 * 86400))
        plan.append((tenant, rng.choice(statuses), created, None))
    for _ in range(scheduled):
        tenant = rng.randrange(tenants)
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
                print(f"  {label}: filled {done}/{len(plan)} ({rate:.0f}/s)", flush=True)

    await asyncio.gather(*(inserter() for _ in range(FILL_CONCURRENCY)))
    return time.perf_counter() - started


@dataclass
class Subject:
    """One database under measurement, with the services running on it."""

    label: str
    emails: int
    scheduled: int
    settings: SuiteSettings
    app: MailApp
    domain_app: Any
    lookup: DirectoryRelayLookup
    domain_ids: dict[tuple[int, int], str]
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    fill: dict[str, float] = field(default_factory=dict)
    calls: dict[str, Callable[[], Awaitable[object]]] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=dict)
    delivered_per_s: list[float] = field(default_factory=list)

    @property
    def mail(self) -> mail_pb2_grpc.MailServiceAsyncStub:
        """The mail service's stub."""
        stub: mail_pb2_grpc.MailServiceAsyncStub = mail_pb2_grpc.MailServiceStub(self.channels[0])
        return stub

    @property
    def domains(self) -> domain_pb2_grpc.DomainServiceAsyncStub:
        """The domain service's stub."""
        stub: domain_pb2_grpc.DomainServiceAsyncStub = domain_pb2_grpc.DomainServiceStub(
            self.channels[1]
        )
        return stub

    def reads(self) -> dict[str, dict[str, float]]:
        """p50/p99 in milliseconds of every read."""
        return {
            name: {
                "p50_ms": percentile(values, 50),
                "p99_ms": percentile(values, 99),
                "n": len(values),
            }
            for name, values in self.samples.items()
        }


async def start_subject(
    uri: str, label: str, database: str, args: argparse.Namespace, sink_port: int
) -> Subject:
    """Start the domain and mail services on `database` (nothing stored yet)."""
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
    subject = Subject(
        label=label,
        emails=0,
        scheduled=0,
        settings=settings,
        app=app,
        domain_app=domain_app,
        lookup=lookup,
        domain_ids=domain_ids,
    )
    subject.channels = [
        grpc.aio.insecure_channel(f"127.0.0.1:{app.running.port}"),
        grpc.aio.insecure_channel(f"127.0.0.1:{domain_app.running.port}"),
    ]
    return subject


async def stop_subject(subject: Subject) -> None:
    """Close the channels and stop both services."""
    for channel in subject.channels:
        await channel.close()
    await subject.app.running.stop(None)
    await subject.domain_app.running.stop(None)


async def fill_subject(subject: Subject, *, emails: int, scheduled: int, tenants: int) -> None:
    """Store `emails` finished and `scheduled` far-future emails in the subject's database."""
    subject.emails, subject.scheduled = emails, scheduled
    if not emails and not scheduled:
        return
    print(f"filling {subject.label}: {emails} emails + {scheduled} scheduled", flush=True)
    seconds = await fill(
        subject.app,
        emails=emails,
        scheduled=scheduled,
        tenants=tenants,
        domain_ids=subject.domain_ids,
        label=subject.label,
    )
    total = emails + scheduled
    subject.fill = {"emails": total, "seconds": seconds, "per_second": total / seconds}
    print(f"  {subject.label}: filled in {seconds:.0f} s ({total / seconds:.0f}/s)", flush=True)


async def prepare_reads(subject: Subject) -> None:
    """The calls of every read, as the development tenant, with this database's page token."""
    mail, domains = subject.mail, subject.domains
    domain_id = subject.domain_ids[(0, 1)]
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

    subject.calls = {
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


async def interleaved_reads(subjects: list[Subject], repeat: int) -> None:
    """Time every read `repeat` times per subject, the subjects in a new order each round."""
    rng = random.Random(11)  # noqa: S311 - call order only
    for name in subjects[0].calls:
        for subject in subjects:
            await subject.calls[name]()  # warm-up
            subject.samples[name] = []
        for _ in range(repeat):
            order = subjects[:]
            rng.shuffle(order)
            for subject in order:
                t0 = time.perf_counter()
                await subject.calls[name]()
                subject.samples[name].append((time.perf_counter() - t0) * 1000)
        print(
            f"  {name}: "
            + ", ".join(
                f"{s.label} p50 {percentile(s.samples[name], 50):.1f} ms" for s in subjects
            ),
            flush=True,
        )


async def deliver(subject: Subject, count: int) -> float:
    """Submit `count` emails, then deliver them with one worker: delivered per second."""
    request = mail_pb2.SendEmailRequest(
        from_address=f"Bench <bench@{domain_name(0, 0)}>",
        to=["user@sink.example"],
        subject="x",
        text=BODY,
    )
    sem = asyncio.Semaphore(16)
    mail = subject.mail

    async def send() -> None:
        async with sem:
            await mail.SendEmail(request, timeout=120)

    await asyncio.gather(*(send() for _ in range(count)))
    worker = make_worker(
        subject.settings,
        emails=subject.app.emails,
        relays=subject.lookup,
        clock=SystemClock(),
        relay_health=RelayHealthStore(
            subject.app.running.database.db, refresh=timedelta(seconds=60)
        ),
    )
    attempts = 0
    started = time.perf_counter()
    while attempts < count:
        made = await worker.run_once()
        attempts += made
        if not made:
            await asyncio.sleep(0.05)
    return count / (time.perf_counter() - started)


async def interleaved_deliveries(subjects: list[Subject], count: int, rounds: int) -> None:
    """`rounds` delivery runs per subject, alternating between the subjects."""
    rng = random.Random(13)  # noqa: S311 - run order only
    for number in range(rounds):
        order = subjects[:]
        rng.shuffle(order)
        for subject in order:
            rate = await deliver(subject, count)
            subject.delivered_per_s.append(rate)
            print(
                f"  delivery round {number + 1}, {subject.label}: {rate:.1f} delivered/s "
                f"(load {os.getloadavg()[0]:.2f})",
                flush=True,
            )


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def table(
    empty: dict[str, Any], page: dict[str, Any], full: dict[str, Any]
) -> tuple[str, list[dict[str, Any]]]:
    """The printed comparison and its rows, from three `summary` forms."""
    rows: list[dict[str, Any]] = []
    lines = [
        f"{'read (p50/p99 ms)':28} {'empty':>14} {'page':>14} {'full':>14} "
        f"{'x empty':>8} {'x page':>7} {'target':>7}  <target  <=2x empty  <=2x page"
    ]
    for name, f in full["reads"].items():
        e, p = empty["reads"][name], page["reads"][name]
        to_empty, to_page = _ratio(f["p50_ms"], e["p50_ms"]), _ratio(f["p50_ms"], p["p50_ms"])
        target = TARGET_STATS_30D_P50_MS if name == "GetEmailStats 30 days" else TARGET_P50_MS
        verdict = {
            "under_target": f["p50_ms"] < target,
            "within_2x_empty": to_empty <= 2.0,
            "within_2x_page": to_page <= 2.0,
        }
        rows.append(
            {
                "read": name,
                "empty": e,
                "page": p,
                "full": f,
                "ratio_to_empty": to_empty,
                "ratio_to_page": to_page,
                "target_p50_ms": target,
                **verdict,
            }
        )
        cells = "  ".join(f"{'yes' if v else 'NO':>8}" for v in verdict.values())
        lines.append(
            f"{name:28} "
            + " ".join(f"{r['p50_ms']:6.1f}/{r['p99_ms']:<7.1f}" for r in (e, p, f))
            + f" {to_empty:8.2f} {to_page:7.2f} {target:7.0f}  {cells}"
        )
    medians = [statistics.median(s["delivered_per_s"]) for s in (empty, page, full)]
    to_empty, to_page = _ratio(medians[2], medians[0]), _ratio(medians[2], medians[1])
    rows.append(
        {
            "read": "delivered/s",
            "medians": medians,
            "ratio_to_empty": to_empty,
            "ratio_to_page": to_page,
            "within_10pct_empty": to_empty >= 0.9,
            "within_10pct_page": to_page >= 0.9,
        }
    )
    lines.append(
        f"{'delivered/s (median)':28} "
        + " ".join(f"{m:14.1f}" for m in medians)
        + f" {to_empty:8.2f} {to_page:7.2f} {'>=0.9x':>7}  {'':8}  "
        f"{'yes' if to_empty >= 0.9 else 'NO':>8}  {'yes' if to_page >= 0.9 else 'NO':>8}"
    )
    return "\n".join(lines), rows


def summary(subject: Subject) -> dict[str, Any]:
    """The JSON form of one subject's figures."""
    return {
        "emails": subject.emails,
        "scheduled": subject.scheduled,
        "fill": subject.fill,
        "reads": subject.reads(),
        "delivered_per_s": subject.delivered_per_s,
    }


async def main_async(args: argparse.Namespace) -> None:
    """Start the database and the sink, fill, measure the three databases interleaved."""
    ferret: EmbeddedFerretDB | None = None
    uri = os.environ.get("MONGODB_URI", "")
    data_dir = Path(tempfile.mkdtemp(prefix="bench-data-"))
    if not uri:
        ferret = EmbeddedFerretDB(binary=find_ferretdb_binary(REPO), data_dir=data_dir)
        uri = ferret.start()
    sink_port = free_port()
    sink, sink_name = start_sink(sink_port)
    run = secrets.token_hex(3)
    subjects: list[Subject] = []
    loads: dict[str, tuple[float, float, float]] = {}
    try:
        for label in ("empty", "page", "full"):
            subjects.append(
                await start_subject(uri, label, f"bench_{label}_{run}", args, sink_port)
            )
        _, page, full = subjects
        # The small one keeps the full one's proportions (finished to scheduled).
        await fill_subject(
            page,
            emails=args.baseline_emails,
            scheduled=args.baseline_emails * args.scheduled // max(args.emails, 1),
            tenants=args.tenants,
        )
        await fill_subject(full, emails=args.emails, scheduled=args.scheduled, tenants=args.tenants)
        loads["reads_start"] = os.getloadavg()
        print(f"reads, interleaved (load {loads['reads_start'][0]:.2f})", flush=True)
        for subject in subjects:
            await prepare_reads(subject)
        await interleaved_reads(subjects, args.repeat)
        loads["deliveries_start"] = os.getloadavg()
        print(f"deliveries, interleaved (load {loads['deliveries_start'][0]:.2f})", flush=True)
        await interleaved_deliveries(subjects, args.deliver, args.delivery_rounds)
        loads["end"] = os.getloadavg()
    finally:
        for subject in subjects:
            await stop_subject(subject)
        sink.terminate()
        sink.wait(10)
        if ferret is not None:
            ferret.stop()
        if args.keep_data and ferret is not None:
            print(f"data kept: {data_dir} (FerretDB data directory)", flush=True)
        else:
            # The full database takes about 1.2 GB per 120,000 emails.
            shutil.rmtree(data_dir, ignore_errors=True)
    summaries = {s.label: summary(s) for s in subjects}
    text, rows = table(summaries["empty"], summaries["page"], summaries["full"])
    print()
    print(
        f"stored: full {args.emails} finished + {args.scheduled} scheduled emails, page "
        f"{page.emails} + {page.scheduled}, {args.tenants} tenants x {DOMAINS_PER_TENANT} "
        f"domains; {args.repeat} calls per read and database, interleaved; "
        f"{args.delivery_rounds} delivery runs of {args.deliver} per database; relay: {sink_name}"
    )
    print(f"database: {'FerretDB 1.24 (SQLite, local build)' if ferret else 'MONGODB_URI'}")
    print(
        "load average (1/5/15 min): "
        + "; ".join(f"{k} {v[0]:.2f}/{v[1]:.2f}/{v[2]:.2f}" for k, v in loads.items())
    )
    print(text)
    path = write_json(
        Path(args.out),
        {
            "benchmark": "data",
            "machine": machine(),
            "args": vars(args),
            "loads": loads,
            **summaries,
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
    parser.add_argument(
        "--baseline-emails",
        type=int,
        default=int(os.environ.get("BENCH_DATA_BASELINE_EMAILS", 2_000)),
        help="finished emails of the small 'page' database (every read returns full pages)",
    )
    parser.add_argument("--tenants", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=int(os.environ.get("BENCH_DATA_REPEAT", 50)))
    parser.add_argument("--deliver", type=int, default=1000)
    parser.add_argument(
        "--delivery-rounds",
        type=int,
        default=int(os.environ.get("BENCH_DATA_DELIVERY_ROUNDS", 3)),
        help="delivery runs per database, alternating between the databases (median reported)",
    )
    parser.add_argument("--out", default="build/bench/data.json")
    parser.add_argument(
        "--keep-data",
        action="store_true",
        help="keep the embedded database's data directory (to measure it again)",
    )
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
