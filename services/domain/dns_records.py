"""Validation, normalisation and zone-file rendering of a tenant's DNS records.

Two entry points (the name rules themselves, shared with the smtp service, are in
`services.core.dns_names`):

* `normalize_record_set` validates a whole record set of one domain at once and reports every
  problem in a single `InvalidArgument`, so a form can highlight all bad fields in one round trip.
* `to_zone_file` renders validated records as an RFC 1035 master file.

Names in and out of this module are lowercase A-labels without the trailing dot, except in the
zone file, where host names are written absolute (with the dot).
"""

from __future__ import annotations

import ipaddress
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from services.core.dns_names import (
    MAX_TXT_OCTETS,
    DnsRuleError,
    check_name_length,
    check_registrable_shape,
    encode_labels,
    is_ip_address,
    parses_as,
    shown,
    split_txt,
    strip_name,
)
from services.core.errors import FieldViolation, InvalidArgument
from services.domain.models import DnsRecord, DnsRecordInput, DnsRecordType

__all__ = [
    "SRV_PROTOCOLS",
    "ZONE_FILE_DEFAULT_TTL",
    "normalize_record_set",
    "to_zone_file",
]

SRV_PROTOCOLS = frozenset({"_tcp", "_udp", "_tls"})
"""Protocol labels accepted in SRV owner names (``_service._proto.name``)."""

ZONE_FILE_DEFAULT_TTL = 3600
"""The ``$TTL`` written to zone files; every record line carries its own TTL anyway."""

_MAX_U16 = 65535
_REVERSE_SUFFIXES = (".in-addr.arpa", ".ip6.arpa")
_TYPE_NAMES = ", ".join(t.value for t in DnsRecordType)
# Which of priority/weight/port each type uses; every other one must stay 0.
_NUMERIC_FIELDS: dict[DnsRecordType, frozenset[str]] = {
    DnsRecordType.MX: frozenset({"priority"}),
    DnsRecordType.SRV: frozenset({"priority", "weight", "port"}),
}


@dataclass(slots=True)
class _Checked:
    """One input record after field checks; a field is None when it was invalid."""

    index: int
    type: DnsRecordType | None
    name: str | None
    value: str | None
    ttl: int | None
    priority: int
    weight: int
    port: int
    txt_strings: tuple[str, ...]

    def same_rdata(self, other: _Checked) -> bool:
        """Whether the two records would be the same resource record (ignoring TTL)."""
        return (
            self.value is not None
            and self.value == other.value
            and self.priority == other.priority
            and self.weight == other.weight
            and self.port == other.port
        )


def normalize_record_set(
    domain: str,
    records: Sequence[DnsRecordInput],
    *,
    default_ttl: int = 3600,
    min_ttl: int = 60,
    max_ttl: int = 604800,
    max_records: int = 500,
) -> list[DnsRecord]:
    """Validate and normalise the complete record set of one domain.

    Every record is checked on its own (type, owner name, value, TTL, priority/weight/port)
    and then the set as a whole (CNAME exclusivity, exact duplicates, one TTL per RRset).

    Args:
        domain: the zone, already normalised by `normalize_domain_name` (A-label form).
        records: the records as the caller sent them.
        default_ttl: TTL used for records whose ttl is 0.
        min_ttl: smallest explicit TTL accepted.
        max_ttl: largest explicit TTL accepted.
        max_records: most records the set may hold.

    Returns:
        The normalised records, in input order.

    Raises:
        InvalidArgument: listing every violation, with fields ``records[i].<field>`` or
            ``records`` for the set size.
    """
    if len(records) > max_records:
        # Reported alone: validating an oversized set wastes work and could produce more
        # violations than fit in a gRPC error's trailing metadata.
        raise InvalidArgument(
            [
                FieldViolation(
                    "records",
                    f"a domain may have at most {max_records} records; got {len(records)}",
                )
            ]
        )
    zone = strip_name(domain).lower()
    violations: list[FieldViolation] = []
    checked = [
        _check_record(index, record, zone, default_ttl, min_ttl, max_ttl, violations)
        for index, record in enumerate(records)
    ]
    _check_set(checked, violations)
    if violations:
        raise InvalidArgument(violations)
    result: list[DnsRecord] = []
    for item in checked:
        # No violations means every field was filled in.
        assert item.type is not None
        assert item.name is not None
        assert item.value is not None
        assert item.ttl is not None
        result.append(
            DnsRecord(
                type=item.type,
                name=item.name,
                value=item.value,
                ttl=item.ttl,
                priority=item.priority,
                weight=item.weight,
                port=item.port,
                txt_strings=item.txt_strings,
            )
        )
    return result


def to_zone_file(
    domain: str, records: Sequence[DnsRecord], *, extra: Sequence[DnsRecord] = ()
) -> str:
    r"""Render records as an RFC 1035 master file for the zone `domain`.

    Owner names are written relative to ``$ORIGIN`` (``@`` for the apex), host names in rdata
    absolute. TXT strings are quoted; ``"`` and ``\`` are backslash-escaped and every octet
    outside printable ASCII is written as ``\DDD``, so the file is pure ASCII. Records whose
    owner is outside the zone (reverse PTRs) cannot be served by it and are written as comments.

    Args:
        domain: the zone (A-label form, trailing dot optional).
        records: validated records, normally from `normalize_record_set`.
        extra: further records (e.g. platform-managed ones) appended after `records`.

    Returns:
        The zone file text, ending with a newline.
    """
    origin = strip_name(domain).lower()
    lines = [f"$ORIGIN {origin}.", f"$TTL {ZONE_FILE_DEFAULT_TTL}"]
    for record in (*records, *extra):
        owner = _relative_owner(record.name, origin)
        rdata = _render_rdata(record)
        if owner is None:
            line = f"{record.name}. {record.ttl} IN {record.type.value} {rdata}"
            lines.append(f"; out of zone, not served: {line}")
        else:
            lines.append(f"{owner}\t{record.ttl}\tIN\t{record.type.value}\t{rdata}")
    return "\n".join(lines) + "\n"


# --- per-record checks -----------------------------------------------------------------------


def _check_record(
    index: int,
    record: DnsRecordInput,
    zone: str,
    default_ttl: int,
    min_ttl: int,
    max_ttl: int,
    violations: list[FieldViolation],
) -> _Checked:
    """Check one record's fields, appending violations; return what was valid."""
    prefix = f"records[{index}]"

    def bad(field: str, description: str) -> None:
        violations.append(FieldViolation(f"{prefix}.{field}", description))

    rtype = _parse_type(record.type)
    if rtype is None:
        bad("type", f"must be one of {_TYPE_NAMES}; got {shown(record.type)}")

    name: str | None = None
    try:
        name = _owner_name(record.name, zone, rtype)
    except DnsRuleError as exc:
        bad("name", str(exc))

    ttl: int | None = None
    if record.ttl == 0:
        ttl = default_ttl
    elif min_ttl <= record.ttl <= max_ttl:
        ttl = record.ttl
    else:
        bad(
            "ttl",
            f"must be between {min_ttl} and {max_ttl} seconds, or 0 for the default "
            f"({default_ttl}); got {record.ttl}",
        )

    value: str | None = None
    txt_strings: tuple[str, ...] = ()
    if rtype is not None:
        if name is not None:
            problem = _type_name_problem(rtype, name, zone)
            if problem:
                bad("name", problem)
                name = None
        try:
            value = _parse_value(rtype, record.value, zone)
        except DnsRuleError as exc:
            bad("value", str(exc))
        if value is not None and rtype is DnsRecordType.TXT:
            txt_strings = split_txt(value)
        used = _NUMERIC_FIELDS.get(rtype, frozenset())
        for field, number in (
            ("priority", record.priority),
            ("weight", record.weight),
            ("port", record.port),
        ):
            if field in used:
                if not 0 <= number <= _MAX_U16:
                    bad(field, f"must be between 0 and {_MAX_U16}; got {number}")
            elif number != 0:
                bad(field, f"must be 0: {rtype.value} records have no {field}; got {number}")

    return _Checked(
        index=index,
        type=rtype,
        name=name,
        value=value,
        ttl=ttl,
        priority=record.priority,
        weight=record.weight,
        port=record.port,
        txt_strings=txt_strings,
    )


def _parse_type(raw: str) -> DnsRecordType | None:
    """Map a case-insensitive type name to the enum, or None if unsupported."""
    try:
        return DnsRecordType(raw.strip().upper())
    except ValueError:
        return None


def _owner_name(raw: str, zone: str, rtype: DnsRecordType | None) -> str:
    """Resolve an owner name (``@``, relative or absolute) to a FQDN at or below `zone`."""
    text = raw.strip()
    if text in ("", "@"):
        return zone
    absolute = text.endswith(".")
    if absolute:
        text = text[:-1]
        if not text:
            raise DnsRuleError(f'"." is the DNS root; use "@" for the domain {zone} itself')
    name = ".".join(encode_labels(text, underscore=True, wildcard=True, strict=False))
    if _is_at_or_below(name, zone):
        return name
    if rtype is DnsRecordType.PTR and name.endswith(_REVERSE_SUFFIXES):
        # Reverse names are absolute by nature; nobody means 4.3.2.1.in-addr.arpa.example.com.
        return name
    if absolute:
        raise DnsRuleError(f"must be {zone} or a name below it")
    name = f"{name}.{zone}"
    check_name_length(name)
    return name


def _type_name_problem(rtype: DnsRecordType, name: str, zone: str) -> str:
    """Owner-name rules that depend on the type; return a description or ``""``."""
    if rtype is DnsRecordType.CNAME and name == zone:
        # The apex always holds SOA and NS, and a CNAME may not share its name (RFC 1034 §3.6.2).
        return "a CNAME record is not allowed at the domain apex (RFC 1034 §3.6.2)"
    if rtype is DnsRecordType.SRV:
        labels = name.split(".")
        service_ok = len(labels[0]) > 1 and labels[0].startswith("_")
        if not service_ok or len(labels) < 3 or labels[1] not in SRV_PROTOCOLS:
            protocols = ", ".join(sorted(SRV_PROTOCOLS))
            return (
                "an SRV name must have the form _service._proto.name "
                f"(e.g. _sip._tcp) with proto one of {protocols}"
            )
    return ""


def _parse_value(rtype: DnsRecordType, raw: str, zone: str) -> str:
    """Validate and canonicalise a record value for its type."""
    if rtype is DnsRecordType.A:
        return _ipv4(raw)
    if rtype is DnsRecordType.AAAA:
        return _ipv6(raw)
    if rtype is DnsRecordType.TXT:
        return _txt(raw)
    # CNAME targets may legitimately carry underscore labels (e.g. ACM or DKIM delegation
    # targets); MX, SRV and PTR targets must be real host names that have addresses.
    underscore = rtype is DnsRecordType.CNAME
    return _host_value(raw, zone, underscore=underscore, allow_root=rtype is DnsRecordType.SRV)


def _ipv4(raw: str) -> str:
    """Canonical IPv4 address; rejects IPv6 with a pointer to AAAA."""
    text = raw.strip()
    if not text:
        raise DnsRuleError("an IPv4 address is required")
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        pass
    if parses_as(ipaddress.IPv6Address, text):
        raise DnsRuleError("is an IPv6 address; use an AAAA record for IPv6")
    raise DnsRuleError(
        f"{shown(text)} is not a valid IPv4 address (four decimal numbers 0-255 without "
        "leading zeros, e.g. 192.0.2.1)"
    )


def _ipv6(raw: str) -> str:
    """Canonical (compressed) IPv6 address; rejects IPv4 and IPv4-mapped forms."""
    text = raw.strip()
    if not text:
        raise DnsRuleError("an IPv6 address is required")
    try:
        address = ipaddress.IPv6Address(text)
    except ValueError:
        if parses_as(ipaddress.IPv4Address, text):
            raise DnsRuleError("is an IPv4 address; use an A record for IPv4") from None
        raise DnsRuleError(f"{shown(text)} is not a valid IPv6 address") from None
    if address.scope_id is not None:
        # A zone index (fe80::1%eth0) only means something on one host, never in DNS.
        raise DnsRuleError("must not contain a zone index (%...)")
    if address.ipv4_mapped is not None:
        raise DnsRuleError("is an IPv4-mapped address; use an A record for IPv4")
    return address.compressed


def _txt(raw: str) -> str:
    """Validate TXT text; the value is kept verbatim (whitespace can be significant)."""
    if raw == "":
        raise DnsRuleError("a TXT record needs a non-empty value")
    for char in raw:
        # Tab is harmless and shows up in pasted SPF/DKIM values; other controls are not.
        if char != "\t" and unicodedata.category(char) == "Cc":
            raise DnsRuleError(
                f"contains the control character U+{ord(char):04X}; only tab is allowed"
            )
    try:
        size = len(raw.encode("utf-8"))
    except UnicodeEncodeError:
        raise DnsRuleError("is not valid Unicode text (it contains unpaired surrogates)") from None
    if size > MAX_TXT_OCTETS:
        raise DnsRuleError(f"is {size} octets long in UTF-8; the maximum is {MAX_TXT_OCTETS}")
    return raw


def _host_value(raw: str, zone: str, *, underscore: bool, allow_root: bool) -> str:
    """Validate a host name in rdata; always taken as absolute, ``@`` means the domain."""
    text = raw.strip()
    if not text:
        raise DnsRuleError("a host name is required")
    if text == ".":
        if allow_root:
            return "."  # RFC 2782: the service is decidedly not available at this domain.
        raise DnsRuleError('"." (no host) is only allowed as an SRV target')
    if text == "@":
        return zone
    text = strip_name(text)
    if is_ip_address(text):
        raise DnsRuleError("must be a host name, not an IP address")
    labels = encode_labels(text, underscore=underscore, wildcard=False, strict=False)
    check_registrable_shape(labels, what="a fully-qualified host name", example="mail.example.com")
    return ".".join(labels)


# --- set-level checks ------------------------------------------------------------------------


def _check_set(checked: Sequence[_Checked], violations: list[FieldViolation]) -> None:
    """Rules between records: duplicates, CNAME exclusivity, one TTL per RRset.

    A violation always goes on the later record, so the first one stands as the reference.
    """
    by_name: dict[str, list[_Checked]] = {}
    for item in checked:
        if item.type is None or item.name is None:
            continue
        prefix = f"records[{item.index}]"
        earlier = by_name.setdefault(item.name, [])
        duplicate = next((e for e in earlier if e.type is item.type and e.same_rdata(item)), None)
        if duplicate is not None:
            violations.append(
                FieldViolation(
                    f"{prefix}.value",
                    f"duplicates records[{duplicate.index}] "
                    f"({item.type.value} record at {item.name})",
                )
            )
            # Nothing more to say about an exact copy; keep it out of later comparisons.
            continue
        if item.type is DnsRecordType.CNAME and earlier:
            other = earlier[0]
            assert other.type is not None
            violations.append(
                FieldViolation(
                    f"{prefix}.name",
                    f"a CNAME record cannot share its name with other records "
                    f"(RFC 1034 §3.6.2); records[{other.index}] is a {other.type.value} "
                    f"record at {item.name}",
                )
            )
        elif item.type is not DnsRecordType.CNAME:
            cname = next((e for e in earlier if e.type is DnsRecordType.CNAME), None)
            if cname is not None:
                violations.append(
                    FieldViolation(
                        f"{prefix}.name",
                        f"records[{cname.index}] is a CNAME record at {item.name}, so no other "
                        "record may have that name (RFC 1034 §3.6.2)",
                    )
                )
        if item.ttl is not None:
            first = next((e for e in earlier if e.type is item.type and e.ttl is not None), None)
            if first is not None and first.ttl != item.ttl:
                violations.append(
                    FieldViolation(
                        f"{prefix}.ttl",
                        f"all {item.type.value} records at {item.name} must share one TTL "
                        f"(RFC 2181 §5.2); records[{first.index}] has {first.ttl}, "
                        f"this has {item.ttl}",
                    )
                )
        earlier.append(item)


# --- names -----------------------------------------------------------------------------------


def _is_at_or_below(name: str, zone: str) -> bool:
    """Whether `name` is `zone` or a subdomain of it (label-wise, not string-wise)."""
    return name == zone or name.endswith("." + zone)


# --- zone file -------------------------------------------------------------------------------


def _relative_owner(name: str, origin: str) -> str | None:
    """Owner relative to `origin` (``@`` for the apex), or None if outside the zone."""
    if name == origin:
        return "@"
    if name.endswith("." + origin):
        return name[: -len(origin) - 1]
    return None


def _render_rdata(record: DnsRecord) -> str:
    """Master-file rdata of one record."""
    rtype = record.type
    if rtype in (DnsRecordType.A, DnsRecordType.AAAA):
        return record.value
    if rtype is DnsRecordType.TXT:
        strings = record.txt_strings or split_txt(record.value)
        return " ".join(_quote_txt(s) for s in strings)
    if rtype is DnsRecordType.MX:
        return f"{record.priority} {_absolute(record.value)}"
    if rtype is DnsRecordType.SRV:
        return f"{record.priority} {record.weight} {record.port} {_absolute(record.value)}"
    return _absolute(record.value)  # CNAME, PTR


def _absolute(host: str) -> str:
    """Host name with the trailing dot, so the master file does not append $ORIGIN."""
    return host if host.endswith(".") else host + "."


def _quote_txt(text: str) -> str:
    """One TXT character-string as an RFC 1035 quoted string."""
    out: list[str] = ['"']
    for octet in text.encode("utf-8"):
        if octet in (0x22, 0x5C):  # " and \
            out.append("\\" + chr(octet))
        elif 0x20 <= octet <= 0x7E:
            out.append(chr(octet))
        else:
            # \DDD keeps the file ASCII and unambiguous for every zone-file parser.
            out.append(f"\\{octet:03d}")
    out.append('"')
    return "".join(out)
