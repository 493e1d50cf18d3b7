"""Composition root of the mail service process (and of separate delivery workers).

Serves azora.mail.v1.MailService with health and reflection, and runs delivery workers plus
the idempotency sweeper in the background. Domains are asked of the domain service; relay
settings and DKIM keys of the SMTP service (both over gRPC with service tokens).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from datetime import timedelta

import grpc
from azora.mail.v1 import mail_pb2, mail_pb2_grpc

from services.core.api_key_client import remote_api_key_resolver
from services.core.clock import Clock, SystemClock
from services.core.metrics import QUEUE_DEPTH, QUEUE_OLDEST_DUE_AGE
from services.core.netguard import AddressPolicy, host_resolver
from services.core.runtime import Database, RunningService, run_periodically, start_service
from services.mail.batch import INDEXES as BATCH_INDEXES
from services.mail.batch import MongoBatchRepository
from services.mail.compose import Limits
from services.mail.delivery import DeliveryWorker
from services.mail.feedback import webhook_servicer as webhooks
from services.mail.feedback.event_wiring import start_with_feedback, suppression_list_from
from services.mail.feedback.late_feedback import LateFeedback
from services.mail.inbound.wiring import start_with_inbound
from services.mail.manager import MailManager, MailPolicy
from services.mail.outcomes import RetryPolicy
from services.mail.relay_health import INDEXES as RELAY_HEALTH_INDEXES
from services.mail.relay_health import RelayHealthStore
from services.mail.relay_lookup import RelayLookup, smtp_service_relays
from services.mail.relay_pool import RelayPool
from services.mail.rendering import TemplateEngine
from services.mail.repository import INDEXES as EMAIL_INDEXES
from services.mail.repository import (
    RETIRED_COLLECTIONS,
    MongoEmailRepository,
    MongoIdempotencyRepository,
)
from services.mail.return_paths import ReturnPaths
from services.mail.senders import GrpcSenderDirectory, SenderDirectory
from services.mail.servicer import MailServicer
from services.mail.settings import MailSettings
from services.mail.template_manager import TemplateManager
from services.mail.templates import INDEXES as TEMPLATE_INDEXES
from services.mail.templates import MongoTemplateRepository

SERVICE_NAME = "mail-service"
log = logging.getLogger(__name__)
MAIL_SERVICE = mail_pb2.DESCRIPTOR.services_by_name["MailService"].full_name
# How often expired idempotency keys are swept.
IDEMPOTENCY_SWEEP_INTERVAL = 600.0
# How often finished emails past their retention are looked for (each run does bounded work).
RETENTION_SWEEP_INTERVAL = 300.0
# How often stats counts that could not be written are retried.
STATS_FLUSH_INTERVAL = 30.0
# How often the queue gauges (depth, oldest due age) are refreshed.
QUEUE_METRICS_INTERVAL = 15.0
# Every collection the mail service (and its separate workers) use.
MAIL_INDEXES = (*EMAIL_INDEXES, *RELAY_HEALTH_INDEXES, *TEMPLATE_INDEXES, *BATCH_INDEXES)
# A relay's unchanged outcome is written again after this long (see relay_health).
RELAY_HEALTH_REFRESH = timedelta(seconds=30)


@dataclass
class MailApp:
    """The running process: server, use cases and the in-process worker (if any)."""

    running: RunningService
    mail: MailManager
    emails: MongoEmailRepository
    worker: DeliveryWorker | None


def policy_from(settings: MailSettings) -> MailPolicy:
    """Rules of the mail service from settings."""
    return MailPolicy(
        limits=Limits(
            max_recipients=settings.mail_max_recipients,
            max_attachment_size=settings.max_attachment_size,
            max_message_size=settings.mail_max_message_size,
            schedule_horizon=timedelta(seconds=settings.mail_schedule_horizon),
        ),
        retry=retry_policy_from(settings),
        idempotency_ttl=timedelta(seconds=settings.mail_idempotency_ttl),
        retention=timedelta(days=settings.retention_days),
        tenant_retention={t: timedelta(days=d) for t, d in settings.retention_tenant_days},
        test_retention=timedelta(hours=settings.test_retention_hours),
        default_page_size=settings.default_page_size,
        max_page_size=settings.max_page_size,
    )


def retry_policy_from(settings: MailSettings) -> RetryPolicy:
    """The retry schedule from settings."""
    return RetryPolicy(
        min_backoff=timedelta(seconds=settings.mail_retry_min_backoff),
        max_backoff=timedelta(seconds=settings.mail_retry_max_backoff),
        jitter=min(settings.mail_retry_jitter, 1.0),
        max_lifetime=timedelta(seconds=settings.mail_max_lifetime),
    )


def remote_relays(settings: MailSettings) -> tuple[RelayLookup, grpc.aio.Channel]:
    """Relay settings and signing keys from the SMTP service, with the channel to close."""
    return smtp_service_relays(settings)


def make_worker(
    settings: MailSettings,
    *,
    emails: MongoEmailRepository,
    relays: RelayLookup,
    clock: Clock,
    worker_id: str | None = None,
    rng: random.Random | None = None,
    relay_health: RelayHealthStore | None = None,
) -> DeliveryWorker:
    """A delivery worker configured from settings, on the queue engine of `emails`."""
    return DeliveryWorker(
        queue=emails.delivery_queue,
        relays=relays,
        pool=RelayPool(
            max_per_relay=settings.mail_relay_connections,
            ca_file=settings.smtp_ca_file,
            policy=AddressPolicy(allow_private=settings.smtp_allow_private_hosts),
            resolver=host_resolver(settings),
        ),
        clock=clock,
        policy=retry_policy_from(settings),
        lease=timedelta(seconds=settings.mail_lease),
        concurrency=settings.mail_worker_concurrency,
        poll_interval=settings.mail_poll_interval,
        worker_id=worker_id,
        rng=rng,
        relay_health=relay_health,
        suppressions=emails.delivery_queue.suppressions,
        return_paths=ReturnPaths.from_settings(settings),
        late_feedback=LateFeedback(
            emails=emails, suppressions=emails.delivery_queue.suppressions, clock=clock
        ),
    )


async def build_app(
    settings: MailSettings,
    *,
    clock: Clock | None = None,
    bind: str | None = None,
    senders: SenderDirectory | None = None,
    relays: RelayLookup | None = None,
    run_workers: bool | None = None,
) -> MailApp:
    """Wire and start the mail service process, returning its use cases too.

    Args:
        settings: configuration.
        clock: time source (tests pass a manual clock).
        bind: "host:port" to listen on; defaults to the configured host and mail port.
        senders: where sender domains are looked up (default: the domain service).
        relays: where relays and DKIM keys come from (default: the SMTP service).
        run_workers: run delivery workers in this process (default: the setting).
    """
    clock = clock or SystemClock()
    database = Database.connect(settings)
    api_keys, domain_channel = remote_api_key_resolver(settings)
    channels: list[grpc.aio.Channel] = [domain_channel]
    if senders is None:
        senders = GrpcSenderDirectory(
            domain_channel,
            settings=settings,
            cache_ttl=settings.domain_cache_ttl,
        )
    if relays is None:
        relays, smtp_channel = remote_relays(settings)
        channels.append(smtp_channel)
    suppressions = suppression_list_from(settings, database.db, clock)
    emails = MongoEmailRepository(
        database.db, inline_limit=settings.mail_inline_content_limit, suppressions=suppressions
    )
    relay_health = RelayHealthStore(database.db, refresh=RELAY_HEALTH_REFRESH)
    engine = TemplateEngine()
    templates = TemplateManager(
        templates=MongoTemplateRepository(database.db),
        engine=engine,
        clock=clock,
        default_page_size=settings.default_page_size,
        max_page_size=settings.max_page_size,
    )
    manager = MailManager(
        emails=emails,
        relay_health=relay_health,
        idempotency=MongoIdempotencyRepository(database.db),
        senders=senders,
        relays=relays,
        clock=clock,
        policy=policy_from(settings),
        templates=templates,
        batches=MongoBatchRepository(database.db),
        suppressions=suppressions,
    )
    inbound = start_with_inbound(
        start_service, clock, manager, emails=emails, suppressions=suppressions
    )
    server = await start_with_feedback(inbound, clock)(
        settings=settings,
        database=database,
        bind=bind or f"{settings.host}:{settings.mail_grpc_port}",
        service_names=(MAIL_SERVICE, webhooks.WEBHOOK_SERVICE),
        registrars=(
            lambda s: mail_pb2_grpc.add_MailServiceServicer_to_server(
                MailServicer(manager, templates), s
            ),
            webhooks.webhook_registrar(settings, database.db, clock),
        ),
        api_keys=api_keys,
        indexes=(*MAIL_INDEXES, *webhooks.WEBHOOK_INDEXES),
        retired_collections=RETIRED_COLLECTIONS,
    )
    worker: DeliveryWorker | None = None
    if settings.mail_run_workers if run_workers is None else run_workers:
        worker = make_worker(
            settings, emails=emails, relays=relays, clock=clock, relay_health=relay_health
        )
        # Stopped gracefully first (`finish_deliveries`), then cancelled with the other
        # background tasks: the worker hands back what it has not started (see delivery).
        server.background.append(run_periodically("mail-worker", 1.0, worker.run))
        server.shutdown_hooks.append(lambda grace: finish_deliveries(worker, emails, grace))
    server.background.append(
        run_periodically("idempotency-sweep", IDEMPOTENCY_SWEEP_INTERVAL, manager.sweep_idempotency)
    )
    server.background.append(
        run_periodically("retention-sweep", RETENTION_SWEEP_INTERVAL, manager.sweep_retention)
    )
    # Counts whose flush failed (database away) are written by the next flush; this one makes
    # sure there is a next one when no mail flows.
    server.background.append(
        run_periodically("stats-flush", STATS_FLUSH_INTERVAL, emails.tallies.flush)
    )

    async def measure_queue() -> None:
        depth, age = await emails.queue_health(now=clock.now())
        QUEUE_DEPTH.set(depth)
        QUEUE_OLDEST_DUE_AGE.set(age)

    server.background.append(
        run_periodically("queue-metrics", QUEUE_METRICS_INTERVAL, measure_queue)
    )
    return MailApp(RunningService(server, database, channels), manager, emails, worker)


async def finish_deliveries(
    worker: DeliveryWorker, emails: MongoEmailRepository, grace: float
) -> None:
    """Shutdown: claim nothing more; deliveries in progress get `grace` s to finish and record.

    One whose outcome the database has not taken by then keeps its lease (never released), so
    it is attempted again only once the lease expires: the documented duplicate window.
    """
    worker.stop()
    await worker.wait_quiet(grace)
    kept = await emails.delivery_queue.flush_outcomes(within=0)
    if kept:
        log.warning(
            "outcomes not recorded at shutdown; their leases are kept",
            extra={"fields": {"outcomes": kept}},
        )


async def build(settings: MailSettings, *, bind: str | None = None) -> RunningService:
    """Start the process and return only its server (what suites of several services use)."""
    return (await build_app(settings, bind=bind)).running


__all__ = [
    "MAIL_INDEXES",
    "MAIL_SERVICE",
    "RELAY_HEALTH_REFRESH",
    "SERVICE_NAME",
    "MailApp",
    "build",
    "build_app",
    "make_worker",
    "policy_from",
    "retry_policy_from",
]
