"""Swagger UI at /api-docs, in a real headless Chromium (Debian's), as a person would use it.

The page must list every operation of the committed OpenAPI document and be able to call the
API: the test executes one "Try it out" request from the page and reads the answer the page
shows. It also insists that the page loads nothing from outside the gateway (the machine is
offline; Swagger UI's assets come from the swagger-ui-dist package). A full-page screenshot is
left in tests/gateway/artifacts/swagger-ui.png for people to look at.

Playwright drives Debian's /usr/bin/chromium (`make deps` installs it): `playwright install`
would download a browser build, which this offline machine cannot do.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.async_api import Browser, Page, Route, async_playwright, expect

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCUMENT = REPO_ROOT / "gen" / "openapi" / "azora.swagger.json"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",  # runs as root in CI; the sandbox needs user namespaces we may not have
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # No traffic of Chromium's own (updates, sync, safe browsing): the machine is offline.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options"}
# Swagger UI renders a few thousand DOM nodes and a 100 kB document; give slow CI room.
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def chromium() -> Path:
    # A missing browser is a broken setup, not a reason to skip the check.
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing (Debian package chromium): run make deps")
    return CHROMIUM


@pytest.fixture(scope="module")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="module")
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(chromium), headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        await browser.close()


class SwaggerPage:
    """An open /api-docs page, with every request it made outside the gateway refused."""

    def __init__(self, page: Page, base_url: str) -> None:
        self.page = page
        self.base_url = base_url
        self.foreign_requests: list[str] = []

    async def refuse_foreign(self, route: Route) -> None:
        # A CDN or the online validator would hang or fail offline: record and refuse it.
        url = route.request.url
        if urlsplit(url).scheme in ("data", "blob") or _same_origin(url, self.base_url):
            await route.continue_()
        else:
            self.foreign_requests.append(url)
            await route.abort()


def _same_origin(url: str, base_url: str) -> bool:
    a, b = urlsplit(url), urlsplit(base_url)
    return (a.scheme, a.netloc) == (b.scheme, b.netloc)


@pytest.fixture
async def swagger(browser: Browser, rest_base_url: str) -> AsyncIterator[SwaggerPage]:
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    swagger = SwaggerPage(page, rest_base_url)
    await page.route("**/*", swagger.refuse_foreign)
    response = await page.goto(f"{rest_base_url}/api-docs")
    assert response is not None
    assert response.status == 200
    # Swagger UI has fetched /api-docs/openapi.json and rendered the operations.
    await page.locator(".opblock").first.wait_for()
    yield swagger
    await context.close()


def document_operations() -> Counter[tuple[str, str]]:
    document: dict[str, Any] = json.loads(DOCUMENT.read_text(encoding="utf-8"))
    return Counter(
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method in HTTP_METHODS
    )


async def listed_operations(page: Page) -> Counter[tuple[str, str]]:
    """(METHOD, path) of every operation block on the page, tags expanded first."""
    # Tags rendered collapsed (docExpansion "none") do not render their operations.
    for tag in await page.locator(".opblock-tag-section:not(.is-open) .opblock-tag").all():
        await tag.click()
    blocks = page.locator(".opblock")
    listed: Counter[tuple[str, str]] = Counter()
    for block in await blocks.all():
        method = await block.locator(".opblock-summary-method").inner_text()
        path_element = block.locator(".opblock-summary-path")
        # data-path is the template as written; the visible text has zero-width break points.
        path = await path_element.get_attribute("data-path") or (
            (await path_element.inner_text()).replace("\u200b", "")
        )
        listed[(method.strip().upper(), path.strip())] += 1
    return listed


# Every operation of the OpenAPI document appears exactly once on the Swagger UI page.
async def test_every_operation_is_listed(swagger: SwaggerPage) -> None:
    page = swagger.page
    await expect(page.locator(".info .title")).to_contain_text(
        "Azora Email Hosting API", timeout=TIMEOUT_MS
    )
    expected = document_operations()
    listed = await listed_operations(page)
    assert await page.locator(".opblock").count() == sum(expected.values())
    assert listed == expected
    assert swagger.foreign_requests == [], "the page must load nothing from outside the gateway"


# "Try it out" + "Execute" on GET /health/ping calls the gateway and shows its 200 JSON answer.
async def test_try_it_out_calls_the_api(swagger: SwaggerPage, artifacts: Path) -> None:
    page = swagger.page
    try:
        block = page.locator(".opblock.opblock-get").filter(
            has=page.locator('.opblock-summary-path[data-path="/health/ping"]')
        )
        await expect(block).to_have_count(1, timeout=TIMEOUT_MS)
        await block.locator(".opblock-summary").click()
        await block.get_by_role("button", name="Try it out").click()
        await block.get_by_role("button", name="Execute").click()

        # The "Server response" table: its header row also has a response-col_status cell.
        answer = block.locator(".live-responses-table tr.response")
        await expect(answer.locator(".response-col_status")).to_have_text("200", timeout=TIMEOUT_MS)
        # The request went to the gateway serving the page, at the documented path.
        await expect(block.locator(".request-url pre")).to_have_text(
            f"{swagger.base_url}/health/ping", timeout=TIMEOUT_MS
        )
        body = json.loads(await answer.locator(".response-col_description pre").first.inner_text())
        assert body["message"] == "pong"
        assert "time" in body
        assert swagger.foreign_requests == []
    finally:
        # The artifact shows the whole page with the executed request and its answer (or how
        # far the test got when it failed).
        await page.screenshot(path=artifacts / "swagger-ui.png", full_page=True)
