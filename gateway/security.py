"""Security headers on every REST response, and CORS only when configured.

The headers are the ones Helmet sets for an API (so browsers treat our JSON as inert data):
nosniff, no framing, no referrer, HSTS, same-origin opener/resource policies, and a
Content-Security-Policy that allows nothing for API responses. The Swagger UI pages get a
policy that allows our own assets and the one inline initialiser by its hash — still no CDN.

CORS is off unless ``AZORA_CORS_ORIGINS`` lists origins (comma-separated, exact match): then a
matching ``Origin`` gets ``Access-Control-Allow-Origin`` and preflight requests are answered
here. Everything else about a request is the transcoder's business.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Awaitable, Callable, Collection

from aiohttp import web

from gateway.docs import INIT_SCRIPT

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_INIT_HASH = base64.b64encode(hashlib.sha256(INIT_SCRIPT.encode()).digest()).decode()
API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
DOCS_CSP = (
    "default-src 'self'; "
    f"script-src 'self' 'sha256-{_INIT_HASH}'; "
    # Swagger UI sets style attributes and uses data: URIs for its icons.
    "style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'self'; frame-ancestors 'none'; form-action 'self'"
)
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Strict-Transport-Security": "max-age=31536000; includeSubDomains",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Origin-Agent-Cluster": "?1",
    "X-DNS-Prefetch-Control": "off",
    "X-Download-Options": "noopen",
    "X-Permitted-Cross-Domain-Policies": "none",
    "X-XSS-Protection": "0",
}
# Our Server header: aiohttp would announce "Python/3.11 aiohttp/x.y"; versions help only
# attackers.
SERVER_NAME = "azora"
_CORS_ALLOW_HEADERS = (
    "authorization, content-type, x-api-key, x-request-id, traceparent, tracestate"
)
_CORS_METHODS = "GET, POST, PUT, DELETE, OPTIONS"


def security_middleware(
    cors_origins: Collection[str],
) -> Callable[..., Awaitable[web.StreamResponse]]:
    """The outermost middleware: CORS preflights, then headers on whatever was answered."""
    allowed = frozenset(cors_origins)

    @web.middleware
    async def secure(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin", "")
        cors = bool(origin) and origin in allowed
        if (
            cors
            and request.method == "OPTIONS"
            and "Access-Control-Request-Method" in request.headers
        ):
            response: web.StreamResponse = web.Response(status=204)
            response.headers["Access-Control-Allow-Methods"] = _CORS_METHODS
            response.headers["Access-Control-Allow-Headers"] = _CORS_ALLOW_HEADERS
            response.headers["Access-Control-Max-Age"] = "600"
        else:
            response = await handler(request)
        response.headers.update(SECURITY_HEADERS)
        docs = request.path == "/api-docs" or request.path.startswith("/api-docs/")
        response.headers["Content-Security-Policy"] = DOCS_CSP if docs else API_CSP
        response.headers["Server"] = SERVER_NAME
        if cors:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = (
                "x-request-id, retry-after, ratelimit-policy, ratelimit-limit, "
                "ratelimit-remaining, ratelimit-reset"
            )
            response.headers["Vary"] = "Origin"
        return response

    return secure
