"""DKIM key material: generation, selectors, the TXT record to publish, and reading it back.

* RSA keys (1024/2048/3072/4096 bits, e = 65537) publish ``p=`` as the base64 DER
  SubjectPublicKeyInfo (RFC 6376 §3.6.1, what opendkim-genkey writes); Ed25519 keys publish the
  raw 32-byte public key (RFC 8463 §4).
* Private keys are PKCS#8 PEM before sealing; `signing_key_for_dkimpy` turns one into what
  dkimpy's ``sign`` takes.
* Selectors are single DNS labels (letters, digits, hyphens), lowercased.
* The record value is ``v=DKIM1; k=<rsa|ed25519>; p=<key>``, split into 255-octet strings
  because one TXT character-string cannot hold a 2048-bit key.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from datetime import datetime

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from services.core.dns_names import MAX_NAME_OCTETS, split_txt
from services.core.errors import InvalidArgument
from services.smtp.models import DkimAlgorithm

RSA_KEY_SIZES = (1024, 2048, 3072, 4096)
DEFAULT_RSA_BITS = 2048
_SELECTOR_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


@dataclass(frozen=True, slots=True)
class GeneratedKey:
    """A fresh key pair: the public ``p=`` value and the private key as PKCS#8 PEM."""

    algorithm: DkimAlgorithm
    key_bits: int
    public_key: str
    private_key_pem: bytes

    def __repr__(self) -> str:  # keep the private key out of logs and tracebacks
        return f"GeneratedKey(algorithm={self.algorithm}, key_bits={self.key_bits})"


def check_key_size(algorithm: DkimAlgorithm, key_bits: int) -> int:
    """The key size to generate (0 for Ed25519).

    Raises:
        InvalidArgument: on ``key_bits`` for an unsupported size.
    """
    if algorithm is DkimAlgorithm.ED25519:
        if key_bits not in (0, 256):
            raise InvalidArgument.single(
                "key_bits", f"Ed25519 keys have a fixed size; leave key_bits 0 (got {key_bits})"
            )
        return 0
    if key_bits == 0:
        return DEFAULT_RSA_BITS
    if key_bits not in RSA_KEY_SIZES:
        sizes = ", ".join(str(s) for s in RSA_KEY_SIZES)
        raise InvalidArgument.single(
            "key_bits", f"RSA keys must be {sizes} bits (default 2048); got {key_bits}"
        )
    return key_bits


def check_selector(raw: str, *, domain: str) -> str:
    """Validate a selector as one DNS label and return it lowercased.

    Raises:
        InvalidArgument: on ``selector``.
    """
    selector = raw.strip().lower()
    if not selector:
        raise InvalidArgument.single("selector", "a selector is required")
    if "." in selector:
        raise InvalidArgument.single("selector", "must be a single DNS label (no dots)")
    if len(selector) > 63:
        raise InvalidArgument.single("selector", "must be at most 63 characters (a DNS label)")
    if not _SELECTOR_RE.match(selector):
        raise InvalidArgument.single(
            "selector",
            "may contain only letters, digits and hyphens, and must not start or end with a "
            f"hyphen; got {raw[:40]!r}",
        )
    if len(record_name(selector, domain)) > MAX_NAME_OCTETS:
        raise InvalidArgument.single(
            "selector", f"makes the record name longer than {MAX_NAME_OCTETS} octets"
        )
    return selector


def dated_selector(now: datetime, taken: set[str]) -> str:
    """A selector from the date (``az20261123``), suffixed ``-2``, ``-3`` ... if taken."""
    base = f"az{now:%Y%m%d}"
    if base not in taken:
        return base
    n = 2
    while f"{base}-{n}" in taken:
        n += 1
    return f"{base}-{n}"


def generate(algorithm: DkimAlgorithm, key_bits: int) -> GeneratedKey:
    """Generate a key pair (CPU-bound: run RSA-4096 in a thread)."""
    if algorithm is DkimAlgorithm.ED25519:
        ed_key = ed25519.Ed25519PrivateKey.generate()
        public = ed_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        pem = ed_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return GeneratedKey(algorithm, 0, base64.b64encode(public).decode(), pem)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=key_bits)
    der = rsa_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pem = rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return GeneratedKey(algorithm, key_bits, base64.b64encode(der).decode(), pem)


def record_name(selector: str, domain: str) -> str:
    """``<selector>._domainkey.<domain>``."""
    return f"{selector}._domainkey.{domain}"


def record_value(algorithm: DkimAlgorithm, public_key: str) -> str:
    """The TXT value to publish."""
    return f"v=DKIM1; k={algorithm.value}; p={public_key}"


def record_strings(algorithm: DkimAlgorithm, public_key: str) -> tuple[str, ...]:
    """The value split into character-strings of at most 255 octets."""
    return split_txt(record_value(algorithm, public_key))


def parse_tags(value: str) -> dict[str, str]:
    """Tag=value pairs of a DKIM/DMARC-style record; whitespace inside values is dropped.

    Later duplicates win; malformed parts are skipped (the caller compares what it needs).
    """
    tags: dict[str, str] = {}
    for part in value.split(";"):
        name, sep, tag_value = part.partition("=")
        if sep:
            tags[name.strip().lower()] = "".join(tag_value.split())
    return tags


def published_matches(published: str, algorithm: DkimAlgorithm, public_key: str) -> bool:
    """Whether a published TXT value carries this key (tag order and spacing do not matter)."""
    tags = parse_tags(published)
    if tags.get("v", "DKIM1") != "DKIM1":
        return False
    return tags.get("k", "rsa").lower() == algorithm.value and tags.get("p") == public_key


def signing_key_for_dkimpy(algorithm: DkimAlgorithm, private_key_pem: bytes) -> bytes:
    """The private key in the form dkimpy's ``dkim.sign`` expects.

    RSA: the PEM itself. Ed25519: the base64 of the raw 32-byte seed (dkimpy's format).
    """
    if algorithm is DkimAlgorithm.RSA:
        return private_key_pem
    key = serialization.load_pem_private_key(private_key_pem, password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError("not an Ed25519 private key")
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return base64.b64encode(raw)


__all__ = [
    "DEFAULT_RSA_BITS",
    "RSA_KEY_SIZES",
    "GeneratedKey",
    "check_key_size",
    "check_selector",
    "dated_selector",
    "generate",
    "parse_tags",
    "published_matches",
    "record_name",
    "record_strings",
    "record_value",
    "signing_key_for_dkimpy",
]
