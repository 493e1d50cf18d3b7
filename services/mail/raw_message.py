"""Messages submitted whole (SMTP submission): checks and the few edits made before storing.

A submitted message is stored as the client sent it, never rebuilt (its DKIM signature is added
at delivery like any other email's). Before that it must pass the checks that stop header
injection and SMTP smuggling: no NUL byte, no bare CR or LF anywhere (every line ends in CRLF,
so nothing downstream can read a line break the client did not mean), a header section made only
of well-formed fields and their continuation lines, exactly one From with one mailbox, and
UTF-8 in the header (RFC 6532). The only edits, all in the header section:

* ``X-Azora-*`` control headers are read and removed: ``X-Azora-Tag`` (one tag per field,
  repeatable), ``X-Azora-Metadata-<key>`` (one metadata entry), ``X-Azora-Send-At`` (RFC 3339
  or RFC 5322 date: schedule), ``X-Azora-Idempotency-Key``. Any other ``X-Azora-*`` name is
  refused rather than silently dropped.
* ``Bcc`` fields are removed (RFC 5322 3.6.3: the envelope says who gets a blind copy; the
  header would reveal them to every recipient).
* ``Message-ID`` and ``Date`` are added at the top when missing (RFC 6409 8.2, 8.3).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import message_from_bytes
from email import policy as email_policy
from email.header import decode_header, make_header
from email.utils import format_datetime, getaddresses, parsedate_to_datetime
from typing import NoReturn

from services.core.errors import FieldViolation, InvalidArgument
from services.mail.compose import MAX_IDEMPOTENCY_KEY, MAX_METADATA, MAX_TAGS
from services.mail.models import AttachmentInfo

CONTROL_PREFIX = "x-azora-"
METADATA_PREFIX = "x-azora-metadata-"
_FIELD_RE = re.compile(rb"^([!-9;-~]+)[ \t]*:")
_BARE_LINE_BREAK = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_FIELD = "raw_message"


@dataclass(frozen=True, slots=True)
class SubmitInput:
    """One SMTP transaction handed over by the submission server."""

    raw: bytes
    envelope_from: str
    envelope_to: list[str]
    client_address: str = ""


@dataclass(frozen=True, slots=True)
class HeaderField:
    """One header field as sent: its name and raw value (continuation lines included)."""

    name: str
    raw: bytes  # the whole field, name to final CRLF

    @property
    def value(self) -> str:
        """The unfolded value, decoded as UTF-8 (RFC 6532), without the final line break."""
        text = self.raw.decode("utf-8").partition(":")[2]
        return re.sub(r"\r\n(?=[ \t])", "", text).strip()


@dataclass(slots=True)
class Controls:
    """What the ``X-Azora-*`` headers asked for."""

    tags: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    send_at: datetime | None = None
    idempotency_key: str = ""


@dataclass(frozen=True, slots=True)
class SubmittedMessage:
    """A checked message, split into header fields and body, with its control headers read."""

    fields: list[HeaderField]
    body: bytes  # from the blank line on (empty when the message has no body)
    controls: Controls

    def first(self, name: str) -> HeaderField | None:
        """The first field called `name` (case-insensitive), if any."""
        lowered = name.lower()
        return next((f for f in self.fields if f.name.lower() == lowered), None)

    def all(self, name: str) -> list[HeaderField]:
        """Every field called `name` (case-insensitive)."""
        lowered = name.lower()
        return [f for f in self.fields if f.name.lower() == lowered]

    def subject(self) -> str:
        """The Subject, RFC 2047 words decoded."""
        found = self.first("Subject")
        return decode_words(found.value) if found else ""

    def addresses(self, name: str) -> list[str]:
        """addr-specs of every mailbox in the fields called `name` (lower-cased)."""
        # Parsed before decoding: a decoded display name may contain commas or brackets.
        values = [f.value for f in self.all(name)]
        return [addr.lower() for _, addr in getaddresses(values) if addr]

    def content(self, *, message_id: str, now: datetime) -> bytes:
        """The message to store: missing Message-ID and Date first, then the kept fields."""
        added = b""
        if self.first("Message-ID") is None:
            added += f"Message-ID: {message_id}\r\n".encode()
        if self.first("Date") is None:
            added += f"Date: {format_datetime(now)}\r\n".encode()
        return added + b"".join(f.raw for f in self.fields) + self.body


def decode_words(value: str) -> str:
    """A header value with its RFC 2047 encoded words decoded (unchanged if they are broken)."""
    try:
        return str(make_header(decode_header(value)))
    except (ValueError, LookupError, UnicodeDecodeError):
        return value


def fingerprint(raw: bytes, envelope_from: str, envelope_to: list[str]) -> str:
    """SHA-256 of a submission (message and envelope), for idempotency."""
    digest = hashlib.sha256(raw)
    digest.update(b"\0" + envelope_from.encode() + b"\0" + "\0".join(envelope_to).encode())
    return digest.hexdigest()


def parse(raw: bytes) -> SubmittedMessage:
    """Check a submitted message and read its header section.

    Raises:
        InvalidArgument: reason MESSAGE_MALFORMED (field ``raw_message``) for NUL, bare CR/LF,
            a malformed header or From; INVALID_CONTROL_HEADER for a bad ``X-Azora-*`` header.
    """
    if not raw:
        _malformed("the message is empty")
    if b"\0" in raw:
        _malformed("the message contains a NUL byte")
    bare = _BARE_LINE_BREAK.search(raw)
    if bare is not None:
        line_no = raw.count(b"\n", 0, bare.start()) + 1
        _malformed(f"bare CR or LF on line {line_no}: every line must end with CRLF")
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if sep:
        head, body = head + b"\r\n", b"\r\n" + rest
    else:
        body = b""  # a message without a body: all header
        if not head.endswith(b"\r\n"):
            head += b"\r\n"
    fields: list[HeaderField] = []
    for number, line in enumerate(head.split(b"\r\n")[:-1], start=1):
        if line[:1] in (b" ", b"\t"):
            if not fields:
                _malformed("the message starts with a continuation line")
            previous = fields[-1]
            fields[-1] = HeaderField(previous.name, previous.raw + line + b"\r\n")
            continue
        match = _FIELD_RE.match(line)
        if match is None:
            _malformed(f"line {number} of the header section is not a header field")
        fields.append(HeaderField(match.group(1).decode("ascii"), line + b"\r\n"))
    try:
        for f in fields:
            f.raw.decode("utf-8")
    except UnicodeDecodeError:
        _malformed("the header section is not valid UTF-8")
    controls, kept = _controls(fields)
    if len([f for f in kept if f.name.lower() == "from"]) != 1:
        _malformed("the message must have exactly one From header")
    return SubmittedMessage(kept, body, controls)


def attachments(content: bytes) -> list[AttachmentInfo]:
    """What the email record lists about the message's attachments (none if MIME is broken)."""
    found: list[AttachmentInfo] = []
    try:
        message = message_from_bytes(content, policy=email_policy.default)
        for part in message.walk():
            filename = part.get_filename()
            if not filename or part.is_multipart():
                continue
            payload = part.get_payload(decode=True)
            found.append(
                AttachmentInfo(
                    filename,
                    part.get_content_type(),
                    len(payload) if isinstance(payload, bytes) else 0,
                    str(part.get("Content-ID", "")).strip().strip("<>"),
                    part.get_content_disposition() == "inline",
                )
            )
    except (ValueError, LookupError, TypeError, IndexError):
        return found  # an unparsable structure is still delivered as sent; we only list less
    return found


def from_mailbox(message: SubmittedMessage) -> tuple[str, str]:
    """The From header's (display form, addr-spec) of a checked message.

    Raises:
        InvalidArgument: MESSAGE_MALFORMED when From is not exactly one mailbox.
    """
    found = message.first("From")
    value = found.value if found else ""
    # Parsed before decoding: a decoded display name may contain commas or brackets.
    pairs = getaddresses([value])
    if len(pairs) != 1 or "@" not in pairs[0][1]:
        _malformed("the From header must hold exactly one mailbox")
    return decode_words(value), pairs[0][1]


def _controls(fields: list[HeaderField]) -> tuple[Controls, list[HeaderField]]:
    controls = Controls()
    kept: list[HeaderField] = []
    violations: list[FieldViolation] = []
    seen: set[str] = set()
    for f in fields:
        lowered = f.name.lower()
        if lowered == "bcc":
            continue
        if not lowered.startswith(CONTROL_PREFIX):
            kept.append(f)
            continue
        value = decode_words(f.value)
        if lowered == "x-azora-tag":
            if not value or len(value) > 100:
                violations.append(FieldViolation(f.name, "a tag of 1-100 characters"))
            controls.tags.append(value)
        elif lowered.startswith(METADATA_PREFIX) and len(lowered) > len(METADATA_PREFIX):
            key = f.name[len(METADATA_PREFIX) :]
            if key.lower() in {k.lower() for k in controls.metadata}:
                violations.append(FieldViolation(f.name, "metadata key given twice"))
            controls.metadata[key] = value
        elif lowered in ("x-azora-send-at", "x-azora-idempotency-key"):
            if lowered in seen:
                violations.append(FieldViolation(f.name, "given more than once"))
            seen.add(lowered)
            if lowered == "x-azora-idempotency-key":
                if not value or len(value) > MAX_IDEMPOTENCY_KEY:
                    violations.append(FieldViolation(f.name, f"1-{MAX_IDEMPOTENCY_KEY} characters"))
                controls.idempotency_key = value
            else:
                when = _parse_time(value)
                if when is None:
                    violations.append(
                        FieldViolation(
                            f.name, "an RFC 3339 or RFC 5322 date with a time zone is needed"
                        )
                    )
                controls.send_at = when
        else:
            violations.append(
                FieldViolation(
                    f.name,
                    "unknown control header (X-Azora-Tag, X-Azora-Metadata-<key>, "
                    "X-Azora-Send-At, X-Azora-Idempotency-Key)",
                )
            )
    if len(controls.tags) > MAX_TAGS:
        violations.append(FieldViolation("X-Azora-Tag", f"at most {MAX_TAGS} tags"))
    if len(controls.metadata) > MAX_METADATA:
        violations.append(FieldViolation("X-Azora-Metadata-*", f"at most {MAX_METADATA} entries"))
    if violations:
        raise InvalidArgument(violations, reason="INVALID_CONTROL_HEADER")
    return controls, kept


def _parse_time(value: str) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        try:
            parsed = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
    if parsed.tzinfo is None:
        return None
    return parsed.astimezone(UTC)


def _malformed(description: str) -> NoReturn:
    raise InvalidArgument([FieldViolation(_FIELD, description)], reason="MESSAGE_MALFORMED")


__all__ = [
    "Controls",
    "SubmitInput",
    "HeaderField",
    "SubmittedMessage",
    "attachments",
    "decode_words",
    "fingerprint",
    "from_mailbox",
    "parse",
]
