"""Rules for DNS names and TXT strings that more than one service applies.

`normalize_domain_name` turns what a user typed as a domain into its IDNA 2008 A-label form (what
goes on the wire and in storage) and its U-label form (what we show); `split_txt` cuts TXT text
into RFC 1035 character-strings. The label-level helpers are public so that the domain service's
record-set validation applies exactly the same rules to owner names and host values.

Names in and out of this module are lowercase A-labels without the trailing dot.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import idna
import unicodedataplus

from services.core.errors import InvalidArgument

MAX_NAME_OCTETS = 253
"""Longest domain name in presentation form without the trailing dot (255 on the wire)."""

MAX_LABEL_OCTETS = 63
"""Longest single label (RFC 1035 §2.3.4)."""

MAX_TXT_OCTETS = 4000
"""Longest TXT value we accept (UTF-8 octets); enough for 4096-bit DKIM keys."""

MAX_TXT_STRING_OCTETS = 255
"""Longest character-string inside TXT rdata (RFC 1035 §3.3: one length octet)."""

_LDH_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")


class DnsRuleError(ValueError):
    """A name or value failed validation; the message is a user-facing description."""


def normalize_domain_name(raw: str, *, field: str = "name") -> tuple[str, str]:
    """Validate a domain name and return its A-label and U-label forms.

    Surrounding whitespace and one trailing dot are removed, the name is mapped with UTS #46
    (which also lowercases it) and encoded with IDNA 2008.

    Args:
        raw: the domain as the user typed it, e.g. ``" Bücher.Example. "``.
        field: the request field to name in the violation.

    Returns:
        ``(a_label_name, u_label_name)``, e.g. ``("xn--bcher-kva.example", "bücher.example")``.

    Raises:
        InvalidArgument: with one violation on `field` if the name is empty, too long, has an
            empty, too long or malformed label, is a single label, has an all-numeric top-level
            label, is an IP address, or has a label mixing scripts beyond what UTS #39's
            "highly restrictive" level allows (e.g. a Cyrillic "\u0430" among Latin letters).
    """
    text = strip_name(raw)
    if not text:
        raise InvalidArgument.single(field, "a domain name is required")
    if is_ip_address(text):
        raise InvalidArgument.single(field, "must be a domain name, not an IP address")
    try:
        labels = encode_labels(text, underscore=False, wildcard=False, strict=True)
        check_registrable_shape(labels, what="a domain name", example="example.com")
    except DnsRuleError as exc:
        raise InvalidArgument.single(field, str(exc)) from None
    a_name = ".".join(labels)
    try:
        u_name = idna.decode(a_name)
    except UnicodeError:
        # Unreachable for labels that passed the strict checks; kept so a library quirk becomes
        # a client error rather than an internal one.
        raise InvalidArgument.single(field, "is not a valid IDNA 2008 domain name") from None
    for label in u_name.split("."):
        mixed = mixed_scripts(label)
        if mixed:
            raise InvalidArgument.single(
                field,
                f"label {shown(label)} mixes the {' and '.join(mixed)} scripts, so it can pass for "
                "another name (UTS #39, highly restrictive): write each label in one script",
            )
    return a_name, u_name


def split_txt(text: str) -> tuple[str, ...]:
    """Split TXT text into strings of at most 255 UTF-8 octets, never inside a character."""
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for char in text:
        width = len(char.encode("utf-8"))
        if size + width > MAX_TXT_STRING_OCTETS:
            chunks.append("".join(current))
            current, size = [], 0
        current.append(char)
        size += width
    if current:
        chunks.append("".join(current))
    return tuple(chunks)


# --- names -----------------------------------------------------------------------------------


def strip_name(raw: str) -> str:
    """Drop surrounding whitespace and one trailing dot (the root label)."""
    text = raw.strip()
    return text[:-1] if text.endswith(".") else text


def encode_labels(text: str, *, underscore: bool, wildcard: bool, strict: bool) -> list[str]:
    """Turn a dot-separated name (without trailing dot) into lowercase A-labels.

    Args:
        text: the name; may contain U-labels, A-labels and upper case.
        underscore: allow a leading underscore in a label (``_dmarc``, ``_sip``).
        wildcard: allow ``*`` as the leftmost label.
        strict: run ASCII labels through IDNA 2008 too. That additionally rejects ``--`` in
            positions 3-4 (reserved for A-labels), which real third-party host names such as
            ``r3---sn-abc.googlevideo.com`` violate, so only our own domain names use it.

    Raises:
        DnsRuleError: describing the first problem found.
    """
    try:
        # UTS #46 lowercases and maps look-alikes such as the ideographic full stop to ".".
        mapped = idna.uts46_remap(text, std3_rules=False)
    except UnicodeError as exc:
        if len(text) > MAX_NAME_OCTETS:
            raise DnsRuleError(f"is longer than {MAX_NAME_OCTETS} octets") from None
        raise DnsRuleError(
            f"contains a character that is not allowed in domain names ({exc})"
        ) from None
    labels: list[str] = []
    for index, label in enumerate(mapped.split(".")):
        if not label:
            raise DnsRuleError("contains an empty label (a leading dot or two dots in a row)")
        if label == "*":
            if not wildcard:
                raise DnsRuleError('a wildcard label "*" is not allowed here')
            if index != 0:
                raise DnsRuleError('"*" is only allowed as the leftmost label')
            labels.append(label)
        elif label.isascii() and not label.startswith("xn--"):
            labels.append(_ascii_label(label, underscore=underscore, strict=strict))
        else:
            labels.append(_idna_label(label))
    check_name_length(".".join(labels))
    return labels


def _ascii_label(label: str, *, underscore: bool, strict: bool) -> str:
    """Check a lowercase ASCII label against the LDH rules (plus leading underscore)."""
    if len(label) > MAX_LABEL_OCTETS:
        raise DnsRuleError(
            f"label {shown(label)} is {len(label)} octets long; the maximum is {MAX_LABEL_OCTETS}"
        )
    body = label[1:] if underscore and label.startswith("_") else label
    if not body:
        raise DnsRuleError('a label cannot be just "_"')
    for char in body:
        if char not in _LDH_CHARS:
            if char == "_":
                hint = (
                    "an underscore is only allowed as the first character of a label"
                    if underscore
                    else "underscores are not allowed here"
                )
                raise DnsRuleError(f"label {shown(label)}: {hint}")
            raise DnsRuleError(
                f"label {shown(label)} contains {char!r}; only letters, digits and hyphens "
                "are allowed"
            )
    if body.startswith("-") or body.endswith("-"):
        raise DnsRuleError(f"label {shown(label)} must not start or end with a hyphen")
    if strict:
        try:
            idna.alabel(label)
        except UnicodeError as exc:
            raise DnsRuleError(
                f"label {shown(label)} is not valid under IDNA 2008 ({exc})"
            ) from None
    return label


def _idna_label(label: str) -> str:
    """Encode a U-label (or validate an ``xn--`` A-label) with IDNA 2008."""
    try:
        if label.isascii():
            idna.ulabel(label)  # rejects bad or non-canonical Punycode
            encoded = label
        else:
            # Python's punycode codec is what idna uses; measure first for a clear message.
            encoded = "xn--" + label.encode("punycode").decode("ascii")
            if len(encoded) <= MAX_LABEL_OCTETS:
                encoded = idna.alabel(label).decode("ascii")
    except UnicodeError as exc:
        raise DnsRuleError(
            f"label {shown(label)} is not a valid internationalised (IDNA 2008) label ({exc})"
        ) from None
    if len(encoded) > MAX_LABEL_OCTETS:
        raise DnsRuleError(
            f"label {shown(label)} is {len(encoded)} octets long when encoded; "
            f"the maximum is {MAX_LABEL_OCTETS}"
        )
    return encoded


def check_name_length(name: str) -> None:
    """Enforce the 253-octet limit on an A-label name."""
    if len(name) > MAX_NAME_OCTETS:
        raise DnsRuleError(
            f"is {len(name)} octets long when encoded; the maximum is {MAX_NAME_OCTETS}"
        )


def check_registrable_shape(labels: Sequence[str], *, what: str, example: str) -> None:
    """Names that must be resolvable on the Internet: two labels or more, non-numeric TLD."""
    if len(labels) < 2:
        raise DnsRuleError(f"must be {what} with at least two labels (e.g. {example})")
    if labels[-1].isdigit():
        raise DnsRuleError("the top-level label must not be all-numeric")


def is_ip_address(text: str) -> bool:
    """Whether `text` (optionally in brackets) parses as an IPv4 or IPv6 address."""
    candidate = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    return parses_as(ipaddress.IPv4Address, candidate) or parses_as(
        ipaddress.IPv6Address, candidate
    )


def parses_as(kind: type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address], text: str) -> bool:
    """Whether `text` is a valid address of `kind`."""
    try:
        kind(text)
    except ValueError:
        return False
    return True


# UTS #39 section 5.1: a character's Script_Extensions, "augmented" so that Han text written
# with kana (Jpan), Bopomofo (Hanb) or Hangul (Kore) counts as one script.
_AUGMENTED = {
    "Hani": ("Hanb", "Jpan", "Kore"),
    "Hira": ("Jpan",),
    "Kana": ("Jpan",),
    "Hang": ("Kore",),
    "Bopo": ("Hanb",),
}
_COMMON_OR_INHERITED = frozenset({"Zyyy", "Zinh"})
# UTS #39 section 5.2, highly restrictive: besides one script, Latin plus one of these.
_WITH_LATIN = frozenset({"Jpan", "Hanb", "Kore"})


def mixed_scripts(label: str) -> list[str]:
    """The scripts a label mixes (sorted names) if UTS #39 "highly restrictive" refuses it.

    An empty list means the label is fine.
    Common and Inherited characters (digits, hyphen, combining marks) belong to every script.
    A label passes if one script covers all its characters, or if its non-Latin characters are
    all Japanese (Han, Hiragana, Katakana), all Han with Bopomofo, or all Korean (Han, Hangul).
    """
    if label.isascii():
        return []
    sets: list[frozenset[str]] = []
    non_latin: list[frozenset[str]] = []
    for char in label:
        scripts = set(unicodedataplus.script_extensions(char))
        if scripts & _COMMON_OR_INHERITED:
            continue
        for script in list(scripts):
            scripts.update(_AUGMENTED.get(script, ()))
        sets.append(frozenset(scripts))
        if "Latn" not in scripts:
            non_latin.append(frozenset(scripts))
    if not sets or frozenset.intersection(*sets):
        return []  # a single script
    if non_latin and frozenset.intersection(*non_latin) & _WITH_LATIN:
        return []
    return sorted(
        {
            str(unicodedataplus.script(char))
            for char in label
            if not set(unicodedataplus.script_extensions(char)) & _COMMON_OR_INHERITED
        }
    )


def shown(text: str, limit: int = 40) -> str:
    """Quote user input for a message, truncated so errors stay small."""
    return repr(text if len(text) <= limit else text[:limit] + "…")
