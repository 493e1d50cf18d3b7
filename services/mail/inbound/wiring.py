"""Adds the inbound message store and the bounce mailbox to the mail process.

Servicer, indexes, actions, sweeps (retention, and the run that finishes route actions left
pending); the bounce mailbox (reports to return paths, applied through `LateFeedback`) behind
the same servicer.

Wraps the shared `start_service` the way the feedback wiring does, so the mail service's
composition root changes by one line. The SRS key of forwarded mail is derived from the master
secrets key (AZORA_SECRETS_KEY), so there is no further secret to configure; replacing that
key invalidates SRS addresses made before (they only matter for bounces of forwarded mail).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from azora.mail.v1 import inbound_pb2, inbound_pb2_grpc

from services.core.clock import Clock, SystemClock
from services.core.runtime import Database, run_periodically
from services.core.server import ServiceServer
from services.core.srs import SrsRewriter
from services.mail.feedback.late_feedback import LateFeedback
from services.mail.feedback.suppression_store import SuppressionList
from services.mail.feedback.webhook_store import WebhookStore
from services.mail.inbound.actions import Forwarder, InboundActions
from services.mail.inbound.bounce_mailbox import BounceMailbox
from services.mail.inbound.servicer import InboundServicer
from services.mail.inbound.store import INDEXES, InboundStore, MongoInboundRepository
from services.mail.repository import MongoEmailRepository
from services.mail.return_paths import ReturnPaths
from services.mail.settings import MailSettings

INBOUND_SERVICE = inbound_pb2.DESCRIPTOR.services_by_name["InboundService"].full_name
# Each run deletes expired messages in bounded batches until none is left.
SWEEP_INTERVAL = 300.0
# How often records whose action was left pending (a process died mid-store) are looked for.
PENDING_INTERVAL = 60.0


def srs_rewriter(settings: MailSettings) -> SrsRewriter:
    """The SRS rewriter of forwarded mail, keyed from the master secrets key."""
    key = hmac.new(settings.secrets_key_bytes(), b"azora-srs-v1", hashlib.sha256).digest()
    return SrsRewriter(secret=key)


def inbound_store_from(
    settings: MailSettings,
    database: Database,
    clock: Clock,
    forwarder: Forwarder | None = None,
) -> InboundStore:
    """The store of received messages, configured from settings.

    Without a `forwarder` (the mail service's `MailManager`), webhook and forward actions are
    refused (INVALID_ARGUMENT on ``action``).
    """
    actions = None
    if forwarder is not None:
        actions = InboundActions(
            webhooks=WebhookStore(database.db),
            forwarder=forwarder,
            srs=srs_rewriter(settings),
            clock=clock,
            attachment_limit=settings.inbound_webhook_attachment_limit,
        )
    return InboundStore(
        repository=MongoInboundRepository(database.db),
        clock=clock,
        retention=timedelta(days=settings.inbound_retention_days),
        max_message_size=settings.mail_max_message_size,
        default_page_size=settings.default_page_size,
        max_page_size=settings.max_page_size,
        actions=actions,
    )


def start_with_inbound(
    start: Callable[..., Awaitable[ServiceServer]],
    clock: Clock | None = None,
    forwarder: Forwarder | None = None,
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
        store = inbound_store_from(settings, kwargs["database"], now, forwarder)
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
        server.background.append(
            run_periodically("inbound-pending", PENDING_INTERVAL, store.finish_pending)
        )
        return server

    return started


__all__ = ["INBOUND_SERVICE", "inbound_store_from", "srs_rewriter", "start_with_inbound"]
