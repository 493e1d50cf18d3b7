"""The parsed view of a received message: what GetInboundMessage shows and webhook routes POST.

One reading of the stored bytes (the stdlib parser, `policy.default`) for both, so the API and
the webhook JSON never disagree about a message's addresses, bodies or attachments. Nothing
here raises for a malformed message: what cannot be read is left empty (the raw bytes are
always available).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from email import policy
from email.headerregistry import AddressHeader
from email.message import EmailMessage
from email.parser import BytesParser


@dataclass(frozen=True, slots=True)
class Attachment:
    """One attachment: its name, type and decoded bytes."""

    filename: str
    content_type: str
    content: bytes


@dataclass(frozen=True, slots=True)
class ParsedMessage:
    """Headers, addresses, bodies and attachments of a message."""

    from_address: str = ""
    to: list[str] = field(default_factory=list)
    cc: list[str] = field(default_factory=list)
    subject: str = ""
    message_id: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    text: str = ""
    html: str = ""
    attachments: list[Attachment] = field(default_factory=list)


def _addresses(message: EmailMessage, name: str) -> list[str]:
    try:
        header = message.get(name)
    except (ValueError, IndexError, TypeError):
        return []
    if isinstance(header, AddressHeader):
        return [str(a.addr_spec) for a in header.addresses]
    return []


def _header(message: EmailMessage, name: str) -> str:
    try:
        return str(message.get(name, ""))
    except (ValueError, IndexError, TypeError):
        return ""


def parse_message(content: bytes) -> ParsedMessage:
    """Read `content` (see the module docstring)."""
    message = BytesParser(policy=policy.default).parsebytes(content)
    assert isinstance(message, EmailMessage)
    from_addresses = _addresses(message, "From")
    headers = []
    for name, raw_value in message.raw_items():
        try:
            value = str(message.policy.header_fetch_parse(name, raw_value))
        except (ValueError, IndexError, TypeError):
            value = str(raw_value)
        headers.append((name, value))
    bodies = {"plain": "", "html": ""}
    for kind in bodies:
        try:
            part = message.get_body(preferencelist=(kind,))
        except (ValueError, IndexError, TypeError):
            part = None
        if part is not None and isinstance(part, EmailMessage):
            try:
                body = part.get_content()
            except (LookupError, ValueError):
                body = part.get_payload(decode=True)
            text = body if isinstance(body, str) else bytes(body or b"").decode("utf-8", "replace")
            # The parsed view uses newlines; the wire's CRLFs stay in the raw download.
            bodies[kind] = text.replace("\r\n", "\n")
    attachments = []
    try:
        for attachment in message.iter_attachments():
            payload = attachment.get_payload(decode=True)
            attachments.append(
                Attachment(
                    filename=attachment.get_filename() or "",
                    content_type=attachment.get_content_type(),
                    content=payload if isinstance(payload, bytes) else b"",
                )
            )
    except (ValueError, IndexError, TypeError, KeyError):
        pass  # a broken MIME structure: the raw message still has everything
    return ParsedMessage(
        from_address=from_addresses[0] if from_addresses else _header(message, "From"),
        to=_addresses(message, "To"),
        cc=_addresses(message, "Cc"),
        subject=_header(message, "Subject"),
        message_id=_header(message, "Message-ID").strip(),
        headers=headers,
        text=bodies["plain"],
        html=bodies["html"],
        attachments=attachments,
    )


__all__ = ["Attachment", "ParsedMessage", "parse_message"]
