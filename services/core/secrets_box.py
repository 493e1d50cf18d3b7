"""Authenticated encryption of secrets at rest (SMTP passwords, DKIM private keys).

AES-256-GCM from `cryptography` with the master key `Settings.secrets_key_bytes()`. A sealed
secret is a printable string ``v1.<key id>.<base64url(nonce || ciphertext || tag)>``:

* the version prefix lets the format change later without guessing;
* the key id (a fingerprint of the key, never the key) says which master key sealed it, so
  the master key can rotate: the new key seals, former keys listed in
  ``AZORA_SECRETS_PREVIOUS_KEYS`` still open what they sealed. Nothing re-encrypts stored
  secrets in bulk: a secret moves to the current key when it is written again (the relay
  password set again, a new DKIM key), so a former key stays listed until every secret it
  sealed has been rewritten or deleted;
* the caller's `context` (e.g. ``b"smtp-password:<domain id>"``) is authenticated as
  associated data, so a ciphertext copied into another document does not decrypt there.

Nonces are 96 random bits per message, which is safe far beyond the number of secrets this
service will ever seal under one key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Iterable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from services.core.settings import Settings

FORMAT_VERSION = "v1"
_NONCE_BYTES = 12
_KEY_BYTES = 32


class SecretsError(Exception):
    """A sealed value cannot be opened: unknown key, wrong context, or tampered data.

    Never carries the plaintext or the key; callers treat it as data corruption (or a missing
    former master key), not as a client error.
    """


def key_id(key: bytes) -> str:
    """A short public fingerprint of a master key (16 hex characters)."""
    return hashlib.sha256(b"azora-secrets-key-id\x00" + key).hexdigest()[:16]


class SecretsBox:
    """Seals and opens secrets with the current master key; opens with former ones too."""

    def __init__(self, primary: bytes, *, previous: Iterable[bytes] = ()) -> None:
        """Create a box.

        Args:
            primary: the 32-byte key that seals new secrets.
            previous: former keys that may still have to open old secrets.

        Raises:
            ValueError: a key is not 32 bytes long.
        """
        keys = [primary, *previous]
        for key in keys:
            if len(key) != _KEY_BYTES:
                raise ValueError("secrets keys must be 32 bytes long")
        self._primary_id = key_id(primary)
        self._ciphers = {key_id(key): AESGCM(key) for key in keys}

    @classmethod
    def from_settings(cls, settings: Settings) -> SecretsBox:
        """The box for the configured master key and its former keys."""
        previous = [base64.b64decode(k, validate=True) for k in settings.secrets_previous_keys]
        return cls(settings.secrets_key_bytes(), previous=previous)

    @property
    def primary_key_id(self) -> str:
        """The id of the key new secrets are sealed with."""
        return self._primary_id

    def seal(self, plaintext: bytes, *, context: bytes) -> str:
        """Encrypt and authenticate `plaintext`, bound to `context`."""
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._ciphers[self._primary_id].encrypt(nonce, plaintext, context)
        body = base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")
        return f"{FORMAT_VERSION}.{self._primary_id}.{body}"

    def open(self, sealed: str, *, context: bytes) -> bytes:
        """Decrypt a value made by `seal` with the same `context`.

        Raises:
            SecretsError: malformed value, unknown key id, wrong context or tampered data.
        """
        version, kid, body = self._split(sealed)
        if version != FORMAT_VERSION:
            raise SecretsError(f"unknown sealed-secret format {version!r}")
        cipher = self._ciphers.get(kid)
        if cipher is None:
            raise SecretsError(
                f"sealed with master key {kid}, which is neither AZORA_SECRETS_KEY nor listed "
                "in AZORA_SECRETS_PREVIOUS_KEYS"
            )
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except (binascii.Error, ValueError):
            raise SecretsError("sealed secret is not valid base64") from None
        if len(raw) <= _NONCE_BYTES:
            raise SecretsError("sealed secret is truncated")
        try:
            return cipher.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], context)
        except InvalidTag:
            raise SecretsError("sealed secret failed authentication") from None

    @staticmethod
    def _split(sealed: str) -> tuple[str, str, str]:
        parts = sealed.split(".")
        if len(parts) != 3 or not all(parts):
            raise SecretsError("malformed sealed secret")
        return parts[0], parts[1], parts[2]


__all__ = ["FORMAT_VERSION", "SecretsBox", "SecretsError", "key_id"]
