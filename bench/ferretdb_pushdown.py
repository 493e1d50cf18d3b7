"""Index pushdown of the embedded FerretDB, before/after: query latency on a filled database.

Fills one embedded FerretDB (bin/ferretdb) with emails-like documents (~3 KB each, several
tenants, statuses and domains) and a queue-like collection (as many far-future entries as
emails, then the due ones), with the mail service's indexes,
then times the hot query shapes twice on the same data: with the local pushdown and after a
restart with FERRETDB_SQLITE_INDEX_PUSHDOWN=off (upstream's plans). Prints p50/p99 per shape.

    .venv/bin/python -m bench.ferretdb_pushdown [--emails 20000] [--repeat 30]
"""

from __future__ import annotations

import argparse
import datetime as dt
import pathlib
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

from pymongo import MongoClient

from services.core.embedded_db import EmbeddedFerretDB, find_ferretdb_binary
from services.mail.repository import EMAILS, QUEUE
from services.mail.repository import INDEXES as MAIL_INDEXES

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
STATUSES = ["sent", "sent", "sent", "delivered", "failed", "queued", "deferred", "scheduled"]
NOW = dt.datetime(2026, 3, 1)
Doc = dict[str, Any]


def _fill(client: MongoClient[Doc], emails: int) -> None:
    rng = random.Random(7)  # noqa: S311 - reproducible data, not secrets
    db = client["bench"]
    for spec in (s for s in MAIL_INDEXES if not s.retired):
        db[spec.collection].create_index(list(spec.keys), name=spec.name, unique=spec.unique)
    batch: list[Doc] = []
    # Far-future scheduled emails' entries first (oldest rows): a poll that scans meets them all
    # before the due ones.
    future = NOW + dt.timedelta(days=30)
    for start in range(0, emails, 1000):
        db[QUEUE].insert_many(
            [
                {"_id": f"future{i:07d}", "due": future, "claims": 0}
                for i in range(start, start + 1000)
            ]
        )
    queue: list[Doc] = []
    for i in range(emails):
        created = NOW - dt.timedelta(seconds=emails - i)
        status = rng.choice(STATUSES)
        batch.append(
            {
                "_id": f"em_{created:%Y%m%d%H%M%S}{i:07d}",
                "tenant_id": f"tenant{i % 4}",
                "domain_id": f"dom{i % 10}",
                "status": status,
                "created_at": created,
                "next_attempt_at": created,
                "recipient_addresses": [f"user{i % 97}@example.test"],
                "tags": ["bench"],
                "content": "x" * 3000,
            }
        )
        # The queue holds unfinished emails; most are far-future scheduled ones.
        if status in ("queued", "deferred", "scheduled"):
            due = NOW + dt.timedelta(days=30) if status == "scheduled" else created
            queue.append({"_id": batch[-1]["_id"], "due": due, "claims": 0})
        if len(batch) == 500:
            db[EMAILS].insert_many(batch)
            batch = []
    if batch:
        db[EMAILS].insert_many(batch)
    if queue:
        db[QUEUE].insert_many(queue)


def _shapes(client: MongoClient[Doc]) -> dict[str, Callable[[], object]]:
    emails, queue = client["bench"][EMAILS], client["bench"][QUEUE]
    page = {"content": 0}
    # The email halfway down tenant1's list: where a later page starts, and a GetEmail target.
    middle = emails.count_documents({"tenant_id": "tenant1"}) // 2
    mid = list(
        emails.find({"tenant_id": "tenant1"}, {"_id": 1}).sort("_id", -1).skip(middle).limit(1)
    )
    later = {"tenant_id": "tenant1", "_id": {"$lt": mid[0]["_id"]}} if mid else {"tenant_id": "x"}
    return {
        "ListEmails first page": lambda: list(
            emails.find({"tenant_id": "tenant1"}, page).sort("_id", -1).limit(20)
        ),
        "ListEmails later page": lambda: list(emails.find(later, page).sort("_id", -1).limit(20)),
        "ListEmails status=failed": lambda: list(
            emails.find({"tenant_id": "tenant1", "status": "failed"}, page)
            .sort("_id", -1)
            .limit(20)
        ),
        "ListEmails domain": lambda: list(
            emails.find({"tenant_id": "tenant2", "domain_id": "dom2"}, page)
            .sort("_id", -1)
            .limit(20)
        ),
        "queue poll (due<=now, limit 40)": lambda: list(
            queue.find({"due": {"$lte": NOW}}).limit(40)
        ),
        "GetEmail by _id": lambda: emails.find_one({"_id": mid[0]["_id"] if mid else "x"}),
    }


def _measure(db: EmbeddedFerretDB, repeat: int) -> dict[str, tuple[float, float]]:
    client: MongoClient[Doc] = MongoClient(db.uri)
    try:
        out: dict[str, tuple[float, float]] = {}
        for name, run in _shapes(client).items():
            size = run()  # warm-up; the size shows the query found what it should
            if isinstance(size, list) and len(size) == 0:
                print(f"warning: {name} returned nothing")
            samples = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                run()
                samples.append((time.perf_counter() - t0) * 1000)
            samples.sort()
            out[name] = (statistics.median(samples), samples[int(0.99 * (len(samples) - 1))])
        return out
    finally:
        client.close()


def main() -> None:
    """Fill, measure with and without pushdown, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emails", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    binary = find_ferretdb_binary(REPO_ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        data = pathlib.Path(tmp)
        results: dict[str, dict[str, tuple[float, float]]] = {}
        t0 = time.perf_counter()
        with EmbeddedFerretDB(binary=binary, data_dir=data) as db:
            client: MongoClient[Doc] = MongoClient(db.uri)
            _fill(client, args.emails)
            client.close()
            print(f"filled {args.emails} emails in {time.perf_counter() - t0:.0f} s")
            results["pushdown"] = _measure(db, args.repeat)
        off = {"FERRETDB_SQLITE_INDEX_PUSHDOWN": "off"}
        with EmbeddedFerretDB(binary=binary, data_dir=data, environment=off) as db:
            results["upstream"] = _measure(db, max(3, args.repeat // 10))
    print(f"{'query':34} {'upstream p50/p99 ms':>22} {'pushdown p50/p99 ms':>22}")
    for name, (p50, p99) in results["pushdown"].items():
        u50, u99 = results["upstream"][name]
        print(f"{name:34} {u50:10.1f} /{u99:9.1f} {p50:10.1f} /{p99:9.1f}")


if __name__ == "__main__":
    main()
