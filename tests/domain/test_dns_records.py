"""Unit tests for DNS names (services.core.dns_names) and record sets, zone files (domain)."""

from __future__ import annotations

import dns.name
import dns.rdatatype
import dns.zone
import pytest

from services.core.dns_names import normalize_domain_name
from services.core.errors import InvalidArgument
from services.domain.dns_records import normalize_record_set, to_zone_file
from services.domain.models import DnsRecord, DnsRecordInput, DnsRecordType

DOMAIN = "example.com"


def _violation_fields(exc_info: pytest.ExceptionInfo[InvalidArgument]) -> list[str]:
    """The field paths of the raised error, in order."""
    return [v.field for v in exc_info.value.violations]


def _one(record: DnsRecordInput, **options: int) -> DnsRecord:
    """Normalise a single record under DOMAIN."""
    (result,) = normalize_record_set(DOMAIN, [record], **options)
    return result


def _fields_for(*records: DnsRecordInput, **options: int) -> list[str]:
    """Validate records that must fail; return the violation field paths."""
    with pytest.raises(InvalidArgument) as exc_info:
        normalize_record_set(DOMAIN, list(records), **options)
    return _violation_fields(exc_info)


def _label_chain(total: int) -> str:
    """A name of exactly `total` octets made of 63-octet labels ending in ".com"."""
    labels: list[str] = []
    remaining = total - len(".com")
    while remaining > 0:
        size = min(63, remaining)
        labels.append("a" * size)
        remaining -= size + 1
    name = ".".join(labels) + ".com"
    # The greedy fill can overshoot by one dot; trim the first label to land exactly.
    excess = len(name) - total
    return name[excess:]


# --- normalize_domain_name -------------------------------------------------------------------


def test_domain_is_stripped_lowercased_and_loses_trailing_dot() -> None:
    # Pasted names carry whitespace, capitals and the root dot; storage wants none of them.
    assert normalize_domain_name("  Mail.Example.COM. ") == ("mail.example.com", "mail.example.com")


def test_domain_idn_is_encoded_to_a_label_and_decoded_for_display() -> None:
    # IDN domains are stored as A-labels but shown to the user as U-labels.
    assert normalize_domain_name("Bücher.example") == ("xn--bcher-kva.example", "bücher.example")


def test_domain_given_as_a_label_yields_same_pair() -> None:
    # Typing the xn-- form must land on the same stored domain as typing the Unicode form.
    assert normalize_domain_name("XN--BCHER-KVA.example") == (
        "xn--bcher-kva.example",
        "bücher.example",
    )


def test_domain_ideographic_full_stop_is_a_label_separator() -> None:
    # UTS #46 maps the ideographic full stop to "."; CJK keyboards produce it.
    assert normalize_domain_name("bücher\u3002example")[0] == "xn--bcher-kva.example"


def test_domain_of_exactly_253_octets_and_63_octet_label_is_accepted() -> None:
    # The limits are inclusive: 253 octets total, 63 per label.
    name = _label_chain(253)
    assert len(name) == 253
    assert normalize_domain_name(name)[0] == name
    assert normalize_domain_name("a" * 63 + ".com")[0] == "a" * 63 + ".com"


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("", "required"),
        ("   ", "required"),
        (".", "required"),
        ("localhost", "at least two labels"),
        ("example..com", "empty label"),
        (".example.com", "empty label"),
        ("example.com..", "empty label"),
        ("-example.com", "hyphen"),
        ("example-.com", "hyphen"),
        ("ab--cd.com", "IDNA 2008"),
        ("exa_mple.com", "underscore"),
        ("_dmarc.example.com", "underscore"),
        ("exa mple.com", "only letters, digits and hyphens"),
        ("exa!mple.com", "only letters, digits and hyphens"),
        ("*.example.com", "wildcard"),
        ("a" * 64 + ".com", "maximum is 63"),
        (_label_chain(254), "maximum is 253"),
        ("example.123", "all-numeric"),
        ("192.0.2.1", "IP address"),
        ("2001:db8::1", "IP address"),
        ("[2001:db8::1]", "IP address"),
        ("xn--zz.com", "IDNA 2008"),
        ("bücher\u2764.example", "IDNA 2008"),
        ("\u0300a.example", "IDNA 2008"),
        ("exa\x00mple.com", "only letters, digits and hyphens"),
    ],
)
def test_domain_invalid_is_rejected_on_the_given_field(raw: str, fragment: str) -> None:
    # Every malformed domain is one violation on the caller's field, with a clear reason.
    with pytest.raises(InvalidArgument) as exc_info:
        normalize_domain_name(raw, field="domain.name")
    assert _violation_fields(exc_info) == ["domain.name"]
    assert fragment in exc_info.value.violations[0].description


@pytest.mark.parametrize(
    ("raw", "scripts"),
    [
        ("\u0430lpha-corp.test", "Cyrillic and Latin"),  # Cyrillic a, then Latin
        ("p\u0430yp\u0430l.com", "Cyrillic and Latin"),
        ("mail.g\u03bfogle.example", "Greek and Latin"),  # Greek omicron in the second label
        ("\u0440\u0443\u0441x.example", "Cyrillic and Latin"),
        ("\u0561pple.example", "Armenian and Latin"),  # Armenian ayb
    ],
)
def test_mixed_script_look_alikes_are_refused(raw: str, scripts: str) -> None:
    # UTS #39 highly restrictive: one label mixing Latin with Cyrillic, Greek, ... is refused.
    with pytest.raises(InvalidArgument) as exc_info:
        normalize_domain_name(raw)
    assert _violation_fields(exc_info) == ["name"]
    assert f"mixes the {scripts} scripts" in exc_info.value.violations[0].description


@pytest.mark.parametrize(
    "raw",
    [
        "b\u00fccher.example",  # Latin with diacritics
        "\u043f\u0440\u0438\u043c\u0435\u0440.\u0440\u0444",  # all Cyrillic
        "\u03b5\u03bb\u03bb\u03ac\u03b4\u03b1.example",  # Greek label, Latin TLD
        "\u6771\u4eac\u30db\u30c6\u30eb.jp",  # Han + Katakana (Japanese)
        "abc\u6771\u4eac.example",  # Latin + Han
        "\ud55c\uad6d\uc5b4abc.example",  # Hangul + Latin (Korean)
        "x1-2\u0301y.example",  # digits, hyphen and a combining mark belong to every script
    ],
)
def test_single_script_and_allowed_combinations_are_accepted(raw: str) -> None:
    # One script per label, or Latin with the Chinese, Japanese or Korean combinations.
    assert normalize_domain_name(raw)[0].isascii()


def test_domain_violation_defaults_to_field_name() -> None:
    # Without an explicit field the violation is reported on "name".
    with pytest.raises(InvalidArgument) as exc_info:
        normalize_domain_name("localhost")
    assert _violation_fields(exc_info) == ["name"]


# --- record types ----------------------------------------------------------------------------


@pytest.mark.parametrize("raw_type", ["a", " A ", "A"])
def test_type_is_case_insensitive(raw_type: str) -> None:
    # Users type "a" or "Mx"; the stored type is the enum.
    assert _one(DnsRecordInput(raw_type, "@", "192.0.2.1")).type is DnsRecordType.A


@pytest.mark.parametrize("raw_type", ["SPF", "NS", "SOA", "", "A6"])
def test_unsupported_type_is_rejected(raw_type: str) -> None:
    # Only the seven tenant-manageable types are accepted; NS/SOA belong to the platform.
    assert _fields_for(DnsRecordInput(raw_type, "@", "192.0.2.1")) == ["records[0].type"]


# --- owner names -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw_name", "expected"),
    [
        ("@", "example.com"),
        ("", "example.com"),
        ("  @ ", "example.com"),
        ("www", "www.example.com"),
        ("WWW", "www.example.com"),
        ("a.b.c", "a.b.c.example.com"),
        ("www.example.com", "www.example.com"),
        ("www.example.com.", "www.example.com"),
        ("example.com", "example.com"),
        ("Example.COM.", "example.com"),
        ("*", "*.example.com"),
        ("*.www", "*.www.example.com"),
        ("bücher", "xn--bcher-kva.example.com"),
        ("_acme-challenge", "_acme-challenge.example.com"),
    ],
)
def test_owner_name_forms_resolve_to_fqdn(raw_name: str, expected: str) -> None:
    # Apex, relative, absolute, wildcard and IDN owner names all end as lowercase FQDNs.
    assert _one(DnsRecordInput("A", raw_name, "192.0.2.1")).name == expected


def test_underscore_labels_allowed_for_dmarc_and_dkim() -> None:
    # _dmarc and selector._domainkey are the whole point of TXT records for mail.
    records = normalize_record_set(
        DOMAIN,
        [
            DnsRecordInput("TXT", "_dmarc", "v=DMARC1; p=none"),
            DnsRecordInput("TXT", "s1._domainkey", "v=DKIM1; k=rsa; p=AAAA"),
        ],
    )
    assert [r.name for r in records] == ["_dmarc.example.com", "s1._domainkey.example.com"]


@pytest.mark.parametrize(
    "raw_name",
    [
        "www.other.com.",  # absolute but outside the domain
        "xexample.com.",  # suffix match on a string, not on labels
        ".",  # the root
        "www.*",  # wildcard not leftmost
        "a.*.b",  # wildcard in the middle
        "w*w",  # asterisk inside a label
        "a..b",  # empty label
        ".www",  # leading dot
        "-www",  # leading hyphen
        "www-",  # trailing hyphen
        "ww_w",  # underscore not leading
        "_",  # underscore alone
        "w w",  # space
        "@.www",  # @ is only a whole name
        "a" * 64,  # label too long
        _label_chain(250)[: -len(".com")],  # fits alone, too long with ".example.com" appended
        "4.3.2.1.in-addr.arpa.",  # reverse names only for PTR
    ],
)
def test_invalid_owner_name_is_rejected(raw_name: str) -> None:
    # Malformed names and names outside the domain are a violation on records[i].name.
    assert _fields_for(DnsRecordInput("A", raw_name, "192.0.2.1")) == ["records[0].name"]


# --- TTL -------------------------------------------------------------------------------------


def test_ttl_zero_uses_default() -> None:
    # 0 means "use the default", and the default is configurable.
    assert _one(DnsRecordInput("A", "@", "192.0.2.1")).ttl == 3600
    assert _one(DnsRecordInput("A", "@", "192.0.2.1"), default_ttl=300).ttl == 300


@pytest.mark.parametrize("ttl", [60, 86400, 604800])
def test_ttl_within_bounds_is_kept(ttl: int) -> None:
    # The bounds are inclusive.
    assert _one(DnsRecordInput("A", "@", "192.0.2.1", ttl=ttl)).ttl == ttl


@pytest.mark.parametrize("ttl", [-1, 1, 59, 604801])
def test_ttl_out_of_bounds_is_rejected(ttl: int) -> None:
    # Too-short TTLs hammer resolvers, too-long ones make mistakes stick; negatives are nonsense.
    assert _fields_for(DnsRecordInput("A", "@", "192.0.2.1", ttl=ttl)) == ["records[0].ttl"]


def test_ttl_bounds_are_configurable() -> None:
    # A caller-chosen minimum applies instead of the default 60.
    assert _fields_for(DnsRecordInput("A", "@", "192.0.2.1", ttl=200), min_ttl=300) == [
        "records[0].ttl"
    ]


# --- A / AAAA --------------------------------------------------------------------------------


def test_a_record_value_is_trimmed() -> None:
    # Surrounding whitespace from copy-paste is not part of the address.
    assert _one(DnsRecordInput("A", "@", " 192.0.2.1 ")).value == "192.0.2.1"


@pytest.mark.parametrize(
    "value", ["192.0.2.01", "256.1.1.1", "192.0.2", "", "2001:db8::1", "mail.example.com"]
)
def test_a_record_invalid_value_is_rejected(value: str) -> None:
    # Leading zeros (octal ambiguity), out-of-range octets, IPv6 and names are not IPv4.
    assert _fields_for(DnsRecordInput("A", "@", value)) == ["records[0].value"]


def test_a_record_with_ipv6_points_to_aaaa() -> None:
    # The wrong-family message tells the user which type to use instead.
    with pytest.raises(InvalidArgument) as exc_info:
        normalize_record_set(DOMAIN, [DnsRecordInput("A", "@", "2001:db8::1")])
    assert "AAAA" in exc_info.value.violations[0].description


def test_aaaa_record_is_stored_compressed_lowercase() -> None:
    # One canonical spelling so duplicates and diffs compare correctly.
    assert _one(DnsRecordInput("AAAA", "@", "2001:0DB8:0000:0000::0001")).value == "2001:db8::1"


@pytest.mark.parametrize(
    "value", ["192.0.2.1", "fe80::1%eth0", "::ffff:192.0.2.1", "2001:db8::g", ""]
)
def test_aaaa_record_invalid_value_is_rejected(value: str) -> None:
    # IPv4, zone indexes, IPv4-mapped and malformed addresses are not valid AAAA data.
    assert _fields_for(DnsRecordInput("AAAA", "@", value)) == ["records[0].value"]


# --- host-name values ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Target.Example.NET.", "target.example.net"),
        ("target.example.net", "target.example.net"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("@", "example.com"),
        ("_abc.acm-validations.aws.", "_abc.acm-validations.aws"),
    ],
)
def test_cname_target_is_normalised(value: str, expected: str) -> None:
    # Targets are absolute, lowercase A-labels; "@" means the domain; underscores are allowed.
    assert _one(DnsRecordInput("CNAME", "www", value)).value == expected


@pytest.mark.parametrize(
    "value", ["", "localhost", "192.0.2.1", "target..example", "x.123", "*.example.net", "."]
)
def test_cname_invalid_target_is_rejected(value: str) -> None:
    # Empty, single-label, IP, malformed, numeric-TLD, wildcard and root targets are invalid.
    assert _fields_for(DnsRecordInput("CNAME", "www", value)) == ["records[0].value"]


def test_mx_record_keeps_preference_and_normalises_exchange() -> None:
    # MX stores the preference in priority and the exchange as a host name.
    record = _one(DnsRecordInput("mx", "@", "MX1.Example.NET.", priority=10))
    assert (record.type, record.value, record.priority) == (
        DnsRecordType.MX,
        "mx1.example.net",
        10,
    )


@pytest.mark.parametrize("priority", [0, 65535])
def test_mx_preference_bounds_are_inclusive(priority: int) -> None:
    # Preference is a 16-bit unsigned integer.
    assert _one(DnsRecordInput("MX", "@", "mx.example.net", priority=priority)).priority == priority


@pytest.mark.parametrize("priority", [-1, 65536])
def test_mx_preference_out_of_range_is_rejected(priority: int) -> None:
    # Anything outside 0..65535 cannot be encoded.
    assert _fields_for(DnsRecordInput("MX", "@", "mx.example.net", priority=priority)) == [
        "records[0].priority"
    ]


@pytest.mark.parametrize("value", [".", "192.0.2.1", "_mx.example.net", "mail"])
def test_mx_invalid_exchange_is_rejected(value: str) -> None:
    # MX exchanges must be real host names: no null target, address, underscore or bare label.
    assert _fields_for(DnsRecordInput("MX", "@", value, priority=10)) == ["records[0].value"]


def test_mx_weight_and_port_must_be_zero() -> None:
    # Weight and port belong to SRV; setting them on MX is a client bug worth reporting.
    assert _fields_for(DnsRecordInput("MX", "@", "mx.example.net", weight=1, port=25)) == [
        "records[0].weight",
        "records[0].port",
    ]


@pytest.mark.parametrize("rtype", ["A", "TXT"])
def test_priority_weight_port_on_other_types_are_rejected(rtype: str) -> None:
    # None of the numeric fields exist for A/TXT, so non-zero values are violations.
    value = "192.0.2.1" if rtype == "A" else "hello"
    assert _fields_for(DnsRecordInput(rtype, "@", value, priority=1, weight=2, port=25)) == [
        "records[0].priority",
        "records[0].weight",
        "records[0].port",
    ]


def test_srv_record_is_normalised() -> None:
    # SRV keeps priority, weight and port and normalises the target.
    record = _one(
        DnsRecordInput("srv", "_SIP._TCP", "SIP.example.com.", priority=10, weight=60, port=5060)
    )
    assert record == DnsRecord(
        type=DnsRecordType.SRV,
        name="_sip._tcp.example.com",
        value="sip.example.com",
        ttl=3600,
        priority=10,
        weight=60,
        port=5060,
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("_imaps._tcp", "_imaps._tcp.example.com"),
        ("_sip._udp", "_sip._udp.example.com"),
        ("_xmpp._tls.chat", "_xmpp._tls.chat.example.com"),
    ],
)
def test_srv_accepts_tcp_udp_tls_protocols(name: str, expected: str) -> None:
    # _tcp, _udp and _tls are all valid protocol labels, also below a sub-name.
    assert _one(DnsRecordInput("SRV", name, "host.example.com", port=993)).name == expected


def test_srv_target_dot_means_service_not_available() -> None:
    # RFC 2782: a target of "." says the service is decidedly not offered.
    assert _one(DnsRecordInput("SRV", "_imap._tcp", ".", port=0)).value == "."


@pytest.mark.parametrize("name", ["sip._tcp", "_sip.tcp", "_sip._sctp", "_sip", "@", "_._tcp"])
def test_srv_owner_name_must_be_service_and_proto(name: str) -> None:
    # The owner must be _service._proto.name with a known protocol.
    assert _fields_for(DnsRecordInput("SRV", name, "sip.example.com", port=5060)) == [
        "records[0].name"
    ]


def test_srv_numeric_fields_out_of_range_are_each_reported() -> None:
    # All three 16-bit fields are checked and reported separately.
    record = DnsRecordInput(
        "SRV", "_sip._tcp", "sip.example.com", priority=-1, weight=65536, port=70000
    )
    assert _fields_for(record) == [
        "records[0].priority",
        "records[0].weight",
        "records[0].port",
    ]


@pytest.mark.parametrize("value", ["192.0.2.1", "", "sip"])
def test_srv_invalid_target_is_rejected(value: str) -> None:
    # SRV targets must be host names (or ".").
    assert _fields_for(DnsRecordInput("SRV", "_sip._tcp", value, port=5060)) == ["records[0].value"]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("4.3.2.1.in-addr.arpa.", "4.3.2.1.in-addr.arpa"),
        ("4.3.2.1.IN-ADDR.ARPA", "4.3.2.1.in-addr.arpa"),
        (
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa.",
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa",
        ),
        ("host", "host.example.com"),
    ],
)
def test_ptr_owner_may_be_reverse_name_or_in_domain(name: str, expected: str) -> None:
    # PTR owners are either reverse-zone names (absolute by nature) or names in the domain.
    assert _one(DnsRecordInput("PTR", name, "mail.example.com")).name == expected


@pytest.mark.parametrize("value", ["192.0.2.1", "", "mail"])
def test_ptr_value_must_be_host_name(value: str) -> None:
    # A PTR points at a host name, never at an address.
    assert _fields_for(DnsRecordInput("PTR", "4.3.2.1.in-addr.arpa.", value)) == [
        "records[0].value"
    ]


def test_ptr_owner_outside_domain_and_reverse_zones_is_rejected() -> None:
    # Being a PTR does not allow arbitrary foreign names.
    assert _fields_for(DnsRecordInput("PTR", "host.other.net.", "mail.example.com")) == [
        "records[0].name"
    ]


# --- TXT -------------------------------------------------------------------------------------


def test_txt_value_is_kept_verbatim() -> None:
    # Spaces, "=", ";", quotes, backslashes, tabs and non-ASCII are all legitimate TXT content.
    value = 'v=spf1 include:_spf.example.net ~all; x="q" \\ \tgrüße'
    record = _one(DnsRecordInput("TXT", "@", value))
    assert (record.value, record.txt_strings) == (value, (value,))


@pytest.mark.parametrize(
    "value", ["", "line1\nline2", "a\x00b", "a\rb", "bell\x07", "del\x7f", "c1\x85", "x\ud800y"]
)
def test_txt_invalid_value_is_rejected(value: str) -> None:
    # Empty text, control characters other than tab and unencodable text are rejected.
    assert _fields_for(DnsRecordInput("TXT", "@", value)) == ["records[0].value"]


def test_txt_length_limit_counts_utf8_octets() -> None:
    # 4000 octets is the limit in UTF-8, not in characters ("ü" is two octets).
    assert _one(DnsRecordInput("TXT", "@", "ü" * 2000)).value == "ü" * 2000
    assert _one(DnsRecordInput("TXT", "@", "x" * 4000)).value == "x" * 4000
    assert _fields_for(DnsRecordInput("TXT", "@", "ü" * 2000 + "x")) == ["records[0].value"]


def test_txt_dkim_value_splits_into_255_octet_strings() -> None:
    # A 600-character DKIM key must become 255 + 255 + 90 octet strings that rejoin exactly.
    value = "v=DKIM1; k=rsa; p=" + "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8A"[:30] * 20
    value = value[:600]
    assert len(value) == 600
    record = _one(DnsRecordInput("TXT", "s1._domainkey", value))
    assert [len(s) for s in record.txt_strings] == [255, 255, 90]
    assert "".join(record.txt_strings) == value


def test_txt_split_never_cuts_a_multibyte_character() -> None:
    # "€" is three octets; the first string stops at 253 octets rather than splitting one.
    value = "a" + "€" * 100
    record = _one(DnsRecordInput("TXT", "@", value))
    assert [len(s.encode("utf-8")) for s in record.txt_strings] == [253, 48]
    assert "".join(record.txt_strings) == value


def test_non_txt_records_have_no_txt_strings() -> None:
    # txt_strings is only meaningful for TXT.
    assert _one(DnsRecordInput("A", "@", "192.0.2.1")).txt_strings == ()


# --- set-level rules -------------------------------------------------------------------------


def test_cname_at_apex_is_rejected() -> None:
    # The apex holds SOA/NS, which a CNAME may not coexist with.
    assert _fields_for(DnsRecordInput("CNAME", "@", "target.example.net")) == ["records[0].name"]


def test_cname_after_other_record_at_same_name_is_rejected() -> None:
    # RFC 1034 §3.6.2: a CNAME must be alone at its name; the later record is flagged.
    assert _fields_for(
        DnsRecordInput("A", "www", "192.0.2.1"),
        DnsRecordInput("CNAME", "www.example.com.", "target.example.net"),
    ) == ["records[1].name"]


def test_other_record_after_cname_at_same_name_is_rejected() -> None:
    # The rule is symmetric: whichever record comes second gets the violation.
    assert _fields_for(
        DnsRecordInput("CNAME", "www", "target.example.net"),
        DnsRecordInput("TXT", "WWW", "hello"),
    ) == ["records[1].name"]


def test_two_cnames_at_same_name_are_rejected() -> None:
    # A name can alias only one target.
    assert _fields_for(
        DnsRecordInput("CNAME", "www", "a.example.net"),
        DnsRecordInput("CNAME", "www", "b.example.net"),
    ) == ["records[1].name"]


def test_cname_with_records_at_other_names_is_accepted() -> None:
    # Records below or beside a CNAME name do not conflict with it.
    records = normalize_record_set(
        DOMAIN,
        [
            DnsRecordInput("CNAME", "www", "target.example.net"),
            DnsRecordInput("TXT", "_acme-challenge.www", "token"),
            DnsRecordInput("A", "@", "192.0.2.1"),
        ],
    )
    assert [r.type for r in records] == [DnsRecordType.CNAME, DnsRecordType.TXT, DnsRecordType.A]


def test_exact_duplicate_is_rejected_on_later_record() -> None:
    # Same type, name and (normalised) value twice is a duplicate.
    assert _fields_for(
        DnsRecordInput("A", "www", "192.0.2.1"),
        DnsRecordInput("A", "WWW.example.com.", " 192.0.2.1 "),
    ) == ["records[1].value"]


def test_duplicate_aaaa_detected_after_compression() -> None:
    # Different spellings of one IPv6 address are the same record.
    assert _fields_for(
        DnsRecordInput("AAAA", "@", "2001:db8::1"),
        DnsRecordInput("AAAA", "@", "2001:0db8:0:0:0:0:0:1"),
    ) == ["records[1].value"]


def test_duplicate_srv_requires_equal_numbers() -> None:
    # SRV records differing only in port are distinct; identical ones are duplicates.
    distinct = normalize_record_set(
        DOMAIN,
        [
            DnsRecordInput("SRV", "_sip._tcp", "sip.example.com", priority=10, weight=5, port=5060),
            DnsRecordInput("SRV", "_sip._tcp", "sip.example.com", priority=10, weight=5, port=5061),
        ],
    )
    assert len(distinct) == 2
    srv = DnsRecordInput("SRV", "_sip._tcp", "sip.example.com", priority=10, weight=5, port=5060)
    assert _fields_for(srv, srv) == ["records[1].value"]


def test_mx_same_host_different_preference_is_not_duplicate() -> None:
    # Preference is part of MX rdata, so these are two records.
    records = normalize_record_set(
        DOMAIN,
        [
            DnsRecordInput("MX", "@", "mx.example.net", priority=10),
            DnsRecordInput("MX", "@", "mx.example.net", priority=20),
        ],
    )
    assert [r.priority for r in records] == [10, 20]


def test_txt_values_differing_in_case_are_not_duplicates() -> None:
    # TXT text is case-sensitive (tokens, keys), unlike host names.
    records = normalize_record_set(
        DOMAIN, [DnsRecordInput("TXT", "@", "Token"), DnsRecordInput("TXT", "@", "token")]
    )
    assert len(records) == 2


def test_different_ttls_in_one_rrset_are_rejected() -> None:
    # RFC 2181 §5.2: all records of an RRset share one TTL; the later one is flagged.
    assert _fields_for(
        DnsRecordInput("A", "www", "192.0.2.1", ttl=300),
        DnsRecordInput("A", "www", "192.0.2.2", ttl=600),
    ) == ["records[1].ttl"]


def test_ttl_comparison_uses_resolved_default() -> None:
    # ttl=0 resolves to the default, so it matches an explicit TTL equal to the default.
    records = normalize_record_set(
        DOMAIN,
        [
            DnsRecordInput("A", "www", "192.0.2.1", ttl=0),
            DnsRecordInput("A", "www", "192.0.2.2", ttl=3600),
        ],
    )
    assert [r.ttl for r in records] == [3600, 3600]


def test_different_ttls_across_types_or_names_are_accepted() -> None:
    # Only records of the same name and type form an RRset.
    records = normalize_record_set(
        DOMAIN,
        [
            DnsRecordInput("A", "www", "192.0.2.1", ttl=300),
            DnsRecordInput("AAAA", "www", "2001:db8::1", ttl=600),
            DnsRecordInput("A", "mail", "192.0.2.1", ttl=900),
        ],
    )
    assert [r.ttl for r in records] == [300, 600, 900]


def test_more_than_max_records_is_a_set_violation() -> None:
    # The size limit is reported on "records" itself.
    records = [DnsRecordInput("A", f"h{i}", "192.0.2.1") for i in range(3)]
    assert _fields_for(*records, max_records=2) == ["records"]
    assert len(normalize_record_set(DOMAIN, records, max_records=3)) == 3


def test_empty_record_set_is_valid() -> None:
    # Clearing all records of a domain is allowed.
    assert normalize_record_set(DOMAIN, []) == []


def test_all_violations_are_collected_in_one_error() -> None:
    # One round trip reports every problem, in record order, with exact field paths.
    assert _fields_for(
        DnsRecordInput("A", "ok", "192.0.2.1"),
        DnsRecordInput("BOGUS", "x y", "v", ttl=5),
        DnsRecordInput("A", "www", "999.0.0.1", port=80),
        DnsRecordInput("MX", "@", "mx.example.net", priority=70000),
        DnsRecordInput("A", "ok", "192.0.2.1"),
    ) == [
        "records[1].type",
        "records[1].name",
        "records[1].ttl",
        "records[2].value",
        "records[2].port",
        "records[3].priority",
        "records[4].value",
    ]


def test_result_preserves_input_order_and_fields() -> None:
    # Callers rely on output[i] corresponding to input[i].
    records = normalize_record_set(
        DOMAIN,
        [
            DnsRecordInput("TXT", "@", "v=spf1 -all", ttl=300),
            DnsRecordInput("A", "@", "192.0.2.1"),
            DnsRecordInput("MX", "@", "mx.example.net", priority=5),
        ],
    )
    assert records == [
        DnsRecord(
            DnsRecordType.TXT, "example.com", "v=spf1 -all", 300, txt_strings=("v=spf1 -all",)
        ),
        DnsRecord(DnsRecordType.A, "example.com", "192.0.2.1", 3600),
        DnsRecord(DnsRecordType.MX, "example.com", "mx.example.net", 3600, priority=5),
    ]


def test_idn_domain_records_are_under_a_label_domain() -> None:
    # Record names under an IDN domain use the A-label form of the domain.
    domain, _ = normalize_domain_name("bücher.example")
    (record,) = normalize_record_set(domain, [DnsRecordInput("A", "www", "192.0.2.1")])
    assert record.name == "www.xn--bcher-kva.example"


# --- zone file -------------------------------------------------------------------------------


def test_zone_file_text_for_simple_records() -> None:
    # The exact layout: origin, default TTL, then owner/TTL/IN/type/rdata per record.
    records = normalize_record_set(
        DOMAIN,
        [
            DnsRecordInput("A", "@", "192.0.2.1"),
            DnsRecordInput("MX", "@", "mx.example.net", priority=10, ttl=300),
            DnsRecordInput("TXT", "_dmarc", 'v=DMARC1; p=none; note="a\\b"'),
            DnsRecordInput("SRV", "_imap._tcp", ".", ttl=600),
        ],
    )
    assert to_zone_file(DOMAIN, records) == (
        "$ORIGIN example.com.\n"
        "$TTL 3600\n"
        "@\t3600\tIN\tA\t192.0.2.1\n"
        "@\t300\tIN\tMX\t10 mx.example.net.\n"
        '_dmarc\t3600\tIN\tTXT\t"v=DMARC1; p=none; note=\\"a\\\\b\\""\n'
        "_imap._tcp\t600\tIN\tSRV\t0 0 0 .\n"
    )


def test_zone_file_round_trips_through_dnspython() -> None:
    # Every record type must parse back with dnspython to the same data.
    dkim = "v=DKIM1; k=rsa; p=" + "Q" * 582
    records = normalize_record_set(
        DOMAIN,
        [
            DnsRecordInput("A", "@", "192.0.2.1"),
            DnsRecordInput("A", "@", "192.0.2.2"),
            DnsRecordInput("AAAA", "www", "2001:db8::1", ttl=300),
            DnsRecordInput("CNAME", "shop", "Shops.Example.NET."),
            DnsRecordInput("CNAME", "*.apps", "lb.example.net"),
            DnsRecordInput("MX", "@", "mx1.example.net", priority=10),
            DnsRecordInput("MX", "@", "mx2.example.net", priority=20),
            DnsRecordInput("TXT", "@", 'v=spf1 a mx ~all "quoted" back\\slash\ttab'),
            DnsRecordInput("TXT", "s1._domainkey", dkim),
            DnsRecordInput("TXT", "bücher", "grüße " + "€" * 100),
            DnsRecordInput("SRV", "_sip._tcp", "sip.example.com", priority=1, weight=2, port=5060),
            DnsRecordInput("SRV", "_imap._tcp", "."),
            DnsRecordInput("PTR", "host", "mail.example.com"),
        ],
    )
    text = to_zone_file(DOMAIN, records)
    zone = dns.zone.from_text(text, origin=DOMAIN, check_origin=False)

    origin = dns.name.from_text(DOMAIN)
    seen = 0
    for record in records:
        node_name = dns.name.from_text(record.name).relativize(origin)
        rdataset = zone.find_rdataset(node_name, dns.rdatatype.from_text(record.type.value))
        assert rdataset.ttl == record.ttl
        # The zone stores in-zone names relative; render them absolute for comparison.
        texts = {rdata.to_text(origin=zone.origin, relativize=False) for rdata in rdataset}
        if record.type is DnsRecordType.TXT:
            parsed = {tuple(rdata.strings) for rdata in rdataset}
            assert tuple(s.encode("utf-8") for s in record.txt_strings) in parsed
        elif record.type in (DnsRecordType.A, DnsRecordType.AAAA):
            assert record.value in texts
        elif record.type is DnsRecordType.MX:
            assert f"{record.priority} {record.value}." in texts
        elif record.type is DnsRecordType.SRV:
            target = "." if record.value == "." else record.value + "."
            assert f"{record.priority} {record.weight} {record.port} {target}" in texts
        else:
            assert f"{record.value}." in texts
        seen += 1
    assert seen == len(records)
    # Nothing extra appeared: the zone holds exactly as many rdatas as records went in.
    assert sum(len(rds) for _, rds in zone.iterate_rdatasets()) == len(records)


def test_zone_file_dkim_txt_rejoins_to_original() -> None:
    # The split TXT strings read back from the zone concatenate to the original value.
    value = ("v=DKIM1; k=rsa; p=" + "MIIBIjANBgkqhkiG9w0BAQEFAAOC" * 30)[:600]
    records = normalize_record_set(DOMAIN, [DnsRecordInput("TXT", "s1._domainkey", value)])
    zone = dns.zone.from_text(to_zone_file(DOMAIN, records), origin=DOMAIN, check_origin=False)
    (rdata,) = zone.find_rdataset("s1._domainkey", "TXT")
    strings = rdata.strings
    assert len(strings) == 3
    assert b"".join(strings).decode("utf-8") == value


def test_zone_file_appends_extra_records_and_comments_out_of_zone_ptr() -> None:
    # Platform records come after the tenant's; reverse PTRs cannot live in this zone.
    records = normalize_record_set(
        DOMAIN, [DnsRecordInput("PTR", "4.3.2.1.in-addr.arpa.", "mail.example.com")]
    )
    extra = [DnsRecord(DnsRecordType.MX, DOMAIN, "mx.azora.example", 3600, priority=10)]
    text = to_zone_file(DOMAIN + ".", records, extra=extra)
    assert text.splitlines()[2:] == [
        "; out of zone, not served: 4.3.2.1.in-addr.arpa. 3600 IN PTR mail.example.com.",
        "@\t3600\tIN\tMX\t10 mx.azora.example.",
    ]
    zone = dns.zone.from_text(text, origin=DOMAIN, check_origin=False)
    assert [rds.rdtype for _, rds in zone.iterate_rdatasets()] == [dns.rdatatype.MX]


def test_zone_file_txt_without_txt_strings_is_split_on_render() -> None:
    # Hand-built TXT records (e.g. extra) without txt_strings still render valid strings.
    extra = [DnsRecord(DnsRecordType.TXT, "azora._domainkey.example.com", "k" * 300, 3600)]
    text = to_zone_file(DOMAIN, [], extra=extra)
    zone = dns.zone.from_text(text, origin=DOMAIN, check_origin=False)
    (rdata,) = zone.find_rdataset("azora._domainkey", "TXT")
    assert [len(s) for s in rdata.strings] == [255, 45]
