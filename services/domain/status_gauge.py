"""The ``azora_domains{status}`` gauge: how many domains are in each lifecycle status.

The domain service owns the ``domains`` collection, so it is the one that counts it; the suite
health servicer (hosted in the same process) only asks for a refresh before it renders the
metrics, through the callable the composition root hands it.
"""

from __future__ import annotations

import logging

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from services.core.metrics import DOMAINS
from services.core.mongo import Document
from services.domain.models import DomainStatus
from services.domain.repository import DOMAINS as DOMAINS_COLLECTION

log = logging.getLogger(__name__)


class DomainStatusGauge:
    """Sets the gauge from one aggregation over the domains collection."""

    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self._db = db
        # Every status is exported from the start (at 0), so /health/metrics always lists each
        # one even before the first count has succeeded.
        for status in DomainStatus:
            DOMAINS.labels(status.value)

    async def refresh(self) -> None:
        """Set ``azora_domains{status}`` for every status (0 where none).

        A failed count is logged and leaves the previous figures: a scrape must not fail for it.
        """
        counts = dict.fromkeys((s.value for s in DomainStatus), 0)
        try:
            async for row in await self._db[DOMAINS_COLLECTION].aggregate(
                [{"$group": {"_id": "$status", "n": {"$sum": 1}}}]
            ):
                if row["_id"] in counts:
                    counts[row["_id"]] = int(row["n"])
        except PyMongoError as exc:
            log.warning("domain counts unavailable", extra={"fields": {"error": str(exc)[:200]}})
            return
        for status, count in counts.items():
            DOMAINS.labels(status).set(count)
