"""VERP return paths: an envelope sender per email and recipient that names both, authenticated.

Every outbound message can carry its own Return-Path, ``bounce-<token>@<bounce domain>``, so a
bounce (DSN) or a late rejection that comes back to it says exactly which email and which
recipient it is about, whatever the report itself contains. The token is

    version (1 byte) | email id (12 bytes) | recipient digest (8 bytes) | HMAC (10 bytes)

in lower-case base32 without padding (50 characters: the local part stays under the 64 octets
of RFC 5321, and a remote MTA that changes the case of the local part changes nothing). The
recipient is named by the first 8 bytes of SHA-256 of the address (domain part in lower case),
which `VerpToken.names` compares with the email's recipients; the address itself would not fit.
The HMAC-SHA-256 (truncated to 80 bits) covers the version, email id and digest under a key
only the suite knows, so a forged or altered token is recognised and ignored (`parse` answers
None), never turned into a bounce of somebody's email.

The bounce domain is a setting (``AZORA_BOUNCE_DOMAIN``): ``bounces.{domain}`` gives every
sending domain its own (``bounces.example.com`` for mail from example.com, so the SPF check of
the MAIL FROM domain is aligned with the From domain for DMARC), a fixed name makes one shared
domain. `bounce_domain` resolves it for a sender, `is_return_path` tells the inbound server,
without the key, whether an address has the shape of one of ours (the mail service, which holds
the key, decides whether it is authentic). The key is derived from the suite's master key
(`key_from_master`), so no secret has to be configured for it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass

LOCAL_PREFIX = "bounce-"
_VERSION = 1
_ID_BYTES = 12
_DIGEST_BYTES = 8
_MAC_BYTES = 10
_TOKEN_BYTES = 1 + _ID_BYTES + _DIGEST_BYTES + _MAC_BYTES
_MIN_KEY_BYTES = 16


@dataclass(frozen=True, slots=True)
class VerpToken:
    """What an authentic return path names."""

    email_id: str
    recipient_digest: bytes

    def names(self, recipient: str) -> bool:
        """Whether `recipient` is the recipient this token was made for."""
        return hmac.compare_digest(self.recipient_digest, recipient_digest(recipient))


def recipient_digest(recipient: str) -> bytes:
    """The 8-byte name of a recipient: its local part as sent, its domain in lower case."""
    local, at, domain = recipient.strip().rpartition("@")
    normalized = f"{local}{at}{domain.lower()}" if at else recipient.strip()
    return hashlib.sha256(normalized.encode("utf-8")).digest()[:_DIGEST_BYTES]


def return_path(*, key: bytes, email_id: str, recipient: str, bounce_domain: str) -> str:
    """The VERP envelope sender of one recipient of an email.

    Raises:
        ValueError: `email_id` is not a 24-hex-character id, or `key` is shorter than 16 bytes.
    """
    _check_key(key)
    try:
        raw_id = bytes.fromhex(email_id)
    except ValueError:
        raw_id = b""
    if len(raw_id) != _ID_BYTES:
        raise ValueError("email ids are 24 hexadecimal characters")
    body = bytes([_VERSION]) + raw_id + recipient_digest(recipient)
    token = body + _mac(key, body)
    encoded = base64.b32encode(token).decode("ascii").rstrip("=").lower()
    return f"{LOCAL_PREFIX}{encoded}@{bounce_domain.lower()}"


def parse(address: str, *, key: bytes, bounce_domain: str | None = None) -> VerpToken | None:
    """The token of a VERP address, or None if it is not one of ours (or forged, or altered).

    Args:
        address: the recipient address a report was sent to.
        key: the HMAC key the return paths were made with.
        bounce_domain: when given, the address must be at this domain.
    """
    _check_key(key)
    local, at, domain = address.strip().strip("<>").rpartition("@")
    if not at or (bounce_domain is not None and domain.lower() != bounce_domain.lower()):
        return None
    if not local.lower().startswith(LOCAL_PREFIX):
        return None
    encoded = local[len(LOCAL_PREFIX) :].upper()
    try:
        token = base64.b32decode(encoded + "=" * (-len(encoded) % 8))
    except (binascii.Error, ValueError):
        return None
    if len(token) != _TOKEN_BYTES or token[0] != _VERSION:
        return None
    # The last character carries bits beyond the token (its length is not a multiple of 5
    # bytes), which decoding ignores: only the one spelling we make is ours, so an altered
    # last character never names the same token.
    if base64.b32encode(token).decode("ascii").rstrip("=") != encoded:
        return None
    body, mac = token[:-_MAC_BYTES], token[-_MAC_BYTES:]
    if not hmac.compare_digest(mac, _mac(key, body)):
        return None
    return VerpToken(body[1 : 1 + _ID_BYTES].hex(), body[1 + _ID_BYTES :])


def parse_any(
    address: str, *, keys: list[bytes], bounce_domain: str | None = None
) -> VerpToken | None:
    """`parse` with each key in turn (the current one first, then former ones)."""
    for key in keys:
        token = parse(address, key=key, bounce_domain=bounce_domain)
        if token is not None:
            return token
    return None


def key_from_master(master: bytes) -> bytes:
    """The HMAC key of return paths, derived from the suite's master key (32 bytes)."""
    return hmac.new(master, b"azora verp return paths", hashlib.sha256).digest()


PLACEHOLDER = "{domain}"
_TOKEN_CHARS = (_TOKEN_BYTES * 8 + 4) // 5


def bounce_domain(template: str, sender_domain: str) -> str:
    """The bounce domain of mail from `sender_domain` (``bounces.{domain}`` or a fixed name)."""
    return template.replace(PLACEHOLDER, sender_domain.lower().rstrip("."), 1)


def is_bounce_domain(template: str, domain: str) -> bool:
    """Whether `domain` is a bounce domain under `template` (for some sender domain)."""
    domain = domain.lower().rstrip(".")
    if PLACEHOLDER not in template:
        return domain == template
    prefix = template.removesuffix(PLACEHOLDER)
    rest = domain.removeprefix(prefix)
    return domain.startswith(prefix) and "." in rest and not rest.startswith(".")


def is_return_path(address: str, template: str) -> bool:
    """Whether `address` has the shape of a return path of ours (authenticity not checked)."""
    local, at, domain = address.strip().strip("<>").rpartition("@")
    if not at or not is_bounce_domain(template, domain):
        return False
    encoded = local.lower().removeprefix(LOCAL_PREFIX)
    return (
        local.lower().startswith(LOCAL_PREFIX)
        and len(encoded) == _TOKEN_CHARS
        and all(c in "abcdefghijklmnopqrstuvwxyz234567" for c in encoded)
    )


def _mac(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, b"azora verp\0" + body, hashlib.sha256).digest()[:_MAC_BYTES]


def _check_key(key: bytes) -> None:
    if len(key) < _MIN_KEY_BYTES:
        raise ValueError("the VERP key must be at least 16 bytes")


__all__ = [
    "LOCAL_PREFIX",
    "PLACEHOLDER",
    "VerpToken",
    "bounce_domain",
    "is_bounce_domain",
    "is_return_path",
    "key_from_master",
    "parse",
    "parse_any",
    "recipient_digest",
    "return_path",
]
