"""DKIM signing (RFC 6376, RFC 8463 for Ed25519) with OpenSSL through `cryptography`.

dkimpy signs RSA in pure Python (about 170 signatures/s per core); delivery signs every
message, so this module does the same standard signature with OpenSSL and keeps the per-message
Python work to a few byte operations. What it produces:

* ``a=rsa-sha256`` or ``a=ed25519-sha256``; ``c=relaxed/relaxed`` (survives the whitespace and
  folding changes relays commonly make); ``d=``, ``s=``, ``t=``, ``bh=``, ``h=`` and ``b=``.
* ``h=`` lists the headers of a fixed set present in the message, each as many times as it
  occurs, and ``from`` once more ("oversigning"): a verifier then also hashes a From that does
  not exist, so a second From added in transit breaks the signature instead of being shown to
  the reader unsigned.
* The header is folded at tag boundaries (and inside long values) to lines of at most 78
  characters; what is signed is the relaxed canonical form of exactly the folded bytes
  returned, so folding can never disagree with verification.

The key is loaded once, in ``__init__``; `DkimSigner.sign` is thread-safe and CPU-bound (OpenSSL
releases the GIL while signing, so a thread pool scales across cores).
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from collections.abc import Sequence
from typing import Final, Literal

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

Algorithm = Literal["rsa-sha256", "ed25519-sha256"]
PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

# Headers worth protecting that a message built by the mail service may carry (RFC 6376
# §5.4.1 recommends From, the addressing and content headers); trace and transport headers
# are left out because relays legitimately add or rewrite them.
SIGNED_HEADERS: Final[tuple[str, ...]] = (
    "from",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "reply-to",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
)
# Listed once more than they occur, so adding one in transit breaks the signature.
OVERSIGNED_HEADERS: Final[tuple[str, ...]] = ("from",)
MIN_RSA_BITS: Final = 1024  # RFC 8301: verifiers must not accept smaller keys
_LINE_WIDTH: Final = 78
_HEADER_NAME: Final = b"DKIM-Signature"

# Only runs that change when collapsed to one space: a lone space matches nothing, which keeps
# the substitution cheap on ordinary text (most spaces are single).
_WSP_RUN = re.compile(rb"\t[ \t]*| [ \t]+")
_WSP_BEFORE_CRLF = re.compile(rb"[ \t]+\r\n")
_BARE_LF = re.compile(rb"(?<!\r)\n")
_TAG_SAFE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")


class DkimSigner:
    """Signs messages for one domain with one key (one signer per active key)."""

    __slots__ = ("_algorithm", "_domain", "_key", "_selector")

    def __init__(
        self,
        *,
        domain: str,
        selector: str,
        private_key: bytes | PrivateKey,
        algorithm: Algorithm,
    ) -> None:
        """Load the key and check that it fits the algorithm.

        Args:
            domain: the signing domain (``d=``), an A-label; lowercased.
            selector: the selector (``s=``); lowercased.
            private_key: PKCS#8 (or traditional) PEM, or an already loaded key.
            algorithm: ``rsa-sha256`` or ``ed25519-sha256``.

        Raises:
            ValueError: a malformed domain or selector, an unreadable key, a key of the wrong
                type for `algorithm`, or an RSA key smaller than 1024 bits.
        """
        domain = domain.strip().rstrip(".").lower()
        selector = selector.strip().lower()
        # Both go verbatim into tag values: anything that could end a tag (";", "=", spaces,
        # CR/LF) or is not an A-label would make an unverifiable or ambiguous header.
        if not all(_TAG_SAFE.match(label) for label in domain.split(".")):
            raise ValueError(f"not a valid signing domain (A-label form): {domain[:80]!r}")
        if not all(_TAG_SAFE.match(label) for label in selector.split(".")):
            raise ValueError(f"not a valid DKIM selector: {selector[:80]!r}")
        key = _load_key(private_key)
        if algorithm == "rsa-sha256":
            if not isinstance(key, rsa.RSAPrivateKey):
                raise ValueError("rsa-sha256 needs an RSA private key")
            if key.key_size < MIN_RSA_BITS:
                raise ValueError(f"RSA keys must have at least {MIN_RSA_BITS} bits (RFC 8301)")
        elif algorithm == "ed25519-sha256":
            if not isinstance(key, ed25519.Ed25519PrivateKey):
                raise ValueError("ed25519-sha256 needs an Ed25519 private key")
        else:
            raise ValueError(f"unsupported DKIM algorithm {algorithm!r}")
        self._domain = domain
        self._selector = selector
        self._key: PrivateKey = key
        self._algorithm: Algorithm = algorithm

    @property
    def domain(self) -> str:
        """The signing domain (``d=``)."""
        return self._domain

    @property
    def selector(self) -> str:
        """The selector (``s=``)."""
        return self._selector

    @property
    def algorithm(self) -> Algorithm:
        """The signature algorithm (``a=``)."""
        return self._algorithm

    def __repr__(self) -> str:  # never the key
        return (
            f"DkimSigner(domain={self._domain!r}, selector={self._selector!r}, "
            f"algorithm={self._algorithm!r})"
        )

    def sign(self, message: bytes, *, timestamp: int | None = None) -> bytes:
        """The ``DKIM-Signature`` header field for `message`, folded, ending in CRLF.

        Prepend it to the message unchanged. `message` should use CRLF line ends; LF-only
        input is treated as if converted to CRLF (as SMTP transport does).

        Args:
            message: the complete RFC 5322 message (headers, blank line, body).
            timestamp: the ``t=`` value (seconds since the epoch); now when None.

        Raises:
            ValueError: the message has no From header (RFC 6376 requires signing it).
        """
        if message.count(b"\n") != message.count(b"\r\n"):  # two C scans beat a regex
            message = _BARE_LF.sub(b"\r\n", message)
        head, body = _split(message)
        fields = _parse_headers(head)
        names, canonical_headers = _select(fields)
        body_hash = base64.b64encode(hashlib.sha256(relaxed_body(body)).digest()).decode()
        stamp = int(time.time()) if timestamp is None else int(timestamp)
        unsigned = _fold(
            [
                "v=1;",
                f"a={self._algorithm};",
                "c=relaxed/relaxed;",
                f"d={self._domain};",
                f"s={self._selector};",
                f"t={stamp};",
            ],
            names,
            body_hash,
        )
        # RFC 6376 §3.7: the selected headers, then this header with an empty b= and without
        # its final CRLF, all in relaxed canonical form.
        signed_data = b"".join(canonical_headers) + relaxed_header(
            _HEADER_NAME, unsigned[len(_HEADER_NAME) + 1 :]
        ).removesuffix(b"\r\n")
        signature = self._signature(signed_data)
        return unsigned + _fold_b(signature, last_line_length=len(unsigned.rsplit(b"\n", 1)[-1]))

    def _signature(self, data: bytes) -> bytes:
        if isinstance(self._key, rsa.RSAPrivateKey):
            return self._key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        # RFC 8463 §3: PureEdDSA over the SHA-256 hash of the data, not over the data.
        return self._key.sign(hashlib.sha256(data).digest())


def relaxed_body(body: bytes) -> bytes:
    """The relaxed canonical form of a body (RFC 6376 §3.4.4), CRLF line ends assumed.

    A body that does not end in CRLF is treated as if it did: SMTP transport adds the CRLF
    before the end-of-data dot, so that is what the verifier sees. The result is empty for an
    empty body (or one of empty lines only), as dkimpy and OpenDKIM compute it.
    """
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    if b" \r\n" in body or b"\t\r\n" in body:
        body = _WSP_BEFORE_CRLF.sub(b"\r\n", body)
    if b"\t" in body or b"  " in body:
        body = _WSP_RUN.sub(b" ", body)
    end = len(body)
    while end >= 2 and body[end - 2 : end] == b"\r\n":
        end -= 2
    return body[:end] + b"\r\n" if end else b""


def relaxed_header(name: bytes, value: bytes) -> bytes:
    """The relaxed canonical form of one header field (RFC 6376 §3.4.2), with its CRLF."""
    unfolded = value.replace(b"\r\n", b"").replace(b"\n", b"")
    if b"\t" in unfolded or b"  " in unfolded:
        unfolded = _WSP_RUN.sub(b" ", unfolded)
    return name.strip().lower() + b":" + unfolded.strip(b" \t") + b"\r\n"


def _load_key(private_key: bytes | PrivateKey) -> PrivateKey:
    if isinstance(private_key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        return private_key
    try:
        key = serialization.load_pem_private_key(private_key, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError("the DKIM private key is not a readable PEM private key") from exc
    if not isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        raise ValueError("DKIM keys are RSA or Ed25519")
    return key


def _split(message: bytes) -> tuple[bytes, bytes]:
    """Header block (without the blank line) and body; a message without a body has none."""
    if message.startswith(b"\r\n"):
        return b"", message[2:]
    head, sep, body = message.partition(b"\r\n\r\n")
    if not sep:
        return message, b""
    return head, body


def _parse_headers(head: bytes) -> list[tuple[bytes, bytes]]:
    """(name, raw value with its folding) per field, in message order."""
    fields: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if fields:  # a continuation line belongs to the field above
                name, value = fields[-1]
                fields[-1] = (name, value + b"\r\n" + line)
            continue
        name, sep, value = line.partition(b":")
        if sep:  # lines that are not fields (an mbox "From " line) are not signable anyway
            fields.append((name, value))
    return fields


def _select(fields: Sequence[tuple[bytes, bytes]]) -> tuple[list[str], list[bytes]]:
    """The h= names and the canonical fields they cover, bottom-up per name (§5.4.2)."""
    by_name: dict[str, list[bytes]] = {}
    for name, value in fields:
        key = name.strip().lower().decode("ascii", "replace")
        if key in SIGNED_HEADERS:
            by_name.setdefault(key, []).append(relaxed_header(name, value))
    if "from" not in by_name:
        raise ValueError("the message has no From header; DKIM requires signing it")
    names: list[str] = []
    canonical: list[bytes] = []
    for key in SIGNED_HEADERS:
        instances = by_name.get(key)
        if not instances:
            continue
        for field in reversed(instances):  # the last instance is signed first
            names.append(key)
            canonical.append(field)
        if key in OVERSIGNED_HEADERS:
            names.append(key)  # hashes as nothing now; a later-added instance would not
    return names, canonical


def _fold(tags: list[str], header_names: list[str], body_hash: str) -> bytes:
    """The header up to ``b=`` (empty), folded at tag boundaries and inside h=."""
    # Atoms are (separator when kept on the same line, text). A fold replaces the separator
    # with CRLF + space; relaxed canonicalization turns that into one space, and since the
    # signed bytes are canonicalized from this very output, any fold point is safe.
    atoms: list[tuple[str, str]] = [(" ", t) for t in tags]
    for index, name in enumerate(header_names):
        last = index == len(header_names) - 1
        text = name + (";" if last else ":")
        atoms.append((" ", "h=" + text) if index == 0 else ("", text))
    atoms.append((" ", f"bh={body_hash};"))
    atoms.append((" ", "b="))
    lines: list[str] = []
    line = _HEADER_NAME.decode() + ":"
    for separator, text in atoms:
        if len(line) + len(separator) + len(text) > _LINE_WIDTH:
            lines.append(line)
            line = " " + text
        else:
            line += separator + text
    lines.append(line)
    return "\r\n".join(lines).encode("ascii")


def _fold_b(signature: bytes, *, last_line_length: int) -> bytes:
    """The base64 signature folded after the ``b=`` that ends the header so far, plus CRLF."""
    encoded = base64.b64encode(signature)
    room = max(_LINE_WIDTH - last_line_length, 0)
    chunks = [encoded[:room]] if room else [b""]
    width = _LINE_WIDTH - 1  # continuation lines start with one space
    chunks.extend(encoded[i : i + width] for i in range(room, len(encoded), width))
    return b"\r\n ".join(chunks) + b"\r\n"


__all__ = [
    "MIN_RSA_BITS",
    "OVERSIGNED_HEADERS",
    "SIGNED_HEADERS",
    "Algorithm",
    "DkimSigner",
    "PrivateKey",
    "relaxed_body",
    "relaxed_header",
]
