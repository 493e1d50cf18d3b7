"""The events API's reads and the retention sweeper of ``events`` (and its tag keys).

Every query is served by an index on MongoDB 7 and on the embedded FerretDB (docs/data-layer.md,
docs/events.md): an equality prefix (tenant, then at most one filter field), then ``_id``
descending as sort and range. Event ids are ULIDs whose time part is ``occurredAt``, so the
time range becomes an ``_id`` range on the same index (plus the exact ``occurredAt`` test for
the millisecond at each end), and the page cursor is one more ``_id`` bound. Filters beyond the
one the index serves are tested on the rows the index streams, newest first, until the page is
full (on both databases): their cost grows with how far back the matches are, as ListEmails'.

The tag filter reads ``event_tags`` (one key per event and tag, written by the publisher before
the event; tags are an array, which the embedded database cannot index), with the same fields
and the same query shape, then the page's events by ``_id``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from pymongo import ASCENDING, DESCENDING
from pymongo.asynchronous.database import AsyncDatabase

from services.core.clock import Clock
from services.core.errors import InvalidArgument
from services.core.ids import decode_page_token, encode_page_token, page_size, ulid_floor
from services.core.mongo import Document, IndexSpec, delete_older
from services.mail.feedback.event_log import (
    EVENT_ID_PREFIX,
    EVENT_TYPES,
    EVENTS,
    TAG_KEYS,
    to_millis,
)
from services.mail.feedback.suppression_rules import normalize_address, normalize_domain

# Filter fields served by their own index, most selective first: with several filters the
# embedded database's planner takes the first declared of equal rank (and MongoDB's its own
# pick among the same candidates).
_KEYED = ("emailId", "recipient", "type", "domain")

INDEXES = (
    *(
        IndexSpec(
            EVENTS,
            [("tenantId", ASCENDING), (name, ASCENDING), ("_id", DESCENDING)],
            f"events_tenant_{name}",
        )
        for name in _KEYED
    ),
    IndexSpec(EVENTS, [("tenantId", ASCENDING), ("_id", DESCENDING)], "events_tenant_newest"),
    IndexSpec(EVENTS, [("occurredAt", ASCENDING)], "events_age"),
    IndexSpec(
        TAG_KEYS,
        [("tenantId", ASCENDING), ("tag", ASCENDING), ("eventId", DESCENDING)],
        "event_tags_newest",
    ),
    IndexSpec(TAG_KEYS, [("occurredAt", ASCENDING)], "event_tags_age"),
)


@dataclass(frozen=True, slots=True)
class EventFilter:
    """ListEvents' filters as the client sent them (empty / None: not filtered)."""

    type: str = ""
    email_id: str = ""
    recipient: str = ""
    domain: str = ""
    tag: str = ""
    start: datetime | None = None
    end: datetime | None = None


@dataclass(frozen=True, slots=True)
class EventPage:
    """One page of event documents, newest first."""

    events: list[Document]
    next_page_token: str


def _bound(at: datetime) -> str:
    """The smallest event id of the millisecond `at`: ids of later events sort after it.

    A time before 1970 (a valid filter value that no event can have) bounds like 1970: the
    smallest id there is.
    """
    return EVENT_ID_PREFIX + ulid_floor(at)


class EventStore:
    """Reads of the events API and the retention sweep."""

    def __init__(
        self,
        db: AsyncDatabase[Document],
        *,
        clock: Clock,
        retention: timedelta,
        default_page_size: int,
        max_page_size: int,
    ) -> None:
        self._events = db[EVENTS]
        self._tags = db[TAG_KEYS]
        self._clock = clock
        self._retention = retention
        self._default = default_page_size
        self._max = max_page_size

    async def page(
        self, *, tenant_id: str, filter: EventFilter, size: int, page_token: str
    ) -> EventPage:
        """A page of the tenant's events, newest first.

        Raises:
            InvalidArgument: an unknown type, a malformed recipient or domain, an empty time
                range, a bad page size or page token (each naming its field).
        """
        limit = page_size(size, default=self._default, maximum=self._max)
        conditions: Document = {}
        if filter.type:
            if filter.type not in EVENT_TYPES:
                raise InvalidArgument.single(
                    "type", f"unknown event type {filter.type!r}; one of {sorted(EVENT_TYPES)}"
                )
            conditions["type"] = filter.type
        if filter.email_id:
            conditions["emailId"] = filter.email_id
        if filter.recipient:
            conditions["recipient"] = normalize_address(filter.recipient, field="recipient")
        if filter.domain:
            conditions["domain"] = normalize_domain(filter.domain, field="domain")
        if filter.start and filter.end and filter.start >= filter.end:
            raise InvalidArgument.single("end_time", "must be after start_time")
        query = {
            "type": filter.type,
            "email_id": filter.email_id,
            "recipient": filter.recipient,
            "domain": filter.domain,
            "tag": filter.tag,
            "start": filter.start.isoformat() if filter.start else "",
            "end": filter.end.isoformat() if filter.end else "",
        }
        before = decode_page_token(page_token, query)
        if before is not None and not before.startswith(EVENT_ID_PREFIX):
            raise InvalidArgument.single("page_token", "malformed page token")
        id_range: Document = {}
        if filter.start:
            id_range["$gte"] = _bound(filter.start)
            conditions["occurredAt"] = {"$gte": to_millis(filter.start)}
        if filter.end:
            # Ids of the end's millisecond sort at or after its bound: the exact test decides.
            id_range["$lt"] = _bound(filter.end + timedelta(milliseconds=1))
            conditions.setdefault("occurredAt", {})["$lt"] = filter.end
        if before is not None:
            id_range["$lt"] = min(before, id_range.get("$lt", before))
        if filter.tag:
            events = await self._by_tag(tenant_id, filter.tag, conditions, id_range, limit + 1)
        else:
            selector: Document = {"tenantId": tenant_id, **conditions}
            if id_range:
                selector["_id"] = id_range
            cursor = self._events.find(selector).sort("_id", DESCENDING).limit(limit + 1)
            events = [doc async for doc in cursor]
        next_token = ""
        if len(events) > limit:
            events = events[:limit]
            next_token = encode_page_token(events[-1]["_id"], query)
        return EventPage(events, next_token)

    async def _by_tag(
        self, tenant_id: str, tag: str, conditions: Document, id_range: Document, limit: int
    ) -> list[Document]:
        selector: Document = {"tenantId": tenant_id, "tag": tag, **conditions}
        if id_range:
            selector["eventId"] = id_range
        cursor = self._tags.find(selector, {"eventId": 1}).sort("eventId", DESCENDING).limit(limit)
        ids = [doc["eventId"] async for doc in cursor]
        if not ids:
            return []
        found = {
            doc["_id"]: doc
            async for doc in self._events.find({"_id": {"$in": ids}, "tenantId": tenant_id})
        }
        # A key whose event was swept a moment ago has nothing to show.
        return [found[i] for i in ids if i in found]

    async def sweep(self) -> int:
        """Delete events (and their tag keys) older than the retention, in bounded batches.

        Returns:
            How many events this run deleted.
        """
        cutoff = to_millis(self._clock.now() - self._retention)
        deleted = await delete_older(self._events, "occurredAt", cutoff)
        await delete_older(self._tags, "occurredAt", cutoff)
        return deleted
