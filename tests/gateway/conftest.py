"""The whole suite behind the local REST gateway, in-process on loopback, for REST tests.

`rest_base_url` ("http://127.0.0.1:PORT") is the entry point every REST test (and the Swagger
UI test) uses. Behind it: the SMTP and mail services, a domain service whose health report
watches those two (so /health/ready can be green), all on the session's FerretDB and Knot DNS,
and the gateway itself serving real HTTP through aiohttp.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.app import create_app
from gateway.server import create_runner
from services.core.clock import ManualClock
from services.core.runtime import RunningService
from services.domain.app import DomainApp
from services.domain.app import build_app as build_domain
from services.mail.app import build as build_mail
from services.smtp.app import build_app as build_smtp
from tests.conftest import Tenant, new_tenant
from tests.support.settings import SuiteSettings


@dataclass(frozen=True)
class RestStack:
    """The running gateway and what it calls."""

    base_url: str
    settings: SuiteSettings
    domain: DomainApp
    smtp: RunningService
    mail: RunningService


@pytest.fixture(scope="session")
async def rest_stack(
    settings: SuiteSettings, clock: ManualClock, domain_app: DomainApp
) -> AsyncIterator[RestStack]:
    """Start SMTP, mail, a domain service watching them, and the gateway in front."""
    # SMTP and mail resolve API keys through a domain service: the session one will do (same
    # database, so keys created through the gateway's domain service resolve there too).
    resolver = f"127.0.0.1:{domain_app.running.port}"
    # No background DKIM sweep: it would act on other tests' keys in the shared database.
    smtp_app = await build_smtp(
        settings.with_overrides(domain_service_target=resolver),
        clock=clock,
        bind="127.0.0.1:0",
        run_lifecycle=False,
    )
    smtp = smtp_app.running
    # The mail service asks the SMTP service for relays and signing keys.
    mail = await build_mail(
        settings.with_overrides(
            domain_service_target=resolver, smtp_service_target=f"127.0.0.1:{smtp.port}"
        ),
        bind="127.0.0.1:0",
    )
    targets = {
        "smtp_service_target": f"127.0.0.1:{smtp.port}",
        "mail_service_target": f"127.0.0.1:{mail.port}",
    }
    # The session domain service's health report watches the default ports; this one watches
    # the services actually running, so the REST health routes report the real suite.
    domain = await build_domain(
        settings.with_overrides(**targets),
        clock=clock,
        bind="127.0.0.1:0",
        run_lifecycle=False,
    )
    gateway_settings = settings.with_overrides(
        service_name="gateway",
        domain_service_target=f"127.0.0.1:{domain.running.port}",
        **targets,
    )
    app = await create_app(gateway_settings)
    runner = create_runner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    address: Any = runner.addresses[0]
    yield RestStack(
        base_url=f"http://127.0.0.1:{address[1]}",
        settings=gateway_settings,
        domain=domain,
        smtp=smtp,
        mail=mail,
    )
    await runner.cleanup()
    await domain.running.stop(None)
    await mail.stop(None)
    await smtp.stop(None)


@pytest.fixture(scope="session")
def rest_base_url(rest_stack: RestStack) -> str:
    """Base URL of the local REST gateway, e.g. "http://127.0.0.1:41234"."""
    return rest_stack.base_url


@pytest.fixture(scope="session")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """One HTTP client for the session (real HTTP over loopback)."""
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def rest_tenant(settings: SuiteSettings) -> Tenant:
    """A fresh tenant for one test."""
    return new_tenant(settings)


def bearer(tenant: Tenant) -> dict[str, str]:
    """Headers authenticating as `tenant`."""
    return {"Authorization": f"Bearer {tenant.token}"}


@pytest.fixture
def auth(rest_tenant: Tenant) -> dict[str, str]:
    """Authorization headers of a fresh tenant."""
    return bearer(rest_tenant)
