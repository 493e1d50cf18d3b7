"""SRS: forwarded mail's envelope sender is rewritten at our domain and reversed only when ours."""

from __future__ import annotations

import pytest

from services.core.srs import SrsRewriter

SECRET = b"s" * 32
DAY = 86_400.0
NOW = 20_000 * DAY + 3600.0


def test_forward_and_reverse() -> None:
    # The rewritten sender is at our domain, names the original, and reverses to it.
    srs = SrsRewriter(secret=SECRET)
    rewritten = srs.forward("alice@example.org", alias_domain="fwd.example", now=NOW)
    local, _, domain = rewritten.rpartition("@")
    assert domain == "fwd.example"
    assert local.startswith("SRS0=")
    assert local.endswith("=example.org=alice")
    assert srs.reverse(rewritten, now=NOW) == "alice@example.org"
    # Case folded by a remote MTA: still ours.
    assert srs.reverse(rewritten.lower(), now=NOW + DAY) == "alice@example.org"


def test_tampered_foreign_and_expired_addresses_are_refused() -> None:
    # A changed original, another secret, a stale timestamp or a plain address: None.
    srs = SrsRewriter(secret=SECRET, max_age_days=21)
    rewritten = srs.forward("alice@example.org", alias_domain="fwd.example", now=NOW)
    assert srs.reverse(rewritten.replace("=alice@", "=mallory@"), now=NOW) is None
    assert SrsRewriter(secret=b"t" * 32).reverse(rewritten, now=NOW) is None
    assert srs.reverse(rewritten, now=NOW + 22 * DAY) is None
    assert srs.reverse(rewritten, now=NOW + 21 * DAY) == "alice@example.org"
    assert srs.reverse("alice@fwd.example", now=NOW) is None
    assert srs.reverse("SRS0=abcd@fwd.example", now=NOW) is None


def test_null_local_and_srs_senders() -> None:
    # The null sender stays null; our own domain is kept; an SRS0 sender becomes SRS1 that
    # reverses to the first forwarder's SRS0 address.
    srs = SrsRewriter(secret=SECRET)
    assert srs.forward("", alias_domain="fwd.example", now=NOW) == ""
    assert srs.forward("a@FWD.example", alias_domain="fwd.example", now=NOW) == "a@FWD.example"
    first = SrsRewriter(secret=b"f" * 32)
    srs0 = first.forward("alice@example.org", alias_domain="first.example", now=NOW)
    srs1 = srs.forward(srs0, alias_domain="fwd.example", now=NOW)
    assert srs1.startswith("SRS1=")
    assert srs1.endswith("@fwd.example")
    assert srs.reverse(srs1, now=NOW) == srs0
    assert first.reverse(srs0, now=NOW) == "alice@example.org"


def test_short_secrets_are_refused() -> None:
    # A guessable secret would make our domain a bounce relay.
    with pytest.raises(ValueError, match="16 bytes"):
        SrsRewriter(secret=b"short")
