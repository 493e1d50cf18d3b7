"""Composition root of the domain service process.

Besides azora.domain.v1.DomainService the process serves azora.domain.v1.RouteService (inbound
mail routes, services/domain/routes.py), azora.iam.v1.ApiKeyService (the
domain service owns tenants' API keys) and azora.health.v1.SuiteHealthService (the REST health
routes). It runs the domain lifecycle loop (expiry, periodic re-checks) in the background.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from azora.domain.v1 import domain_pb2, domain_pb2_grpc, routes_pb2, routes_pb2_grpc
from azora.health.v1 import health_pb2 as suite_pb2
from azora.health.v1 import health_pb2_grpc as suite_pb2_grpc
from azora.iam.v1 import api_keys_pb2, api_keys_pb2_grpc
from azora.mail.v1 import mail_pb2
from azora.smtp.v1 import smtp_pb2

from services.core.clock import Clock, SystemClock
from services.core.dns import DnsResolver
from services.core.metrics import Peer
from services.core.runtime import Database, RunningService, run_periodically, start_service
from services.core.tracing import traced_channel
from services.domain.cascade import MailCancelCascade, SmtpDataCascade
from services.domain.manager import DomainManager, DomainPolicy
from services.domain.repository import INDEXES as DOMAIN_INDEXES
from services.domain.repository import MongoClaimRepository, MongoDomainRepository
from services.domain.routes import INDEXES as ROUTE_INDEXES
from services.domain.routes import MongoDomainLookup, MongoRouteRepository, RouteManager
from services.domain.routes_servicer import RouteServicer
from services.domain.servicer import DomainServicer
from services.domain.settings import DomainSettings
from services.domain.status_gauge import DomainStatusGauge
from services.domain.verifier import OwnershipVerifier
from services.domain.webhook_endpoints import GrpcWebhookEndpoints
from services.health.mail_client import MailDeliveryProbe
from services.health.servicer import SuiteHealthServicer
from services.iam.api_keys import INDEXES as API_KEY_INDEXES
from services.iam.api_keys import ApiKeyManager, MongoApiKeyRepository
from services.iam.servicer import ApiKeyServicer

SERVICE_NAME = "domain-service"
DOMAIN_SERVICE = domain_pb2.DESCRIPTOR.services_by_name["DomainService"].full_name
ROUTE_SERVICE = routes_pb2.DESCRIPTOR.services_by_name["RouteService"].full_name
API_KEY_SERVICE = api_keys_pb2.DESCRIPTOR.services_by_name["ApiKeyService"].full_name
SUITE_HEALTH_SERVICE = suite_pb2.DESCRIPTOR.services_by_name["SuiteHealthService"].full_name
SMTP_SERVICE = smtp_pb2.DESCRIPTOR.services_by_name["SmtpService"].full_name
MAIL_SERVICE = mail_pb2.DESCRIPTOR.services_by_name["MailService"].full_name


@dataclass
class DomainApp:
    """The running process: server, use cases (tests drive the lifecycle through them)."""

    running: RunningService
    domains: DomainManager
    api_keys: ApiKeyManager


def policy_from(settings: DomainSettings) -> DomainPolicy:
    """Lifecycle rules and limits from settings."""
    return DomainPolicy(
        verification_window=timedelta(seconds=settings.verification_window),
        recheck_interval=timedelta(seconds=settings.recheck_interval),
        suspension_grace=timedelta(seconds=settings.suspension_grace),
        default_page_size=settings.default_page_size,
        max_page_size=settings.max_page_size,
        max_domains_per_tenant=settings.max_domains_per_tenant,
        max_dns_records=settings.max_dns_records_per_domain,
        max_dns_records_per_tenant=settings.max_dns_records_per_tenant,
        bounce_domain=settings.bounce_domain,
        bounce_mx_host=settings.bounce_mx_host,
    )


async def build_app(
    settings: DomainSettings,
    *,
    clock: Clock | None = None,
    bind: str | None = None,
    run_lifecycle: bool = True,
) -> DomainApp:
    """Wire and start the domain service process.

    Args:
        settings: configuration.
        clock: time source (tests pass a manual clock).
        bind: "host:port" to listen on; defaults to the configured host and domain port.
        run_lifecycle: whether to start the background lifecycle loop (tests drive it).
    """
    clock = clock or SystemClock()
    database = Database.connect(settings)
    smtp_channel = traced_channel(settings.smtp_service_target)
    mail_channel = traced_channel(settings.mail_service_target)
    domain_repository = MongoDomainRepository(database.db)
    routes = RouteManager(
        routes=MongoRouteRepository(database.db),
        domains=MongoDomainLookup(database.db, domain_repository),
        # The mail service owns webhook endpoints: it says whether a route's endpoint exists.
        endpoints=GrpcWebhookEndpoints(mail_channel, settings=settings),
        clock=clock,
    )
    manager = DomainManager(
        domains=domain_repository,
        claims=MongoClaimRepository(database.db),
        checker=OwnershipVerifier(resolver=DnsResolver.from_settings(settings), clock=clock),
        clock=clock,
        policy=policy_from(settings),
        # The mail service owns emails: it cancels the unfinished ones of a deleted domain.
        # The SMTP service owns relay configs and DKIM keys: it purges them on deletion.
        on_deleted=[
            MailCancelCascade(mail_channel, settings=settings),
            SmtpDataCascade(
                smtp_channel,
                settings=settings,
            ),
            # Routes are the domain service's own: they go with the domain.
            routes.purge_domain,
        ],
    )
    api_keys = ApiKeyManager(
        keys=MongoApiKeyRepository(database.db),
        clock=clock,
        default_page_size=settings.default_page_size,
        max_page_size=settings.max_page_size,
    )
    gauge = DomainStatusGauge(database.db)
    health = SuiteHealthServicer(
        services={
            "smtp-service": (smtp_channel, SMTP_SERVICE),
            "mail-service": (mail_channel, MAIL_SERVICE),
        },
        db=database.db,
        clock=clock,
        version=settings.version,
        process=SERVICE_NAME,
        metrics_peers=[Peer.parse(peer) for peer in settings.metrics_peers],
        delivery=MailDeliveryProbe(mail_channel, settings=settings),
        # Health is hosted here and asks the domain service's own code to count its domains,
        # rather than reading the domains collection itself.
        before_metrics=[gauge.refresh],
    )
    server = await start_service(
        settings=settings,
        database=database,
        bind=bind or f"{settings.host}:{settings.domain_grpc_port}",
        service_names=(DOMAIN_SERVICE, ROUTE_SERVICE, API_KEY_SERVICE, SUITE_HEALTH_SERVICE),
        registrars=(
            lambda s: domain_pb2_grpc.add_DomainServiceServicer_to_server(
                DomainServicer(manager), s
            ),
            lambda s: routes_pb2_grpc.add_RouteServiceServicer_to_server(RouteServicer(routes), s),
            lambda s: api_keys_pb2_grpc.add_ApiKeyServiceServicer_to_server(
                ApiKeyServicer(api_keys), s
            ),
            lambda s: suite_pb2_grpc.add_SuiteHealthServiceServicer_to_server(health, s),
        ),
        api_keys=api_keys,
        indexes=(*DOMAIN_INDEXES, *ROUTE_INDEXES, *API_KEY_INDEXES),
    )
    # The suite health report includes this process too, asked the same way as the others.
    self_channel = traced_channel(f"127.0.0.1:{server.port}")
    health.watch(SERVICE_NAME, self_channel, DOMAIN_SERVICE)
    # Keeps the azora_domains gauge current on the per-process scrape port, too.
    server.background.append(run_periodically("domain-gauge", 60.0, gauge.refresh))
    if run_lifecycle:
        server.background.append(
            run_periodically(
                "domain-lifecycle", settings.lifecycle_sweep_interval, manager.run_lifecycle_once
            )
        )
    running = RunningService(server, database, [smtp_channel, mail_channel, self_channel])
    return DomainApp(running, manager, api_keys)


async def build(settings: DomainSettings, *, bind: str | None = None) -> RunningService:
    """Start the process and return only its server (what suites of several services use)."""
    return (await build_app(settings, bind=bind)).running


__all__ = ["DomainApp", "build", "build_app"]
