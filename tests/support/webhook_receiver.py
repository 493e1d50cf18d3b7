"""A real HTTP receiver for webhook tests: aiohttp on 127.0.0.1, recording every request.

Its answers are scripted: a queue of status codes (then `default`), or "HANG" (never answer
until the receiver closes), with a body per answer and an optional delay.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Request:
    """One request the receiver got."""

    headers: dict[str, str]
    body: bytes

    @property
    def event(self) -> dict[str, Any]:
        """The JSON body."""
        data: dict[str, Any] = json.loads(self.body)
        return data

    @property
    def webhook_id(self) -> str:
        """The webhook-id header."""
        return self.headers.get("webhook-id", "")


@dataclass
class Receiver:
    """The running receiver: its URL, what it got and what it answers next."""

    answers: list[int | str] = field(default_factory=list)
    default: int | str = 200
    body: str = "ok"
    # Seconds each answer waits (keeps requests in flight).
    delay: float = 0.0
    requests: list[Request] = field(default_factory=list)
    hanging: int = 0
    url: str = ""
    _runner: web.AppRunner | None = None
    _release: asyncio.Event = field(default_factory=asyncio.Event)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> Receiver:
        """Listen on 127.0.0.1:0."""
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{port}/hooks"
        return self

    async def close(self) -> None:
        """Release hanging requests and stop."""
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def wait_for(self, count: int, *, within: float = 30.0) -> list[Request]:
        """Wait until `count` requests arrived (a bound, not a timing assertion)."""
        async with asyncio.timeout(within):
            while len(self.requests) < count:
                self._arrived.clear()
                await self._arrived.wait()
        return self.requests

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(Request({k.lower(): v for k, v in request.headers.items()}, body))
        self._arrived.set()
        answer = self.answers.pop(0) if self.answers else self.default
        if answer == "HANG":
            self.hanging += 1
            try:
                await self._release.wait()
            finally:
                self.hanging -= 1
            return web.Response(status=503, text="released")
        assert isinstance(answer, int)
        if self.delay:
            await asyncio.sleep(self.delay)
        return web.Response(status=answer, text=self.body)
