"""The queue engine reads in batches: a claim, a group of outcomes or a release is a few commands.

Against the real FerretDB, with a PyMongo command listener counting every command per
collection: claiming N emails reads the emails once (not once per email), recording N outcomes
checks their lease fences with one read, and a shutdown gives N leases back with one read and
one write. What each step wrote is checked too, so a batch that skipped an email would fail.
New emails sent at once are screened (the suppression check) and written as one group, the
screen reading while the writes that precede the emails go out.
"""

from __future__ import annotations

import asyncio
import random
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta

import pytest
from pymongo import AsyncMongoClient, monitoring
from pymongo.asynchronous.database import AsyncDatabase

from services.core.ids import new_id
from services.core.mongo import Document, ensure_indexes
from services.mail.app import MAIL_INDEXES
from services.mail.documents import CLAIMS, CONTENTS, EMAILS, QUEUE
from services.mail.feedback.event_log import HINTS, OUTBOX_FIELD
from services.mail.models import Email, EmailStatus, SmtpReply
from services.mail.outcomes import RetryPolicy, after_attempt, decide, suppress_new
from services.mail.queue import ORPHAN_AGE, queue_entry
from services.mail.repository import MongoEmailRepository
from tests.mail.conftest import START
from tests.mail.test_write_batch_cap import new_email

EMAILS_CLAIMED = 20
LEASE = timedelta(minutes=2)


class Commands(monitoring.CommandListener):
    """Counts commands by (name, collection)."""

    def __init__(self) -> None:
        self.seen: Counter[tuple[str, str]] = Counter()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        """Count one command."""
        target = event.command.get(event.command_name)
        self.seen[(event.command_name, target if isinstance(target, str) else "")] += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        """Nothing to do."""

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        """Nothing to do."""


@pytest.fixture
async def counted(
    ferretdb: str,
) -> AsyncIterator[tuple[MongoEmailRepository, Commands, AsyncDatabase[Document]]]:
    """The mail storage on a fresh database whose client counts every command."""
    commands = Commands()
    name = f"azora_batches_{secrets.token_hex(4)}"
    client: AsyncMongoClient[Document] = AsyncMongoClient(
        ferretdb, event_listeners=[commands], tz_aware=True
    )
    await ensure_indexes(client[name], MAIL_INDEXES)
    yield MongoEmailRepository(client[name], inline_limit=256 * 1024), commands, client[name]
    await client.drop_database(name)
    await client.close()


async def test_claims_outcomes_and_releases_are_batched(
    counted: tuple[MongoEmailRepository, Commands, AsyncDatabase[Document]],
) -> None:
    # 20 due emails: one claim takes them all with one read of the emails; 20 outcomes
    # recorded together check their fences with one read; 20 more given back at shutdown.
    emails, commands, db = counted
    queue = emails.delivery_queue
    domain_id = new_id()
    first = [new_email(domain_id, n) for n in range(EMAILS_CLAIMED)]
    commands.seen.clear()
    assert all(await emails.insert_many(emails=first))
    # The messages are stored beside the emails, in one insert, not in their documents.
    assert commands.seen[("insert", CONTENTS)] == 1
    assert await db[EMAILS].count_documents({"content": {"$exists": True}}) == 0
    assert await db[CONTENTS].count_documents({}) == EMAILS_CLAIMED

    commands.seen.clear()
    claimed = await queue.claim_batch(now=START, lease=LEASE, worker_id="w1", limit=EMAILS_CLAIMED)
    assert {c.email.id for c in claimed} == {e.id for e in first}
    assert commands.seen[("find", EMAILS)] == 1
    # Their messages in one read too, carried by the claims (the worker reads no more).
    assert commands.seen[("find", CONTENTS)] == 1
    assert all(c.email.content == b"Subject: cap\r\n\r\nbody\r\n" for c in claimed)
    assert commands.seen[("insert", CLAIMS)] == 1
    commands.seen.clear()
    assert await queue.content(email=claimed[0].email) == claimed[0].email.content
    assert not commands.seen

    commands.seen.clear()
    policy = RetryPolicy()
    rng = random.Random(1)  # noqa: S311 - jitter only
    sent = {c.email.recipients[0].address: SmtpReply(250, "2.0.0", "ok") for c in claimed}
    written = await asyncio.gather(
        *(
            queue.finish_attempt(
                claimed=c,
                transition=after_attempt(
                    c, decide(c, sent, now=START, policy=policy, rng=rng), now=START
                ),
            )
            for c in claimed
        )
    )
    assert all(written)
    assert commands.seen[("find", CLAIMS)] == 1
    assert commands.seen[("update", EMAILS)] == 1
    assert commands.seen[("delete", QUEUE)] == 1
    stored = [d async for d in db[EMAILS].find({}, {"status": 1, "events": 1})]
    assert {d["status"] for d in stored} == {EmailStatus.SENT.value}
    assert all([e["type"] for e in d["events"]][-2:] == ["claimed", "sent"] for d in stored)
    assert await db[QUEUE].count_documents({}) == 0

    second = [new_email(domain_id, n) for n in range(EMAILS_CLAIMED)]
    assert all(await emails.insert_many(emails=second))
    held = await queue.claim_batch(now=START, lease=LEASE, worker_id="w2", limit=EMAILS_CLAIMED)
    assert len(held) == EMAILS_CLAIMED
    commands.seen.clear()
    await queue.release(claimed=held, now=START)
    assert commands.seen[("find", CLAIMS)] == 1
    assert commands.seen[("update", CLAIMS)] == 1
    # Given back: another worker takes every one of them at once.
    again = await queue.claim_batch(now=START, lease=LEASE, worker_id="w3", limit=EMAILS_CLAIMED)
    assert {c.email.id for c in again} == {e.id for e in second}


async def test_a_submit_that_crashed_before_its_email_leaves_nothing_behind(
    counted: tuple[MongoEmailRepository, Commands, AsyncDatabase[Document]],
) -> None:
    # Entry and content go in before the email: a crash in between leaves both without an
    # email. The claimer that meets the entry once it is older than ORPHAN_AGE drops both; an
    # email stored with them keeps its content.
    emails, _, db = counted
    queue = emails.delivery_queue
    domain_id = new_id()
    crashed, kept = new_email(domain_id, 1), new_email(domain_id, 2)
    entry = queue_entry(crashed)
    assert entry is not None
    await db[QUEUE].insert_one(entry)
    await db[CONTENTS].insert_one({"_id": crashed.id, "content": b"x", "created_at": START})
    assert await emails.insert(email=kept)

    later = START + ORPHAN_AGE + timedelta(seconds=1)
    claimed = await queue.claim_batch(now=later, lease=LEASE, worker_id="w1", limit=10)
    assert [c.email.id for c in claimed] == [kept.id]
    assert await db[QUEUE].find_one({"_id": crashed.id}) is None
    assert await db[CONTENTS].find_one({"_id": crashed.id}) is None
    assert await db[CONTENTS].find_one({"_id": kept.id}) is not None


async def test_concurrent_new_emails_are_screened_and_written_as_one_group(
    counted: tuple[MongoEmailRepository, Commands, AsyncDatabase[Document]],
) -> None:
    # 20 sends at once, each with the send path's screen (the suppression check): the screen
    # runs once per group written (the first email alone, the 19 that queued meanwhile
    # together), not once per email, and what it changed is what is stored.
    emails, commands, db = counted
    domain_id = new_id()
    new = [new_email(domain_id, n) for n in range(EMAILS_CLAIMED)]
    screened: list[list[str]] = []

    async def screen(group: Sequence[Email]) -> None:
        screened.append([e.id for e in group])
        for email in group:
            if email.recipients[0].address == "r3@example.org":
                suppress_new(email, {"r3@example.org": "hard_bounce"}, now=email.created_at)

    commands.seen.clear()
    stored = await asyncio.gather(*(emails.insert(email=e, screen=screen) for e in new))
    assert stored == [True] * EMAILS_CLAIMED
    assert sorted(i for group in screened for i in group) == sorted(e.id for e in new)
    assert len(screened) <= 2
    assert commands.seen[("insert", EMAILS)] == len(screened)
    suppressed = await db[EMAILS].find_one({"_id": new[3].id})
    assert suppressed is not None
    assert suppressed["status"] == EmailStatus.SUPPRESSED.value
    assert await db[QUEUE].find_one({"_id": new[3].id}) is None
    assert await db[QUEUE].count_documents({}) == EMAILS_CLAIMED - 1


async def test_the_screen_reads_while_the_writes_before_the_emails_go_out(
    counted: tuple[MongoEmailRepository, Commands, AsyncDatabase[Document]],
) -> None:
    # The screen does not wait for the contents' insert, nor the contents for the screen: here
    # the screen waits until the contents' insert has begun, which only happens if both run
    # at once (one after the other, the screen would wait in vain). What it changed is still
    # what is stored: its email SUPPRESSED, without a queue entry, with the added event
    # announced by a hint of its own.
    emails, _, db = counted
    email = new_email(new_id(), 0)
    contents_begun = asyncio.Event()
    write_contents = emails._write_contents

    async def contents_seen(bodies: list[Document]) -> None:
        contents_begun.set()
        await write_contents(bodies)

    async def screen(group: Sequence[Email]) -> None:
        await asyncio.wait_for(contents_begun.wait(), timeout=10)
        for e in group:
            suppress_new(e, {e.recipients[0].address: "manual"}, now=e.created_at)

    emails._write_contents = contents_seen  # type: ignore[method-assign]
    assert await emails.insert(email=email, screen=screen)
    stored = await db[EMAILS].find_one({"_id": email.id})
    assert stored is not None
    assert stored["status"] == EmailStatus.SUPPRESSED.value
    assert await db[QUEUE].find_one({"_id": email.id}) is None
    outbox = [event["_id"] for event in stored[OUTBOX_FIELD]]
    announced = [
        event_id
        async for hint in db[HINTS].find({})
        for change in hint["changes"]
        if change["email_id"] == email.id
        for event_id in change["event_ids"]
    ]
    # (This email had no event before the screen: its one event is the screen's.)
    assert [event["type"] for event in stored[OUTBOX_FIELD]] == ["suppressed"]
    assert announced == outbox


async def test_a_failed_insert_of_the_group_stores_no_email(
    counted: tuple[MongoEmailRepository, Commands, AsyncDatabase[Document]],
) -> None:
    # The hints, queue entries and contents go in at once, the emails after them: if one of
    # the three fails, the send fails and no email is stored (what the others left behind is
    # what a crash leaves, cleaned up as such). The failure is raised only once the others have
    # ended: here the contents' insert is slow and the queue's fails at once, and the content
    # has landed by the time the caller hears of the failure (nothing left running unobserved).
    emails, _, db = counted
    email = new_email(new_id(), 0)
    write_contents = emails._write_contents

    async def slow_contents(bodies: list[Document]) -> None:
        await asyncio.sleep(0.3)
        await write_contents(bodies)

    async def broken(entries: Sequence[Document]) -> None:
        raise RuntimeError("the queue is on fire")

    emails._write_contents = slow_contents  # type: ignore[method-assign]
    emails.delivery_queue.add_entries = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="on fire"):
        await emails.insert(email=email)
    assert await db[EMAILS].find_one({"_id": email.id}) is None
    assert await db[CONTENTS].find_one({"_id": email.id}) is not None
