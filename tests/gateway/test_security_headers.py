"""Security headers on every REST response, as Helmet sets them for an API.

Also CORS, which is off unless origins are configured.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.security import SECURITY_HEADERS
from tests.gateway.conftest import RestStack
from tests.gateway.test_rest_errors import serve

ALLOWED = "https://app.azora.example"


@pytest.fixture
async def cors_url(rest_stack: RestStack) -> AsyncIterator[str]:
    """A gateway that lets one browser origin call it."""
    app = await create_app(rest_stack.settings, config=GatewayConfig(cors_origins=(ALLOWED,)))
    async for url in serve(app):
        yield url


@pytest.mark.parametrize("path", ["/health/ping", "/api/v1/domains/nope", "/nowhere", "/api-docs"])
async def test_every_response_carries_the_security_headers(
    http: aiohttp.ClientSession, rest_base_url: str, path: str
) -> None:
    # Successes, errors from services, the gateway's own 404s and the docs page alike.
    async with http.get(f"{rest_base_url}{path}") as reply:
        for name, value in SECURITY_HEADERS.items():
            assert reply.headers.get(name) == value, name
        csp = reply.headers["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in csp
        if path == "/api-docs":
            assert "script-src 'self' 'sha256-" in csp
            assert "https:" not in csp  # no CDN
        else:
            assert csp.startswith("default-src 'none'")
        assert "Access-Control-Allow-Origin" not in reply.headers
        assert reply.headers["Server"] == "azora"  # no software versions


async def test_cors_is_off_by_default(http: aiohttp.ClientSession, rest_base_url: str) -> None:
    # Without configured origins a preflight is not answered with CORS headers.
    async with http.options(
        f"{rest_base_url}/api/v1/domains",
        headers={"Origin": ALLOWED, "Access-Control-Request-Method": "POST"},
    ) as reply:
        assert "Access-Control-Allow-Origin" not in reply.headers
        assert reply.status == 404


async def test_cors_allows_only_configured_origins(
    http: aiohttp.ClientSession, cors_url: str
) -> None:
    # A configured origin gets a preflight answer and the allow-origin header; others do not.
    async with http.options(
        f"{cors_url}/api/v1/domains",
        headers={"Origin": ALLOWED, "Access-Control-Request-Method": "POST"},
    ) as preflight:
        assert preflight.status == 204
        assert preflight.headers["Access-Control-Allow-Origin"] == ALLOWED
        assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
        assert "authorization" in preflight.headers["Access-Control-Allow-Headers"]
    async with http.get(f"{cors_url}/health/ping", headers={"Origin": ALLOWED}) as allowed:
        assert allowed.status == 200
        assert allowed.headers["Access-Control-Allow-Origin"] == ALLOWED
        assert allowed.headers["Vary"] == "Origin"
    async with http.get(
        f"{cors_url}/health/ping", headers={"Origin": "https://evil.example"}
    ) as other:
        assert other.status == 200
        assert "Access-Control-Allow-Origin" not in other.headers
