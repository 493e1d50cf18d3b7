"""Composition root of the SMTP service process.

Serves azora.smtp.v1.SmtpService (relay configs and live tests, DKIM keys with rotation, SPF,
DMARC, DNS checks) with health and reflection, and runs the DKIM lifecycle loop (DNS checks,
auto-activation, retirement after the overlap) in the background. Domains and API keys belong
to the domain service and are asked of it over one gRPC channel.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import grpc
from azora.smtp.v1 import smtp_pb2, smtp_pb2_grpc
from publicsuffixlist import PublicSuffixList

from services.core.api_key_client import remote_api_key_resolver
from services.core.clock import Clock, SystemClock
from services.core.dns import DnsResolver
from services.core.netguard import AddressPolicy, host_resolver
from services.core.runtime import Database, RunningService, run_periodically, start_service
from services.core.secrets_box import SecretsBox
from services.smtp.dkim_manager import DkimManager, DkimPolicy
from services.smtp.dmarc import DmarcBuilder
from services.smtp.dns_check import RecordChecker
from services.smtp.domain_data import DomainDataRemover
from services.smtp.domains_client import GrpcDomainDirectory
from services.smtp.records_manager import RecordsManager
from services.smtp.relay_manager import RelayManager, RelayPolicy
from services.smtp.relay_probe import RelayTester
from services.smtp.repository import INDEXES as SMTP_INDEXES
from services.smtp.repository import (
    MongoAuthRecordRepository,
    MongoDkimKeyringRepository,
    MongoSmtpConfigRepository,
)
from services.smtp.servicer import SmtpServicer
from services.smtp.settings import SmtpSettings
from services.smtp.spf import SpfBuilder

SERVICE_NAME = "smtp-service"
SMTP_SERVICE = smtp_pb2.DESCRIPTOR.services_by_name["SmtpService"].full_name


@dataclass
class SmtpApp:
    """The running process: server and use cases (tests drive the lifecycle through them)."""

    running: RunningService
    relays: RelayManager
    dkim: DkimManager
    records: RecordsManager


def relay_policy_from(settings: SmtpSettings) -> RelayPolicy:
    """Rules of relay configuration from settings."""
    return RelayPolicy(default_timeout=timedelta(milliseconds=settings.smtp_timeout_ms))


def dkim_policy_from(settings: SmtpSettings) -> DkimPolicy:
    """Rules of the DKIM key lifecycle from settings."""
    return DkimPolicy(
        rotation_overlap=timedelta(seconds=settings.dkim_rotation_overlap),
        check_interval=timedelta(seconds=settings.dkim_check_interval),
    )


async def build_app(
    settings: SmtpSettings,
    *,
    clock: Clock | None = None,
    bind: str | None = None,
    run_lifecycle: bool = True,
) -> SmtpApp:
    """Wire and start the SMTP service process, returning its use cases too.

    Args:
        settings: configuration.
        clock: time source (tests pass a manual clock).
        bind: "host:port" to listen on; defaults to the configured host and SMTP port.
        run_lifecycle: whether to start the background DKIM lifecycle loop (tests drive it).
    """
    clock = clock or SystemClock()
    database = Database.connect(settings)
    api_keys, domain_channel = remote_api_key_resolver(settings)
    dns = DnsResolver.from_settings(settings)
    address_policy = AddressPolicy(allow_private=settings.smtp_allow_private_hosts)
    # Relay names resolve where ownership records do when nameservers are configured (one DNS
    # view for the whole service); otherwise the OS resolver, which also reads /etc/hosts.
    relay_resolver = host_resolver(settings, dns=dns)
    domains = GrpcDomainDirectory(
        domain_channel,
        settings=settings,
        cache_ttl=settings.domain_cache_ttl,
    )
    configs = MongoSmtpConfigRepository(database.db)
    keyrings = MongoDkimKeyringRepository(database.db)
    auth_records = MongoAuthRecordRepository(database.db)
    secrets = SecretsBox.from_settings(settings)
    checker = RecordChecker(dns=dns, clock=clock)
    remover = DomainDataRemover(configs=configs, keyrings=keyrings, auth_records=auth_records)
    relays = RelayManager(
        domains=domains,
        configs=configs,
        secrets=secrets,
        tester=RelayTester(
            resolver=relay_resolver, policy=address_policy, ca_file=settings.smtp_ca_file
        ),
        address_policy=address_policy,
        clock=clock,
        policy=relay_policy_from(settings),
    )
    dkim = DkimManager(
        domains=domains,
        keyrings=keyrings,
        secrets=secrets,
        checker=checker,
        remover=remover,
        clock=clock,
        policy=dkim_policy_from(settings),
    )
    records = RecordsManager(
        domains=domains,
        configs=configs,
        auth_records=auth_records,
        dkim=dkim,
        checker=checker,
        spf=SpfBuilder(dns),
        dmarc=DmarcBuilder(PublicSuffixList()),
        clock=clock,
    )
    servicer = SmtpServicer(relays=relays, dkim=dkim, records=records, remover=remover)
    server = await start_service(
        settings=settings,
        database=database,
        bind=bind or f"{settings.host}:{settings.smtp_grpc_port}",
        service_names=(SMTP_SERVICE,),
        registrars=(lambda s: smtp_pb2_grpc.add_SmtpServiceServicer_to_server(servicer, s),),
        api_keys=api_keys,
        indexes=SMTP_INDEXES,
    )
    if run_lifecycle:
        server.background.append(
            run_periodically(
                "dkim-lifecycle", settings.lifecycle_sweep_interval, dkim.run_lifecycle_once
            )
        )
    channels: list[grpc.aio.Channel] = [domain_channel]
    return SmtpApp(RunningService(server, database, channels), relays, dkim, records)


async def build(settings: SmtpSettings, *, bind: str | None = None) -> RunningService:
    """Start the process and return only its server (what suites of several services use)."""
    return (await build_app(settings, bind=bind)).running


__all__ = ["SERVICE_NAME", "SMTP_SERVICE", "SmtpApp", "build", "build_app"]
