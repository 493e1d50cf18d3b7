"""Server interceptors shared by all services.

`ErrorMappingInterceptor` (outermost) gives every call its request id, log context and server
span (child of the caller's W3C ``traceparent``), applies the caller's deadline to database
calls, turns typed errors into rich gRPC statuses, shields callers from internals, and records
the call once: an access log line plus the ``azora_grpc_requests_total`` counter and the
``azora_grpc_request_duration_seconds`` histogram. `AuthInterceptor` (inside it) establishes
the principal and checks the rpc's declared scope; it also counts failed authentications per
client address and refuses an address that failed too often before looking at its
credentials, so keys cannot be guessed at full speed. `RateLimitInterceptor` (inside that)
applies the rate limits and sending quotas of `services.core.ratelimit`. Only unary-unary
handlers of our own services are wrapped; gRPC's health and reflection services pass through
untouched.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
import pymongo
from google.protobuf.message import DecodeError, Message
from grpc_status import rpc_status
from pymongo.errors import PyMongoError

from services.core.auth import SERVICE_SUBJECT_PREFIX, Authenticator, MethodRules
from services.core.context import Principal, new_request_id, principal_var, request_id_var
from services.core.errors import (
    AzoraError,
    DeadlineExceeded,
    InvalidArgument,
    Unauthenticated,
    Unimplemented,
)
from services.core.metrics import GRPC_REQUEST_DURATION, GRPC_REQUESTS
from services.core.mongo import translate_error
from services.core.protobuf import json_field_path
from services.core.ratelimit import RateLimiter, RateLimitExceeded
from services.core.status import internal_status, to_status
from services.core.tracing import server_span, set_rpc_code

log = logging.getLogger("azora.access")
# Initial metadata of the running rpc, collected by the interceptors and sent with the answer.
response_metadata_var: contextvars.ContextVar[list[tuple[str, str]] | None] = (
    contextvars.ContextVar("response_metadata", default=None)
)
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

Behavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
# Quoted: grpc's runtime classes are not generic, only their type stubs are.
Continuation = Callable[
    [grpc.HandlerCallDetails], Awaitable["grpc.RpcMethodHandler[Any, Any] | None"]
]


class _MalformedRequest:
    """Stands in for a request whose bytes did not parse, so we can answer INVALID_ARGUMENT."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _metadata(context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, str]:
    found: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str):
            found[key.lower()] = value
    return found


def _service_domain(method: str) -> str:
    """ErrorInfo.domain for "/azora.domain.v1.DomainService/X" is "domain.azora.dev"."""
    parts = method.lstrip("/").split(".")
    return f"{parts[1]}.azora.dev" if len(parts) > 2 and parts[0] == "azora" else "azora.dev"


async def _send_headers(
    context: grpc.aio.ServicerContext[Any, Any], headers: list[tuple[str, str]]
) -> None:
    # UsageError: the servicer sent its own initial metadata already.
    with contextlib.suppress(grpc.aio.UsageError):
        await context.send_initial_metadata(tuple(headers))


def add_response_metadata(entries: Iterable[tuple[str, str]]) -> None:
    """Add headers (initial metadata) to the answer of the running rpc."""
    headers = response_metadata_var.get()
    if headers is not None:
        headers.extend(entries)


def _wrap_unary(handler: Any, wrap: Callable[[Behavior], Behavior]) -> Any:
    if handler is None or handler.unary_unary is None:
        return handler
    return handler._replace(unary_unary=wrap(handler.unary_unary))


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Request context, deadline propagation, error mapping and access logging."""

    def __init__(self, *, database_timeout: float | None = None) -> None:
        """Build the interceptor.

        Args:
            database_timeout: the most one request may spend on the database (None: only the
                caller's deadline bounds it).
        """
        self._database_timeout = database_timeout

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """Wrap the unary handler of an azora rpc."""
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith("/azora.") or handler.unary_unary is None:
            return handler  # type: ignore[return-value]
        deserialize = handler.request_deserializer

        def safe_deserialize(data: bytes) -> Any:
            # grpc answers INTERNAL when a deserializer raises; we want INVALID_ARGUMENT.
            try:
                return deserialize(data) if deserialize else data
            except (DecodeError, ValueError, TypeError) as exc:
                return _MalformedRequest(exc)

        domain = _service_domain(method)
        rpc_service, _, rpc_method = method.lstrip("/").partition("/")

        def wrap(behavior: Behavior) -> Behavior:
            async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                metadata = _metadata(context)
                # One SERVER span per rpc, child of the caller's `traceparent` (if any).
                with server_span(method, metadata) as span:
                    incoming = metadata.get("x-request-id", "")
                    request_id = incoming if _REQUEST_ID_RE.match(incoming) else new_request_id()
                    request_id_var.set(request_id)
                    started = time.perf_counter()
                    code = grpc.StatusCode.OK
                    remaining = context.time_remaining()
                    deadline = remaining if remaining is not None and remaining < 1e8 else None
                    # Inner interceptors add response headers (RateLimit-*) to this list; it
                    # is sent just before the answer, success or error.
                    headers = [("x-request-id", request_id)]
                    response_metadata_var.set(headers)
                    try:
                        if isinstance(request, _MalformedRequest):
                            raise InvalidArgument.single("request", "the request body is malformed")
                        if deadline is not None and deadline <= 0:
                            raise DeadlineExceeded("the deadline expired before the call started")
                        # The caller's deadline bounds every database call made for this request,
                        # and so does our own limit: under a pymongo.timeout the driver waits for
                        # an unreachable server as long as the block allows (it replaces the
                        # server selection timeout), so without it a client with a long deadline
                        # would wait all of it instead of hearing UNAVAILABLE.
                        # The driver gets slightly less than the deadline, so that it gives up
                        # (and we answer) before gRPC cancels this handler: a cancellation that
                        # lands while PyMongo is timing out its own server selection corrupts
                        # its topology lock on Python 3.11 (asyncio.wait_for), which leaves
                        # the client failing every operation from then on.
                        budget = _smaller(_driver_deadline(deadline), self._database_timeout)
                        with pymongo.timeout(budget):
                            response = await behavior(request, context)
                        await _send_headers(context, headers)
                        return response
                    except AzoraError as exc:
                        if isinstance(exc, InvalidArgument) and isinstance(request, Message):
                            # Field paths in the request's JSON names (FieldViolation says why).
                            descriptor: Any = request.DESCRIPTOR
                            exc = exc.renamed(lambda path: json_field_path(descriptor, path))
                        code, status = to_status(exc, service_domain=domain)
                    except PyMongoError as exc:
                        left = context.time_remaining()
                        expired = (
                            deadline is not None
                            and left is not None
                            and left <= _DEADLINE_MARGIN + 0.05
                        )
                        mapped = translate_error(exc, deadline_expired=expired, time_limit=budget)
                        code, status = to_status(mapped, service_domain=domain)
                    except NotImplementedError:
                        # Generated base servicers raise this for rpcs a service does not serve yet.
                        unimplemented = Unimplemented(f"{method} is not implemented by this build")
                        code, status = to_status(unimplemented, service_domain=domain)
                    except grpc.aio.AbortError:
                        code = grpc.StatusCode.ABORTED  # a servicer aborted by itself
                        raise
                    except Exception:
                        log.exception("unhandled error", extra={"fields": {"method": method}})
                        code, status = internal_status(service_domain=domain)
                    finally:
                        elapsed = time.perf_counter() - started
                        set_rpc_code(span, code)
                        GRPC_REQUESTS.labels(rpc_service, rpc_method, code.name).inc()
                        GRPC_REQUEST_DURATION.labels(rpc_service, rpc_method).observe(elapsed)
                        log.info(
                            "rpc",
                            extra={
                                "fields": {
                                    "method": method,
                                    "code": code.name,
                                    "duration_ms": round(elapsed * 1000, 2),
                                }
                            },
                        )
                    await _send_headers(context, headers)
                    await context.abort(
                        code,
                        status.message,
                        trailing_metadata=rpc_status.to_status(status).trailing_metadata,
                    )

            return handle

        wrapped = _wrap_unary(handler, wrap)
        return wrapped._replace(request_deserializer=safe_deserialize)  # type: ignore[no-any-return]


# Failures that are no guess: no credentials at all, or a token whose signature checked out.
_NOT_GUESSES = frozenset({"CREDENTIALS_MISSING", "TOKEN_EXPIRED"})


def _is_service(principal: Principal | None) -> bool:
    return principal is not None and principal.subject.startswith(SERVICE_SUBJECT_PREFIX)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates the caller and enforces the scope each rpc declares in its proto."""

    def __init__(
        self,
        authenticator: Authenticator,
        rules: MethodRules | None = None,
        *,
        limiter: RateLimiter | None = None,
    ) -> None:
        """Build the interceptor.

        Args:
            authenticator: checks credentials.
            rules: the rpcs' access rules (read from the descriptors by default).
            limiter: counts failed authentications per client address (None: not counted).
        """
        self._authenticator = authenticator
        self._rules = rules or MethodRules()
        self._limiter = limiter

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """Wrap the unary handler of an azora rpc with the access check."""
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith("/azora."):
            return handler  # type: ignore[return-value]
        rule = self._rules.rule(method)
        authenticator = self._authenticator
        # Health routes and /metrics stay reachable from any address (probes, scrapers).
        service = method.lstrip("/").partition("/")[0]
        limiter = None if service in _UNLIMITED_SERVICES else self._limiter

        def wrap(behavior: Behavior) -> Behavior:
            async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                metadata = _metadata(context)
                ip, blocked = None, None
                if limiter is not None:
                    peer = context.peer() or ""
                    ip = limiter.client_ip(peer, metadata.get("x-forwarded-for", ""))
                    try:
                        limiter.check_failed_authentications(ip)
                    except RateLimitExceeded as exc:
                        blocked = exc
                try:
                    principal = await authenticator.authorize(rule, metadata)
                except AzoraError as exc:
                    guess = isinstance(exc, Unauthenticated) and exc.reason not in _NOT_GUESSES
                    if limiter is not None and guess:
                        limiter.record_failed_authentication(ip)
                    raise blocked or exc from None
                # A blocked address learns nothing from its credentials: right or wrong, the
                # answer is the same refusal. Only our services' own tokens (which cannot be
                # guessed) still pass, so one client guessing from a shared address (a host
                # running several of our processes) does not cut the services off each other.
                if blocked is not None and not _is_service(principal):
                    raise blocked
                principal_var.set(principal)
                return await behavior(request, context)

            return handle

        return _wrap_unary(handler, wrap)  # type: ignore[no-any-return]


# Rpcs no budget applies to: the REST health routes and /metrics (probes and scrapers must
# always get through; grpc.health.v1 and reflection are not wrapped at all).
_UNLIMITED_SERVICES = frozenset({"azora.health.v1.SuiteHealthService"})
# Rpcs that need this scope send email: the send budget and the tenant quotas apply to them.
SEND_SCOPE = "emails:send"


class RateLimitInterceptor(grpc.aio.ServerInterceptor):
    """Admits each call against the rate limits and quotas (inside `AuthInterceptor`).

    It runs after authentication because calls between our services (service JWTs) are never
    limited and because the principal is one of the two keys counted (the other is the client
    address). Calls that fail authentication are not counted here (`AuthInterceptor` counts
    them against their own limit). Every limited answer carries
    ``ratelimit-*`` headers; a refusal is RESOURCE_EXHAUSTED with RetryInfo (HTTP 429 with
    Retry-After through either gateway).
    """

    def __init__(self, limiter: RateLimiter, rules: MethodRules | None = None) -> None:
        self._limiter = limiter
        self._rules = rules or MethodRules()

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """Wrap the unary handler of a limited azora rpc."""
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        service = method.lstrip("/").partition("/")[0]
        if handler is None or not method.startswith("/azora.") or service in _UNLIMITED_SERVICES:
            return handler  # type: ignore[return-value]
        send = self._rules.rule(method).required_scope == SEND_SCOPE
        limiter = self._limiter

        def wrap(behavior: Behavior) -> Behavior:
            async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                principal = principal_var.get()
                if principal is not None and principal.subject.startswith(SERVICE_SUBJECT_PREFIX):
                    return await behavior(request, context)
                metadata = _metadata(context)
                ip = limiter.client_ip(context.peer() or "", metadata.get("x-forwarded-for", ""))
                count = _sends_in(request) if send else 1
                try:
                    decision = await limiter.admit(
                        send=send, ip=ip, principal=principal, count=count
                    )
                except RateLimitExceeded as exc:
                    add_response_metadata(
                        (*exc.decision.headers(), ("retry-after", str(exc.decision.reset_seconds)))
                    )
                    raise
                add_response_metadata(decision.headers())
                response = await behavior(request, context)
                if send and principal is not None:
                    limiter.record_send(principal, _accepted_in(response))
                return response

            return handle

        return _wrap_unary(handler, wrap)  # type: ignore[no-any-return]


def _sends_in(request: Any) -> int:
    """Sends a request makes: each message of a batch (a ``messages`` list) counts as one."""
    fields = getattr(getattr(request, "DESCRIPTOR", None), "fields_by_name", {})
    if "messages" in fields:
        return max(1, len(request.messages))
    return 1


def _accepted_in(response: Any) -> int:
    """Emails a send rpc accepted: a batch says how many (``accepted_count``), else one."""
    fields = getattr(getattr(response, "DESCRIPTOR", None), "fields_by_name", {})
    if "accepted_count" in fields:
        return int(response.accepted_count)
    return 1


# What the database driver leaves of a request's deadline for the handler to answer in.
_DEADLINE_MARGIN = 0.25


def _driver_deadline(deadline: float | None) -> float | None:
    """The part of a request's remaining deadline its database calls may use."""
    if deadline is None:
        return None
    return max(deadline - _DEADLINE_MARGIN, deadline / 2)


def _smaller(a: float | None, b: float | None) -> float | None:
    """The smaller of two optional limits (None: no limit)."""
    if a is None:
        return b
    return a if b is None else min(a, b)
