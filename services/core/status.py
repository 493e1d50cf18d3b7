"""The one mapping from typed domain errors to gRPC codes and google.rpc.Status details.

Every status carries an ErrorInfo (reason, domain, metadata). InvalidArgument adds BadRequest
field violations, NotFound/AlreadyExists a ResourceInfo, FailedPrecondition a
PreconditionFailure, ResourceExhausted a QuotaFailure and RetryInfo, Unavailable a RetryInfo.
An error's own `details` (e.g. a health report) come last.

What a status echoes is capped here, once for every error: gRPC refuses trailing metadata over
its hard limit (16 KiB by default) and the client then sees RESOURCE_EXHAUSTED "Stream removed"
instead of our answer, so a status that quotes a 17 KB address or lists 500 bad DNS records must
still fit. Texts are cut to `MAX_TEXT` bytes (the message to `MAX_MESSAGE`), field violations
to `MAX_VIOLATIONS` (the message and ErrorInfo metadata ``omittedViolations`` say how many more
there were).
"""

from __future__ import annotations

import math

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from services.core.errors import (
    AlreadyExists,
    AzoraError,
    ErrorKind,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)

ERROR_DOMAIN = "azora.dev"
# Caps on what one status echoes, in UTF-8 bytes. Worst case, every text at its cap: the
# violations (2 x 10 x ~190), ErrorInfo metadata (10 x ~250) and the message (512) make about
# 7 KB, 9.3 KB in base64 (grpc-status-details-bin), plus the message again as grpc-message
# (percent-encoded, up to 1.5 KB): under gRPC's 16 KiB with room for the other headers.
MAX_TEXT = 160
MAX_VIOLATIONS = 10
MAX_MESSAGE = 512


GRPC_CODES: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.ABORTED: grpc.StatusCode.ABORTED,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.UNIMPLEMENTED: grpc.StatusCode.UNIMPLEMENTED,
}


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def _retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    whole = max(0, math.ceil(seconds))
    return error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=whole))


def clip(text: str, limit: int = MAX_TEXT) -> str:
    """`text` cut to `limit` UTF-8 bytes (on a character boundary), saying how much was cut."""
    encoded = text.encode()
    if len(encoded) <= limit:
        return text
    kept = encoded[:limit].decode(errors="ignore")
    return f"{kept}... ({len(encoded) - len(kept.encode())} more bytes)"


def to_status(
    error: AzoraError, *, service_domain: str
) -> tuple[grpc.StatusCode, status_pb2.Status]:
    """Build the gRPC code and google.rpc.Status for a domain error.

    Args:
        error: the raised domain error.
        service_domain: the API's domain in ErrorInfo, e.g. "domain.azora.dev".
    """
    code = GRPC_CODES[error.kind]
    message = error.message
    shown: list[FieldViolation] = []
    metadata = {clip(k, 64): clip(v) for k, v in list(error.metadata.items())[:MAX_VIOLATIONS]}
    if isinstance(error, InvalidArgument):
        shown = error.violations[:MAX_VIOLATIONS]
        omitted = len(error.violations) - len(shown)
        if omitted:
            # A many-violation error's message lists all of them: rebuild it from those shown.
            listed = "; ".join(f"{clip(v.field)}: {clip(v.description)}" for v in shown)
            # The count first: the message itself may be cut.
            message = (
                f"{len(error.violations)} invalid fields, the first {len(shown)} listed "
                f"({omitted} more invalid fields not shown): {listed}"
            )
            metadata["omittedViolations"] = str(omitted)
    details = [
        _pack(
            error_details_pb2.ErrorInfo(
                reason=error.reason, domain=service_domain, metadata=metadata
            )
        )
    ]
    if isinstance(error, InvalidArgument):
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=clip(v.field), description=clip(v.description)
                        )
                        for v in shown
                    ]
                )
            )
        )
    elif isinstance(error, NotFound | AlreadyExists):
        details.append(
            _pack(
                error_details_pb2.ResourceInfo(
                    resource_type=clip(error.resource_type),
                    resource_name=clip(error.resource_name),
                    description=clip(error.message),
                )
            )
        )
    elif isinstance(error, FailedPrecondition) and error.violations:
        details.append(
            _pack(
                error_details_pb2.PreconditionFailure(
                    violations=[
                        error_details_pb2.PreconditionFailure.Violation(
                            type=clip(v.type),
                            subject=clip(v.subject),
                            description=clip(v.description),
                        )
                        for v in error.violations[:MAX_VIOLATIONS]
                    ]
                )
            )
        )
    elif isinstance(error, ResourceExhausted):
        details.append(
            _pack(
                error_details_pb2.QuotaFailure(
                    violations=[
                        error_details_pb2.QuotaFailure.Violation(
                            subject=error.reason, description=clip(error.message)
                        )
                    ]
                )
            )
        )
        details.append(_pack(_retry_info(error.retry_after_seconds)))
    elif isinstance(error, Unavailable):
        details.append(_pack(_retry_info(error.retry_after_seconds)))
    details.extend(_pack(extra) for extra in error.details)
    status = status_pb2.Status(
        code=code.value[0], message=clip(message, MAX_MESSAGE), details=details
    )
    return code, status


def internal_status(*, service_domain: str) -> tuple[grpc.StatusCode, status_pb2.Status]:
    """The generic status for an unexpected exception: no internals reach the caller."""
    info = error_details_pb2.ErrorInfo(reason="INTERNAL", domain=service_domain)
    return grpc.StatusCode.INTERNAL, status_pb2.Status(
        code=code_pb2.INTERNAL, message="internal error", details=[_pack(info)]
    )
