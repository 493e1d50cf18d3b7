"""/api-docs over HTTP: our Swagger UI page, the package's assets, the OpenAPI document.

These are the gateway's only routes that are not transcoded. (The page itself, rendered in
Chromium, is checked by test_swagger_ui.py.)
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.app import create_app
from gateway.config import DEFAULT_OPENAPI_PATH, GatewayConfig
from tests.gateway.conftest import RestStack
from tests.gateway.rest import assert_status_json, call


@pytest.fixture
async def bare_url(rest_stack: RestStack, tmp_path: Path) -> AsyncIterator[str]:
    """A gateway with neither the OpenAPI document nor the Swagger UI package installed."""
    config = GatewayConfig(openapi_path=tmp_path / "none.json", swagger_ui_dir=tmp_path)
    app = await create_app(rest_stack.settings, config=config)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    address: Any = runner.addresses[0]
    yield f"http://127.0.0.1:{address[1]}"
    await runner.cleanup()


# /api-docs (with or without the slash) is our page, loading only local assets.
async def test_swagger_page(http: aiohttp.ClientSession, rest_base_url: str) -> None:
    for path in ("/api-docs", "/api-docs/", "/api-docs/index.html"):
        page = await call(http, "GET", f"{rest_base_url}{path}")
        assert page.status == 200
        assert page.content_type.startswith("text/html")
        html = page.body.decode()
        for asset in ("swagger-ui-bundle.js", "swagger-ui-standalone-preset.js", "swagger-ui.css"):
            assert f'"./{asset}"' in html
        assert 'url: "/api-docs/openapi.json"' in html
        # Nothing from a CDN: the machine is offline.
        assert "https://" not in html
        assert "http://" not in html
    for asset, kind in (
        ("swagger-ui-bundle.js", "javascript"),
        ("swagger-ui-standalone-preset.js", "javascript"),
        ("swagger-ui.css", "text/css"),
    ):
        reply = await call(http, "GET", f"{rest_base_url}/api-docs/{asset}")
        assert reply.status == 200
        assert kind in reply.content_type
        assert len(reply.body) > 1000


# The package's own index and demo initializer, other files and traversal are not served.
async def test_only_assets_are_served(http: aiohttp.ClientSession, rest_base_url: str) -> None:
    for name in ("swagger-initializer.js", "package.json", "nothing.js", "..%2Fpackage.json"):
        reply = await call(http, "GET", f"{rest_base_url}/api-docs/{name}")
        assert_status_json(reply, http_status=404, code=5)


# The committed OpenAPI document is served as JSON; a gateway without one answers 404 Status JSON.
async def test_openapi_document(
    http: aiohttp.ClientSession, rest_base_url: str, bare_url: str
) -> None:
    reply = await call(http, "GET", f"{rest_base_url}/api-docs/openapi.json")
    assert reply.status == 200
    assert reply.content_type == "application/json"
    assert reply.json == json.loads(DEFAULT_OPENAPI_PATH.read_text(encoding="utf-8"))
    missing = await call(http, "GET", f"{bare_url}/api-docs/openapi.json")
    assert_status_json(missing, http_status=404, code=5)
    assert missing.error_info["reason"] == "OPENAPI_NOT_GENERATED"
    no_ui = await call(http, "GET", f"{bare_url}/api-docs")
    assert_status_json(no_ui, http_status=404, code=5)
    assert no_ui.error_info["reason"] == "SWAGGER_UI_NOT_INSTALLED"
