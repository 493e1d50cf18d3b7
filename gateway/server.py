"""The HTTP server under the gateway application: answers to requests aiohttp cannot parse.

A request line or header over aiohttp's limits, an unknown method, a bad HTTP version or a
malformed header never reaches the application (nor its middlewares): aiohttp's protocol
handler answers it itself, in plain text that quotes the offending input (part of an
``Authorization`` header, say), with ``Server: Python/... aiohttp/...``, without our security
headers, and logs an error-level traceback for every such request. `create_runner` builds the
application's runner with a protocol handler that answers these like every other gateway
error instead: a google.rpc.Status JSON body (ErrorInfo reason ``MALFORMED_HTTP_REQUEST``),
the security headers, ``Server: azora``, no word of the request, one warning log line naming
only the error class.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse
from google.protobuf import json_format
from google.rpc import code_pb2

from gateway.errors import GatewayError, code_for_http_status, http_status_for
from gateway.security import API_CSP, SECURITY_HEADERS, SERVER_NAME
from services.core.context import new_request_id

log = logging.getLogger("azora.gateway")


def malformed_request_response(status: int, exc: BaseException | None) -> web.Response:
    """The gateway's answer to a request the HTTP parser refused (or a handler failure)."""
    if status >= 500:
        error = GatewayError(code_pb2.INTERNAL, "internal error", reason="INTERNAL")
    else:
        if isinstance(exc, LineTooLong):
            message = "the request line or a header is longer than the gateway accepts"
        elif isinstance(exc, BadHttpMethod):
            message = "the request method is not a valid HTTP method"
        else:
            message = "the request is not valid HTTP/1.1"
        error = GatewayError(code_for_http_status(status), message, reason="MALFORMED_HTTP_REQUEST")
    body = json.dumps(json_format.MessageToDict(error.to_status()), separators=(",", ":"))
    response = web.Response(
        text=body,
        status=status if status >= 400 else http_status_for(error.code),
        content_type="application/json",
        headers={
            **SECURITY_HEADERS,
            "Content-Security-Policy": API_CSP,
            "Server": SERVER_NAME,
            "x-request-id": new_request_id(),
        },
    )
    response.force_close()  # the stream cannot be trusted past a request it could not parse
    return response


class _GatewayRequestHandler(RequestHandler):
    """aiohttp's protocol handler, answering unparsable requests the gateway's way."""

    __slots__ = ()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> StreamResponse:
        """Answer without quoting the request; log one line without the error's text."""
        # The error's text quotes the input (header values included): log its class only.
        log.warning(
            "malformed HTTP request",
            extra={"fields": {"status": status, "error": type(exc).__name__ if exc else ""}},
        )
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error answer")
        return malformed_request_response(status, exc)


class _GatewayServer(web.Server):
    """aiohttp's connection factory, building `_GatewayRequestHandler`s."""

    def __call__(self) -> RequestHandler:
        return _GatewayRequestHandler(self, loop=self._loop, **self._kwargs)


class _GatewayRunner(web.AppRunner):
    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # Same state, one method more: the application's own server, with our handler class
        # (aiohttp has no public hook for the protocol handler's error answers).
        server.__class__ = _GatewayServer
        return server


def create_runner(app: web.Application, **kwargs: Any) -> web.AppRunner:
    """An AppRunner for the gateway application (same arguments as `web.AppRunner`)."""
    return _GatewayRunner(app, **kwargs)
