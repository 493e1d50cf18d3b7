"""Sender Rewriting Scheme (SRS) for forwarded mail, after the scheme of libsrs2.

A forwarded message keeps its From header and DKIM signature but gets a new envelope sender at
our domain, so SPF at the destination checks our servers (which are allowed) and bounces come
back to us, who can send them on to the original sender:

    SRS0=HHHH=TT=example.org=alice@forwarder.example
    SRS1=HHHH=first.example==HHHH=TT=example.org=alice@forwarder.example   (re-forwarded SRS0)

``TT`` is the day of the rewriting (days since the epoch modulo 1024, two base32 characters);
``HHHH`` the first four base64 characters of HMAC-SHA1 over the (case-folded) rest, under a
secret only we know. `reverse` accepts an address only when the hash matches (compared
case-insensitively: some MTAs fold the local part) and the timestamp is at most `max_age_days`
old, so nobody can use our domain as a bounce relay.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

_BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_HASH_LENGTH = 4
_DAY = 86_400
_TIME_SLOTS = 1024  # 32 * 32: two base32 characters


class SrsRewriter:
    """Rewrites envelope senders for forwarding and reverses the rewritten ones."""

    def __init__(self, *, secret: bytes, max_age_days: int = 21) -> None:
        if len(secret) < 16:
            raise ValueError("the SRS secret must be at least 16 bytes")
        self._secret = secret
        self._max_age = max_age_days

    def forward(self, sender: str, *, alias_domain: str, now: float | None = None) -> str:
        """The envelope sender to use when forwarding mail from `sender` as `alias_domain`.

        The null sender stays null (bounces are never forwarded to anybody); a sender already
        at `alias_domain` is kept; an SRS0 or SRS1 address becomes SRS1 (its first forwarder
        keeps the original).
        """
        if not sender:
            return ""
        local, at, domain = sender.rpartition("@")
        if not at or domain.lower() == alias_domain.lower():
            return sender
        upper = local.upper()
        if upper.startswith(("SRS0=", "SRS0-", "SRS0+")):
            # Re-forwarding: point back at the first forwarder, who can reverse the SRS0 part.
            rest = local[5:]
            return self._srs1(domain, "=" + rest, alias_domain)
        if upper.startswith(("SRS1=", "SRS1-", "SRS1+")):
            first, separator, rest = local[5:].partition("==")
            if separator:
                _, _, first_domain = first.partition("=")
                return self._srs1(first_domain, "=" + rest, alias_domain)
        stamp = _timestamp(now if now is not None else time.time())
        digest = self._hash(stamp, domain, local)
        return f"SRS0={digest}={stamp}={domain}={local}@{alias_domain}"

    def reverse(self, address: str, *, now: float | None = None) -> str | None:
        """The original sender of an SRS address, or None if it is not a valid one of ours."""
        local, at, _domain = address.rpartition("@")
        if not at:
            return None
        upper = local.upper()
        if upper.startswith("SRS0="):
            parts = local[5:].split("=", 3)
            if len(parts) != 4:
                return None
            digest, stamp, domain, original_local = parts
            if not self._valid(digest, stamp, domain, original_local, now):
                return None
            return f"{original_local}@{domain}"
        if upper.startswith("SRS1="):
            first, separator, rest = local[5:].partition("==")
            digest, _, first_domain = first.partition("=")
            if not separator or not hmac.compare_digest(
                digest.lower(), self._hash(first_domain, rest).lower()
            ):
                return None
            return f"SRS0={rest}@{first_domain}"
        return None

    def _srs1(self, first_domain: str, srs0_rest: str, alias_domain: str) -> str:
        rest = srs0_rest.lstrip("=")
        digest = self._hash(first_domain, rest)
        return f"SRS1={digest}={first_domain}=={rest}@{alias_domain}"

    def _valid(self, digest: str, stamp: str, domain: str, local: str, now: float | None) -> bool:
        expected = self._hash(stamp, domain, local)
        if not hmac.compare_digest(digest.lower(), expected.lower()):
            return False
        age = _age_days(stamp, now if now is not None else time.time())
        return age is not None and age <= self._max_age

    def _hash(self, *parts: str) -> str:
        data = "".join(parts).lower().encode("utf-8")
        mac = hmac.new(self._secret, data, hashlib.sha1).digest()
        return base64.b64encode(mac).decode("ascii")[:_HASH_LENGTH]


def _timestamp(now: float) -> str:
    day = int(now // _DAY) % _TIME_SLOTS
    return _BASE32[day >> 5] + _BASE32[day & 31]


def _age_days(stamp: str, now: float) -> int | None:
    if len(stamp) != 2:
        return None
    high, low = _BASE32.find(stamp[0].upper()), _BASE32.find(stamp[1].upper())
    if high < 0 or low < 0:
        return None
    then = high << 5 | low
    today = int(now // _DAY) % _TIME_SLOTS
    return (today - then) % _TIME_SLOTS


__all__ = ["SrsRewriter"]
