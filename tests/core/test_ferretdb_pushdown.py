"""The embedded FerretDB's index pushdown (tools/ferretdb/patches/) keeps results exact.

Two FerretDB processes from the same bin/ferretdb hold the same generated corpus and the same
indexes (every IndexSpec the services declare): one plans queries with the local pushdown, the
other with FERRETDB_SQLITE_INDEX_PUSHDOWN=off, i.e. upstream's full scan and FerretDB's own
filtering and sorting. Every query shape the services issue, plus shapes aimed at the edge cases
(mixed types, numbers across int/double, dates, ObjectIds, null, missing fields, arrays), must
return the same documents in the same order. Where MongoDB leaves the order open (no sort, or
ties of a non-unique sort key), the comparison is of what MongoDB does define: the sort keys in
order, the set of documents, and for a limit that every returned document matches.

A second part checks with `explain` that the hot queries are answered from an index.
"""

from __future__ import annotations

import datetime as dt
import pathlib
import random
import re
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from bson import ObjectId
from pymongo import MongoClient
from pymongo.collection import Collection

from services.core.mongo import IndexSpec
from services.domain.repository import INDEXES as DOMAIN_INDEXES
from services.iam.api_keys import INDEXES as API_KEY_INDEXES
from services.mail.relay_health import INDEXES as RELAY_HEALTH_INDEXES
from services.mail.repository import INDEXES as MAIL_INDEXES
from services.smtp.repository import INDEXES as SMTP_INDEXES
from tests.support.ferretdb import ours_and_switched_off

# The indexes the services create (retired ones are dropped, not created).
ALL_INDEXES: tuple[IndexSpec, ...] = tuple(
    spec
    for spec in (
        *MAIL_INDEXES,
        *DOMAIN_INDEXES,
        *API_KEY_INDEXES,
        *SMTP_INDEXES,
        *RELAY_HEALTH_INDEXES,
    )
    if not spec.retired
)
# Every collection a query below runs on gets the same corpus.
COLLECTIONS = sorted({spec.collection for spec in ALL_INDEXES} | {"rate_limit_counters"})
BASE = dt.datetime(2026, 3, 1, tzinfo=dt.UTC).replace(tzinfo=None)
STATUSES = ["queued", "scheduled", "deferred", "sending", "sent", "failed", "pending", "active"]
Doc = dict[str, Any]
LEVELS = ("clean", "mixed", "messy")  # corpus variants, one database each (see `corpus`)


def _date(rng: random.Random) -> dt.datetime:
    # Whole minutes: plenty of ties between documents.
    return BASE + dt.timedelta(minutes=rng.randrange(0, 600))


def _odd(rng: random.Random, *, arrays: bool) -> Any:
    """A value of an unexpected type; arrays and documents only if `arrays`."""
    scalars: list[Any] = [
        1,
        1.0,
        2.5,
        2**60,
        True,
        None,
        ObjectId(rng.randbytes(12)),
        "t1",
        _date(rng),
        int(BASE.timestamp() * 1000),
        "2026-03-01",
    ]
    composite: list[Any] = [["t1", "t2"], [], {"x": 1}, [_date(rng)]]
    return rng.choice(scalars + composite if arrays else scalars)


def corpus(seed: int, size: int, level: str) -> list[Doc]:
    """Documents shaped like the services' (every field any query below uses), mixed types.

    clean: the types the services write, plus null, missing fields (not for `_id`, `created_at`
    and `updated_at`), numbers where strings are expected and ints next to doubles; no arrays in
    indexed fields, so pushdown is used, sorts included (`created_at` and `updated_at`, which
    every email has, are always dates there). mixed: also values of any scalar type
    in any field and `_id`s of several types, no arrays: pushdown is used, sorts must notice
    the mixed types. messy: arrays and documents too: pushdown must notice and step back.
    """
    rng = random.Random(seed)  # noqa: S311 - a reproducible corpus, not secrets
    order = list(range(size))
    rng.shuffle(order)  # insertion (rowid) order differs from _id order
    docs: list[Doc] = []
    for i in order:
        doc: Doc = {"_id": f"id{i:05d}"}
        fields: dict[str, Any] = {
            # "t1\x1ftest": tenant t1's test partition (test mode's emails).
            "tenant_id": rng.choice(["t0", "t1", "t1", "t1\x1ftest", "t2", "t3", 1, 1.0, None]),
            "status": rng.choice(STATUSES),
            "domain_id": f"d{rng.randrange(4)}",
            "recipient_addresses": [f"r{rng.randrange(5)}@x.test"],
            "tags": rng.sample(["a", "b", "c"], rng.randrange(3)),
            "created_at": _date(rng),
            "next_attempt_at": _date(rng),
            "due": _date(rng),
            "expires_at": _date(rng),
            "next_check_at": _date(rng),
            "verification_expires_at": _date(rng),
            "expiresAt": _date(rng),
            "key_hash": f"{rng.randrange(50):040x}",
            "window": f"w:{rng.randrange(4)}",
            "at": _date(rng),
            "n": rng.choice([0, 1, 1.0, -3, 2.5, 2**40]),
            # Test emails (test mode) and the last write their retention counts from.
            "test": rng.choice([True, False, False]),
            "updated_at": _date(rng),
        }
        for name, value in fields.items():
            roll = rng.random()
            if level == "clean" and name in ("created_at", "updated_at"):
                # Every email document has both (written at its insert).
                doc[name] = value
            elif roll < 0.04:
                continue  # missing
            elif roll < 0.07:
                doc[name] = None
            elif level != "clean" and roll < 0.2 and name not in ("recipient_addresses", "tags"):
                doc[name] = _odd(rng, arrays=level == "messy")
            else:
                doc[name] = value
        if level != "clean" and rng.random() < 0.1:
            doc["_id"] = rng.choice(
                [i, float(i) + 0.5, ObjectId(rng.randbytes(12)), BASE + dt.timedelta(i)]
            )
        docs.append(doc)
    return docs


@pytest.fixture(scope="module")
def pair(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[MongoClient[Doc], MongoClient[Doc]]]:
    """Clients of FerretDB with pushdown (first) and without (second), corpora loaded."""
    tmp = tmp_path_factory.mktemp("pushdown")
    with ours_and_switched_off(tmp, {"FERRETDB_SQLITE_INDEX_PUSHDOWN": "off"}) as clients:
        for client in clients:
            for spec in ALL_INDEXES:
                for db_name in LEVELS:
                    client[db_name][spec.collection].create_index(
                        list(spec.keys), name=spec.name, unique=spec.unique, **spec.options
                    )
            for db_name in LEVELS:
                for n, coll in enumerate(COLLECTIONS):
                    docs = corpus(n, 300, db_name)
                    if coll == "api_keys":  # its key_hash index is unique
                        for i, doc in enumerate(docs):
                            doc["key_hash"] = f"{i:040x}"
                    client[db_name][coll].insert_many(docs)
        yield clients


NOW = BASE + dt.timedelta(minutes=300)
Query = tuple[str, Doc, Sequence[tuple[str, int]] | None, int]  # collection, filter, sort, limit


def _queries() -> list[Query]:
    """Every find/count shape the services issue (repository method in the comment)."""
    q: list[Query] = []
    desc, asc = [("_id", -1)], [("_id", 1)]
    for tenant in ("t1", "t1\x1ftest", "t3", 1):
        # MongoEmailRepository.page: every optional filter, first and later pages.
        for extra in (
            {},
            {"_id": {"$lt": "id00200"}},
            {"status": "sent"},
            {"status": "queued", "_id": {"$lt": "id00300"}},
            {"domain_id": "d1"},
            {"status": "sent", "domain_id": "d2"},
            {"recipient_addresses": "r1@x.test"},
            {"tags": "a"},
            {"created_at": {"$gte": BASE + dt.timedelta(minutes=100), "$lt": NOW}},
        ):
            q.append(("emails", {"tenant_id": tenant, **extra}, desc, 20))
            q.append(("emails", {"tenant_id": tenant, **extra}, desc, 500))
        # MongoEmailRepository.queue: count and oldest due.
        due = {"tenant_id": tenant, "status": {"$in": STATUSES[:3]}}
        q.append(("emails", {**due, "next_attempt_at": {"$lte": NOW}}, [("next_attempt_at", 1)], 1))
        q.append(("emails", {**due, "next_attempt_at": {"$lte": NOW}, "domain_id": "d0"}, None, 0))
        # MongoEmailRepository.stats ($match), domain list/count/record_count, API keys.
        q.append(
            ("emails", {"tenant_id": tenant, "created_at": {"$gte": BASE, "$lt": NOW}}, None, 0)
        )
        q.append(("domains", {"tenant_id": tenant}, asc, 20))
        q.append(("domains", {"tenant_id": tenant, "status": "active"}, asc, 20))
        q.append(("domains", {"tenant_id": tenant, "_id": {"$gt": "id00100"}}, asc, 20))
        q.append(("domains", {"tenant_id": tenant, "status": "pending"}, None, 0))
        q.append(("api_keys", {"tenant_id": tenant}, desc, 20))
        q.append(("api_keys", {"tenant_id": tenant, "_id": {"$lt": "id00250"}}, desc, 20))
        # Lookups by _id within a tenant (smtp configs, keyrings, records, domains, API keys).
        for coll in ("smtp_configs", "dkim_keyrings", "auth_records", "domains", "api_keys"):
            q.append((coll, {"_id": "id00007", "tenant_id": tenant}, None, 0))
    q += [
        # The queue poll (claim_batch) and its health; sweepers (as finds, see below).
        ("email_queue", {"due": {"$lte": NOW}}, None, 40),
        ("email_queue", {"due": {"$lte": NOW}, "_id": {"$nin": ["id00001", "id00002"]}}, None, 40),
        ("email_queue", {"due": {"$lte": NOW}}, None, 0),
        ("email_claims", {"created_at": {"$lt": NOW}}, None, 0),
        ("email_idempotency", {"expires_at": {"$lte": NOW}}, None, 0),
        ("rate_limit_counters", {"expiresAt": {"$lt": NOW}}, None, 0),
        ("rate_limit_counters", {"window": {"$in": ["w:1", "w:2"]}}, None, 0),
        # Domain checks (claim_due_check, expire_pending).
        (
            "domains",
            {"status": {"$in": ["active", "pending"]}, "next_check_at": {"$lte": NOW}},
            [("next_check_at", 1)],
            1,
        ),
        ("domains", {"status": "pending", "verification_expires_at": {"$lte": NOW}}, None, 0),
        ("api_keys", {"key_hash": f"{7:040x}"}, None, 0),
        ("api_keys", {"_id": "id00007", "tenant_id": "t1", "revoked_at": None}, None, 0),
        ("domain_claims", {"_id": "id00007", "domain_id": "d1"}, None, 0),
        # DKIM keyring checks (claim_due): due range, oldest first.
        ("dkim_keyrings", {"next_check_at": {"$lte": NOW}}, [("next_check_at", 1)], 1),
        ("emails", {"_id": "id00011"}, None, 0),
        ("email_queue", {"_id": {"$in": ["id00003", "id00004", "nope"]}}, None, 0),
        ("relay_health", {}, None, 100),
        # The test emails' retention sweep (sweep_test): oldest first, 40 at a time.
        ("emails", {"test": True, "updated_at": {"$lt": NOW}}, [("updated_at", 1)], 40),
        # Edge cases: numbers across int/double, dates against ints, null, booleans, $in of
        # mixed types, ranges of each type, sorts on fields with ties and mixed types.
        ("emails", {"tenant_id": 1.0}, desc, 50),
        ("emails", {"tenant_id": {"$gte": 0.5, "$lt": 2}}, None, 0),
        ("emails", {"tenant_id": None}, desc, 50),
        ("emails", {"tenant_id": True}, None, 0),
        ("emails", {"tenant_id": {"$in": ["t1", 1]}}, desc, 50),
        ("emails", {"tenant_id": {"$in": ["t0", "t2"]}}, desc, 50),
        ("emails", {"tenant_id": {"$gt": "t1"}}, asc, 0),
        (
            "emails",
            {"tenant_id": {"$eq": "t2"}, "_id": {"$gte": "id00100", "$lte": "id00300"}},
            asc,
            0,
        ),
        ("emails", {"tenant_id": "t2", "_id": {"$gt": 5}}, asc, 0),
        (
            "emails",
            {"created_at": {"$gt": BASE + dt.timedelta(minutes=500)}},
            [("created_at", -1)],
            0,
        ),
        ("emails", {"created_at": {"$gte": int(BASE.timestamp() * 1000)}}, None, 0),
        ("emails", {"tenant_id": "t1"}, [("created_at", 1)], 30),
        ("emails", {"tenant_id": "t1"}, [("created_at", -1)], 0),
        ("emails", {}, [("_id", 1)], 25),
        ("emails", {}, [("_id", -1)], 0),
        (
            "emails",
            {"status": "sent", "next_attempt_at": {"$lt": NOW}},
            [("next_attempt_at", -1)],
            0,
        ),
    ]
    return q


def _key(value: Any) -> str:
    return repr(value)


def _sort_values(docs: list[Doc], sort: Sequence[tuple[str, int]]) -> list[Any]:
    return [[d.get(f) for f, _ in sort] for d in docs]


def _run(client: MongoClient[Doc], db: str, query: Query) -> list[Doc]:
    coll, flt, sort, limit = query
    cursor = client[db][coll].find(flt)
    if sort:
        cursor = cursor.sort(list(sort))
    return list(cursor.limit(limit))


@pytest.mark.parametrize("db", LEVELS)
def test_every_service_query_returns_the_same_documents_in_the_same_order(
    pair: tuple[MongoClient[Doc], MongoClient[Doc]], db: str
) -> None:
    on, off = pair
    for query in _queries():
        coll, flt, sort, limit = query
        got, want = _run(on, db, query), _run(off, db, query)
        label = f"{db}.{coll} {flt} sort={sort} limit={limit}"
        everything = _run(off, db, (coll, flt, sort, 0))
        assert len(got) == len(want), label
        assert on[db][coll].count_documents(flt) == len(everything), label
        unique_order = sort is not None and sort[-1][0] == "_id"
        if unique_order:
            assert got == want, label
            continue
        if sort:
            # Ties of a non-unique key come in any order (MongoDB does not define it).
            assert _sort_values(got, sort) == _sort_values(want, sort), label
        if limit == 0 or len(everything) <= limit:
            assert sorted(map(_key, got)) == sorted(map(_key, want)), label
        else:
            allowed = {_key(d) for d in everything}
            assert all(_key(d) in allowed for d in got), label


@pytest.mark.parametrize("db", LEVELS)
def test_aggregate_and_writes_agree(
    pair: tuple[MongoClient[Doc], MongoClient[Doc]], db: str
) -> None:
    on, off = pair
    stats: list[Doc] = [
        {"$match": {"tenant_id": "t1", "created_at": {"$gte": BASE, "$lt": NOW}}},
        {"$group": {"_id": {"d": "$domain_id", "s": "$status"}, "n": {"$sum": 1}}},
    ]
    by_status: list[Doc] = [{"$group": {"_id": "$status", "n": {"$sum": 1}}}]
    pipelines: list[tuple[str, list[Doc]]] = [("emails", stats), ("domains", by_status)]
    for coll, pipeline in pipelines:
        got = sorted(map(_key, on[db][coll].aggregate(pipeline)))
        assert got == sorted(map(_key, off[db][coll].aggregate(pipeline))), pipeline
    # Sweepers and bulk updates (delete_many/update_many), then the whole collections.
    writes: list[tuple[str, str, Doc, Doc | None]] = [
        ("email_claims", "delete", {"created_at": {"$lt": BASE + dt.timedelta(minutes=60)}}, None),
        ("email_idempotency", "delete", {"expires_at": {"$lte": NOW}}, None),
        ("rate_limit_counters", "delete", {"expiresAt": {"$lt": NOW}}, None),
        ("email_queue", "delete", {"_id": {"$in": ["id00003", "id00009", "x"]}}, None),
        (
            "domains",
            "update",
            {"status": "pending", "verification_expires_at": {"$lte": NOW}},
            {"$set": {"status": "expired"}, "$inc": {"version": 1}},
        ),
    ]
    for coll, kind, flt, update in writes:
        counts = []
        for client in (on, off):
            c: Collection[Doc] = client[db][coll]
            if kind == "delete":
                counts.append(c.delete_many(flt).deleted_count)
            else:
                assert update is not None
                counts.append(c.update_many(flt, update).modified_count)
        assert counts[0] == counts[1], (coll, flt)
        assert sorted(map(_key, on[db][coll].find())) == sorted(map(_key, off[db][coll].find()))


# The hot queries: (collection, filter, sort, index that must serve it, sort served by it).
HOT: list[tuple[str, Doc, Doc | None, str, bool]] = [
    ("emails", {"tenant_id": "t1"}, {"_id": -1}, "tenant_newest", True),
    ("emails", {"tenant_id": "t1", "_id": {"$lt": "id00200"}}, {"_id": -1}, "tenant_newest", True),
    ("emails", {"tenant_id": "t1", "status": "sent"}, {"_id": -1}, "tenant_status_newest", True),
    ("emails", {"tenant_id": "t1", "domain_id": "d1"}, {"_id": -1}, "tenant_domain_newest", True),
    (
        "emails",
        {
            "tenant_id": "t1",
            "status": {"$in": ["queued", "deferred"]},
            "next_attempt_at": {"$lte": NOW},
        },
        None,
        "tenant_due",
        False,
    ),
    (
        "emails",
        {"tenant_id": "t1", "created_at": {"$gte": BASE, "$lt": NOW}},
        None,
        "tenant_created",
        False,
    ),
    ("emails", {"test": True, "updated_at": {"$lt": NOW}}, {"updated_at": 1}, "test_age", True),
    # A tenant's test partition (test mode) is listed like any tenant.
    ("emails", {"tenant_id": "t1\x1ftest"}, {"_id": -1}, "tenant_newest", True),
    ("email_queue", {"due": {"$lte": NOW}, "_id": {"$nin": ["id00001"]}}, None, "queue_due", False),
    ("email_claims", {"created_at": {"$lt": NOW}}, None, "claim_age", False),
    ("email_idempotency", {"expires_at": {"$lte": NOW}}, None, "idempotency_expiry", False),
    ("domains", {"tenant_id": "t1"}, {"_id": 1}, "tenant_list", True),
    ("domains", {"tenant_id": "t1", "status": "active"}, {"_id": 1}, "tenant_status_list", True),
    (
        "domains",
        {"status": {"$in": ["active"]}, "next_check_at": {"$lte": NOW}},
        None,
        "due_checks",
        False,
    ),
    (
        "domains",
        {"status": "pending", "verification_expires_at": {"$lte": NOW}},
        None,
        "expiry",
        False,
    ),
    ("api_keys", {"tenant_id": "t1"}, {"_id": -1}, "tenant_keys", True),
    ("api_keys", {"key_hash": f"{7:040x}"}, None, "key_hash_lookup", False),
    # Multikey indexes (side tables, one row per array element; the plan names the side
    # table's index): ListEmails by tag and by recipient, first and later pages.
    ("emails", {"tenant_id": "t1", "tags": "a"}, {"_id": -1}, "tenant_tag_newest_multikey", True),
    (
        "emails",
        {"tenant_id": "t1", "tags": "b", "_id": {"$lt": "id00200"}},
        {"_id": -1},
        "tenant_tag_newest_multikey",
        True,
    ),
    (
        "emails",
        {"tenant_id": "t1", "recipient_addresses": "r1@x.test"},
        {"_id": -1},
        "tenant_recipient_newest_multikey",
        True,
    ),
]


@pytest.mark.parametrize(("coll", "flt", "sort", "index", "sorted_"), HOT)
def test_hot_queries_use_an_index(
    pair: tuple[MongoClient[Doc], MongoClient[Doc]],
    coll: str,
    flt: Doc,
    sort: Doc | None,
    index: str,
    sorted_: bool,
) -> None:
    on, off = pair
    command: Doc = {"find": coll, "filter": flt, "limit": 20}
    if sort:
        command["sort"] = sort
    plan = on["clean"].command("explain", command)
    lines = " ".join(plan["queryPlanner"]["Plan"])
    found = re.search(r"USING (?:COVERING )?INDEX (\S+)", lines)
    used = found.group(1) if found else ""
    # A multikey index is searched through its side table's index (<index>_side_key).
    assert re.search(rf"_{index}(_side_key)?$", used), lines
    assert "SCAN" not in lines, lines
    assert "TEMP B-TREE" not in lines, lines
    assert plan["filterPushdown"] is True
    assert plan["sortPushdown"] is sorted_
    # The reference process plans the same query as upstream: a scan of the table.
    reference = " ".join(off["clean"].command("explain", command)["queryPlanner"]["Plan"])
    assert "SCAN" in reference, reference


def test_declaring_the_indexes_again_changes_nothing(
    pair: tuple[MongoClient[Doc], MongoClient[Doc]],
) -> None:
    # Services declare their indexes at every start-up; the build re-creates only indexes of an
    # older form, so a second declaration keeps the indexes, their plans and the results.
    on, _ = pair
    db = on["clean"]
    before = {name: sorted(i["name"] for i in db[name].list_indexes()) for name in COLLECTIONS}
    query: Query = ("emails", {"tenant_id": "t1"}, [("_id", -1)], 20)
    first = _run(on, "clean", query)
    for spec in ALL_INDEXES:
        db[spec.collection].create_index(
            list(spec.keys), name=spec.name, unique=spec.unique, **spec.options
        )
    after = {name: sorted(i["name"] for i in db[name].list_indexes()) for name in COLLECTIONS}
    assert after == before
    assert _run(on, "clean", query) == first
    plan = db.command(
        "explain", {"find": "emails", "filter": {"tenant_id": "t1"}, "sort": {"_id": -1}}
    )
    assert plan["sortPushdown"] is True


def _element(rng: random.Random) -> Any:
    """A value for the multikey corpus's array field: what arrays and scalars may hold."""
    return rng.choice(
        [
            "x",
            "y",
            "z",
            "",
            1,
            1.0,
            2,
            True,
            None,
            ObjectId(b"\x01" * 12),
            BASE,
            {"k": "x"},
        ]
    )


def multikey_corpus(seed: int, size: int) -> list[Doc]:
    """Documents for the multikey index's test, mixed in every way it must handle.

    `arr` is an array (with repeats, mixed types, empty), a scalar, an object, null or
    missing; `g` is a group (once an array); `_id`s are mostly strings.
    """
    rng = random.Random(seed)  # noqa: S311 - a reproducible corpus, not secrets
    docs: list[Doc] = []
    for i in range(size):
        doc: Doc = {"_id": f"m{i:04d}" if rng.random() < 0.9 else rng.choice([i, float(i)])}
        doc["g"] = rng.choice(["g1", "g2", "g1", ["g1", "g2"], 3])
        roll = rng.random()
        if roll < 0.55:
            doc["arr"] = [_element(rng) for _ in range(rng.randrange(0, 5))]
        elif roll < 0.85:
            doc["arr"] = _element(rng)
        elif roll < 0.95:
            doc["arr"] = {"x": 1}
        docs.append(doc)  # the rest: no `arr` at all
    return docs


# Group g9 holds only string `_id`s, so its sorted queries can be served by the side table
# (the other groups' mixed `_id` types make the planner step back, which must be exact too).
# One of them holds "z" from the start, so that the side table has rows for "z" before the
# updates below push "z" onto others: a query for "z" then shows whether the triggers kept up.
G9 = [
    {"_id": f"n{i:03d}", "g": "g9", "arr": ["z"] if i == 29 else ["x", "y", "x"] if i % 3 else "x"}
    for i in range(30)
]


MULTIKEY_QUERIES: list[tuple[Doc, Sequence[tuple[str, int]] | None]] = [
    (flt, sort)
    for value in ("x", "y", "z", "", 1, 2.0, True, ObjectId(b"\x01" * 12), BASE, "absent")
    for flt, sort in (
        ({"g": "g9", "arr": value}, [("_id", -1)]),
        ({"g": "g9", "arr": value, "_id": {"$gte": "n010"}}, [("_id", 1)]),
        ({"g": "g1", "arr": value}, [("_id", -1)]),
        ({"g": "g2", "arr": value}, [("_id", 1)]),
        ({"g": "g1", "arr": value, "_id": {"$lt": "m0150"}}, [("_id", -1)]),
        ({"g": "g1", "arr": value}, None),
        ({"arr": value}, [("_id", -1)]),
    )
] + [
    ({"g": "g1", "arr": {"$in": ["x", "y"]}}, [("_id", -1)]),
    ({"g": "g1", "arr": {"$gt": "x"}}, [("_id", -1)]),
    ({"g": "g1", "arr": None}, [("_id", -1)]),
    ({"g": "g1", "arr": {"$exists": False}}, [("_id", -1)]),
    ({"g": "g1"}, [("_id", -1)]),
    ({"g": "g1", "arr": "x", "_id": "m0007"}, None),
]


def test_multikey_indexes_return_what_upstream_returns(tmp_path: pathlib.Path) -> None:
    # An index named *_multikey is a side table with a row per array element on the embedded
    # database. Arrays with repeats, mixed types and empty ones, scalars, objects, null and
    # missing values, an array in the leading field too, `_id`s of several types: every query
    # returns the documents and order of the reference (FerretDB's own filtering over a scan),
    # before and after updates that change or keep the array and deletes (the triggers).
    with ours_and_switched_off(tmp_path, {"FERRETDB_SQLITE_INDEX_PUSHDOWN": "off"}) as (on, off):
        for client in (on, off):
            coll = client["multikey"]["docs"]
            # Before the index (its creation fills the side table) and after (the insert
            # trigger): g9, which the plan serves, has documents of both.
            coll.insert_many([*multikey_corpus(7, 200), *G9[:15]])
            coll.create_index([("g", 1), ("arr", 1), ("_id", -1)], name="g_arr_multikey")
            # And one of a single field (its update trigger's guard compares one value).
            coll.create_index([("arr", 1)], name="arr_multikey")
            coll.insert_many(G9[15:])

        def compare(stage: str) -> None:
            for flt, sort in MULTIKEY_QUERIES:
                got, want = (
                    _run(client, "multikey", ("docs", flt, sort, 0)) for client in (on, off)
                )
                if sort:
                    assert got == want, (stage, flt, sort)
                else:
                    assert sorted(map(repr, got)) == sorted(map(repr, want)), (stage, flt)
            plan = on["multikey"].command(
                "explain", {"find": "docs", "filter": {"g": "g9", "arr": "x"}, "sort": {"_id": -1}}
            )
            assert "g_arr_multikey_side_key" in " ".join(plan["queryPlanner"]["Plan"]), stage
            plan = on["multikey"].command("explain", {"find": "docs", "filter": {"arr": "z"}})
            assert "arr_multikey_side_key" in " ".join(plan["queryPlanner"]["Plan"]), stage

        compare("inserted")
        for client in (on, off):
            coll = client["multikey"]["docs"]
            coll.update_many({"g": "g2"}, {"$set": {"arr": ["x", 2]}})  # the array changes
            coll.update_many({"g": "g1"}, {"$set": {"other": 1}})  # other fields only
            coll.update_many({"g": "g9", "arr": "y"}, {"$push": {"arr": "z"}})
            coll.delete_many({"arr": ""})
            coll.update_one({"_id": "n003"}, {"$unset": {"arr": ""}})
            coll.update_one({"_id": "n004"}, {"$set": {"arr": ["z"]}})
        compare("updated")
        assert _run(on, "multikey", ("docs", {"g": "g2", "arr": 2}, [("_id", 1)], 0))
