"""The shared bounded sweep (`services.core.mongo.delete_older`) on a real FerretDB.

Every sweeper (idempotency records, claims, rate-limit counts, stats counts, events)
deletes through it: oldest first, at most 40 ids per read and per delete command, a bounded
number of batches per run, nothing at or after the cutoff.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import AsyncMongoClient, monitoring

from services.core.mongo import MAX_WRITE_BATCH, delete_older
from services.core.ratelimit import COLLECTION, INDEXES

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class DeleteSizes(monitoring.CommandListener):
    """Statements per delete command the driver sends."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "delete":
            self.sizes.append(len(event.command["deletes"]))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


async def test_sweeps_oldest_first_in_bounded_batches(ferretdb: str) -> None:
    # 130 expired and 20 live documents: one batch removes the 40 oldest; a full run removes
    # the other 90 expired ones and never a live one; no delete command holds more than 40.
    listener = DeleteSizes()
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        ferretdb, tz_aware=True, event_listeners=[listener]
    )
    db = client[f"sweeps_{secrets.token_hex(4)}"]
    try:
        collection = db[COLLECTION]
        for spec in INDEXES:
            if spec.collection == COLLECTION:
                await collection.create_index(list(spec.keys), name=spec.name)
        docs = [{"_id": f"w{i:03d}", "expiresAt": T0 + timedelta(minutes=i)} for i in range(150)]
        for start in range(0, 150, 30):
            await collection.insert_many(docs[start : start + 30])
        cutoff = T0 + timedelta(minutes=130)
        assert await delete_older(collection, "expiresAt", cutoff, batches=1) == 40
        oldest = await collection.find_one({}, sort=[("expiresAt", 1)])
        assert oldest is not None
        assert oldest["_id"] == "w040"
        assert await delete_older(collection, "expiresAt", cutoff) == 90
        left = sorted([d["_id"] async for d in collection.find({})])
        assert left == [f"w{i:03d}" for i in range(130, 150)]
        assert listener.sizes
        assert max(listener.sizes) <= MAX_WRITE_BATCH
    finally:
        await client.drop_database(db.name)
        await client.close()
