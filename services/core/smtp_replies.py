"""SMTP replies every listener of the suite shares, and enhanced status codes for aiosmtpd's own.

Replies carry RFC 3463 enhanced status codes (ENHANCEDSTATUSCODES is advertised); `enhanced`
adds one to aiosmtpd's replies that lack it. Each listener keeps its own policy replies in its
own module (services/submission/replies.py, services/inbound/replies.py).
"""

from __future__ import annotations

SENDER_OK = "250 2.1.0 Sender OK"
RECIPIENT_OK = "250 2.1.5 Recipient OK"
TEMPORARY_FAILURE = "451 4.3.0 Temporary failure, try again later"
# 421: the server closes the connection after it.
TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections from your address, try again later"
TOO_MANY_BAD_COMMANDS = "421 4.7.0 Too many bad commands"
IDLE_TIMEOUT = "421 4.4.2 Idle for too long, closing connection"
SESSION_TIMEOUT = "421 4.4.2 Session time limit reached, closing connection"
SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"

# aiosmtpd's own replies that lack an enhanced code, by their start.
_ENHANCED = (
    ("250 OK", "250 2.0.0 OK"),
    ("250 HELP", "250 HELP"),
    ("221 Bye", "221 2.0.0 Bye"),
    ("552 Error: message size exceeds", "552 5.3.4 Message size exceeds fixed maximum size"),
    ("552 Error: Too much mail data", "552 5.3.4 Message too big"),
    ("503 Error: send", "503 5.5.1 Error: send HELO/EHLO first"),
    ("503 Error: need MAIL", "503 5.5.1 Error: need MAIL command"),
    ("503 Error: need RCPT", "503 5.5.1 Error: need RCPT command"),
    ("503 Error: nested MAIL", "503 5.5.1 Error: nested MAIL command"),
    ("503 Already authenticated", "503 5.5.1 Already authenticated"),
    ("501 Error: SMTPUTF8", "501 5.5.4 SMTPUTF8 takes no arguments"),
    ("501 Error: BODY", "501 5.5.4 BODY can only be one of 7BIT, 8BITMIME"),
    ("555 ", "555 5.5.4 MAIL FROM/RCPT TO parameters not recognized or not implemented"),
    ("500 Line too long", "500 5.5.6 Line too long (see RFC 5321 4.5.3.1.6)"),
    ("500 Command line too long", "500 5.5.6 Command line too long"),
    ("500 Error: strict ASCII mode", "500 5.6.7 Non-ASCII data without SMTPUTF8"),
    ("502 ", "502 5.5.1 Command not implemented"),
)


def enhanced(reply: str) -> str:
    """The reply with an enhanced status code (RFC 2034), added to aiosmtpd's own where missing.

    Leaves alone replies that already have one, 220 greetings, 334 challenges, 354 and the
    multi-line EHLO answer, which RFC 2034 exempts.
    """
    if reply.startswith("220 Ready to start TLS"):
        return "220 2.0.0 Ready to start TLS"
    code, _, text = reply.partition(" ")
    if len(code) != 3 or not code.isdigit() or code in ("220", "334", "354"):
        return reply
    first = text.split(" ", 1)[0]
    if first.count(".") == 2 and first.replace(".", "").isdigit():
        return reply
    for start, replacement in _ENHANCED:
        if reply.startswith(start):
            return replacement
    cls = code[0]
    if cls == "5":
        return f"{code} 5.5.2 {text}"
    if cls in ("2", "4"):
        return f"{code} {cls}.0.0 {text}"
    return reply


def one_line(text: str) -> str:
    """`text` fit for a reply line: no line breaks, ASCII, at most 400 characters."""
    flat = " ".join(text.split())
    return flat.encode("ascii", "replace").decode("ascii")[:400]


__all__ = [
    "IDLE_TIMEOUT",
    "RECIPIENT_OK",
    "SENDER_OK",
    "SESSION_TIMEOUT",
    "SHUTTING_DOWN",
    "TEMPORARY_FAILURE",
    "TOO_MANY_BAD_COMMANDS",
    "TOO_MANY_CONNECTIONS",
    "enhanced",
    "one_line",
]
