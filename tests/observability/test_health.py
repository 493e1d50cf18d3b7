"""Suite health through the gateway: /health, /health/ready, /health/ping and grpc.health.v1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pymongo import AsyncMongoClient

from services.core.clock import ManualClock
from services.core.mongo import Document
from services.core.runtime import watch_readiness
from services.core.server import create_server
from services.domain.app import DOMAIN_SERVICE, DomainApp
from services.domain.app import build_app as build_domain
from tests.gateway.rest import call
from tests.observability.conftest import serve_gateway
from tests.support.settings import SuiteSettings

HEALTH_REPORT = "type.googleapis.com/azora.health.v1.HealthReport"
SERVING = int(health_pb2.HealthCheckResponse.SERVING)
NOT_SERVING = int(health_pb2.HealthCheckResponse.NOT_SERVING)


@dataclass
class LonelyDomain:
    """A domain process whose SMTP and mail targets are closed ports, with a gateway."""

    app: DomainApp
    base_url: str


@pytest.fixture
async def lonely(
    settings: SuiteSettings, clock: ManualClock, closed_port: int
) -> AsyncIterator[LonelyDomain]:
    dead = f"127.0.0.1:{closed_port}"
    app = await build_domain(
        settings.with_overrides(smtp_service_target=dead, mail_service_target=dead),
        clock=clock,
        bind="127.0.0.1:0",
        run_lifecycle=False,
    )
    runner, base_url = await serve_gateway(
        settings.with_overrides(
            service_name="gateway",
            domain_service_target=f"127.0.0.1:{app.running.port}",
            smtp_service_target=dead,
            mail_service_target=dead,
        )
    )
    yield LonelyDomain(app, base_url)
    await runner.cleanup()
    await app.running.stop(None)


async def grpc_check(port: int, service: str = "") -> int:
    """The grpc.health.v1 status a Kubernetes gRPC probe would see."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[attr-defined]
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return int(reply.status)


# A healthy suite: 200, every component up, MongoDB with its ping latency, version and uptime.
async def test_health_is_200_with_components(
    http: aiohttp.ClientSession, rest_base_url: str
) -> None:
    reply = await call(http, "GET", f"{rest_base_url}/health")
    assert reply.status == 200, reply.json
    components = {c["name"]: c for c in reply.json["components"]}
    required = [c for c in components.values() if c.get("required")]
    assert {c["name"] for c in required} == {
        "mongodb",
        "domain-service",
        "smtp-service",
        "mail-service",
    }
    assert all(c["status"] == "COMPONENT_STATUS_UP" for c in required)
    # The mail service's queue and relays are there too, optional: "degraded" at worst (other
    # tests of this session may have left relays that never answered).
    assert not components["queue"].get("required")
    assert components["queue"]["detail"].startswith("depth ")
    assert not components["smtp-relays"].get("required")
    optional_down = any(c["status"] != "COMPONENT_STATUS_UP" for c in components.values())
    assert reply.json["status"] == ("degraded" if optional_down else "healthy")
    mongo = components["mongodb"]
    assert mongo["required"] is True
    assert mongo["latency"].endswith("s")
    assert reply.json["version"]
    assert reply.json["uptime"].endswith("s")


# A required component down (the SMTP and mail services are closed ports): 503, and the
# HealthReport naming them travels in the Status details.
async def test_health_is_503_with_report_when_a_service_is_down(
    http: aiohttp.ClientSession, lonely: LonelyDomain
) -> None:
    reply = await call(http, "GET", f"{lonely.base_url}/health")
    assert reply.status == 503, reply.json
    assert reply.json["code"] == 14
    assert reply.error_info["reason"] == "UNHEALTHY"
    report = reply.detail(HEALTH_REPORT)
    assert report["status"] == "unhealthy"
    status = {c["name"]: c["status"] for c in report["components"]}
    assert status["smtp-service"] == "COMPONENT_STATUS_DOWN"
    assert status["mail-service"] == "COMPONENT_STATUS_DOWN"
    assert status["mongodb"] == "COMPONENT_STATUS_UP"
    assert status["domain-service"] == "COMPONENT_STATUS_UP"


# Readiness is about the answering process: with peers down it is 200 "degraded", and the
# process's grpc.health.v1 status agrees (SERVING).
async def test_ready_ignores_peers_and_agrees_with_grpc_health(
    http: aiohttp.ClientSession, lonely: LonelyDomain
) -> None:
    reply = await call(http, "GET", f"{lonely.base_url}/health/ready")
    assert reply.status == 200, reply.json
    assert reply.json["status"] == "degraded"
    assert await grpc_check(lonely.app.running.port, DOMAIN_SERVICE) == SERVING


# A process that reports NOT_SERVING (what shutdown or a lost database does) is not ready:
# /health/ready answers 503 and grpc.health.v1 Check says NOT_SERVING, together.
async def test_not_serving_makes_ready_503(
    http: aiohttp.ClientSession, lonely: LonelyDomain
) -> None:
    await lonely.app.running.server.set_serving(False)
    reply = await call(http, "GET", f"{lonely.base_url}/health/ready")
    assert reply.status == 503, reply.json
    assert reply.error_info["reason"] == "NOT_READY"
    report = reply.detail(HEALTH_REPORT)
    local = next(c for c in report["components"] if c["name"] == "domain-service")
    assert local["status"] == "COMPONENT_STATUS_DOWN"
    assert await grpc_check(lonely.app.running.port, DOMAIN_SERVICE) == NOT_SERVING
    ping = await call(http, "GET", f"{lonely.base_url}/health/ping")
    assert ping.status == 200
    assert ping.json["message"] == "pong"


# The readiness watcher turns grpc.health.v1 NOT_SERVING when the database stops answering.
async def test_readiness_watcher_follows_the_database(closed_port: int) -> None:
    server = await create_server(bind="127.0.0.1:0", service_names=("x.v1.X",), registrars=())
    await server.set_serving(True)
    client: AsyncMongoClient[Document] = AsyncMongoClient(
        f"mongodb://127.0.0.1:{closed_port}/", serverSelectionTimeoutMS=100
    )
    server.background.append(asyncio.create_task(watch_readiness(server, client["x"], 0.05)))
    try:
        status: int = SERVING
        while status == SERVING:  # bounded by the test timeout
            await asyncio.sleep(0.05)
            status = await grpc_check(server.port, "x.v1.X")
        assert status == NOT_SERVING
    finally:
        await server.stop(None)
        await client.close()
