"""Wiring of events and suppressions into the mail service process.

`start_with_feedback` wraps the shared `start_service`: it adds EventService and
SuppressionService to the server (their servicers, health and reflection names), their indexes
to the start-up, and their background loops (the event publisher, the retention sweep of
events, the expiry sweep of suppressions) to the server's tasks, so that the mail service's
composition root wires all of it by calling this instead of `start_service`.

The send path and the state changes use `EventRecorder`, `with_events` and
`SuppressionList.suppressed`, built from the same database wherever they are wired.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from azora.mail.v1 import events_pb2, events_pb2_grpc, suppressions_pb2, suppressions_pb2_grpc
from pymongo.asynchronous.database import AsyncDatabase

from services.core.clock import Clock, SystemClock
from services.core.mongo import Document
from services.core.runtime import Database, run_periodically
from services.core.server import ServiceServer
from services.mail.feedback import event_log, event_store, suppression_store
from services.mail.feedback.event_log import EventPublisher
from services.mail.feedback.event_service import EventServicer
from services.mail.feedback.event_store import EventStore
from services.mail.feedback.suppression_service import SuppressionServicer
from services.mail.feedback.suppression_store import SuppressionList
from services.mail.settings import MailSettings

EVENT_SERVICE = events_pb2.DESCRIPTOR.services_by_name["EventService"].full_name
SUPPRESSION_SERVICE = suppressions_pb2.DESCRIPTOR.services_by_name["SuppressionService"].full_name
# Every collection of events and suppressions.
FEEDBACK_INDEXES = (*event_log.INDEXES, *event_store.INDEXES, *suppression_store.INDEXES)
# How often expired events and suppressions are looked for (each run does bounded work).
SWEEP_INTERVAL = 300.0


def event_store_from(
    settings: MailSettings, db: AsyncDatabase[Document], clock: Clock
) -> EventStore:
    """The events API's store, configured from settings."""
    return EventStore(
        db,
        clock=clock,
        retention=timedelta(days=settings.event_retention_days),
        default_page_size=settings.default_page_size,
        max_page_size=settings.max_page_size,
    )


def suppression_list_from(
    settings: MailSettings, db: AsyncDatabase[Document], clock: Clock
) -> SuppressionList:
    """The suppression lists, configured from settings."""
    return SuppressionList(
        db,
        clock=clock,
        default_page_size=settings.default_page_size,
        max_page_size=settings.max_page_size,
    )


def start_with_feedback(
    start: Callable[..., Awaitable[ServiceServer]], clock: Clock | None = None
) -> Callable[..., Awaitable[ServiceServer]]:
    """`start` (the shared `start_service`) that also serves and runs events and suppressions.

    Takes the same keyword arguments as `start_service` (``settings``, ``database``,
    ``service_names``, ``registrars``, ``indexes``, ...).
    """

    async def started(**kwargs: Any) -> ServiceServer:
        settings: MailSettings = kwargs["settings"]
        database: Database = kwargs["database"]
        now = clock or SystemClock()
        db = database.db
        store = event_store_from(settings, db, now)
        suppressions = suppression_list_from(settings, db, now)
        publisher = EventPublisher(
            db,
            clock=now,
            abandon_after=timedelta(seconds=settings.event_hint_abandon_after),
        )
        kwargs["service_names"] = (*kwargs["service_names"], EVENT_SERVICE, SUPPRESSION_SERVICE)
        kwargs["registrars"] = (
            *kwargs["registrars"],
            lambda s: events_pb2_grpc.add_EventServiceServicer_to_server(EventServicer(store), s),
            lambda s: suppressions_pb2_grpc.add_SuppressionServiceServicer_to_server(
                SuppressionServicer(suppressions), s
            ),
        )
        kwargs["indexes"] = (*kwargs["indexes"], *FEEDBACK_INDEXES)
        server = await start(**kwargs)
        server.background.extend(
            (
                run_periodically("event-publisher", settings.event_publish_interval, publisher.run),
                run_periodically("event-retention", SWEEP_INTERVAL, store.sweep),
                run_periodically("suppression-expiry", SWEEP_INTERVAL, suppressions.sweep),
            )
        )
        return server

    return started


__all__ = [
    "EVENT_SERVICE",
    "FEEDBACK_INDEXES",
    "SUPPRESSION_SERVICE",
    "event_store_from",
    "start_with_feedback",
    "suppression_list_from",
]
