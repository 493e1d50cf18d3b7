"""Adds the inbound message store and the bounce mailbox to the mail process.

The store's servicer, indexes and retention sweep; the bounce mailbox (reports to return
paths, applied through `LateFeedback`) behind the same servicer.

Wraps the shared `start_service` the way the feedback wiring does, so the mail service's
composition root changes by one line.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from azora.mail.v1 import inbound_pb2, inbound_pb2_grpc

from services.core.clock import Clock, SystemClock
from services.core.runtime import Database, run_periodically
from services.core.server import ServiceServer
from services.mail.feedback.late_feedback import LateFeedback
from services.mail.feedback.suppression_store import SuppressionList
from services.mail.inbound.bounce_mailbox import BounceMailbox
from services.mail.inbound.servicer import InboundServicer
from services.mail.inbound.store import INDEXES, InboundStore, MongoInboundRepository
from services.mail.repository import MongoEmailRepository
from services.mail.return_paths import ReturnPaths
from services.mail.settings import MailSettings

INBOUND_SERVICE = inbound_pb2.DESCRIPTOR.services_by_name["InboundService"].full_name
# Each run deletes expired messages in bounded batches until none is left.
SWEEP_INTERVAL = 300.0


def inbound_store_from(settings: MailSettings, database: Database, clock: Clock) -> InboundStore:
    """The store of received messages, configured from settings."""
    return InboundStore(
        repository=MongoInboundRepository(database.db),
        clock=clock,
        retention=timedelta(days=settings.inbound_retention_days),
        max_message_size=settings.mail_max_message_size,
        default_page_size=settings.default_page_size,
        max_page_size=settings.max_page_size,
    )


def start_with_inbound(
    start: Callable[..., Awaitable[ServiceServer]],
    clock: Clock | None = None,
    *,
    emails: MongoEmailRepository,
    suppressions: SuppressionList,
) -> Callable[..., Awaitable[ServiceServer]]:
    """`start` (the shared `start_service`) that also serves InboundService and sweeps it.

    `emails` and `suppressions` are the process's own (the bounce mailbox changes emails
    through the same storage as the API and the workers).
    """

    async def started(**kwargs: Any) -> ServiceServer:
        settings: MailSettings = kwargs["settings"]
        now = clock or SystemClock()
        store = inbound_store_from(settings, kwargs["database"], now)
        mailbox = BounceMailbox(
            store=store,
            feedback=LateFeedback(emails=emails, suppressions=suppressions, clock=now),
            emails=emails,
            return_paths=ReturnPaths.from_settings(settings),
        )
        kwargs["service_names"] = (*kwargs["service_names"], INBOUND_SERVICE)
        kwargs["registrars"] = (
            *kwargs["registrars"],
            lambda s: inbound_pb2_grpc.add_InboundServiceServicer_to_server(
                InboundServicer(store, mailbox), s
            ),
        )
        kwargs["indexes"] = (*kwargs["indexes"], *INDEXES)
        server = await start(**kwargs)
        server.background.append(run_periodically("inbound-retention", SWEEP_INTERVAL, store.sweep))
        return server

    return started


__all__ = ["INBOUND_SERVICE", "inbound_store_from", "start_with_inbound"]
