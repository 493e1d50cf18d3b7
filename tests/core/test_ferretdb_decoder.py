"""The embedded FerretDB's one-pass document decoder returns exactly what upstream's returns.

tools/ferretdb/patches/sjson_fast_unmarshal.go decodes stored documents in one pass and
declines (handing the text to upstream's decoder) whenever it is not sure. Two FerretDB
processes from the same bin/ferretdb, one with FERRETDB_SJSON_FAST_DECODE=off (upstream's
decoder for every row), hold the same generated corpus: every BSON type FerretDB 1.24 stores,
nested documents and arrays, empty ones, strings with escapes, HTML characters, control
characters, astral-plane characters and the JSON separators U+2028/U+2029, integer and double
extremes. Every document must come back byte for byte the same from both, and equal to what was
written; so must the documents an update rewrote and what filters select.
"""

from __future__ import annotations

import datetime as dt
import pathlib
import random
from collections.abc import Iterator
from typing import Any

import bson
import pytest
from bson import Binary, Int64, ObjectId, Regex, Timestamp
from bson.raw_bson import RawBSONDocument
from pymongo import MongoClient

from services.core.embedded_db import EmbeddedFerretDB, find_ferretdb_binary

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
DATABASE = "decoder"

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


def _start(tmp: pathlib.Path, name: str, environment: dict[str, str]) -> EmbeddedFerretDB:
    data = tmp / name
    data.mkdir()
    db = EmbeddedFerretDB(
        binary=find_ferretdb_binary(REPO_ROOT), data_dir=data, environment=environment
    )
    db.start()
    return db


@pytest.fixture(scope="module")
def pair(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[MongoClient[RawBSONDocument], MongoClient[RawBSONDocument]]]:
    """Raw-BSON clients of FerretDB with the one-pass decoder (first) and without (second)."""
    tmp = tmp_path_factory.mktemp("decoder")
    fast = _start(tmp, "fast", {})
    upstream = _start(tmp, "upstream", {"FERRETDB_SJSON_FAST_DECODE": "off"})
    clients: list[MongoClient[RawBSONDocument]] = [
        MongoClient(db.uri, document_class=RawBSONDocument) for db in (fast, upstream)
    ]
    try:
        docs = [RawBSONDocument(bson.encode(doc)) for doc in corpus(600)]
        for client in clients:
            client[DATABASE]["docs"].insert_many(docs)
        yield clients[0], clients[1]
    finally:
        for client in clients:
            client.close()
        fast.stop()
        upstream.stop()


def _raw(client: MongoClient[RawBSONDocument], query: dict[str, Any]) -> list[bytes]:
    return [bytes(doc.raw) for doc in client[DATABASE]["docs"].find(query).sort("_id", 1)]


def test_every_document_comes_back_byte_for_byte_as_upstream_decodes_it(
    pair: tuple[MongoClient[RawBSONDocument], MongoClient[RawBSONDocument]],
) -> None:
    fast, upstream = pair
    from_fast, from_upstream = _raw(fast, {}), _raw(upstream, {})
    assert len(from_fast) == 600
    assert from_fast == from_upstream


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
