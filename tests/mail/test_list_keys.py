"""ListEmails by recipient or tag, served from the ``email_keys`` lookup documents.

The pages must be exactly what a query on the emails' arrays returns (MongoDB semantics, in
``_id`` order), for every combination with the other filters and across pages; a key left
without its email (a crash between the key and the email, or during a removal) is skipped and
removed; deletes and retention take an email's keys with it.
"""

from __future__ import annotations

import itertools
from datetime import timedelta
from typing import Any

from azora.mail.v1 import mail_pb2
from pymongo import AsyncMongoClient, monitoring

from services.mail.models import EmailFilter, EmailStatus
from services.mail.repository import EMAILS, KEYS, MongoEmailRepository
from tests.conftest import Tenant
from tests.mail.conftest import START, LocalMail

E = mail_pb2


async def expected(
    mail: LocalMail, tenant: Tenant, query: dict[str, Any], limit: int = 1000
) -> list[str]:
    """Ids the filter selects when asked of the emails' own fields, newest first."""
    db = mail.app.running.database.db
    cursor = db[EMAILS].find({"tenant_id": tenant.id, **query}, {"_id": 1}).sort("_id", -1)
    return [d["_id"] async for d in cursor.limit(limit)]


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


class EmailLookups(monitoring.CommandListener):
    """Emails the driver asks the ``emails`` collection for (`count`), and in how many reads."""

    def __init__(self) -> None:
        self.count = 0
        self.reads = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "find" and event.command["find"] == EMAILS:
            self.reads += 1
            by_id = event.command.get("filter", {}).get("_id")
            self.count += len(by_id["$in"]) if isinstance(by_id, dict) and "$in" in by_id else 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


async def test_a_key_alone_reads_only_the_page_of_emails(
    local_mail: LocalMail, tenant: Tenant
) -> None:
    # Keyed emails are read by id, one `_id $in` read per batch of keys: with the tag or
    # recipient as the only filter, a page of 5 (6 asked for, as ListEmails does to know
    # whether a next page exists) reads 6 of the 30 tagged emails, not spares for filters that
    # are not there; with a status as well spares are still read, and every page is the one the
    # emails' own fields give.
    _, name = local_mail.add_domain(tenant, port=9)
    for _ in range(30):
        await local_mail.send(
            tenant, from_address=f"s@{name}", to=["a@example.org"], text="t", tags=["x"]
        )
    listener = EmailLookups()
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        local_mail.settings.mongodb_uri, tz_aware=True, event_listeners=[listener]
    )
    try:
        repo = MongoEmailRepository(client[local_mail.settings.mongodb_database], inline_limit=0)
        newest = await expected(local_mail, tenant, {"tags": "x"}, limit=6)
        for key in (EmailFilter(tag="x"), EmailFilter(recipient="a@example.org")):
            page = await repo.page(tenant_id=tenant.id, filter=key, before_id=None, limit=6)
            assert [e.id for e in page] == newest
        assert (listener.count, listener.reads) == (12, 2)
        listener.count = 0
        queued = EmailFilter(tag="x", status=EmailStatus.QUEUED)
        page = await repo.page(tenant_id=tenant.id, filter=queued, before_id=None, limit=6)
        assert [e.id for e in page] == newest
        assert listener.count > 6
    finally:
        await client.close()


async def test_orphan_keys_are_skipped_and_removed_and_removals_take_keys(
    local_mail: LocalMail, tenant: Tenant
) -> None:
    # A key whose email is missing (what a crash between the key and the email leaves) never
    # shows and is removed when met; deleting an email removes its keys.
    _, name = local_mail.add_domain(tenant, port=9)
    kept = await local_mail.send(
        tenant, from_address=f"s@{name}", to=["a@example.org"], text="t", tags=["x"]
    )
    gone = await local_mail.send(
        tenant, from_address=f"s@{name}", to=["a@example.org"], text="t", tags=["x"]
    )
    db = local_mail.app.running.database.db
    assert await db[KEYS].count_documents({"email_id": gone.id}) == 2
    ghost = "f" * 24  # an id newer than any email: met first
    await db[KEYS].insert_one(
        {
            "_id": f"{tenant.id}|t:x|{ghost}",
            "tenant_id": tenant.id,
            "key": "t:x",
            "email_id": ghost,
            "created_at": START - timedelta(hours=1),
        }
    )
    # Cancel, then remove, one of them: its keys go with it.
    for _ in range(2):
        await local_mail.stub.DeleteEmail(
            E.DeleteEmailRequest(id=gone.id), metadata=tenant.metadata
        )
    assert await db[KEYS].count_documents({"email_id": gone.id}) == 0
    page = await local_mail.stub.ListEmails(E.ListEmailsRequest(tag="x"), metadata=tenant.metadata)
    assert [e.id for e in page.emails] == [kept.id]
    assert await db[KEYS].count_documents({"email_id": ghost}) == 0


async def test_emails_stored_before_keys_existed_get_theirs(
    local_mail: LocalMail, tenant: Tenant
) -> None:
    # An email stored by a version without lookup keys (simulated: its keys removed and the
    # migration not run yet) is not found by a recipient filter until the backfill, a bounded
    # part per run, has walked it; then it is.
    from services.mail.repository import MIGRATIONS

    _, name = local_mail.add_domain(tenant, port=9)
    olds = [
        await local_mail.send(tenant, from_address=f"s@{name}", to=["old@example.org"], text="t")
        for _ in range(45)
    ]
    db = local_mail.app.running.database.db
    await db[KEYS].delete_many({})
    await db[MIGRATIONS].delete_many({})
    first = await local_mail.stub.ListEmails(
        E.ListEmailsRequest(recipient="old@example.org"), metadata=tenant.metadata
    )
    assert list(first.emails) == []
    emails = local_mail.app.emails
    assert await emails.backfill_keys(batches=1) is False  # 40 of 45 walked
    assert await emails.backfill_keys(batches=1) is False  # the last 5
    assert await emails.backfill_keys(batches=1) is True
    listed_ids = await listed(local_mail, tenant, 50, recipient="old@example.org")
    assert listed_ids == sorted((e.id for e in olds), reverse=True)
    assert await emails.backfill_keys() is True  # done: nothing read any more
