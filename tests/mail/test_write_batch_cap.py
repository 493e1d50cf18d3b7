"""No write command the queue issues carries more than `MAX_WRITE_BATCH` statements.

FerretDB 1.24 can hang forever on a write command of 64 statements or more. Hundreds of
concurrent submissions and deliveries against the real FerretDB drive every group-commit path
(inserts, claims, outcomes); a PyMongo command listener records the size of each write command,
and the run must finish (nothing hangs) with every size within the cap.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import pytest
from pymongo import AsyncMongoClient, monitoring
from pymongo.asynchronous.database import AsyncDatabase

from services.core.clock import ManualClock
from services.core.ids import new_id
from services.core.mongo import MAX_WRITE_BATCH, Document, ensure_indexes
from services.mail.app import MAIL_INDEXES, make_worker
from services.mail.models import Email, EmailStatus
from services.mail.relay_directory import InMemoryRelayDirectory, RelaySecurity, RelaySettings
from services.mail.relay_lookup import DirectoryRelayLookup
from services.mail.repository import EMAILS, MongoEmailRepository
from tests.conftest import make_settings
from tests.mail.conftest import RETRY_ENV, START, Script, ScriptedRelay
from tests.support.emails import an_email

EMAILS_SENT = 400
CONCURRENCY = 200
HANG_GUARD_SECONDS = 240  # guards against a hang only; never a measure of speed
# Write commands and the array that holds their statements.
STATEMENTS = {"insert": "documents", "update": "updates", "delete": "deletes"}


class WriteSizes(monitoring.CommandListener):
    """Records, per write command, how many statements (or $in values of a delete) it has."""

    def __init__(self) -> None:
        self.sizes: list[tuple[str, int]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        """Note the size of a write command."""
        field = STATEMENTS.get(event.command_name)
        if field is None:
            return
        statements: list[Any] = list(event.command.get(field, []))
        size = len(statements)
        for statement in statements:
            values = statement.get("q", {}).get("_id", {})
            if isinstance(values, dict) and "$in" in values:
                size = max(size, len(values["$in"]))
        self.sizes.append((event.command_name, size))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        """Nothing to do."""

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        """Nothing to do."""


@pytest.fixture
async def observed(
    ferretdb: str,
) -> AsyncIterator[tuple[MongoEmailRepository, WriteSizes, AsyncDatabase[Document]]]:
    """A queue repository on a fresh database whose client reports every command."""
    sizes = WriteSizes()
    name = f"azora_cap_{secrets.token_hex(4)}"
    client: AsyncMongoClient[Document] = AsyncMongoClient(
        ferretdb, event_listeners=[sizes], tz_aware=True
    )
    await ensure_indexes(client[name], MAIL_INDEXES)
    yield MongoEmailRepository(client[name], inline_limit=256 * 1024), sizes, client[name]
    await client.drop_database(name)
    await client.close()


def new_email(domain_id: str, n: int) -> Email:
    """An accepted email due at START, for one recipient."""
    address = f"r{n}@example.org"
    return an_email(
        at=START,
        id=new_id(),
        tenant_id="t-cap",
        domain_id=domain_id,
        domain_name="cap.example",
        from_address="s@cap.example",
        envelope_from="s@cap.example",
        to=[address],
        subject="cap",
        message_id=f"{new_id()}@cap.example",
        size=40,
        expires_at=START + timedelta(hours=1),
        content=b"Subject: cap\r\n\r\nbody\r\n",
    )


async def test_group_commits_stay_below_the_write_batch_cap(
    observed: tuple[MongoEmailRepository, WriteSizes, AsyncDatabase[Document]],
    ferretdb: str,
    scripted_relay: Callable[[Script], asyncio.Future[ScriptedRelay]],
) -> None:
    # 400 concurrent submissions, then a worker of 200 delivery loops: every email is sent and
    # no insert/update/delete command exceeded the cap.
    emails, sizes, db = observed
    relay = await scripted_relay(Script())
    domain_id = new_id()
    directory = InMemoryRelayDirectory()
    directory.domains.add(("t-cap", domain_id))
    directory.add_relay(
        tenant_id="t-cap",
        relay=RelaySettings(
            domain_id=domain_id,
            host="127.0.0.1",
            port=relay.port,
            security=RelaySecurity.NONE,
            timeout=60.0,
        ),
    )
    settings = make_settings(
        ferretdb,
        db.name,
        **{
            **RETRY_ENV,
            "AZORA_MAIL_WORKER_CONCURRENCY": str(CONCURRENCY),
            "AZORA_MAIL_RELAY_CONNECTIONS": "16",
        },
    )
    worker = make_worker(
        settings, emails=emails, relays=DirectoryRelayLookup(directory), clock=ManualClock(START)
    )
    batch = [new_email(domain_id, n) for n in range(EMAILS_SENT)]
    async with asyncio.timeout(HANG_GUARD_SECONDS):
        stored = await asyncio.gather(*(emails.insert(email=e) for e in batch))
        assert all(stored)
        run = asyncio.create_task(worker.run())
        try:
            sent = {"status": EmailStatus.SENT.value}
            while True:
                if await db[EMAILS].count_documents(sent) == len(batch):
                    break
                await asyncio.sleep(0.2)
        finally:
            worker.stop()
            await run
    assert len(relay.received) == EMAILS_SENT
    inserts = [n for name, n in sizes.sizes if name == "insert"]
    updates = [n for name, n in sizes.sizes if name == "update"]
    # The paths were driven in groups (several statements per command), never above the cap.
    assert max(inserts) > 1
    assert max(updates) > 1
    assert max(n for _, n in sizes.sizes) <= MAX_WRITE_BATCH
