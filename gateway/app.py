"""The aiohttp application: one catch-all handler that transcodes, plus /api-docs.

Per request: choose the binding (`Router`), read the body within the size limit, build the
request message (`Transcoder`), forward the allowed headers as gRPC metadata, call the service
(`Upstreams`) and answer JSON, raw HttpBody or a google.rpc.Status. A middleware gives every
request its id and writes one JSON access-log line with the route *template* (never the raw
path, which carries ids, nor any header value).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from google.rpc import code_pb2, status_pb2

from gateway.config import GatewayConfig, upstream_targets
from gateway.descriptors import DescriptorSet
from gateway.docs import ApiDocs
from gateway.errors import (
    GatewayError,
    StatusPrinter,
    code_for_http_status,
    http_status_for,
    retry_after_seconds,
)
from gateway.keys import REQUEST_ID_KEY, ROUTE_KEY, RPC_KEY
from gateway.observability import configure_process, observe_request, upstream_metadata
from gateway.router import Router
from gateway.security import security_middleware
from gateway.transcode import Transcoder, parse_query
from gateway.upstream import Upstreams
from services.core.context import new_request_id, request_id_var
from services.core.settings import Settings

log = logging.getLogger("azora.gateway")
access_log = logging.getLogger("azora.gateway.access")

# Same rule as the services' interceptor: anything else is replaced by a fresh id.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# Headers that travel to the services as metadata. Envoy forwards every header; the local
# gateway forwards what the services read (credentials, request id, W3C trace context).
FORWARDED_HEADERS = ("authorization", "x-api-key", "traceparent", "tracestate")
# Response metadata of the services copied to the HTTP answer (Envoy copies all of it): the
# rate-limit state of services.core.ratelimit, as express-rate-limit's standardHeaders.
RESPONSE_HEADERS = (
    "ratelimit-policy",
    "ratelimit-limit",
    "ratelimit-remaining",
    "ratelimit-reset",
    "retry-after",
)
# gRPC metadata values (non -bin) are printable ASCII.
_METADATA_VALUE = re.compile(r"^[\x20-\x7e]*$")
_READ_CHUNK = 64 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Gateway:
    """Everything a request needs, built once per application."""

    config: GatewayConfig
    descriptors: DescriptorSet
    router: Router
    transcoder: Transcoder
    upstreams: Upstreams
    printer: StatusPrinter

    # -- answers ----------------------------------------------------------------------------

    def status_response(
        self, status: status_pb2.Status, *, http_status: int | None = None
    ) -> web.Response:
        """A google.rpc.Status as the JSON error body, with code.proto's HTTP status."""
        headers = {"Content-Type": "application/json"}
        if status.code in (code_pb2.RESOURCE_EXHAUSTED, code_pb2.UNAVAILABLE):
            retry_after = retry_after_seconds(status)
            if retry_after is not None:
                headers["Retry-After"] = str(retry_after)
        body = json.dumps(
            self.printer.to_json(status), ensure_ascii=False, separators=(",", ":")
        ).encode()
        return web.Response(
            body=body,
            status=http_status if http_status is not None else http_status_for(status.code),
            headers=headers,
        )

    # -- middleware -------------------------------------------------------------------------

    @web.middleware
    async def observe(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Request id, error bodies for anything raised, and the access-log line."""
        started = time.perf_counter()
        incoming = request.headers.get("x-request-id", "")
        request_id = incoming if _REQUEST_ID.match(incoming) else new_request_id()
        request[REQUEST_ID_KEY] = request_id
        token = request_id_var.set(request_id)
        status = 499  # what the log says if the client goes away mid-request
        # A span (current while the request is answered and logged) and the REST metrics.
        with observe_request(request) as observation:
            try:
                response = await self._answer(request, handler)
                status = response.status
                response.headers["x-request-id"] = request.get(REQUEST_ID_KEY, request_id)
                return response
            finally:
                observation.finish(status)
                access_log.info(
                    "http",
                    extra={
                        "fields": {
                            "method": request.method,
                            "route": request.get(ROUTE_KEY),
                            "rpc": request.get(RPC_KEY),
                            "status": status,
                            "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                            "request_id": request.get(REQUEST_ID_KEY, request_id),
                        }
                    },
                )
                request_id_var.reset(token)

    async def _answer(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except GatewayError as exc:
            return self.status_response(exc.to_status(), http_status=exc.http_status)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            # aiohttp's own refusals (e.g. a malformed request line) get the same error shape.
            code = code_for_http_status(exc.status)
            status = status_pb2.Status(code=code, message=exc.reason or exc.text or "")
            return self.status_response(status, http_status=exc.status)
        except Exception:
            log.exception("gateway failure", extra={"fields": {"method": request.method}})
            status = status_pb2.Status(code=code_pb2.INTERNAL, message="internal error")
            return self.status_response(status)

    # -- transcoding ------------------------------------------------------------------------

    async def transcode(self, request: web.Request) -> web.StreamResponse:
        """Answer any request that is not /api-docs through the rpc its path is bound to."""
        raw_path, _, raw_query = request.raw_path.partition("?")
        raw_query = raw_query.partition("#")[0]
        found = self.router.match(request.method, raw_path)
        binding = found.binding
        request[ROUTE_KEY] = binding.template.source
        request[RPC_KEY] = binding.rpc
        body = await self._read_body(request) if binding.body else b""
        message = self.transcoder.build_request(
            binding,
            variables=found.variables,
            query=parse_query(raw_query),
            body=body,
            content_type=request.headers.get("Content-Type", ""),
        )
        metadata = upstream_metadata(self._metadata(request))
        result = await self.upstreams.call(binding, message, metadata)
        upstream_id = result.initial_metadata.get("x-request-id", "")
        if _REQUEST_ID.match(upstream_id):
            request[REQUEST_ID_KEY] = upstream_id
        if result.status is not None:
            response = self.status_response(result.status)
        else:
            assert result.response is not None  # one of the two is always set
            payload, content_type = self.transcoder.render_response(binding, result.response)
            response = web.Response(
                body=payload, status=200, headers={"Content-Type": content_type}
            )
        for name in RESPONSE_HEADERS:
            value = result.initial_metadata.get(name)
            if value is not None and name not in response.headers:
                response.headers[name] = value
        return response

    async def _read_body(self, request: web.Request) -> bytes:
        """The whole body, refused with 413 as soon as it exceeds the limit."""
        limit = self.config.max_body_bytes
        declared = request.content_length
        if declared is not None and declared > limit:
            raise _too_large(limit)
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = await request.content.read(_READ_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
        return b"".join(chunks)

    @staticmethod
    def _metadata(request: web.Request) -> list[tuple[str, str]]:
        metadata = [("x-request-id", request[REQUEST_ID_KEY])]
        for name in FORWARDED_HEADERS:
            for value in request.headers.getall(name, ()):
                if not _METADATA_VALUE.match(value):
                    raise GatewayError.invalid(
                        f"header {name} contains characters gRPC metadata cannot carry",
                        reason="INVALID_HEADER",
                        field=name,
                    )
                metadata.append((name, value))
        # Like Envoy with use_remote_address: the peer is appended to what proxies before said.
        forwarded = [v.strip() for v in request.headers.getall("x-forwarded-for", ()) if v.strip()]
        if request.remote:
            forwarded.append(request.remote)
        if forwarded and all(_METADATA_VALUE.match(v) for v in forwarded):
            metadata.append(("x-forwarded-for", ", ".join(forwarded)))
        return metadata


def _too_large(limit: int) -> GatewayError:
    # HTTP 413 (Content Too Large) with an INVALID_ARGUMENT Status naming the body, the same
    # answer gateway/envoy.yaml's local_reply_config gives for Envoy's max_request_body_size.
    return GatewayError(
        code_pb2.INVALID_ARGUMENT,
        f"the request body exceeds the gateway's limit of {limit} bytes",
        reason="REQUEST_BODY_TOO_LARGE",
        http_status=413,
        metadata={"limit_bytes": str(limit)},
        violations=[("body", f"larger than {limit} bytes")],
    )


GATEWAY_KEY = web.AppKey("azora_gateway", Gateway)


async def create_app(
    settings: Settings,
    *,
    descriptor_path: Path | None = None,
    config: GatewayConfig | None = None,
) -> web.Application:
    """Build the gateway application (call inside the event loop that will serve it).

    Args:
        settings: suite settings; the service targets say where each gRPC service runs.
        descriptor_path: the FileDescriptorSet; defaults to `config.descriptor_path`
            (``gen/azora.binpb``).
        config: gateway-only settings; defaults to `GatewayConfig()`.

    Raises:
        OSError: the descriptor set cannot be read.
        DescriptorSetError: the descriptor set's HTTP rules cannot be routed.
    """
    config = config or GatewayConfig()
    configure_process(settings)
    if descriptor_path is not None:
        config = config.with_overrides(descriptor_path=descriptor_path)
    descriptors = DescriptorSet.load(config.descriptor_path)
    router = Router(descriptors.bindings)
    targets = dict(config.upstreams) if config.upstreams is not None else upstream_targets(settings)
    for service in sorted({binding.service for binding in router.bindings} - set(targets)):
        log.warning(
            "no upstream for service; its routes answer 501", extra={"fields": {"service": service}}
        )
    gateway = Gateway(
        config=config,
        descriptors=descriptors,
        router=router,
        transcoder=Transcoder(descriptors),
        upstreams=Upstreams(descriptors, targets, deadline_seconds=config.deadline_seconds),
        printer=StatusPrinter(descriptors.pool),
    )
    app = web.Application(
        middlewares=[security_middleware(config.cors_origins), gateway.observe],
        client_max_size=config.max_body_bytes,
    )
    app[GATEWAY_KEY] = gateway
    ApiDocs(openapi_path=config.openapi_path, swagger_ui_dir=config.swagger_ui_dir).add_routes(app)
    # Everything else is transcoded: the descriptor set's http rules are the routing table.
    app.router.add_route("*", "/{path:.*}", gateway.transcode)

    async def close_channels(_: web.Application) -> None:
        await gateway.upstreams.close()

    app.on_cleanup.append(close_channels)
    log.info(
        "routes loaded",
        extra={
            "fields": {
                "descriptor_set": str(config.descriptor_path),
                "routes": len(router.bindings),
                "upstreams": targets,
            }
        },
    )
    return app
