"""Errors of the gateway and their google.rpc.Status JSON form.

Every error the gateway answers has the body Envoy's transcoder produces with
``convert_grpc_status: true``: a google.rpc.Status as JSON (``code``, ``message``, ``details``
with ``@type``-tagged Any entries) and the HTTP status of google/rpc/code.proto's mapping.
Upstream statuses are decoded from the ``grpc-status-details-bin`` trailer; the gateway's own
errors (unknown route, malformed JSON, ...) are built here with an ErrorInfo in the domain
``gateway.azora.dev`` and, when a field is at fault, a BadRequest field violation.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf import any_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.message import DecodeError, Message
from google.rpc import code_pb2, error_details_pb2, status_pb2

GATEWAY_ERROR_DOMAIN = "gateway.azora.dev"

# google/rpc/code.proto's HTTP mapping, the same table as Envoy's Grpc::Utility::grpcToHttpStatus.
HTTP_STATUS_BY_CODE: Mapping[int, int] = {
    code_pb2.OK: 200,
    code_pb2.CANCELLED: 499,
    code_pb2.UNKNOWN: 500,
    code_pb2.INVALID_ARGUMENT: 400,
    code_pb2.DEADLINE_EXCEEDED: 504,
    code_pb2.NOT_FOUND: 404,
    code_pb2.ALREADY_EXISTS: 409,
    code_pb2.PERMISSION_DENIED: 403,
    code_pb2.RESOURCE_EXHAUSTED: 429,
    code_pb2.FAILED_PRECONDITION: 400,
    code_pb2.ABORTED: 409,
    code_pb2.OUT_OF_RANGE: 400,
    code_pb2.UNIMPLEMENTED: 501,
    code_pb2.INTERNAL: 500,
    code_pb2.UNAVAILABLE: 503,
    code_pb2.DATA_LOSS: 500,
    code_pb2.UNAUTHENTICATED: 401,
}

# The other direction, for HTTP errors raised by aiohttp itself (rare: the gateway answers
# almost everything itself). Unlisted 4xx become INVALID_ARGUMENT, unlisted 5xx INTERNAL.
_CODE_BY_HTTP_STATUS: Mapping[int, int] = {
    400: code_pb2.INVALID_ARGUMENT,
    401: code_pb2.UNAUTHENTICATED,
    403: code_pb2.PERMISSION_DENIED,
    404: code_pb2.NOT_FOUND,
    405: code_pb2.NOT_FOUND,
    409: code_pb2.ABORTED,
    413: code_pb2.INVALID_ARGUMENT,
    429: code_pb2.RESOURCE_EXHAUSTED,
    499: code_pb2.CANCELLED,
    501: code_pb2.UNIMPLEMENTED,
    503: code_pb2.UNAVAILABLE,
    504: code_pb2.DEADLINE_EXCEEDED,
}


def http_status_for(code: int) -> int:
    """The HTTP status of a gRPC code; codes outside code.proto are 500, as in Envoy."""
    return int(HTTP_STATUS_BY_CODE.get(code, 500))


def code_for_http_status(status: int) -> int:
    """A gRPC code for an HTTP error status the gateway did not choose itself."""
    if status in _CODE_BY_HTTP_STATUS:
        return int(_CODE_BY_HTTP_STATUS[status])
    return int(code_pb2.INVALID_ARGUMENT if 400 <= status < 500 else code_pb2.INTERNAL)


def pack_any(message: Message) -> any_pb2.Any:
    """`message` packed into an Any (a google.rpc.Status detail)."""
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


class GatewayError(Exception):
    """A request the gateway answers itself, without calling a service.

    Attributes:
        code: the google.rpc.Code of the answer.
        message: a human-readable message naming the problem.
        reason: UPPER_SNAKE ErrorInfo.reason.
        http_status: the HTTP status; code.proto's mapping of `code` unless Envoy answers
            differently (413 for an oversized body).
        violations: (field, description) pairs sent as BadRequest field violations.
        metadata: ErrorInfo.metadata.
    """

    def __init__(
        self,
        code: int,
        message: str,
        *,
        reason: str,
        http_status: int | None = None,
        violations: Sequence[tuple[str, str]] = (),
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.http_status = http_status if http_status is not None else http_status_for(code)
        self.violations = list(violations)
        self.metadata = dict(metadata or {})

    @classmethod
    def invalid(
        cls,
        message: str,
        *,
        reason: str,
        field: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> GatewayError:
        """An INVALID_ARGUMENT (400), with a field violation when a field is at fault."""
        violations = [(field, message)] if field else []
        return cls(
            code_pb2.INVALID_ARGUMENT,
            message,
            reason=reason,
            violations=violations,
            metadata=metadata,
        )

    def to_status(self) -> status_pb2.Status:
        """The google.rpc.Status sent to the client."""
        details = [
            pack_any(
                error_details_pb2.ErrorInfo(
                    reason=self.reason, domain=GATEWAY_ERROR_DOMAIN, metadata=self.metadata
                )
            )
        ]
        if self.violations:
            details.append(
                pack_any(
                    error_details_pb2.BadRequest(
                        field_violations=[
                            error_details_pb2.BadRequest.FieldViolation(
                                field=field, description=description
                            )
                            for field, description in self.violations
                        ]
                    )
                )
            )
        return status_pb2.Status(code=self.code, message=self.message, details=details)


class StatusPrinter:
    """Prints google.rpc.Status messages as JSON, resolving Any details by type URL.

    Detail types are looked up in the gateway's descriptor pool first (the descriptor set
    carries google/rpc/error_details.proto), then in the default pool where
    `google.rpc.error_details_pb2` registered itself. A detail of a type neither knows is
    printed as ``{"@type": ..., "value": <base64>}`` rather than failing the whole answer.
    """

    def __init__(self, pool: descriptor_pool.DescriptorPool) -> None:
        self._pools = (pool, descriptor_pool.Default())

    def detail_to_json(self, detail: any_pb2.Any) -> dict[str, Any]:
        """One Any detail as proto3 JSON."""
        type_name = detail.type_url.rpartition("/")[2]
        for pool in self._pools:
            try:
                descriptor = pool.FindMessageTypeByName(type_name)
            except KeyError:
                continue
            message = message_factory.GetMessageClass(descriptor)()
            try:
                message.ParseFromString(detail.value)
            except DecodeError:
                break
            printed = json_format.MessageToDict(
                message, always_print_fields_with_no_presence=True, descriptor_pool=pool
            )
            # Well-known types print as a scalar (e.g. a Duration string) and go under "value".
            body = printed if isinstance(printed, dict) else {"value": printed}
            return {"@type": detail.type_url, **body}
        return {"@type": detail.type_url, "value": base64.b64encode(detail.value).decode()}

    def to_json(self, status: status_pb2.Status) -> dict[str, Any]:
        """The status as the JSON object Envoy's convert_grpc_status prints."""
        return {
            "code": status.code,
            "message": status.message,
            "details": [self.detail_to_json(detail) for detail in status.details],
        }


def retry_after_seconds(status: status_pb2.Status) -> int | None:
    """Whole seconds from a RetryInfo detail, for the Retry-After header (None without one)."""
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            delay = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
            return int(max(0, math.ceil(delay)))
    return None
