"""The one mapping from typed domain errors to gRPC codes and google.rpc.Status details.

Every status carries an ErrorInfo (reason, domain, metadata). InvalidArgument adds BadRequest
field violations, NotFound/AlreadyExists a ResourceInfo, FailedPrecondition a
PreconditionFailure, ResourceExhausted a QuotaFailure and RetryInfo, Unavailable a RetryInfo.
An error's own `details` (e.g. a health report) come last.
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
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)

ERROR_DOMAIN = "azora.dev"

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


def to_status(
    error: AzoraError, *, service_domain: str
) -> tuple[grpc.StatusCode, status_pb2.Status]:
    """Build the gRPC code and google.rpc.Status for a domain error.

    Args:
        error: the raised domain error.
        service_domain: the API's domain in ErrorInfo, e.g. "domain.azora.dev".
    """
    code = GRPC_CODES[error.kind]
    details = [
        _pack(
            error_details_pb2.ErrorInfo(
                reason=error.reason, domain=service_domain, metadata=error.metadata
            )
        )
    ]
    if isinstance(error, InvalidArgument):
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=v.field, description=v.description
                        )
                        for v in error.violations
                    ]
                )
            )
        )
    elif isinstance(error, NotFound | AlreadyExists):
        details.append(
            _pack(
                error_details_pb2.ResourceInfo(
                    resource_type=error.resource_type,
                    resource_name=error.resource_name,
                    description=error.message,
                )
            )
        )
    elif isinstance(error, FailedPrecondition) and error.violations:
        details.append(
            _pack(
                error_details_pb2.PreconditionFailure(
                    violations=[
                        error_details_pb2.PreconditionFailure.Violation(
                            type=v.type, subject=v.subject, description=v.description
                        )
                        for v in error.violations
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
                            subject=error.reason, description=error.message
                        )
                    ]
                )
            )
        )
        details.append(_pack(_retry_info(error.retry_after_seconds)))
    elif isinstance(error, Unavailable):
        details.append(_pack(_retry_info(error.retry_after_seconds)))
    details.extend(_pack(extra) for extra in error.details)
    status = status_pb2.Status(code=code.value[0], message=error.message, details=details)
    return code, status


def internal_status(*, service_domain: str) -> tuple[grpc.StatusCode, status_pb2.Status]:
    """The generic status for an unexpected exception: no internals reach the caller."""
    info = error_details_pb2.ErrorInfo(reason="INTERNAL", domain=service_domain)
    return grpc.StatusCode.INTERNAL, status_pb2.Status(
        code=code_pb2.INTERNAL, message="internal error", details=[_pack(info)]
    )
