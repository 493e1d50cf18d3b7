"""Validating a send request and building its message once, at submit.

Every problem is collected and reported together, each naming its proto field (``to[2]``,
``attachments[0].content``, ``headers[1].name``). Addresses follow RFC 5322 (display names,
quoted local parts) with IDN domains converted to A-labels. Anything that ends up in a header
(subject, header values, display names, attachment file names and types) is checked by one
function, `header_text_problem`: no NUL and no line break of any kind — CR and LF, which is what
stops header injection, and the other characters Python's `str.splitlines` breaks on (VT, FF,
FS, GS, RS, NEL, U+2028, U+2029), which the stdlib's header folding refuses while building the
message. Bodies may contain any line endings: they are normalised to CRLF by the MIME writer.
Sizes are bounded before anything is built: recipients and Reply-To addresses, attachments,
custom headers, tags and metadata (`MAX_*` below and `Limits`; docs/operations.md lists them).

The built message is stored as bytes and never rebuilt: workers only prepend a DKIM signature.
Simple messages are written directly by `services.mail.simple_mime` (same bytes, a fraction of
the cost); everything else by the stdlib's `EmailMessage`.
"""

from __future__ import annotations

import hashlib
import json
import mimetypes
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email import policy as email_policy
from email.headerregistry import DateHeader, HeaderRegistry
from email.message import EmailMessage
from email.utils import format_datetime, formataddr, getaddresses, parsedate_to_datetime

import idna

from services.core.errors import FieldViolation, InvalidArgument
from services.mail import simple_mime

# Headers we write ourselves or that would change routing/structure if a caller set them.
RESERVED_HEADERS = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "reply-to",
        "subject",
        "date",
        "message-id",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "content-disposition",
        "dkim-signature",
        "sender",
        "return-path",
        "received",
    }
)
# Matched with fullmatch: "$" would also accept a trailing newline.
_HEADER_NAME_RE = re.compile(r"[!-9;-~]{1,76}")  # RFC 5322 ftext: printable, no colon
_LOCAL_RE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}")
_CONTENT_ID_RE = re.compile(r"[!-~]{1,200}")
# NUL and every character `str.splitlines` treats as a line break.
_HEADER_FORBIDDEN = frozenset("\0\r\n\v\f\x1c\x1d\x1e\x85\u2028\u2029")
HEADER_TEXT_RULE = (
    "must not contain line breaks (CR, LF, VT, FF, FS, GS, RS, NEL, U+2028, U+2029) or NUL"
)
MAX_SUBJECT = 998
# Every address (display name included), attachment file name and content type is stored with
# the email: bounded, so no request can push the email's document past the database's limit.
MAX_ADDRESS = 998
MAX_FILENAME = 255
MAX_CONTENT_TYPE = 255
MAX_TAGS = 20
MAX_TAG_LENGTH = 100
MAX_METADATA = 50
# Keys and values of all metadata entries together, UTF-8 (they are stored with the email).
MAX_METADATA_BYTES = 16 * 1024
MAX_HEADERS = 50
MAX_HEADER_VALUE = 998
MAX_IDEMPOTENCY_KEY = 255
# The header classes of policy.SMTP (its default header_factory): which fields it parses.
_HEADER_CLASSES = HeaderRegistry()


@dataclass(frozen=True, slots=True)
class AttachmentInput:
    """One attachment of a request."""

    filename: str
    content_type: str
    content: bytes
    content_id: str = ""
    inline: bool = False


@dataclass(frozen=True, slots=True)
class SendInput:
    """A send request, independent of protobuf."""

    from_address: str
    to: list[str] = field(default_factory=list)
    cc: list[str] = field(default_factory=list)
    bcc: list[str] = field(default_factory=list)
    reply_to: list[str] = field(default_factory=list)
    subject: str = ""
    text: str = ""
    html: str = ""
    attachments: list[AttachmentInput] = field(default_factory=list)
    headers: list[tuple[str, str]] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    send_at: datetime | None = None
    idempotency_key: str = ""

    def fingerprint(self) -> str:
        """SHA-256 of the canonical request (everything but the idempotency key)."""
        canonical = {
            "from": self.from_address,
            "to": self.to,
            "cc": self.cc,
            "bcc": self.bcc,
            "reply_to": self.reply_to,
            "subject": self.subject,
            "text": self.text,
            "html": self.html,
            "attachments": [
                [
                    a.filename,
                    a.content_type,
                    hashlib.sha256(a.content).hexdigest(),
                    a.content_id,
                    a.inline,
                ]
                for a in self.attachments
            ],
            "headers": self.headers,
            "tags": self.tags,
            "metadata": sorted(self.metadata.items()),
            "send_at": self.send_at.isoformat() if self.send_at else None,
        }
        raw = json.dumps(canonical, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(raw.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Mailbox:
    """A parsed address: header form (display name kept) and the SMTP addr-spec."""

    header: str
    addr_spec: str
    domain: str  # A-label, lower case


@dataclass(frozen=True, slots=True)
class Limits:
    """Validation limits from settings."""

    max_recipients: int
    max_attachment_size: int
    max_message_size: int
    schedule_horizon: timedelta


@dataclass(frozen=True, slots=True)
class ValidRequest:
    """A request that passed validation, with its addresses parsed."""

    request: SendInput
    sender: Mailbox
    to: list[Mailbox]
    cc: list[Mailbox]
    bcc: list[Mailbox]
    reply_to: list[Mailbox]


def header_text_problem(value: str) -> str | None:
    """Why `value` cannot go into a header, or None if it can (the one rule for header text)."""
    if _HEADER_FORBIDDEN.isdisjoint(value):
        return None
    return HEADER_TEXT_RULE


def parse_mailbox(value: str, field_name: str) -> Mailbox:
    """Parse one RFC 5322 mailbox (``Name <local@domain>`` or ``local@domain``).

    Raises:
        InvalidArgument: the value is not exactly one valid mailbox (naming `field_name`).
    """
    problem = header_text_problem(value)
    if problem:
        raise InvalidArgument.single(field_name, problem)
    if not value.strip():
        raise InvalidArgument.single(field_name, "must be an email address")
    if len(value) > MAX_ADDRESS:
        raise InvalidArgument.single(
            field_name, f"at most {MAX_ADDRESS} characters, display name included"
        )
    pairs = getaddresses([value])
    if len(pairs) != 1 or not pairs[0][1] or "@" not in pairs[0][1]:
        raise InvalidArgument.single(field_name, f"{value!r} is not a valid email address")
    name, addr = pairs[0]
    local, _, domain = addr.rpartition("@")
    local = unicodedata.normalize("NFC", local)  # RFC 6532 section 3.1
    if not _valid_local_part(local):
        raise InvalidArgument.single(field_name, f"{value!r} has an invalid local part")
    try:
        a_label = idna.encode(domain.rstrip("."), uts46=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError):
        raise InvalidArgument.single(field_name, f"{value!r} has an invalid domain") from None
    if "." not in a_label or len(a_label) > 253:
        raise InvalidArgument.single(field_name, f"{value!r} has an invalid domain")
    addr_spec = f"{local}@{a_label}"
    if not addr_spec.isascii():
        # An internationalised address (RFC 6531/6532) is written as UTF-8 in the headers of
        # a message that then needs SMTPUTF8; the display name is quoted, not RFC 2047-encoded.
        quoted = name.replace("\\", "\\\\").replace('"', '\\"')
        return Mailbox(
            header=f'"{quoted}" <{addr_spec}>' if name else addr_spec,
            addr_spec=addr_spec,
            domain=a_label,
        )
    # formataddr quotes or RFC 2047-encodes the display name as needed.
    header = formataddr((name, addr_spec)) if name else addr_spec
    return Mailbox(header=header, addr_spec=addr_spec, domain=a_label)


def _valid_local_part(local: str) -> bool:
    """RFC 5321 dot-atom local part, with RFC 6531's UTF-8 characters; at most 64 octets."""
    if not local or len(local.encode()) > 64:
        return False
    if local.startswith(".") or local.endswith(".") or ".." in local:
        return False
    return all(
        _LOCAL_RE.fullmatch(ch) if ch.isascii() else unicodedata.category(ch)[0] not in "CZ"
        for ch in local
    )


def needs_smtputf8(addresses: Iterable[str]) -> bool:
    """Whether addr-specs can only travel in an SMTPUTF8 transaction (RFC 6531)."""
    return not all(address.isascii() for address in addresses)


def validate(request: SendInput, *, limits: Limits, now: datetime) -> ValidRequest:
    """Check everything that does not need other services.

    Raises:
        InvalidArgument: every violation, each naming its field.
    """
    violations: list[FieldViolation] = []

    def mailboxes(values: list[str], name: str) -> list[Mailbox]:
        out = []
        for i, value in enumerate(values):
            try:
                out.append(parse_mailbox(value, f"{name}[{i}]"))
            except InvalidArgument as exc:
                violations.extend(exc.violations)
        return out

    sender: Mailbox | None = None
    try:
        sender = parse_mailbox(request.from_address, "from")
    except InvalidArgument as exc:
        violations.extend(exc.violations)
    to = mailboxes(request.to, "to")
    cc = mailboxes(request.cc, "cc")
    bcc = mailboxes(request.bcc, "bcc")
    reply_to = mailboxes(request.reply_to, "reply_to")
    count = len(request.to) + len(request.cc) + len(request.bcc)
    if count == 0:
        violations.append(FieldViolation("to", "at least one recipient (to, cc or bcc) is needed"))
    elif count > limits.max_recipients:
        violations.append(
            FieldViolation("to", f"{count} recipients; at most {limits.max_recipients} allowed")
        )
    if len(request.reply_to) > limits.max_recipients:
        violations.append(
            FieldViolation(
                "reply_to",
                f"{len(request.reply_to)} addresses; at most {limits.max_recipients} allowed",
            )
        )
    subject_problem = header_text_problem(request.subject)
    if subject_problem:
        violations.append(FieldViolation("subject", subject_problem))
    elif len(request.subject) > MAX_SUBJECT:
        violations.append(FieldViolation("subject", f"at most {MAX_SUBJECT} characters"))
    if not request.text and not request.html:
        violations.append(FieldViolation("text", "text or html is required"))
    for name, body in (("text", request.text), ("html", request.html)):
        if "\0" in body:
            violations.append(FieldViolation(name, "must not contain NUL characters"))
    if len(request.headers) > MAX_HEADERS:
        violations.append(FieldViolation("headers", f"at most {MAX_HEADERS} headers"))
    for i, (hname, hvalue) in enumerate(request.headers):
        if not _HEADER_NAME_RE.fullmatch(hname):
            violations.append(
                FieldViolation(f"headers[{i}].name", "must be printable ASCII without ':'")
            )
        elif hname.lower() in RESERVED_HEADERS:
            violations.append(
                FieldViolation(f"headers[{i}].name", f"{hname} is set by the service")
            )
        value_problem = header_text_problem(hvalue)
        if value_problem:
            violations.append(FieldViolation(f"headers[{i}].value", value_problem))
        elif len(hvalue) > MAX_HEADER_VALUE:
            violations.append(
                FieldViolation(f"headers[{i}].value", f"at most {MAX_HEADER_VALUE} characters")
            )
        elif _HEADER_NAME_RE.fullmatch(hname):
            violations.extend(_structured_header_problems(request.headers, i))
    estimated = len(request.text.encode()) + len(request.html.encode())
    for i, att in enumerate(request.attachments):
        prefix = f"attachments[{i}]"
        if not att.filename:
            violations.append(FieldViolation(f"{prefix}.filename", "required"))
        elif len(att.filename) > MAX_FILENAME:
            violations.append(
                FieldViolation(f"{prefix}.filename", f"at most {MAX_FILENAME} characters")
            )
        else:
            filename_problem = header_text_problem(att.filename)
            if filename_problem:
                violations.append(FieldViolation(f"{prefix}.filename", filename_problem))
        if att.content_type and (
            header_text_problem(att.content_type)
            or att.content_type.count("/") != 1
            or len(att.content_type) > MAX_CONTENT_TYPE
        ):
            violations.append(
                FieldViolation(
                    f"{prefix}.content_type", f"type/subtype, at most {MAX_CONTENT_TYPE} characters"
                )
            )
        if att.content_id and not _CONTENT_ID_RE.fullmatch(att.content_id.strip("<>")):
            violations.append(FieldViolation(f"{prefix}.content_id", "must be printable ASCII"))
        if len(att.content) > limits.max_attachment_size:
            violations.append(
                FieldViolation(
                    f"{prefix}.content",
                    f"{len(att.content)} bytes; at most {limits.max_attachment_size} allowed",
                )
            )
        # Base64 grows content by 4/3 plus line breaks.
        estimated += len(att.content) * 4 // 3 * 78 // 76 + 512
    if estimated > limits.max_message_size:
        violations.append(
            FieldViolation(
                "attachments",
                f"the message would be about {estimated} bytes; at most "
                f"{limits.max_message_size} allowed",
            )
        )
    if len(request.tags) > MAX_TAGS:
        violations.append(FieldViolation("tags", f"at most {MAX_TAGS} tags"))
    for i, tag in enumerate(request.tags):
        if not tag or len(tag) > MAX_TAG_LENGTH or header_text_problem(tag):
            violations.append(
                FieldViolation(f"tags[{i}]", f"1-{MAX_TAG_LENGTH} characters, no line breaks")
            )
    if len(request.metadata) > MAX_METADATA:
        violations.append(FieldViolation("metadata", f"at most {MAX_METADATA} entries"))
    metadata_bytes = sum(len(k.encode()) + len(v.encode()) for k, v in request.metadata.items())
    if metadata_bytes > MAX_METADATA_BYTES:
        violations.append(
            FieldViolation(
                "metadata",
                f"{metadata_bytes} bytes of keys and values; at most {MAX_METADATA_BYTES} allowed",
            )
        )
    if len(request.idempotency_key) > MAX_IDEMPOTENCY_KEY:
        violations.append(
            FieldViolation("idempotency_key", f"at most {MAX_IDEMPOTENCY_KEY} characters")
        )
    if request.send_at is not None and request.send_at > now + limits.schedule_horizon:
        violations.append(
            FieldViolation(
                "send_at",
                f"at most {int(limits.schedule_horizon.total_seconds())} seconds in the future",
            )
        )
    if violations or sender is None:
        raise InvalidArgument(violations)
    return ValidRequest(request, sender, to, cc, bcc, reply_to)


def _structured_header_problems(headers: list[tuple[str, str]], index: int) -> list[FieldViolation]:
    """What the stdlib would refuse or silently drop in custom header `index`.

    RFC 5322 allows some fields once only (Orig-Date): the stdlib raises on a second one.
    Date fields (Orig-Date, Resent-Date) are parsed: a value that is not a date would be
    written as an empty field.
    """
    name, value = headers[index]
    problems = []
    most = email_policy.SMTP.header_max_count(name)
    if most is not None and sum(n.lower() == name.lower() for n, _ in headers[:index]) >= most:
        problems.append(FieldViolation(f"headers[{index}].name", f"{name} at most {most} time(s)"))
    if issubclass(_HEADER_CLASSES[name], DateHeader):
        try:
            parsedate_to_datetime(value)
        except (ValueError, TypeError):
            problems.append(
                FieldViolation(f"headers[{index}].value", f"{name} must be an RFC 5322 date")
            )
    return problems


def _normalise(body: str) -> str:
    # Bare CR or LF become one line break; the SMTP policy writes every break as CRLF.
    return body.replace("\r\n", "\n").replace("\r", "\n")


def build_message(
    valid: ValidRequest,
    *,
    email_id: str,
    domain: str,
    now: datetime,
    boundary: str | None = None,
) -> tuple[bytes, str]:
    """The complete RFC 5322 message (without Bcc) and its Message-ID.

    Simple messages (`simple_mime.is_simple`: short plain ASCII headers, text and/or HTML, no
    attachments) are written directly; everything else is built by the stdlib
    (`build_message_with_stdlib`). Both give the same bytes for a simple message.

    Args:
        valid: the validated request.
        email_id: the email's id (the Message-ID's local part).
        domain: the sending domain (the Message-ID's domain).
        now: the Date header's time.
        boundary: the top-level MIME boundary; None draws a random one (tests pass one to
            compare exact bytes).
    """
    message_id = f"<{email_id}@{domain}>"
    headers = message_headers(valid, message_id=message_id, now=now)
    text, html = _normalise(valid.request.text), _normalise(valid.request.html)
    if written_directly(valid, headers):
        return simple_mime.build(headers, text, html, boundary=boundary), message_id
    return _stdlib_message(valid, headers, text, html, boundary), message_id


def written_directly(valid: ValidRequest, headers: list[tuple[str, str]]) -> bool:
    """Whether `build_message` writes this message itself rather than through the stdlib.

    Args:
        valid: the validated request.
        headers: its headers, from `message_headers`.
    """
    request = valid.request
    return simple_mime.is_simple(
        headers,
        _normalise(request.text),
        _normalise(request.html),
        has_attachments=bool(request.attachments),
        custom_names=[name for name, _ in request.headers],
    )


def build_message_with_stdlib(
    valid: ValidRequest,
    *,
    email_id: str,
    domain: str,
    now: datetime,
    boundary: str | None = None,
) -> tuple[bytes, str]:
    """`build_message` through the stdlib whatever the message (the reference for the fast path)."""
    message_id = f"<{email_id}@{domain}>"
    headers = message_headers(valid, message_id=message_id, now=now)
    text, html = _normalise(valid.request.text), _normalise(valid.request.html)
    return _stdlib_message(valid, headers, text, html, boundary), message_id


def message_headers(
    valid: ValidRequest, *, message_id: str, now: datetime
) -> list[tuple[str, str]]:
    """Every header of the message, in order, as both writers set them."""
    headers = [("From", valid.sender.header)]
    if valid.to:
        headers.append(("To", ", ".join(m.header for m in valid.to)))
    if valid.cc:
        headers.append(("Cc", ", ".join(m.header for m in valid.cc)))
    if valid.reply_to:
        headers.append(("Reply-To", ", ".join(m.header for m in valid.reply_to)))
    headers.append(("Subject", valid.request.subject))
    headers.append(("Date", format_datetime(now)))
    headers.append(("Message-ID", message_id))
    headers.extend(valid.request.headers)
    return headers


def _stdlib_message(
    valid: ValidRequest,
    headers: list[tuple[str, str]],
    text: str,
    html: str,
    boundary: str | None,
) -> bytes:
    """The message built by `email.message.EmailMessage`.

    Structure: text or html alone; multipart/alternative for both; html with inline parts
    becomes multipart/related; downloads make the whole multipart/mixed.
    """
    request = valid.request
    header_addresses = [valid.sender, *valid.to, *valid.cc, *valid.reply_to]
    # UTF-8 headers only when an address needs them (the relay must then offer SMTPUTF8);
    # otherwise RFC 2047 words keep the message readable by any relay.
    utf8 = needs_smtputf8(m.addr_spec for m in header_addresses)
    msg = EmailMessage(policy=email_policy.SMTPUTF8 if utf8 else email_policy.SMTP)
    for name, value in headers:
        msg[name] = value
    if text and html:
        msg.set_content(text)
        msg.add_alternative(html, subtype="html")
    elif html:
        msg.set_content(html, subtype="html")
    else:
        msg.set_content(text)
    html_part = _html_part(msg) if html else None
    for att in request.attachments:
        maintype, subtype = _content_type(att)
        cid = f"<{att.content_id.strip('<>')}>" if att.content_id else None
        if att.inline and cid and html_part is not None:
            html_part.add_related(
                att.content,
                maintype,
                subtype,
                cid=cid,
                filename=att.filename,
                disposition="inline",
            )
        else:
            msg.add_attachment(
                att.content,
                maintype,
                subtype,
                filename=att.filename,
                cid=cid,
                disposition="inline" if att.inline else "attachment",
            )
    if boundary is not None and msg.is_multipart():
        # Nested multiparts keep their random boundaries: only the top level is compared.
        msg.set_boundary(boundary)
    return msg.as_bytes()


def _html_part(msg: EmailMessage) -> EmailMessage:
    if msg.get_content_type() == "text/html":
        return msg
    for part in msg.iter_parts():
        if isinstance(part, EmailMessage) and part.get_content_type() == "text/html":
            return part
    return msg


def _content_type(att: AttachmentInput) -> tuple[str, str]:
    content_type = att.content_type or mimetypes.guess_type(att.filename)[0]
    content_type = content_type or "application/octet-stream"
    maintype, _, subtype = content_type.partition("/")
    return maintype.strip().lower(), subtype.strip().lower()


def content_type_of(att: AttachmentInput) -> str:
    """The MIME type an attachment is sent with."""
    return "/".join(_content_type(att))


__all__ = [
    "AttachmentInput",
    "Limits",
    "Mailbox",
    "SendInput",
    "ValidRequest",
    "build_message",
    "build_message_with_stdlib",
    "content_type_of",
    "header_text_problem",
    "message_headers",
    "needs_smtputf8",
    "parse_mailbox",
    "validate",
    "written_directly",
]
