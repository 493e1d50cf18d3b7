"""Typed domain errors shared by all services.

Domain code raises these; it never imports grpc. One interceptor
(`services.core.interceptors.ErrorMappingInterceptor`) turns them into a gRPC status with
google.rpc details, so the mapping from error kind to status code lives in exactly one place.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from google.protobuf.message import Message


class ErrorKind(enum.Enum):
    """The broad class of an error; the interceptor maps each kind to one gRPC code."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ABORTED = "ABORTED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNIMPLEMENTED = "UNIMPLEMENTED"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One invalid field of a request, named by its path (e.g. ``records[2].ttl``).

    Domain code may use proto names (``send_at``); the error interceptor renames every path to
    the request's JSON names (``sendAt``) before it leaves the service, for gRPC and REST
    alike: Envoy relays a service's status unchanged, so the service must already speak the
    REST spelling, and one spelling for every client is simpler than two.
    """

    field: str
    description: str


@dataclass(frozen=True, slots=True)
class PreconditionViolation:
    """One unmet precondition (google.rpc.PreconditionFailure.Violation)."""

    type: str
    subject: str
    description: str


class AzoraError(Exception):
    """Base of every error a service raises on purpose.

    Attributes:
        kind: which gRPC status family the error belongs to.
        reason: an UPPER_SNAKE machine-readable reason, sent as google.rpc.ErrorInfo.reason.
        message: a human-readable message, safe to show to the caller (never holds secrets).
        metadata: extra string facts for ErrorInfo.metadata.
        details: extra messages for google.rpc.Status.details, packed after the standard ones
            (e.g. the health report that explains an UNAVAILABLE).
    """

    kind: ErrorKind = ErrorKind.FAILED_PRECONDITION
    default_reason: str = "FAILED_PRECONDITION"
    # Class default too, so a subclass that skips this __init__ still has no extra details.
    details: Sequence[Message] = ()

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        details: Sequence[Message] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata: dict[str, str] = dict(metadata or {})
        self.details = tuple(details)


class InvalidArgument(AzoraError):
    """The request is malformed; `violations` names every offending field."""

    kind = ErrorKind.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        violations: Sequence[FieldViolation],
        *,
        message: str | None = None,
        reason: str | None = None,
    ) -> None:
        self.violations = list(violations)
        if message is None:
            message = "; ".join(f"{v.field}: {v.description}" for v in self.violations)
        super().__init__(message or "invalid argument", reason=reason)

    @classmethod
    def single(cls, field: str, description: str) -> InvalidArgument:
        """Build an error for one bad field."""
        return cls([FieldViolation(field, description)])

    def renamed(self, rename: Callable[[str], str]) -> InvalidArgument:
        """The same error with every field path passed through `rename`.

        A message built from the violations is rebuilt; a message of its own is kept.
        """
        violations = [FieldViolation(rename(v.field), v.description) for v in self.violations]
        built = "; ".join(f"{v.field}: {v.description}" for v in self.violations)
        message = None if self.message == built else self.message
        renamed = InvalidArgument(violations, message=message, reason=self.reason)
        renamed.metadata = self.metadata
        renamed.details = self.details
        return renamed


class NotFound(AzoraError):
    """The resource does not exist, or belongs to another tenant (which must look the same)."""

    kind = ErrorKind.NOT_FOUND
    default_reason = "NOT_FOUND"

    def __init__(
        self, resource_type: str, resource_name: str, *, reason: str | None = None
    ) -> None:
        self.resource_type = resource_type
        self.resource_name = resource_name
        super().__init__(
            f"{resource_type} {resource_name!r} not found",
            reason=reason or f"{_snake(resource_type)}_NOT_FOUND",
            metadata={"resourceType": resource_type, "resourceName": resource_name},
        )


class AlreadyExists(AzoraError):
    """Creating the resource would duplicate one that exists."""

    kind = ErrorKind.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"

    def __init__(
        self, resource_type: str, resource_name: str, *, message: str | None = None
    ) -> None:
        self.resource_type = resource_type
        self.resource_name = resource_name
        super().__init__(
            message or f"{resource_type} {resource_name!r} already exists",
            reason=f"{_snake(resource_type)}_ALREADY_EXISTS",
            metadata={"resourceType": resource_type, "resourceName": resource_name},
        )


class FailedPrecondition(AzoraError):
    """The system is not in a state where the request can be carried out."""

    kind = ErrorKind.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        violations: Sequence[PreconditionViolation] = (),
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.violations = list(violations)
        super().__init__(message, reason=reason, metadata=metadata)


class Conflict(AzoraError):
    """A concurrent change won (optimistic concurrency); the caller may retry."""

    kind = ErrorKind.ABORTED
    default_reason = "CONCURRENT_MODIFICATION"


class Unauthenticated(AzoraError):
    """Credentials are missing, malformed, expired, forged or revoked."""

    kind = ErrorKind.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(AzoraError):
    """The principal is known but lacks the scope the method requires."""

    kind = ErrorKind.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class ResourceExhausted(AzoraError):
    """A quota or rate limit is exceeded; `retry_after_seconds` says when to come back."""

    kind = ErrorKind.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"

    def __init__(
        self, message: str, *, retry_after_seconds: float, reason: str | None = None
    ) -> None:
        self.retry_after_seconds = retry_after_seconds
        super().__init__(message, reason=reason)


class Unavailable(AzoraError):
    """A dependency (database, DNS, another service) cannot be reached right now."""

    kind = ErrorKind.UNAVAILABLE
    default_reason = "DEPENDENCY_UNAVAILABLE"

    def __init__(
        self,
        message: str,
        *,
        retry_after_seconds: float = 1.0,
        reason: str | None = None,
        details: Sequence[Message] = (),
    ) -> None:
        self.retry_after_seconds = retry_after_seconds
        super().__init__(message, reason=reason, details=details)


class DeadlineExceeded(AzoraError):
    """The caller's deadline ran out while we were working (e.g. inside a database call)."""

    kind = ErrorKind.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class Unimplemented(AzoraError):
    """The method is part of the contract but not served by this build yet."""

    kind = ErrorKind.UNIMPLEMENTED
    default_reason = "NOT_IMPLEMENTED"


def _snake(name: str) -> str:
    """Turn ``DkimKey`` or ``domain`` into ``DKIM_KEY`` / ``DOMAIN`` for reasons."""
    out: list[str] = []
    for i, ch in enumerate(name):
        if ch.isupper() and i and not name[i - 1].isupper():
            out.append("_")
        out.append(ch.upper() if ch.isalnum() else "_")
    return "".join(out)
