"""Declared indexes on a real FerretDB: created once, and retired ones dropped where they exist.

Services declare their indexes at every start-up (`services.core.mongo.ensure_indexes`). An
index no query needs any more is declared ``retired``: an existing database loses it at the
next start (each index costs every insert and update of its collection), and a database that
never had it, or never had the collection, starts without error.
"""

from __future__ import annotations

import secrets
from dataclasses import replace

from pymongo import ASCENDING, AsyncMongoClient

from services.core.mongo import Document, IndexSpec, ensure_indexes

LIVE = IndexSpec("things", [("tenant_id", ASCENDING), ("at", ASCENDING)], "tenant_at")
OLD = IndexSpec("things", [("status", ASCENDING), ("due", ASCENDING)], "old_due")


async def test_a_retired_index_is_dropped_and_declaring_again_changes_nothing(
    ferretdb: str,
) -> None:
    client: AsyncMongoClient[Document] = AsyncMongoClient(ferretdb, tz_aware=True)
    db = client[f"indexes_{secrets.token_hex(4)}"]
    try:
        # Before any collection exists: the retired one is simply absent.
        await ensure_indexes(db, [LIVE, replace(OLD, retired=True)])
        assert {i["name"] async for i in await db["things"].list_indexes()} == {
            "_id_",
            "tenant_at",
        }
        # A database an earlier version set up has it: it goes, the live one stays.
        await ensure_indexes(db, [LIVE, OLD])
        assert "old_due" in {i["name"] async for i in await db["things"].list_indexes()}
        await db["things"].insert_one({"_id": "a", "tenant_id": "t", "status": "queued"})
        retired = [LIVE, replace(OLD, retired=True)]
        for _ in range(2):
            await ensure_indexes(db, retired)
            assert {i["name"] async for i in await db["things"].list_indexes()} == {
                "_id_",
                "tenant_at",
            }
        assert await db["things"].count_documents({}) == 1
    finally:
        await client.drop_database(db.name)
        await client.close()
