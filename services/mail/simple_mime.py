"""Simple messages written straight to bytes, without the stdlib's header machinery.

`email.message.EmailMessage` parses every header it is given into a header object and folds it
back out when the message is generated; for the typical message (a text and/or HTML body, a
handful of short headers) that costs about 0.6 ms, twenty times a string template. This module
writes exactly the bytes the stdlib (``policy.SMTP``) would write for messages that need none
of that machinery, and `is_simple` is the one predicate that says which messages those are:

* no attachments;
* every header value printable ASCII (no tabs or other controls), no leading or trailing
  space, no ``=?`` (the stdlib would decode and re-encode it as an RFC 2047 word), and the
  whole ``Name: value`` line at most 78 characters (longer lines are folded by the stdlib);
* every custom header name one the stdlib treats as unstructured text (``Resent-Date``,
  ``Resent-To`` and friends are parsed and re-rendered, so they take the stdlib path);
* bodies that are valid text (any characters, any line length).

Bodies are encoded as the stdlib's content manager encodes a UTF-8 text part: 7bit or 8bit
when every line fits in 78 octets, otherwise quoted-printable or base64, whichever its
heuristic picks, through the stdlib's own `email.quoprimime` and `binascii` encoders.

Anything else goes through the stdlib path in `services.mail.compose`. The bytes are the same
as the stdlib's except for the random MIME boundary of a text + HTML message, which tests pass
in to compare both paths byte for byte (tests/mail/test_simple_mime.py).
"""

from __future__ import annotations

import binascii
import re
import secrets
import sys
from collections.abc import Sequence
from email import quoprimime
from email.headerregistry import HeaderRegistry, UnstructuredHeader
from functools import lru_cache

# policy.SMTP's max_line_length: the stdlib folds header lines and re-encodes bodies beyond it.
MAX_LINE = 78
# Printable ASCII without leading or trailing space; empty is allowed (written "Name:").
_PLAIN_VALUE = re.compile(r"(?:[!-~](?:[ -~]*[!-~])?)?")
# Base64 input bytes per output line (what the stdlib's content manager uses for 78).
_BASE64_CHUNK = MAX_LINE // 4 * 3
_LINE_BREAKS = re.compile(r"\r\n|\r|\n")
# RFC 2046 bchars without the space, short enough that `boundary="..."` fits one folded line.
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,./:=?-]{1,64}")
_BOUNDARY_DIGITS = len(repr(sys.maxsize - 1))
_CRLF = b"\r\n"
_CONTENT_TYPES = {
    "plain": b'Content-Type: text/plain; charset="utf-8"\r\n',
    "html": b'Content-Type: text/html; charset="utf-8"\r\n',
}
# The header classes policy.SMTP uses (its default header_factory).
_REGISTRY = HeaderRegistry()
_MIME_VERSION = b"MIME-Version: 1.0\r\n"
_ALTERNATIVE = "Content-Type: multipart/alternative;"


@lru_cache(maxsize=512)
def _unstructured(name: str) -> bool:
    """Whether the stdlib stores header `name` as unstructured text (written back verbatim)."""
    return issubclass(_REGISTRY[name], UnstructuredHeader)


def _plain_header(name: str, value: str) -> bool:
    return (
        len(name) + 2 + len(value) <= MAX_LINE
        and _PLAIN_VALUE.fullmatch(value) is not None
        and "=?" not in value
    )


def _valid_text(body: str) -> bool:
    try:
        body.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: the stdlib raises, let it say so
        return False
    return True


def is_simple(
    headers: Sequence[tuple[str, str]],
    text: str,
    html: str,
    *,
    has_attachments: bool,
    custom_names: Sequence[str] = (),
) -> bool:
    """Whether `build` writes exactly the stdlib's bytes for this message.

    Args:
        headers: every header in order, as `services.mail.compose` sets them.
        text: the plain-text body, line breaks normalised to LF ("" for none).
        html: the HTML body, likewise.
        has_attachments: whether the request has attachments.
        custom_names: the names of the caller's own headers (among `headers`).
    """
    return (
        not has_attachments
        and all(_plain_header(name, value) for name, value in headers)
        and all(_unstructured(name) for name in custom_names)
        and _valid_text(text)
        and _valid_text(html)
    )


def new_boundary(*bodies: str) -> str:
    """A boundary of the stdlib's shape that occurs in none of `bodies`."""
    while True:
        token = secrets.randbelow(sys.maxsize)
        boundary = f"{'=' * 15}{token:0{_BOUNDARY_DIGITS}d}=="
        if not any(boundary in body for body in bodies):
            return boundary


def _encoded_part(subtype: str, body: str) -> tuple[bytes, bytes]:
    """Headers, blank line and body of a text part, encoded as the stdlib's content manager does.

    It picks 7bit (ASCII) or 8bit when no line is longer than 78 octets; otherwise it encodes
    the first ten lines both ways and takes quoted-printable unless base64 is shorter.
    """
    lines = body.encode("utf-8").splitlines()
    cte = ""
    if max(map(len, lines), default=0) <= MAX_LINE:
        data = _CRLF.join(lines) + _CRLF
        cte = "7bit" if data.isascii() else "8bit"
    else:
        sniff = _CRLF.join(lines[:10]) + _CRLF
        sniff_qp = quoprimime.body_encode(sniff.decode("latin-1"), MAX_LINE)
        if len(sniff_qp) > len(binascii.b2a_base64(sniff)):
            cte = "base64"
            whole = _CRLF.join(lines) + _CRLF
            payload = "".join(
                binascii.b2a_base64(whole[i : i + _BASE64_CHUNK]).decode("ascii")
                for i in range(0, len(whole), _BASE64_CHUNK)
            )
        else:
            cte = "quoted-printable"
            payload = (
                sniff_qp
                if len(lines) <= 10
                else quoprimime.body_encode((b"\n".join(lines) + b"\n").decode("latin-1"), MAX_LINE)
            )
        # The generator writes every line break of the payload as CRLF.
        data = _LINE_BREAKS.sub("\r\n", payload).encode("ascii")
    headers = _CONTENT_TYPES[subtype] + f"Content-Transfer-Encoding: {cte}\r\n".encode("ascii")
    return headers, data


def build(
    headers: Sequence[tuple[str, str]], text: str, html: str, *, boundary: str | None = None
) -> bytes:
    """The message for headers and bodies that `is_simple` accepted.

    Args:
        headers: every header in order (From, To, ..., the caller's own).
        text: the plain-text body ("" for none), LF line breaks.
        html: the HTML body ("" for none), LF line breaks.
        boundary: the multipart boundary when both bodies are present (tests compare exact
            bytes with it); None draws a random one, as the stdlib does.

    Raises:
        ValueError: `boundary` is not a token this writer can put on one header line.
    """
    out = [
        f"{name}: {value}\r\n".encode("ascii") if value else f"{name}:\r\n".encode("ascii")
        for name, value in headers
    ]
    if not (text and html):
        part_headers, data = _encoded_part("html" if html else "plain", html or text)
        out += [part_headers, _MIME_VERSION, _CRLF, data]
        return b"".join(out)
    if boundary is None:
        boundary = new_boundary(text, html)
    elif not _BOUNDARY.fullmatch(boundary):
        raise ValueError(f"unsupported MIME boundary {boundary!r}")
    parameter = f'boundary="{boundary}"'
    # The stdlib keeps the parameter on the first line when it fits, else folds before it.
    if len(_ALTERNATIVE) + 1 + len(parameter) <= MAX_LINE:
        content_type = f"{_ALTERNATIVE} {parameter}\r\n"
    else:
        content_type = f"{_ALTERNATIVE}\r\n {parameter}\r\n"
    delimiter = f"--{boundary}\r\n".encode("ascii")
    text_headers, text_data = _encoded_part("plain", text)
    html_headers, html_data = _encoded_part("html", html)
    out += [_MIME_VERSION, content_type.encode("ascii"), _CRLF]
    out += [delimiter, text_headers, _CRLF, text_data, _CRLF]
    # The stdlib's add_alternative gives the added part a MIME-Version header of its own.
    out += [delimiter, html_headers, _MIME_VERSION, _CRLF, html_data]
    out.append(f"\r\n--{boundary}--\r\n".encode("ascii"))
    return b"".join(out)


__all__ = ["MAX_LINE", "build", "is_simple", "new_boundary"]
