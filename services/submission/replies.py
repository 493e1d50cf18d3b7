"""Every SMTP reply of the submission server that is ours, and the gRPC error -> reply table.

Replies carry RFC 3463 enhanced status codes (ENHANCEDSTATUSCODES is advertised). The mail
service's answer to SubmitMessage decides the final reply to DATA:

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

QUEUED = "250 2.0.0 Ok: queued as {id}"
SENDER_OK = "250 2.1.0 Sender OK"
RECIPIENT_OK = "250 2.1.5 Recipient OK"
AUTH_REQUIRED = "530 5.7.0 Authentication required"
TLS_REQUIRED = "530 5.7.0 Must issue a STARTTLS command first"
AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"
AUTH_TEMPORARY = "454 4.7.0 Temporary authentication failure, try again later"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients (at most {limit})"
TEMPORARY_FAILURE = "451 4.3.0 Temporary failure, try again later"
# 421: the server closes the connection after it.
TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections from your address, try again later"
AUTH_BLOCKED = "421 4.7.0 Too many failed authentications, try again later"
TOO_MANY_COMMANDS = "421 4.7.0 Too many commands before authentication"
TOO_MANY_BAD_COMMANDS = "421 4.7.0 Too many bad commands"
IDLE_TIMEOUT = "421 4.4.2 Idle for too long, closing connection"
SESSION_TIMEOUT = "421 4.4.2 Session time limit reached, closing connection"
SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"

# aiosmtpd's own replies that lack an enhanced code, by their start.
_ENHANCED = (
    ("250 OK", "250 2.0.0 OK"),
    ("250 HELP", "250 HELP"),
    ("221 Bye", "221 2.0.0 Bye"),
    ("552 Error: message size exceeds", "552 5.3.4 Message size exceeds fixed maximum size"),
    ("552 Error: Too much mail data", "552 5.3.4 Message too big"),
    ("503 Error: send", "503 5.5.1 Error: send HELO/EHLO first"),
    ("503 Error: need MAIL", "503 5.5.1 Error: need MAIL command"),
    ("503 Error: need RCPT", "503 5.5.1 Error: need RCPT command"),
    ("503 Error: nested MAIL", "503 5.5.1 Error: nested MAIL command"),
    ("503 Already authenticated", "503 5.5.1 Already authenticated"),
    ("501 Error: SMTPUTF8", "501 5.5.4 SMTPUTF8 takes no arguments"),
    ("501 Error: BODY", "501 5.5.4 BODY can only be one of 7BIT, 8BITMIME"),
    ("555 ", "555 5.5.4 MAIL FROM/RCPT TO parameters not recognized or not implemented"),
    ("500 Line too long", "500 5.5.6 Line too long (see RFC 5321 4.5.3.1.6)"),
    ("500 Command line too long", "500 5.5.6 Command line too long"),
    ("500 Error: strict ASCII mode", "500 5.6.7 Non-ASCII data without SMTPUTF8"),
    ("502 ", "502 5.5.1 Command not implemented"),
)


def enhanced(reply: str) -> str:
    """The reply with an enhanced status code (RFC 2034), added to aiosmtpd's own where missing.

    Leaves alone replies that already have one, 220 greetings, 334 challenges, 354 and the
    multi-line EHLO answer, which RFC 2034 exempts.
    """
    if reply.startswith("220 Ready to start TLS"):
        return "220 2.0.0 Ready to start TLS"
    code, _, text = reply.partition(" ")
    if len(code) != 3 or not code.isdigit() or code in ("220", "334", "354"):
        return reply
    first = text.split(" ", 1)[0]
    if first.count(".") == 2 and first.replace(".", "").isdigit():
        return reply
    for start, replacement in _ENHANCED:
        if reply.startswith(start):
            return replacement
    cls = code[0]
    if cls == "5":
        return f"{code} 5.5.2 {text}"
    if cls in ("2", "4"):
        return f"{code} {cls}.0.0 {text}"
    return reply


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
    text = _one_line(failure.message)
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


def _one_line(text: str) -> str:
    # A reply line must not break (and must stay ASCII unless SMTPUTF8 was negotiated).
    flat = " ".join(text.split())
    return flat.encode("ascii", "replace").decode("ascii")[:400]


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
