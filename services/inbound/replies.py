"""The inbound server's own SMTP replies (the shared ones are in services/core/smtp_replies.py)."""

from __future__ import annotations

STORED = "250 2.0.0 Ok: stored as {id}"
# Never an open relay: a recipient we do not host, or without a route, is refused at RCPT.
RELAY_DENIED = "550 5.7.1 <{address}>: Recipient address rejected: relay access denied"
ROUTE_REJECTED = "550 5.7.1 <{address}>: {text}"
BAD_RECIPIENT = "501 5.1.3 Bad recipient address syntax"
LOOKUP_FAILED = "451 4.4.3 Recipient lookup failed, try again later"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients (at most {limit})"
TOO_MANY_MESSAGES = "451 4.7.1 Too many messages from your address, try again later"
# RFC 5321 6.3: a message that went through too many hops is in a loop (forward routes can
# make one between two domains); refused for good, as Postfix does past hopcount_limit.
TOO_MANY_HOPS = "554 5.4.6 Too many hops ({hops} Received headers): mail loop?"

__all__ = [
    "BAD_RECIPIENT",
    "LOOKUP_FAILED",
    "RELAY_DENIED",
    "ROUTE_REJECTED",
    "STORED",
    "TOO_MANY_HOPS",
    "TOO_MANY_MESSAGES",
    "TOO_MANY_RECIPIENTS",
]
