"""Services with small budgets, for the rate-limit, quota and abuse-limit tests.

The session's services run with budgets too high to trip (tests/conftest.py `make_settings`);
these tests start their own: a domain service, or a mail service whose sender domains come
from an in-memory directory, each on a fresh database of the session's FerretDB (the counts
live in the database, so two tests never share them), optionally behind a local REST gateway.
Everything started through `LimitedServices` is stopped, and its database dropped, at teardown.
`service_processes` starts domain services as real processes instead (replicas on one database).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import idna
import pytest
from aiohttp import web
from azora.domain.v1 import domain_pb2_grpc
from azora.mail.v1 import mail_pb2, mail_pb2_grpc
from grpc_health.v1 import health_pb2
from pymongo import AsyncMongoClient

from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.server import create_runner
from services.core.ids import new_id
from services.core.ratelimit import RateLimiter
from services.core.runtime import RunningService
from services.domain.app import build_app as build_domain
from services.mail.app import build_app as build_mail
from services.mail.relay_directory import InMemoryRelayDirectory, RelaySecurity, RelaySettings
from services.mail.relay_lookup import DirectoryRelayLookup
from services.mail.senders import SenderDomain, StaticSenderDirectory
from tests.conftest import REPO_ROOT, Tenant, make_settings, unique_domain
from tests.support.settings import SuiteSettings


def limiter_of(running: RunningService) -> RateLimiter:
    """The rate limiter of a running service."""
    limiter = running.server.rate_limiter
    assert limiter is not None
    return limiter


@dataclass
class LimitedDomain:
    """A domain service with its own settings, and a stub to it."""

    running: RunningService
    stub: domain_pb2_grpc.DomainServiceAsyncStub
    settings: SuiteSettings

    @property
    def limiter(self) -> RateLimiter:
        """Its rate limiter."""
        return limiter_of(self.running)


@dataclass
class LimitedMail:
    """A mail service whose sender domains are an in-memory directory (no workers)."""

    running: RunningService
    stub: mail_pb2_grpc.MailServiceAsyncStub
    settings: SuiteSettings
    senders: StaticSenderDirectory
    relays: InMemoryRelayDirectory

    @property
    def limiter(self) -> RateLimiter:
        """Its rate limiter."""
        return limiter_of(self.running)

    def add_domain(self, tenant: Tenant) -> str:
        """An active sender domain of `tenant`; returns its name."""
        name = unique_domain()
        a_label = idna.encode(name, uts46=True).decode()
        domain_id = new_id()
        self.senders.domains[(tenant.id, a_label)] = SenderDomain(domain_id, a_label)
        # A relay must be configured for a send to be accepted; no worker ever uses it.
        self.relays.domains.add((tenant.id, domain_id))
        self.relays.add_relay(
            tenant_id=tenant.id,
            relay=RelaySettings(domain_id, "127.0.0.1", 9, RelaySecurity.NONE),
        )
        return name

    async def send(self, tenant: Tenant, domain: str, **fields: Any) -> mail_pb2.Email:
        """SendEmail as `tenant` from `domain` (one recipient unless `fields` say otherwise)."""
        request = mail_pb2.SendEmailRequest(
            **{"from_address": f"s@{domain}", "to": ["a@example.org"], "text": "t", **fields}
        )
        return await self.stub.SendEmail(request, metadata=tenant.metadata)


@dataclass
class LimitedServices:
    """Starts services with small budgets; `close` stops them and drops their databases."""

    mongodb_uri: str
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    services: list[RunningService] = field(default_factory=list)
    runners: list[web.AppRunner] = field(default_factory=list)
    databases: set[str] = field(default_factory=set)

    def settings(self, database: str | None = None, **env: str) -> SuiteSettings:
        """Test settings on `database` (a fresh one by default) with `env` on top."""
        database = database or f"azora_limits_{secrets.token_hex(4)}"
        self.databases.add(database)
        return make_settings(self.mongodb_uri, database, **env)

    def _channel(self, port: int) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.channels.append(channel)
        return channel

    async def domain(self, settings: SuiteSettings) -> LimitedDomain:
        """A domain service (it also owns API keys) with `settings`."""
        app = await build_domain(settings, bind="127.0.0.1:0", run_lifecycle=False)
        self.services.append(app.running)
        stub = domain_pb2_grpc.DomainServiceStub(self._channel(app.running.port))
        return LimitedDomain(app.running, stub, settings)

    async def mail(self, settings: SuiteSettings) -> LimitedMail:
        """A mail service with in-memory sender domains and relays, without workers."""
        senders = StaticSenderDirectory()
        relays = InMemoryRelayDirectory()
        app = await build_mail(
            settings,
            bind="127.0.0.1:0",
            senders=senders,
            relays=DirectoryRelayLookup(relays),
            run_workers=False,
        )
        self.services.append(app.running)
        stub = mail_pb2_grpc.MailServiceStub(self._channel(app.running.port))
        return LimitedMail(app.running, stub, settings, senders, relays)

    async def gateway(
        self, settings: SuiteSettings, upstreams: dict[str, int], **config: Any
    ) -> str:
        """A local REST gateway (service full name -> port); returns its base URL."""
        targets = {service: f"127.0.0.1:{port}" for service, port in upstreams.items()}
        app = await create_app(
            settings.with_overrides(service_name="gateway"),
            config=GatewayConfig(upstreams=targets, **config),
        )
        runner = create_runner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        self.runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        address: Any = runner.addresses[0]
        return f"http://127.0.0.1:{address[1]}"

    async def close(self) -> None:
        """Stop everything started and drop the databases."""
        for runner in self.runners:
            await runner.cleanup()
        for channel in self.channels:
            await channel.close()
        for running in self.services:
            await running.stop(None)
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(self.mongodb_uri)
        for database in self.databases:
            await client.drop_database(database)
        await client.close()


@pytest.fixture
async def limited(ferretdb: str) -> AsyncIterator[LimitedServices]:
    """Start services with small budgets for one test."""
    services = LimitedServices(ferretdb)
    yield services
    await services.close()


@dataclass
class ServiceProcess:
    """A service started as its own process (``python -m services.<name>``) on loopback."""

    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    log: Path

    async def wait_serving(self, service: str) -> None:
        """Wait until grpc.health.v1 reports `service` SERVING (fails if the process exits)."""
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            check = channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            async with asyncio.timeout(60):
                while True:
                    assert self.process.poll() is None, self.log.read_text()
                    try:
                        reply = await check(health_pb2.HealthCheckRequest(service=service))
                        if reply.status == health_pb2.HealthCheckResponse.SERVING:
                            return
                    except grpc.aio.AioRpcError:
                        pass
                    await asyncio.sleep(0.1)

    async def metric(self, http: aiohttp.ClientSession, name: str, labels: str) -> float:
        """One sample of the process's Prometheus exposition (0 when absent)."""
        async with http.get(f"http://127.0.0.1:{self.metrics_port}/metrics") as response:
            text = await response.text()
        for line in text.splitlines():
            if line.startswith(f"{name}{{{labels}}} "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not stop."""
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def service_processes(tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """Start domain service processes with an environment on top of the test settings'."""
    started: list[ServiceProcess] = []

    def start(settings: SuiteSettings, **env: str) -> ServiceProcess:
        port, metrics_port = _free_port(), _free_port()
        log = tmp_path / f"domain-{len(started)}.log"
        environment = {
            **os.environ,
            "AZORA_ENV": "test",
            "AZORA_HOST": "127.0.0.1",
            "MONGODB_URI": settings.mongodb_uri,
            "AZORA_MONGODB_DATABASE": settings.mongodb_database,
            "JWT_SECRET": settings.jwt_secret,
            "AZORA_SERVICE_TOKEN_SECRET": settings.service_token_secret,
            "LOG_LEVEL": "warn",
            "AZORA_DOMAIN_GRPC_PORT": str(port),
            "AZORA_METRICS_PORT_DOMAIN": str(metrics_port),
            **env,
        }
        with log.open("wb") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", "services.domain"],
                cwd=REPO_ROOT,
                env=environment,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        started.append(ServiceProcess(process, port, metrics_port, log))
        return started[-1]

    yield start
    for service in started:
        service.stop()
