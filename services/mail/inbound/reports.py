"""Bounce and complaint reports that come back after the relay said 250: DSNs and ARF.

A pure module: `parse_report` reads one received message and says what it reports, or raises
`UnparsableReport` with the reason (the caller stores such a report with it, never drops it).

* Bounces: `flufl.bounce` finds the failed recipients and whether each failure is permanent or
  temporary; it knows the standard RFC 3464 DSN and the non-standard formats of older MTAs
  (Exim's plain-text bounce, ...). Where the report has a ``message/delivery-status`` part, each
  recipient's ``Status`` (the RFC 3463 enhanced code), ``Diagnostic-Code`` (the remote server's
  reply) and ``Remote-MTA`` come from it, and ``Action: delayed`` makes a delay report (the
  message is still being retried). Without that part, the enhanced code is the first one
  quoted in the text after the recipient's address, if any.
* Complaints: an RFC 5965 ARF report (``multipart/report; report-type=feedback-report``): the
  feedback type, and the complaining recipient from ``Original-Rcpt-To`` (else the ``To`` of the
  attached original message).

Who the report is about comes, preferably, from the VERP address it was sent to
(services/core/verp.py); `Report.original_return_path` and `original_message_id` are what the
report itself says, for the caller to cross-check.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import Message
from email.utils import getaddresses

from flufl.bounce import all_failures

_ENHANCED = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")


class ReportKind(enum.StrEnum):
    """What a report says happened."""

    BOUNCE = "bounce"  # delivery failed for at least one recipient
    DELAY = "delay"  # delivery is late but still being retried
    COMPLAINT = "complaint"  # the recipient reported the message (ARF)


@dataclass(frozen=True, slots=True)
class RecipientReport:
    """The outcome for one recipient."""

    address: str
    action: str  # "failed", "delayed" or "complained"
    permanent: bool
    status: str = ""  # RFC 3463, e.g. "5.1.1"; "" when the report gives none
    diagnostic: str = ""  # the remote server's reply, unfolded
    remote_mta: str = ""


@dataclass(frozen=True, slots=True)
class Report:
    """What one report says."""

    kind: ReportKind
    recipients: tuple[RecipientReport, ...]
    reporting_mta: str = ""
    feedback_type: str = ""  # complaints: "abuse", "fraud", "virus", "other", ...
    original_message_id: str = ""
    original_return_path: str = ""


class UnparsableReport(ValueError):
    """The message is not a report this module understands; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_report(raw: bytes) -> Report:
    """Read a bounce (DSN or older format) or a complaint (ARF).

    Raises:
        UnparsableReport: not a report, or one naming no failed, delayed or complaining
            recipient.
    """
    if not raw.strip():
        raise UnparsableReport("empty message")
    message = message_from_bytes(raw, policy=policy.compat32)
    if message.get_content_type() == "multipart/report" and (
        message.get_param("report-type", "", header="content-type") == "feedback-report"
    ):
        return _complaint(message)
    return _bounce(message)


def _complaint(message: Message) -> Report:
    feedback = _part(message, "message/feedback-report")
    if feedback is None:
        raise UnparsableReport("feedback report without a message/feedback-report part")
    fields = _fields(feedback)
    original = _part(message, "message/rfc822") or _part(message, "text/rfc822-headers")
    original_headers = _first_message(original) if original is not None else None
    recipients = _addresses(fields.get("original-rcpt-to", ""))
    if not recipients and original_headers is not None:
        recipients = _addresses(str(original_headers.get("To", "")))
    if not recipients:
        raise UnparsableReport("feedback report naming no recipient")
    return Report(
        kind=ReportKind.COMPLAINT,
        recipients=tuple(
            RecipientReport(address=a, action="complained", permanent=True) for a in recipients
        ),
        reporting_mta=_after_type(fields.get("reporting-mta", "")),
        feedback_type=fields.get("feedback-type", "").strip().lower(),
        original_message_id=_original_message_id(original_headers),
        original_return_path=_angle(
            fields.get("original-mail-from", "") or _header(original_headers, "Return-Path")
        ),
    )


def _bounce(message: Message) -> Report:
    try:
        temporary, permanent = all_failures(message)
    except Exception as exc:  # a detector tripping over a malformed message
        raise UnparsableReport(f"bounce detection failed: {type(exc).__name__}") from exc
    failed = {_decode(a): True for a in permanent} | {_decode(a): False for a in temporary}
    status_part = _part(message, "message/delivery-status")
    per_recipient, reporting_mta = _delivery_status(status_part) if status_part else ({}, "")
    recipients: list[RecipientReport] = []
    for address, fields in per_recipient.items():
        action = fields.get("action", "").strip().lower()
        if action not in ("failed", "delayed"):
            continue  # delivered, relayed, expanded: nothing went wrong for this one
        status = _status(fields.get("status", ""))
        is_permanent = action == "failed" and failed.get(address.lower(), status.startswith("5"))
        recipients.append(
            RecipientReport(
                address=address,
                action=action,
                permanent=is_permanent,
                status=status,
                diagnostic=_reply(fields.get("diagnostic-code", "")),
                remote_mta=_after_type(fields.get("remote-mta", "")),
            )
        )
    listed = {r.address.lower() for r in recipients}
    text = _text(message)
    for address, is_permanent in failed.items():
        if address in listed:
            continue
        paragraph = _paragraph_after(text, address)
        recipients.append(
            RecipientReport(
                address=address,
                action="failed" if is_permanent else "delayed",
                permanent=is_permanent,
                status=_status(paragraph),
                diagnostic=paragraph,
            )
        )
    if not recipients:
        raise UnparsableReport("no failed or delayed recipient found")
    kind = ReportKind.BOUNCE if any(r.action == "failed" for r in recipients) else ReportKind.DELAY
    original = _part(message, "message/rfc822") or _part(message, "text/rfc822-headers")
    headers = _first_message(original) if original is not None else _copied_message(text)
    return Report(
        kind=kind,
        recipients=tuple(recipients),
        reporting_mta=reporting_mta,
        original_message_id=_original_message_id(headers)
        or _original_id_field(status_part)
        or str(message.get("In-Reply-To", "")).strip(),
        original_return_path=_angle(_header(headers, "Return-Path")),
    )


# --- helpers --------------------------------------------------------------------------------


def _part(message: Message, content_type: str) -> Message | None:
    for part in message.walk():
        if part.get_content_type() == content_type:
            return part
    return None


def _blocks(part: Message) -> list[Message]:
    """The header blocks of a message/delivery-status or message/feedback-report part."""
    payload = part.get_payload()
    if isinstance(payload, list):
        return [p for p in payload if isinstance(p, Message)]
    text = payload if isinstance(payload, str) else ""
    return [message_from_bytes(b.encode("utf-8", "replace")) for b in re.split(r"\n\s*\n", text)]


def _fields(part: Message) -> dict[str, str]:
    fields: dict[str, str] = {}
    for block in _blocks(part):
        for name, value in block.items():
            fields.setdefault(name.lower(), _unfold(str(value)))
    return fields


def _delivery_status(part: Message) -> tuple[dict[str, dict[str, str]], str]:
    blocks = _blocks(part)
    reporting = ""
    recipients: dict[str, dict[str, str]] = {}
    for block in blocks:
        fields = {k.lower(): _unfold(str(v)) for k, v in block.items()}
        if "reporting-mta" in fields:
            reporting = _after_type(fields["reporting-mta"])
        recipient = fields.get("final-recipient") or fields.get("original-recipient")
        if recipient:
            address = _after_type(recipient)
            recipients[address] = fields
    return recipients, reporting


def _original_id_field(part: Message | None) -> str:
    if part is None:
        return ""
    for block in _blocks(part):
        value = block.get("X-Original-Message-ID")
        if value:
            return str(value).strip()
    return ""


def _first_message(part: Message) -> Message | None:
    payload = part.get_payload()
    if isinstance(payload, list):
        return payload[0] if payload and isinstance(payload[0], Message) else None
    if isinstance(payload, str):
        return message_from_bytes(payload.encode("utf-8", "replace"))
    return None


def _header(headers: Message | None, name: str) -> str:
    return str(headers.get(name, "")).strip() if headers is not None else ""


def _original_message_id(headers: Message | None) -> str:
    return _header(headers, "Message-ID")


def _text(message: Message) -> str:
    chunks = []
    for part in message.walk():
        if part.get_content_type() == "text/plain":
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                chunks.append(payload.decode("utf-8", "replace"))
    return "\n".join(chunks)


def _paragraph_after(text: str, address: str) -> str:
    """What a plain-text bounce says under a failed address (up to the next blank line)."""
    at = text.lower().find(address.lower())
    if at < 0:
        return ""
    rest = text[at + len(address) :].replace("\r\n", "\n")
    return _unfold(rest.split("\n\n", 1)[0])


# How older MTAs introduce the returned message in a plain-text bounce (Exim, Sendmail).
_COPY_MARKERS = re.compile(
    r"^-+ ?(This is a copy of the message|Original message follows|Returned message).*$",
    re.IGNORECASE | re.MULTILINE,
)


def _copied_message(text: str) -> Message | None:
    marker = _COPY_MARKERS.search(text)
    if marker is None:
        return None
    copy = text[marker.end() :].lstrip("\r\n")
    return message_from_bytes(copy.encode("utf-8", "replace"))


def _reply(diagnostic: str) -> str:
    """``smtp; 550 5.1.1 ...`` -> ``550 5.1.1 ...`` (the server's reply, without its type)."""
    kind, semicolon, rest = diagnostic.partition(";")
    if semicolon and " " not in kind.strip():
        return _unfold(rest)
    return _unfold(diagnostic)


def _status(value: str) -> str:
    found = _ENHANCED.search(value)
    return found.group(0) if found else ""


def _after_type(value: str) -> str:
    """``rfc822; a@b`` -> ``a@b``; ``dns; mx.example`` -> ``mx.example`` (RFC 3464 typed values)."""
    kind, semicolon, rest = value.partition(";")
    text = rest if semicolon else kind
    return text.strip().split(" ", 1)[0].strip("<>")


def _angle(value: str) -> str:
    return value.strip().strip("<>").strip()


def _addresses(value: str) -> list[str]:
    return [a for _, a in getaddresses([value]) if "@" in a]


def _unfold(value: str) -> str:
    return " ".join(value.split())


def _decode(address: bytes) -> str:
    return address.decode("utf-8", "replace").lower()


__all__ = ["RecipientReport", "Report", "ReportKind", "UnparsableReport", "parse_report"]
