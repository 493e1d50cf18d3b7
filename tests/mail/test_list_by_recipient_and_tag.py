"""ListEmails by recipient or tag, served by multikey indexes on the emails' arrays.

The pages must be exactly the emails whose array holds the address or tag (MongoDB semantics,
newest first), for every combination with the other filters and across pages; a page is one
read; emails stored before the indexes existed are found once they are created; the lookup
documents earlier versions kept are dropped.
"""

from __future__ import annotations

import itertools
from datetime import timedelta
from typing import Any

from azora.mail.v1 import mail_pb2
from pymongo import AsyncMongoClient, monitoring

from services.core.mongo import ensure_indexes
from services.mail.app import build_app
from services.mail.models import EmailFilter, EmailStatus
from services.mail.repository import EMAILS, INDEXES, RETIRED_COLLECTIONS, MongoEmailRepository
from tests.conftest import Tenant
from tests.mail.conftest import START, LocalMail

E = mail_pb2


async def expected(
    mail: LocalMail, tenant: Tenant, query: dict[str, Any], limit: int = 1000
) -> list[str]:
    """Ids the filter selects, newest first, decided here from every email of the tenant.

    Not a database query: the listing runs the same query, so the expectation applies the
    filter's meaning itself (an address or tag matches when the array holds it; a time range
    compares; anything else is equality).
    """
    db = mail.app.running.database.db
    ids = []
    async for doc in db[EMAILS].find({"tenant_id": tenant.id}).sort("_id", -1):
        if all(_holds(doc, field, want) for field, want in query.items()):
            ids.append(doc["_id"])
    return ids[:limit]


def _holds(doc: dict[str, Any], field: str, want: Any) -> bool:
    value = doc.get(field)
    if field in ("recipient_addresses", "tags"):
        return want in (value or [])
    if isinstance(want, dict):
        return all({"$gte": value >= bound, "$lt": value < bound}[op] for op, bound in want.items())
    return bool(value == want)


async def listed(mail: LocalMail, tenant: Tenant, page_size: int, **filters: Any) -> list[str]:
    """Every id ListEmails returns for the filters, following the page tokens."""
    ids: list[str] = []
    token = ""
    while True:
        page = await mail.stub.ListEmails(
            E.ListEmailsRequest(page_size=page_size, page_token=token, **filters),
            metadata=tenant.metadata,
        )
        ids += [e.id for e in page.emails]
        token = page.next_page_token
        if not token:
            return ids


async def test_recipient_and_tag_filters_match_the_emails_exactly(
    local_mail: LocalMail, tenant: Tenant, other_tenant: Tenant
) -> None:
    # 30 emails with overlapping recipients (to, cc, bcc, mixed case) and tags, two domains,
    # another tenant with the same addresses; every recipient/tag filter alone and combined
    # with domain, status and time, in pages of 1, 4 and 50, equals the query on the emails.
    d1, n1 = local_mail.add_domain(tenant, port=9)
    d2, n2 = local_mail.add_domain(tenant, port=9)
    _, theirs = local_mail.add_domain(other_tenant, port=9)
    people = ["Ann@example.org", "bob@example.org", "cy@example.net"]
    for i in range(30):
        fields: dict[str, Any] = {
            "from_address": f"s@{n1 if i % 3 else n2}",
            "to": [people[i % 3]],
            "text": "t",
            "tags": [f"t{i % 4}", f"u{i % 5}"] if i % 7 else [],
        }
        if i % 2:
            fields["cc"] = [people[(i + 1) % 3]]
        if i % 5 == 0:
            fields["bcc"] = ["hidden@example.com"]
        await local_mail.send(tenant, **fields)
        if i % 4 == 0:
            await local_mail.send(
                other_tenant, from_address=f"s@{theirs}", to=[people[0]], text="t", tags=["t1"]
            )
        local_mail.clock.advance(timedelta(minutes=3))
    # Some emails cancelled: a status that differs between them.
    first = await local_mail.stub.ListEmails(
        E.ListEmailsRequest(page_size=6), metadata=tenant.metadata
    )
    for email in first.emails[::2]:
        await local_mail.stub.DeleteEmail(
            E.DeleteEmailRequest(id=email.id), metadata=tenant.metadata
        )
    middle = START + timedelta(minutes=40)
    keys: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
        ("recipient", {"recipient": "ann@example.org"}, {"recipient_addresses": "ann@example.org"}),
        (
            "recipient",
            {"recipient": "hidden@example.com"},
            {"recipient_addresses": "hidden@example.com"},
        ),
        (
            "recipient",
            {"recipient": "nobody@example.org"},
            {"recipient_addresses": "nobody@example.org"},
        ),
        ("tag", {"tag": "t1"}, {"tags": "t1"}),
        ("tag", {"tag": "u3"}, {"tags": "u3"}),
        (
            "both",
            {"recipient": "bob@example.org", "tag": "t2"},
            {"recipient_addresses": "bob@example.org", "tags": "t2"},
        ),
    ]
    from google.protobuf import timestamp_pb2

    start = timestamp_pb2.Timestamp()
    start.FromDatetime(middle)
    others: list[tuple[dict[str, Any], dict[str, Any]]] = [
        ({}, {}),
        ({"domain_id": d2}, {"domain_id": d2}),
        ({"status": E.EMAIL_STATUS_CANCELLED}, {"status": "cancelled"}),
        ({"start_time": start}, {"created_at": {"$gte": middle}}),
    ]
    for (_, api_key, db_key), (api_more, db_more) in itertools.product(keys, others):
        want = await expected(local_mail, tenant, {**db_key, **db_more})
        for size in (1, 4, 50):
            got = await listed(local_mail, tenant, size, **api_key, **api_more)
            assert got == want, (api_key, api_more, size)
    # The comparison above would hold with both sides empty: every key but nobody@ (a Bcc-only
    # address and tags included) must match stored mail.
    for _, _, db_key in keys:
        if db_key.get("recipient_addresses") != "nobody@example.org":
            assert await expected(local_mail, tenant, db_key), db_key
    assert d1 != d2


class Reads(monitoring.CommandListener):
    """The collections the driver reads (`find`), in order."""

    def __init__(self) -> None:
        self.collections: list[str] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "find":
            self.collections.append(event.command["find"])

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


async def test_a_page_by_recipient_or_tag_is_one_read_of_the_emails(
    local_mail: LocalMail, tenant: Tenant
) -> None:
    # The multikey indexes serve the filters: a page is one query of the emails, with the
    # other filters or without, and it is the page the emails' own fields give.
    _, name = local_mail.add_domain(tenant, port=9)
    for _ in range(30):
        await local_mail.send(
            tenant, from_address=f"s@{name}", to=["a@example.org"], text="t", tags=["x"]
        )
    reads = Reads()
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        local_mail.settings.mongodb_uri, tz_aware=True, event_listeners=[reads]
    )
    try:
        repo = MongoEmailRepository(client[local_mail.settings.mongodb_database], inline_limit=0)
        newest = await expected(local_mail, tenant, {"tags": "x"}, limit=6)
        for key in (
            EmailFilter(tag="x"),
            EmailFilter(recipient="a@example.org"),
            EmailFilter(tag="x", status=EmailStatus.QUEUED),
        ):
            reads.collections.clear()
            page = await repo.page(tenant_id=tenant.id, filter=key, before_id=None, limit=6)
            assert [e.id for e in page] == newest, key
            assert reads.collections == [EMAILS], key
    finally:
        await client.close()


async def test_emails_stored_before_the_indexes_existed_are_found(
    local_mail: LocalMail, tenant: Tenant
) -> None:
    # An upgrade creates the multikey indexes on a collection that already holds emails (an
    # earlier version served these filters from lookup documents): creating the index takes
    # the stored emails in, on the embedded database by filling its side table.
    _, name = local_mail.add_domain(tenant, port=9)
    db = local_mail.app.running.database.db
    multikey = [spec for spec in INDEXES if spec.name.endswith("_multikey")]
    assert len(multikey) == 2
    for spec in multikey:
        await db[EMAILS].drop_index(spec.name)
    olds = [
        await local_mail.send(
            tenant, from_address=f"s@{name}", to=["old@example.org"], text="t", tags=["o"]
        )
        for _ in range(45)
    ]
    await ensure_indexes(db, INDEXES)
    want = sorted((e.id for e in olds), reverse=True)
    assert await listed(local_mail, tenant, 50, recipient="old@example.org") == want
    assert await listed(local_mail, tenant, 7, tag="o") == want
    # And mail written after the index is in it as it is written. With a new email in the
    # side table the embedded database serves the filters from it (before, with no row for
    # these values, it could have fallen back to reading the tenant's emails): the old emails
    # are still listed only if creating the index took them in.
    new = await local_mail.send(
        tenant, from_address=f"s@{name}", to=["old@example.org"], text="t", tags=["o"]
    )
    assert await listed(local_mail, tenant, 7, tag="o") == [new.id, *want]
    assert await listed(local_mail, tenant, 50, recipient="old@example.org") == [new.id, *want]


async def test_the_lookup_documents_of_earlier_versions_are_dropped_at_start_up(
    local_mail: LocalMail,
) -> None:
    # email_keys and its backfill's position, left by an earlier version, are dropped when a
    # mail service starts (with the retired indexes); a missing one is no error.
    db = local_mail.app.running.database.db
    for name in RETIRED_COLLECTIONS:
        await db[name].insert_one({"_id": "left-by-an-earlier-version"})
    assert set(RETIRED_COLLECTIONS) <= set(await db.list_collection_names())
    for _ in range(2):  # the second start finds nothing to drop
        restarted = await build_app(
            local_mail.settings,
            clock=local_mail.clock,
            bind="127.0.0.1:0",
            senders=local_mail.senders,
            relays=local_mail.lookup,
            run_workers=False,
        )
        await restarted.running.stop(None)
        assert not set(RETIRED_COLLECTIONS) & set(await db.list_collection_names())
