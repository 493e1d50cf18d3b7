"""grpcurl lists and describes every service through server reflection.

grpcurl is built with `go install` at a pinned version (`make deps`); it also calls
grpc.health.v1 and an rpc on each service.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.core.runtime import RunningService
from services.domain.app import DomainApp
from services.mail.app import build as build_mail
from services.smtp.app import build as build_smtp
from tests.support.settings import SuiteSettings

REPO_ROOT = Path(__file__).resolve().parents[2]


def grpcurl_binary() -> str:
    local = REPO_ROOT / "bin" / "grpcurl"
    if local.exists():
        return str(local)
    found = shutil.which("grpcurl")
    if found is None:
        pytest.fail("grpcurl not found: run `make deps` (it installs bin/grpcurl)")
    return found


async def grpcurl(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        grpcurl_binary(),
        "-plaintext",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0, err.decode()
    return out.decode()


@pytest.fixture(scope="module")
async def peers(settings: SuiteSettings) -> AsyncIterator[dict[str, RunningService]]:
    """The SMTP and mail service processes (in-process servers on free ports)."""
    smtp = await build_smtp(settings, bind="127.0.0.1:0")
    mail = await build_mail(settings, bind="127.0.0.1:0")
    yield {"smtp": smtp, "mail": mail}
    await smtp.stop(None)
    await mail.stop(None)


async def test_grpcurl_lists_and_describes_every_service(
    domain_app: DomainApp, peers: dict[str, RunningService]
) -> None:
    # Each process lists its services (plus health and reflection) and describes their rpcs.
    expected = {
        domain_app.running.port: {
            "azora.domain.v1.DomainService": "CreateDomain",
            "azora.domain.v1.RouteService": "CreateRoute",
            "azora.iam.v1.ApiKeyService": "CreateApiKey",
            "azora.health.v1.SuiteHealthService": "GetReadiness",
        },
        peers["smtp"].port: {"azora.smtp.v1.SmtpService": "GenerateDkimKey"},
        peers["mail"].port: {
            "azora.mail.v1.MailService": "SendEmail",
            "azora.mail.v1.EventService": "ListEvents",
            "azora.mail.v1.SuppressionService": "AddSuppressions",
            "azora.mail.v1.WebhookService": "CreateWebhook",
            "azora.mail.v1.InboundService": "ListInboundMessages",
        },
    }
    for port, services in expected.items():
        target = f"127.0.0.1:{port}"
        listed = set((await grpcurl(target, "list")).split())
        assert listed == {
            *services,
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        }
        for service, rpc in services.items():
            described = await grpcurl(target, "describe", service)
            assert f"rpc {rpc}" in described
        health = await grpcurl(target, "grpc.health.v1.Health/Check")
        assert '"status": "SERVING"' in health


async def test_grpcurl_describes_messages_with_json_names(domain_app: DomainApp) -> None:
    # Message descriptions come through reflection too, including the http annotations' types.
    described = await grpcurl(
        f"127.0.0.1:{domain_app.running.port}", "describe", "azora.domain.v1.Domain"
    )
    assert "verification_token" in described
    assert "repeated .azora.domain.v1.RequiredRecord required_records" in described


async def test_grpcurl_calls_an_rpc(domain_app: DomainApp) -> None:
    # An operator can call an rpc with JSON through reflection (development tenant).
    out = await grpcurl(
        "-d",
        '{"name": "grpcurl-check.example"}',
        f"127.0.0.1:{domain_app.running.port}",
        "azora.domain.v1.DomainService/CreateDomain",
    )
    assert '"name": "grpcurl-check.example"' in out
    assert '"status": "DOMAIN_STATUS_PENDING"' in out
