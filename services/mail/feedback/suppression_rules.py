"""The suppression list's rules, in one place: which bounces suppress, and how addresses compare.

Bounce classification (RFC 3463 enhanced status codes, ``class.subject.detail``; the IANA
registry of SMTP enhanced status codes gives the meaning of each). A bounce suppresses the
address only when it says, permanently, that this address cannot receive mail:

| enhanced code | meaning | suppress |
|---|---|---|
| 5.1.1 | bad destination mailbox address (no such user) | yes |
| 5.1.2 | bad destination system address (no such domain) | yes |
| 5.1.3 | bad destination mailbox address syntax | yes |
| 5.1.6 | destination mailbox has moved, no forwarding address | yes |
| 5.1.10 | recipient address has null MX (RFC 7505: the domain accepts no mail) | yes |
| 5.2.1 | mailbox disabled, not accepting messages | yes |
| 5.1.x other (5.1.4, 5.1.5, 5.1.7, 5.1.8, ...) | route or sender, not the recipient | no |
| 5.2.2 | mailbox full | no (it may be emptied) |
| 5.2.x other, 5.3.x to 5.6.x | size, system, network, protocol, content | no |
| 5.7.x | policy, security, reputation (spam filters, DMARC, blocklists) | no: the sender's |
| 4.x.x | transient by definition | no |
| missing, malformed, or a class other than 5 | unclassifiable | no |

A reply with no enhanced code is never classified from its basic code: a bare 550 is used
for "no such user" and for policy blocks alike, and a wrong suppression costs the tenant a
real recipient. Complaints (ARF feedback reports) always suppress (`Reason.COMPLAINT`).

Address comparison: the domain part compares case-insensitively (DNS names do, RFC 1035 2.3.3)
and internationalised domains compare by their A-label (IDNA 2008 with UTS #46 mapping, as
the mail service stores recipients); the local part compares exactly as typed (RFC 5321 2.4:
only the receiving host may interpret it; "Bob" and "bob" can be different mailboxes), after
Unicode NFC normalisation (RFC 6532 3.1). `normalize_address` gives the one stored spelling.
"""

from __future__ import annotations

import enum
import re
import unicodedata

import idna

from services.core.errors import InvalidArgument
from services.mail.compose import parse_mailbox

# The most addresses one AddSuppressions request may carry.
MAX_ADD = 1000


class Reason(enum.StrEnum):
    """Why an address is on the list (stored and returned as these strings)."""

    MANUAL = "manual"
    HARD_BOUNCE = "hard_bounce"
    COMPLAINT = "complaint"


_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")

# (subject, detail) of permanent failures that say the address itself cannot receive mail.
SUPPRESSING_CODES = frozenset({(1, 1), (1, 2), (1, 3), (1, 6), (1, 10), (2, 1)})


def bounce_suppresses(enhanced_code: str) -> bool:
    """Whether a bounce with this RFC 3463 enhanced status code suppresses the address.

    The table is in the module docstring: only permanent (5.x.x) bad-mailbox, bad-domain,
    bad-syntax, moved, null-MX and disabled-mailbox codes do; anything else, including a
    missing or malformed code, does not.
    """
    match = _ENHANCED.match(enhanced_code.strip())
    if match is None or match.group(1) != "5":
        return False
    return (int(match.group(2)), int(match.group(3))) in SUPPRESSING_CODES


def normalize_address(value: str, *, field: str) -> str:
    """The stored spelling of a bare address: local part as typed (NFC), domain as A-label.

    Raises:
        InvalidArgument: not exactly one bare address (naming `field`).
    """
    if "<" in value or ">" in value or value != value.strip():
        raise InvalidArgument.single(
            field, f"{value!r} must be a bare address such as user@example.com"
        )
    return parse_mailbox(value, field).addr_spec


def normalize_domain(value: str, *, field: str) -> str:
    """A domain as addresses store it (lower-case A-label).

    Raises:
        InvalidArgument: not a domain name (naming `field`).
    """
    try:
        a_label = idna.encode(value.rstrip("."), uts46=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError):
        raise InvalidArgument.single(field, f"{value!r} is not a domain name") from None
    if "." not in a_label or len(a_label) > 253:
        raise InvalidArgument.single(field, f"{value!r} is not a domain name")
    return a_label


def normalize_prefix(value: str) -> str:
    """An address prefix in stored spelling: the part after an ``@`` in lower case.

    The local part is kept as typed (it compares exactly, NFC). The domain part is matched as
    stored, so a prefix of an internationalised domain is written in its A-label form
    (``xn--``).
    """
    local, at, domain = value.partition("@")
    return f"{unicodedata.normalize('NFC', local)}{at}{domain.lower()}"
