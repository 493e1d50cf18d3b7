"""The embedded FerretDB's row-level local changes return exactly what upstream's code returns.

Five local changes to how FerretDB reads and writes rows have a switch back to upstream's code:
the one-pass decoder of stored documents (tools/ferretdb/patches/sjson_fast_unmarshal.go,
FERRETDB_SJSON_FAST_DECODE=off), the per-connection cache of compiled write statements
(sqlite_stmt_cache.go, FERRETDB_SQLITE_STMT_CACHE=off), the update commands whose statements
on distinct ``_id`` values are written in one transaction (handler_batched_update.go,
FERRETDB_BATCHED_UPDATES=off), concurrent writes sharing a transaction, each in its own
savepoint (fsql_group_commit.go, FERRETDB_GROUP_COMMIT=off) and exclusion projections of
top-level fields built without copying the documents (handler_exclusion_projection.go,
FERRETDB_FAST_EXCLUSION=off). Two FerretDB processes from the
same bin/ferretdb, ours and one with all five switched off, hold the same generated corpus: every
BSON type FerretDB 1.24 stores, nested documents and arrays, empty ones, strings with escapes, HTML
characters, control characters, astral-plane characters and the JSON separators U+2028/U+2029,
integer and double extremes. Every document must come back byte for byte the same from both,
and equal to what was written; so must what writes report (counts, duplicate-key errors) and
the documents they leave.
"""

from __future__ import annotations

import datetime as dt
import random
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import bson
import pytest
from bson import Binary, Int64, ObjectId, Regex, Timestamp
from bson.raw_bson import RawBSONDocument
from pymongo import MongoClient, UpdateOne
from pymongo.errors import DuplicateKeyError, OperationFailure

from tests.support.ferretdb import ours_and_switched_off

DATABASE = "decoder"
# "[collection.go:194 sqlite.(*collection).UpdateAll.func1] " in an internal error's message.
SOURCE_LOCATIONS = re.compile(r"\[[\w.]+\.go:\d+ [^\]]*\] ")

STRINGS = [
    "",
    "plain",
    "héllo wörld",
    "<b>&amp;</b> <script>",
    'quote " and back\\slash',
    "tab\tnewline\ncontrol\x01\x1f",
    "emoji 😀 and 𝄞",
    "line\u2028paragraph\u2029",
    "/slashes/",
    "\x7f delete",
    "日本語のテキスト",
]


def _string(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return rng.choice(STRINGS)
    alphabet = [chr(rng.randrange(0x20, 0x7F)) for _ in range(8)] + [
        chr(rng.randrange(0xA0, 0xD7FF)),
        chr(rng.randrange(0x10000, 0x10FFFF)),
        chr(rng.randrange(0x01, 0x20)),
    ]
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 24)))


def _value(rng: random.Random, depth: int, *, in_array: bool = False) -> Any:
    # FerretDB 1.24 refuses arrays directly inside arrays ("nested arrays are not supported").
    kinds = 13 if depth < 3 and not in_array else 12 if depth < 3 else 11
    kind = rng.randrange(kinds)
    if kind == 0:
        return rng.choice([0.0, -0.0, 1.5, -1e300, 5e-324, 1.7976931348623157e308, 1e21, 1e-7])
    if kind == 1:
        return _string(rng)
    if kind == 2:
        return Binary(_string(rng).encode(), rng.choice([0, 1, 5, 0x80, 0xFF]))
    if kind == 3:
        return ObjectId(bytes(rng.randrange(256) for _ in range(12)))
    if kind == 4:
        return rng.random() < 0.5
    if kind == 5:
        return dt.datetime(1960, 1, 1) + dt.timedelta(milliseconds=rng.randrange(2**41))
    if kind == 6:
        return None
    if kind == 7:
        return Regex(_string(rng), rng.choice(["", "i", "imsx"]))
    if kind == 8:
        return rng.choice([0, 1, -1, 2**31 - 1, -(2**31)])
    if kind == 9:
        return Timestamp(rng.randrange(2**32), rng.randrange(2**32))
    if kind == 10:
        return Int64(rng.choice([0, 2**53, 2**63 - 1, -(2**63), -5]))
    if kind == 11:
        return _document(rng, depth + 1)
    return [_value(rng, depth + 1, in_array=True) for _ in range(rng.randrange(0, 5))]


def _document(rng: random.Random, depth: int) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for _ in range(rng.randrange(0, 7)):
        # Keys: what a stored document may hold (FerretDB refuses "$" prefixes and dots).
        key = _string(rng).replace("$", "").replace(".", "") or "k"
        doc[key] = _value(rng, depth)
    return doc


def corpus(count: int) -> list[dict[str, Any]]:
    """`count` generated documents with ids 0..count-1 and a `group` field to filter on."""
    rng = random.Random(20261205)  # noqa: S311 - reproducible test data
    docs = []
    for i in range(count):
        # Top-level keys plain: upstream's Marshal writes them unescaped (a quote or a control
        # character there makes the row malformed JSON and the insert fails, fast path or not).
        top = {f"f{rng.randrange(40)}": _value(rng, 0) for _ in range(rng.randrange(0, 7))}
        docs.append({"_id": i, "group": i % 7, **top, "nested": _document(rng, 1)})
    return docs


@pytest.fixture(scope="module")
def pair(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[MongoClient[RawBSONDocument], MongoClient[RawBSONDocument]]]:
    """Raw-BSON clients of FerretDB as we build it (first) and with its row changes off."""
    switches = {
        "FERRETDB_SJSON_FAST_DECODE": "off",
        "FERRETDB_SQLITE_STMT_CACHE": "off",
        "FERRETDB_BATCHED_UPDATES": "off",
        "FERRETDB_GROUP_COMMIT": "off",
        "FERRETDB_FAST_EXCLUSION": "off",
    }
    tmp = tmp_path_factory.mktemp("rows")
    with ours_and_switched_off(tmp, switches, document_class=RawBSONDocument) as clients:
        docs = [RawBSONDocument(bson.encode(doc)) for doc in corpus(600)]
        for client in clients:
            client[DATABASE]["docs"].insert_many(docs)
        yield clients


def _raw(
    client: MongoClient[RawBSONDocument], query: dict[str, Any], collection: str = "docs"
) -> list[bytes]:
    """The raw BSON of the documents matching `query`, in `_id` order."""
    return [bytes(doc.raw) for doc in client[DATABASE][collection].find(query).sort("_id", 1)]


def test_every_document_comes_back_byte_for_byte_as_upstream_decodes_it(
    pair: tuple[MongoClient[RawBSONDocument], MongoClient[RawBSONDocument]],
) -> None:
    fast, upstream = pair
    from_fast, from_upstream = _raw(fast, {}), _raw(upstream, {})
    assert len(from_fast) == 600
    assert from_fast == from_upstream


# Exclusions of top-level fields (the fast path: with and without _id, absent fields, every
# field of some documents), then projections the fast path leaves to upstream's code (dotted
# paths, inclusion, _id alone kept).
PROJECTIONS: list[dict[str, Any]] = [
    {"f1": 0},
    {"f1": False, "f2": 0, "nested": 0},
    {"_id": 0},
    {"_id": 0, "f3": 0, "group": 0},
    {"_id": 1, "f4": 0},
    {"_id": True, "absent": 0},
    {f"f{i}": 0 for i in range(40)} | {"nested": 0, "group": 0},
    {"nested.x": 0, "f5": 0},
    {"f6": 1, "group": 1},
    {"_id": 1},
]


def test_projections_return_what_upstream_returns(
    pair: tuple[MongoClient[RawBSONDocument], MongoClient[RawBSONDocument]],
) -> None:
    fast, upstream = pair
    for projection in PROJECTIONS:
        for query in ({}, {"group": 4}, {"_id": {"$in": [3, 17, 599, 1000]}}):
            found = [
                [
                    bytes(doc.raw)
                    for doc in c[DATABASE]["docs"].find(query, projection).sort("_id", 1)
                ]
                for c in (fast, upstream)
            ]
            assert found[0] == found[1], (projection, query)
            assert found[0], (projection, query)  # the comparison saw documents
    # Every document's other fields in order, _id first: what the services' API reads rely on.
    first = fast[DATABASE]["docs"].find_one({"_id": 1}, {"group": 0})
    assert first is not None
    assert next(iter(first.keys())) == "_id"
    assert "group" not in first


def test_what_was_written_is_what_is_read(
    pair: tuple[MongoClient[RawBSONDocument], MongoClient[RawBSONDocument]],
) -> None:
    fast, _ = pair
    written = corpus(600)
    read = [
        dict(doc.items())
        for doc in fast[DATABASE]["docs"].find({}).sort("_id", 1)  # decoded by pymongo
    ]
    assert [_plain(doc) for doc in read] == [_plain(doc) for doc in written]


def test_filters_and_updates_agree(
    pair: tuple[MongoClient[RawBSONDocument], MongoClient[RawBSONDocument]],
) -> None:
    fast, upstream = pair
    for client in (fast, upstream):
        docs = client[DATABASE]["docs"]
        docs.update_many({"group": 3}, {"$set": {"touched": "<é>\n😀"}, "$inc": {"n": 1}})
        docs.update_one({"_id": 10}, {"$push": {"list": {"nested": [1, "two", None]}}})
        docs.delete_many({"group": 5})
    for query in ({"group": 3}, {"group": {"$in": [1, 2]}}, {"touched": {"$exists": True}}, {}):
        assert _raw(fast, query) == _raw(upstream, query), query
    assert len(_raw(fast, {"group": 5})) == 0


def test_writes_report_the_same_counts_and_errors(
    pair: tuple[MongoClient[RawBSONDocument], MongoClient[RawBSONDocument]],
) -> None:
    # The same statements run many times (the cache's case), with a unique index violated by
    # an insert and by an update in between: every answer and every error alike.
    def story(client: MongoClient[RawBSONDocument]) -> list[Any]:
        coll = client[DATABASE]["writes"]
        coll.create_index("email", unique=True)
        told: list[Any] = []
        for round_ in range(3):
            for i in range(30):
                try:
                    doc = {"_id": f"{round_}-{i}", "email": f"u{i % 25}@x", "n": i}
                    coll.insert_one(RawBSONDocument(bson.encode(doc)))
                    told.append("inserted")
                except DuplicateKeyError as exc:
                    told.append(("duplicate", exc.code))
            result = coll.update_many({"n": {"$lt": 10}}, {"$inc": {"seen": 1}})
            told.append((result.matched_count, result.modified_count))
            try:
                coll.update_one({"_id": f"{round_}-1"}, {"$set": {"email": "u2@x"}})
                told.append("updated")
            except OperationFailure as exc:  # FerretDB 1.24 reports this one as InternalError
                told.append((type(exc).__name__, exc.code, str(exc)))
            told.append(coll.delete_many({"n": {"$gte": 20}}).deleted_count)
        told.append(_raw(client, {}))
        told.append(_raw(client, {}, "writes"))
        return told

    ours, theirs = story(pair[0]), story(pair[1])
    assert ours == theirs
    assert ("duplicate", 11000) in ours


def test_update_commands_of_many_statements_end_as_upstream_ends_them(
    pair: tuple[MongoClient[RawBSONDocument], MongoClient[RawBSONDocument]],
) -> None:
    # One update command per bulk_write. Batched (each statement names its own string _id):
    # all well; an update that cannot apply in the middle ($inc on a string); a unique index
    # violated in the middle (the combined write fails and is redone one by one); unordered;
    # a statement matching nothing. Not batched (upstream's way in both): a repeated _id, an
    # upsert, a filter without _id. Each must answer and leave the documents as upstream does.
    def story(client: MongoClient[RawBSONDocument]) -> list[Any]:
        coll = client[DATABASE]["bulk"]
        coll.create_index("email", unique=True)
        coll.insert_many(
            [
                RawBSONDocument(bson.encode({"_id": f"e{i}", "email": f"u{i}@x", "n": i, "s": "t"}))
                for i in range(12)
            ]
        )

        def ids(*numbers: int) -> list[str]:
            return [f"e{i}" for i in numbers]

        commands: list[tuple[list[UpdateOne], bool]] = [
            ([UpdateOne({"_id": i}, {"$inc": {"n": 100}}) for i in ids(0, 1, 2, 3)], True),
            (
                [
                    UpdateOne({"_id": "e4"}, {"$set": {"a": 1}}),
                    UpdateOne({"_id": "e5"}, {"$inc": {"s": 1}}),  # cannot apply
                    UpdateOne({"_id": "e6"}, {"$set": {"a": 1}}),
                ],
                True,
            ),
            (
                [
                    UpdateOne({"_id": "e7"}, {"$set": {"a": 2}}),
                    UpdateOne({"_id": "e8"}, {"$set": {"email": "u0@x"}}),  # unique index
                    UpdateOne({"_id": "e9"}, {"$set": {"a": 2}}),
                ],
                True,
            ),
            (
                [
                    UpdateOne({"_id": "e10", "n": 10}, {"$set": {"b": [1, "two"]}}),
                    UpdateOne({"_id": "nope"}, {"$set": {"b": 1}}),
                    UpdateOne({"_id": "e11", "n": {"$gt": 100}}, {"$set": {"b": 2}}),
                ],
                False,
            ),
            ([UpdateOne({"_id": "e0"}, {"$inc": {"n": 1}})] * 3, True),
            (
                [
                    UpdateOne({"_id": "e1"}, {"$inc": {"n": 1}}),
                    UpdateOne({"_id": "new"}, {"$set": {"n": 0}}, upsert=True),
                ],
                True,
            ),
            (
                [
                    UpdateOne({"email": "u2@x"}, {"$inc": {"n": 1}}),
                    UpdateOne({"_id": "e3"}, {"$inc": {"n": 1}}),
                ],
                True,
            ),
        ]
        told: list[Any] = []
        for requests, ordered in commands:
            try:
                result = coll.bulk_write(requests, ordered=ordered)
                told.append(
                    (result.matched_count, result.modified_count, sorted(result.upserted_ids or {}))
                )
            except OperationFailure as exc:
                # An internal error's text starts with FerretDB's source locations, which
                # differ by path (the deferred write fails in flush); the rest must not.
                told.append((type(exc).__name__, exc.code, SOURCE_LOCATIONS.sub("", str(exc))))
            except KeyError as exc:
                # FerretDB 1.24 answers some failed statements without nModified, which
                # PyMongo's bulk_write trips over (upstream behaviour, both processes alike).
                told.append(("KeyError", str(exc)))
            told.append(_raw(client, {}, "writes"))
        return told

    ours, theirs = story(pair[0]), story(pair[1])
    assert ours == theirs
    assert any(isinstance(entry, tuple) and isinstance(entry[0], str) for entry in ours)


def test_concurrent_writes_end_as_upstream_ends_them(
    pair: tuple[MongoClient[RawBSONDocument], MongoClient[RawBSONDocument]],
) -> None:
    # Eight clients at once (so their writes share transactions in ours), each on documents of
    # its own, so that the outcome does not depend on the interleaving: inserts, an unordered
    # insert_many with _ids already taken in the middle, a unique index violated by an insert
    # and by an update, updates, deletes. Every answer and the documents left must be the same
    # as upstream's, where each write was a transaction of its own.
    def client_story(client: MongoClient[RawBSONDocument], n: int) -> list[Any]:
        coll = client[DATABASE]["concurrent"]
        told: list[Any] = []
        for round_ in range(15):
            base = f"c{n}-{round_}"
            docs = [
                {"_id": f"{base}-{i}", "owner": n, "i": i, "email": f"{base}-{i}@x"}
                for i in range(4)
            ]
            told.append(
                coll.insert_many([RawBSONDocument(bson.encode(d)) for d in docs]).acknowledged
            )
            again = [{"_id": f"{base}-new"}, {"_id": f"{base}-1"}, {"_id": f"{base}-new2"}]
            try:
                coll.insert_many([RawBSONDocument(bson.encode(d)) for d in again], ordered=False)
                told.append("inserted")
            except OperationFailure as exc:
                details = getattr(exc, "details", None) or {}
                told.append(("bulk", details.get("nInserted"), len(details.get("writeErrors", []))))
            try:
                coll.insert_one(
                    RawBSONDocument(bson.encode({"_id": f"{base}-dup", "email": f"{base}-0@x"}))
                )
                told.append("inserted")
            except DuplicateKeyError as exc:
                told.append(("duplicate", exc.code))
            try:
                coll.update_one({"_id": f"{base}-2"}, {"$set": {"email": f"{base}-3@x"}})
                told.append("updated")
            except OperationFailure as exc:
                told.append((type(exc).__name__, exc.code))
            result = coll.update_many({"owner": n, "i": {"$lt": 2}}, {"$inc": {"seen": 1}})
            told.append((result.matched_count, result.modified_count))
            told.append(
                coll.delete_many({"_id": {"$in": [f"{base}-3", f"{base}-new"]}}).deleted_count
            )
        return told

    def story(client: MongoClient[RawBSONDocument]) -> list[Any]:
        client[DATABASE]["concurrent"].create_index("email", unique=True)
        with ThreadPoolExecutor(8) as pool:
            told = list(pool.map(lambda n: client_story(client, n), range(8)))
        return [told, _raw(client, {}, "concurrent")]

    ours, theirs = story(pair[0]), story(pair[1])
    assert ours == theirs
    assert ("duplicate", 11000) in ours[0][0]


def _plain(value: Any) -> Any:
    """Comparable form: datetimes to BSON's milliseconds, regexes and binaries as read."""
    if isinstance(value, dict | RawBSONDocument):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, dt.datetime):
        return value.replace(tzinfo=None, microsecond=value.microsecond // 1000 * 1000)
    if isinstance(value, Regex):
        return ("regex", value.pattern, value.flags)
    if isinstance(value, Binary) and value.subtype == 0:
        return bytes(value)  # pymongo reads subtype 0 as bytes
    return value
