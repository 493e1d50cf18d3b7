"""Fixtures of the observability tests: the REST stack of the gateway tests.

The suite runs in this process (gateway and services on loopback), so one in-memory span
exporter (`spans`, tests/support/tracing.py) sees the spans of every hop and one Prometheus
registry holds every process's metrics.
"""

from __future__ import annotations

import pytest
from aiohttp import web

from gateway.app import create_app
from services.core.settings import Settings
from tests.gateway.conftest import RestStack, http, rest_base_url, rest_stack
from tests.support import ports

__all__ = ["RestStack", "http", "rest_base_url", "rest_stack"]


async def serve_gateway(settings: Settings) -> tuple[web.AppRunner, str]:
    """A gateway for `settings` on a free loopback port; returns its runner and base URL."""
    app = await create_app(settings)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    return ports.closed_port()
