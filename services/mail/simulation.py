"""Test mode: what a relay would have answered, decided per recipient of a test email.

A test email (sent with a test API key, ``azk_test_...``) is validated, rendered, stored, signed
and tracked like any other, but the worker never hands it to a relay: it asks this table for
each open recipient's reply instead, and the ordinary outcome rules (`services.mail.outcomes`)
take it from there, with the same state-change write, events, webhooks and suppression as a
real reply would get. Pure: no I/O.

Addresses at the reserved test domain `TEST_DOMAIN` choose their outcome by their local part
(case-insensitive; a ``+label`` is ignored, so ``bounce+run42@...`` bounces like ``bounce@``
while being an address of its own on the suppression list):

* ``delivered``: 250 2.0.0, sent;
* ``bounce``: 550 5.1.1 (no such mailbox), bounced, and the address suppressed as for any hard
  bounce (later test emails to it are SUPPRESSED; a fresh ``+label`` is a fresh address);
* ``defer``: 451 4.3.0 at every attempt: deferred, retried on the retry schedule and failed at
  the maximum lifetime, like any recipient that never stops deferring (DeleteEmail cancels it);
* ``suppressed``: as if on the tenant's suppression list: SUPPRESSED when accepted, no attempt;
* ``complaint``: 250 2.0.0, sent (the complaint that follows is the late-feedback path's);
* anything else: 250 2.0.0, sent.

Any other recipient of a test email (at any domain) is sent (250), never contacted. The domain
is under ``.test``, which RFC 2606 reserves and DNS never resolves: a live key sending there by
mistake reaches nobody either (live keys are never simulated: such mail goes to the domain's
relay like any other, which can deliver it nowhere).
"""

from __future__ import annotations

from services.mail.models import SmtpReply

# The reserved domain whose local parts pick a simulated outcome (docs/test-mode.md).
TEST_DOMAIN = "simulator.azora.test"

DELIVERED = SmtpReply(250, "2.0.0", "simulated delivery (test mode)")
BOUNCE = SmtpReply(550, "5.1.1", "simulated bounce: no such mailbox (test mode)")
DEFER = SmtpReply(451, "4.3.0", "simulated temporary failure (test mode)")

# Local part at TEST_DOMAIN -> the relay's reply (suppressed@ gets none: see `suppression`).
REPLIES = {
    "delivered": DELIVERED,
    "bounce": BOUNCE,
    "defer": DEFER,
    # Accepted by the "relay"; the complaint arrives later through the late-feedback path.
    "complaint": DELIVERED,
}
# The suppression reason suppressed@ simulates (a value of the suppression list's reasons).
SUPPRESSED_REASON = "hard_bounce"


def _outcome_word(address: str) -> str | None:
    """The local part (before any ``+label``, lower case) of an address at TEST_DOMAIN."""
    local, at, domain = address.rpartition("@")
    if not at or domain.lower() != TEST_DOMAIN:
        return None
    return local.partition("+")[0].lower()


def reply_for(address: str) -> SmtpReply:
    """The simulated relay reply to one recipient of a test email."""
    word = _outcome_word(address)
    return REPLIES.get(word, DELIVERED) if word is not None else DELIVERED


def replies_for(addresses: list[str]) -> dict[str, SmtpReply]:
    """The simulated replies of one attempt, per recipient (what a relay's would be)."""
    return {address: reply_for(address) for address in addresses}


def suppression(address: str) -> str | None:
    """The suppression reason a recipient of a test email simulates (suppressed@), or None."""
    return SUPPRESSED_REASON if _outcome_word(address) == "suppressed" else None


def is_complaint(address: str) -> bool:
    """Whether a recipient of a test email simulates a complaint after delivery (complaint@)."""
    return _outcome_word(address) == "complaint"


__all__ = [
    "REPLIES",
    "SUPPRESSED_REASON",
    "TEST_DOMAIN",
    "is_complaint",
    "replies_for",
    "reply_for",
    "suppression",
]
