"""Every SMTP reply of the submission server that is ours, and the gRPC error -> reply table.

The replies every listener shares (and `enhanced`) are in services/core/smtp_replies.py and
re-exported here. The mail service's answer to SubmitMessage decides the final reply to DATA:

| mail service answer                                    | SMTP reply                      |
|--------------------------------------------------------|---------------------------------|
| OK (stored durably)                                    | 250 2.0.0 Ok: queued as <id>    |
| INVALID_ARGUMENT MESSAGE_TOO_LARGE                     | 552 5.3.4                       |
| INVALID_ARGUMENT TOO_MANY_RECIPIENTS                   | 550 5.5.3                       |
| INVALID_ARGUMENT INVALID_RECIPIENT                     | 550 5.1.3                       |
| INVALID_ARGUMENT INVALID_SENDER                        | 550 5.1.7                       |
| INVALID_ARGUMENT MESSAGE_MALFORMED, INVALID_CONTROL_HEADER, other | 550 5.6.0            |
| FAILED_PRECONDITION (sender domain not active, no relay, ...) | 550 5.7.1 naming the domain |
| ALREADY_EXISTS (idempotency key reused, other message) | 550 5.6.0                       |
| PERMISSION_DENIED                                      | 550 5.7.1                       |
| UNAUTHENTICATED (key revoked since AUTH)               | 535 5.7.8                       |
| RESOURCE_EXHAUSTED with a reason (rate limit, quota)   | 451 4.7.1 (retry after N s)     |
| anything else: UNAVAILABLE (database unreachable), DEADLINE_EXCEEDED, INTERNAL, a dropped
  connection, an unexpected error                                          | 451 4.3.0          |
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import grpc
from google.rpc import error_details_pb2, status_pb2

from services.core.smtp_replies import (
    IDLE_TIMEOUT,
    RECIPIENT_OK,
    SENDER_OK,
    SESSION_TIMEOUT,
    SHUTTING_DOWN,
    TEMPORARY_FAILURE,
    TOO_MANY_BAD_COMMANDS,
    TOO_MANY_CONNECTIONS,
    enhanced,
    one_line,
)

QUEUED = "250 2.0.0 Ok: queued as {id}"
AUTH_REQUIRED = "530 5.7.0 Authentication required"
TLS_REQUIRED = "530 5.7.0 Must issue a STARTTLS command first"
AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"
AUTH_TEMPORARY = "454 4.7.0 Temporary authentication failure, try again later"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients (at most {limit})"
# 421: the server closes the connection after it.
AUTH_BLOCKED = "421 4.7.0 Too many failed authentications, try again later"
TOO_MANY_COMMANDS = "421 4.7.0 Too many commands before authentication"


@dataclass
class Failure:
    """What the mail service said when it refused a message."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    retry_seconds: int = 0


def decode(error: grpc.aio.AioRpcError) -> Failure:
    """Read the google.rpc.Status details of a failed call (ErrorInfo, RetryInfo)."""
    failure = Failure(error.code(), error.details() or "")
    for key, value in error.trailing_metadata() or ():
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                failure.reason, failure.metadata = info.reason, dict(info.metadata)
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                failure.retry_seconds = int(retry.retry_delay.seconds)
    return failure


# SubmitMessageRequest's fields as the mail service names them in errors (JSON spelling), and
# what the SMTP client sent them as: the message after DATA (said without a name: the reply is
# to DATA), the envelope sender and recipients.
_RAW_MESSAGE_FIELD = "rawMessage"
_ENVELOPE_FIELDS = (
    (re.compile(r"^envelopeFrom: "), "MAIL FROM: "),
    (re.compile(r"^envelopeTo\[\d+\]: "), "RCPT TO: "),
)
_INVALID = {
    "MESSAGE_TOO_LARGE": "552 5.3.4",
    "TOO_MANY_RECIPIENTS": "550 5.5.3",
    "INVALID_RECIPIENT": "550 5.1.3",
    "INVALID_SENDER": "550 5.1.7",
}


def for_failure(failure: Failure) -> str:
    """The SMTP reply to DATA for a refusal of the mail service (the table above)."""
    text = one_line(failure.message)
    code = failure.code
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        # "rawMessage: " names SubmitMessage's field, which an SMTP client never sent: the
        # message is what it sent after DATA, so the reply says only what is wrong with it.
        text = text.removeprefix(f"{_RAW_MESSAGE_FIELD}: ")
        for field_name, command in _ENVELOPE_FIELDS:
            text = field_name.sub(command, text)
        return f"{_INVALID.get(failure.reason, '550 5.6.0')} {text}"
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        domain = failure.metadata.get("domain", "")
        if failure.reason == "SENDER_DOMAIN_NOT_ACTIVE":
            return f"550 5.7.1 Sender domain {domain} is not an active domain of your account"
        if failure.reason == "RELAY_NOT_CONFIGURED":
            return f"550 5.7.1 Sender domain {domain} has no SMTP relay configured"
        return f"550 5.7.1 {text}"
    if code == grpc.StatusCode.ALREADY_EXISTS:
        return (
            "550 5.6.0 X-Azora-Idempotency-Key was already used for a different message "
            "in the last 24 hours"
        )
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return f"550 5.7.1 {text}"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return AUTH_INVALID
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and failure.reason:
        retry = f" (retry in {failure.retry_seconds} s)" if failure.retry_seconds else ""
        return f"451 4.7.1 {text}{retry}"
    return TEMPORARY_FAILURE


__all__ = [
    "AUTH_BLOCKED",
    "AUTH_INVALID",
    "AUTH_REQUIRED",
    "AUTH_TEMPORARY",
    "Failure",
    "IDLE_TIMEOUT",
    "QUEUED",
    "RECIPIENT_OK",
    "SENDER_OK",
    "SESSION_TIMEOUT",
    "SHUTTING_DOWN",
    "TEMPORARY_FAILURE",
    "TLS_REQUIRED",
    "TOO_MANY_BAD_COMMANDS",
    "TOO_MANY_COMMANDS",
    "TOO_MANY_CONNECTIONS",
    "TOO_MANY_RECIPIENTS",
    "decode",
    "enhanced",
    "for_failure",
]
