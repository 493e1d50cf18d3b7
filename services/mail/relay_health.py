"""The last delivery outcome per SMTP relay, recorded by the workers for the health report.

The suite's ``GET /health`` shows whether relays answer without opening a connection on every
call: each worker notes the outcome of its attempts here. Writes are throttled per relay and
process (a write when the outcome changes, otherwise at most every `refresh` seconds), so a
busy relay costs one small write per half minute, not one per email.

Collection ``relay_health`` (written only by the mail service): ``_id`` = "host:port" (never
credentials), last outcome, SMTP code, reachability and time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from pymongo import DESCENDING
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from services.core.mongo import Document, IndexSpec

RELAY_HEALTH = "relay_health"
INDEXES = (IndexSpec(RELAY_HEALTH, [("at", DESCENDING)], "relay_health_recent"),)
# Relays listed in a health answer (most recent first): the report stays small.
_MAX_LISTED = 100

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RelayOutcome:
    """One attempt's result through a relay."""

    relay: str  # host:port
    outcome: str  # sent, deferred, bounced, failed
    code: int  # SMTP code of the deciding reply; 0 when there was none
    reachable: bool  # the relay answered (any SMTP reply) rather than failing in transport
    at: datetime


class RelayHealthStore:
    """Throttled writes and reads of `RelayOutcome`s."""

    def __init__(self, db: AsyncDatabase[Document], *, refresh: timedelta) -> None:
        self._collection = db[RELAY_HEALTH]
        self._refresh = refresh
        # relay -> (outcome, reachable, when written) of this process's last write.
        self._written: dict[str, tuple[str, bool, datetime]] = {}

    async def note(self, outcome: RelayOutcome) -> None:
        """Record `outcome` if it differs from the last one written or that one is stale.

        Never raises: health bookkeeping must not fail a delivery that was recorded already.
        """
        last = self._written.get(outcome.relay)
        if (
            last is not None
            and last[:2] == (outcome.outcome, outcome.reachable)
            and outcome.at - last[2] < self._refresh
        ):
            return
        self._written[outcome.relay] = (outcome.outcome, outcome.reachable, outcome.at)
        try:
            await self._collection.update_one(
                {"_id": outcome.relay},
                {
                    "$set": {
                        "outcome": outcome.outcome,
                        "code": outcome.code,
                        "reachable": outcome.reachable,
                        "at": outcome.at,
                    }
                },
                upsert=True,
            )
        except PyMongoError as exc:
            self._written.pop(outcome.relay, None)
            log.warning("relay health not recorded", extra={"fields": {"error": str(exc)[:200]}})

    async def recent(self) -> list[RelayOutcome]:
        """The relays' last outcomes, most recent first."""
        cursor = self._collection.find({}).limit(10 * _MAX_LISTED)
        rows = [
            RelayOutcome(
                doc["_id"],
                str(doc.get("outcome", "")),
                int(doc.get("code", 0)),
                bool(doc.get("reachable", False)),
                doc["at"],
            )
            async for doc in cursor
        ]
        # Sorted here: FerretDB sorts by scanning anyway, and the collection is small.
        rows.sort(key=lambda r: r.at, reverse=True)
        return rows[:_MAX_LISTED]


__all__ = ["INDEXES", "RELAY_HEALTH", "RelayHealthStore", "RelayOutcome"]
