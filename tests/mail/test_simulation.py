"""The test-mode table: which reply each recipient of a test email gets (pure rules)."""

from __future__ import annotations

import pytest

from services.mail.simulation import TEST_DOMAIN, replies_for, reply_for, suppression


@pytest.mark.parametrize(
    ("address", "code", "enhanced"),
    [
        (f"delivered@{TEST_DOMAIN}", 250, "2.0.0"),
        (f"bounce@{TEST_DOMAIN}", 550, "5.1.1"),
        (f"defer@{TEST_DOMAIN}", 451, "4.3.0"),
        (f"complaint@{TEST_DOMAIN}", 250, "2.0.0"),
        # A +label keeps the outcome (a fresh address for the suppression list), in any case.
        (f"bounce+run-42@{TEST_DOMAIN}", 550, "5.1.1"),
        (f"Defer@{TEST_DOMAIN.upper()}", 451, "4.3.0"),
        # Anything else is delivered: other local parts, other domains, look-alike domains.
        (f"nobody@{TEST_DOMAIN}", 250, "2.0.0"),
        ("bounce@example.org", 250, "2.0.0"),
        (f"bounce@sub.{TEST_DOMAIN}", 250, "2.0.0"),
        (f"bounce@{TEST_DOMAIN}.example", 250, "2.0.0"),
    ],
)
def test_reply_per_address(address: str, code: int, enhanced: str) -> None:
    # Each address gets the reply the documented table gives it.
    reply = reply_for(address)
    assert (reply.code, reply.enhanced_code) == (code, enhanced)
    assert "test mode" in reply.text


def test_only_suppressed_at_the_test_domain_is_suppressed() -> None:
    # suppressed@ (with or without a label) simulates a listed address; nothing else does.
    assert suppression(f"suppressed@{TEST_DOMAIN}") == "hard_bounce"
    assert suppression(f"suppressed+x@{TEST_DOMAIN}") == "hard_bounce"
    assert suppression("suppressed@example.org") is None
    assert suppression(f"bounce@{TEST_DOMAIN}") is None


def test_replies_for_an_attempt() -> None:
    # One reply per recipient of the attempt.
    replies = replies_for([f"bounce@{TEST_DOMAIN}", "a@example.org"])
    assert {a: r.code for a, r in replies.items()} == {
        f"bounce@{TEST_DOMAIN}": 550,
        "a@example.org": 250,
    }
