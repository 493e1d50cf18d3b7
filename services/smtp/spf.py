"""SPF record builder (RFC 7208): mechanisms, qualifiers, ``all`` or ``redirect``, lookup budget.

The record is the relay's mechanism (``a:<host>``, or ``ip4:``/``ip6:`` for an address) followed
by the caller's mechanisms and the final ``all`` (or ``redirect=``). Every term is checked
against the RFC's grammar, including macro syntax in domain-specs. Then the DNS lookups the
record costs are counted the way receivers do (§4.6.4): ``include``, ``a``, ``mx``, ``ptr``,
``exists`` and ``redirect`` each cost one, and an ``include``/``redirect`` also costs whatever
the target's own record costs, which is fetched through DNS, recursively. More than 10 is a
permerror at every receiver, so such records are refused rather than published.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from services.core.dns import DnsResolver, LookupOutcome
from services.core.dns_names import MAX_TXT_OCTETS, split_txt
from services.core.errors import FieldViolation, InvalidArgument
from services.smtp.models import SpfMechanismInput, SpfQualifier, SpfRecord
from services.smtp.relay_settings import parse_ip_literal

LOOKUP_LIMIT = 10
KINDS = ("include", "ip4", "ip6", "a", "mx", "exists")
_LOOKUP_KINDS = frozenset({"include", "a", "mx", "ptr", "exists"})
# Above this a record may no longer fit a 512-byte UDP answer with its headers (§3.4).
_UDP_SAFE_OCTETS = 450
_MAX_MECHANISMS = 50
# Counting stops this far over the limit (a loop of includes, or a huge provider tree).
_COUNT_CAP = 3 * LOOKUP_LIMIT
_MACRO_EXPAND = r"%\{[slodiph][0-9]*r?[.\-+,/_=]*\}|%%|%_|%-"
_MACRO_STRING_RE = re.compile(rf"^(?:{_MACRO_EXPAND}|[\x21-\x24\x26-\x7e])*$")
_ENDS_WITH_MACRO_RE = re.compile(rf"(?:{_MACRO_EXPAND})$")
_TOPLABEL_RE = re.compile(r"^(?=.*[a-z])[a-z0-9](?:[a-z0-9-]*[a-z0-9])?$")
_LABEL_RE = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_SPF_RE = re.compile(r"^v=spf1(?:\s|$)", re.IGNORECASE)


class _TermError(ValueError):
    """A term is malformed; the message is user-facing."""


@dataclass(frozen=True, slots=True)
class Term:
    """One validated mechanism: qualifier ("" = implicit pass), kind and argument text."""

    qualifier: str
    kind: str
    argument: str  # everything after the kind, e.g. ":example.com/24" or "" for a bare "mx"

    def render(self) -> str:
        """The term as written in the record."""
        return f"{self.qualifier}{self.kind}{self.argument}"

    @property
    def target(self) -> str:
        """The domain-spec of include/exists/a/mx ("" when none)."""
        if not self.argument.startswith(":"):
            return ""
        return self.argument[1:].split("/", 1)[0]


def is_spf_record(value: str) -> bool:
    """Whether a TXT value is an SPF record (starts with ``v=spf1``)."""
    return bool(_SPF_RE.match(value.strip()))


def check_domain_spec(raw: str) -> str:
    """Validate a domain-spec (a domain name, possibly with macros) and return it lowercased.

    Raises:
        _TermError: with a description.
    """
    text = raw.strip()
    if not text:
        raise _TermError("a domain is required")
    if "%" in text:
        if not _MACRO_STRING_RE.match(text):
            raise _TermError(
                f"{text[:60]!r} has malformed macros: use %{{letter}} with letters "
                "s, l, o, d, i, p, h (RFC 7208 §7), or %% for a literal percent sign"
            )
        if not _ENDS_WITH_MACRO_RE.search(text):
            _check_domain_end(text.rsplit("}", 1)[-1])
        return text
    text = text.rstrip(".").lower()
    if len(text) > 253:
        raise _TermError("is longer than 253 characters")
    labels = text.split(".")
    if len(labels) < 2:
        raise _TermError(f"{text!r} must be a fully-qualified domain (e.g. spf.example.com)")
    for label in labels:
        if not _LABEL_RE.match(label):
            raise _TermError(
                f"label {label!r} may contain only letters, digits, hyphens and underscores"
            )
    if not _TOPLABEL_RE.match(labels[-1]):
        raise _TermError(f"{labels[-1]!r} is not a valid top-level label")
    return text


def _check_domain_end(tail: str) -> None:
    parts = tail.rstrip(".").split(".")
    if len(parts) < 2 or not _TOPLABEL_RE.match(parts[-1].lower()):
        raise _TermError("must end with a top-level label (e.g. .com) or a macro")


def _cidr(text: str, *, maximum: int) -> str:
    if not text.isdigit() or int(text) > maximum or (len(text) > 1 and text[0] == "0"):
        raise _TermError(f"prefix length must be 0-{maximum}; got /{text}")
    return text


def _dual_cidr(text: str) -> str:
    """Validate ``/24``, ``//64`` or ``/24//64`` (a and mx) and return it."""
    if not text:
        return ""
    if not text.startswith("/"):
        raise _TermError("a prefix length starts with /")
    v4: str | None = None
    v6: str | None = None
    if text.startswith("//"):
        v6 = text[2:]
    else:
        v4, sep, rest = text[1:].partition("//")
        v6 = rest if sep else None
    out = ""
    if v4 is not None:
        out += "/" + _cidr(v4, maximum=32)
    if v6 is not None:
        out += "//" + _cidr(v6, maximum=128)
    return out


def _address_argument(kind: str, value: str) -> str:
    text = value.strip()
    if not text:
        raise _TermError(f"{kind} needs an address or network, e.g. {_example(kind)}")
    address_text, sep, prefix = text.partition("/")
    address = parse_ip_literal(address_text)
    version = 4 if kind == "ip4" else 6
    if address is None or address.version != version or address_text.startswith("["):
        other = "ip6" if version == 4 else "ip4"
        if address is not None and address.version != version:
            raise _TermError(f"{text!r} is an IPv{address.version} address; use {other}")
        raise _TermError(f"{text!r} is not an IPv{version} address or network")
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        raise _TermError("IPv4-mapped addresses belong in ip4")
    maximum = 32 if version == 4 else 128
    if sep:
        _cidr(prefix, maximum=maximum)
        if int(prefix) == maximum:
            return f":{address}"
        return f":{address}/{prefix}"
    return f":{address}"


def _example(kind: str) -> str:
    return {"ip4": "ip4:192.0.2.0/24", "ip6": "ip6:2001:db8::/32"}.get(kind, kind)


def parse_term(raw: SpfMechanismInput) -> Term:
    """Validate one caller-supplied mechanism.

    Raises:
        _TermError: on its kind or value (the message says which).
    """
    kind = raw.kind.strip().lower()
    qualifier = "" if raw.qualifier in (None, SpfQualifier.PASS) else raw.qualifier.value
    value = raw.value.strip()
    if kind in ("include", "exists"):
        return Term(qualifier, kind, ":" + check_domain_spec(value))
    if kind in ("ip4", "ip6"):
        return Term(qualifier, kind, _address_argument(kind, value))
    if kind in ("a", "mx"):
        domain, slash, cidr = value.partition("/")
        argument = f":{check_domain_spec(domain)}" if domain else ""
        return Term(qualifier, kind, argument + _dual_cidr(slash + cidr))
    raise _KindError(kind)


class _KindError(_TermError):
    """The mechanism kind itself is wrong."""

    def __init__(self, kind: str) -> None:
        hints = {
            "all": 'set the final policy with the "all" field instead',
            "redirect": 'set the "redirect" field instead',
            "ptr": "ptr is deprecated and slow (RFC 7208 §5.5); use a, mx, ip4 or ip6",
            "exp": "explanations (exp=) are not supported",
        }
        super().__init__(hints.get(kind, f"must be one of {', '.join(KINDS)}; got {kind!r}"))


def relay_term(host: str) -> Term:
    """The mechanism that authorises a relay: its address, or ``a:<host>``."""
    address = parse_ip_literal(host)
    if address is not None:
        return Term("", f"ip{address.version}", f":{address}")
    return Term("", "a", f":{host}")


def _record_terms(record: str) -> list[tuple[str, str]]:
    """(name, argument) of each term of a published record, qualifiers dropped."""
    terms: list[tuple[str, str]] = []
    for term in record.split()[1:]:
        term = term.lstrip("+-~?")
        match = re.match(r"^([a-zA-Z][a-zA-Z0-9_.\-]*)([:=/].*)?$", term)
        if match:
            terms.append((match.group(1).lower(), match.group(2) or ""))
    return terms


@dataclass
class _Budget:
    """Running lookup count across the whole include tree."""

    warnings: list[str]
    count: int = 0
    capped: bool = False


class SpfBuilder:
    """Builds and validates SPF records, resolving nested includes through DNS."""

    def __init__(self, dns: DnsResolver) -> None:
        self._dns = dns

    async def build(
        self,
        *,
        domain: str,
        relay_host: str | None,
        mechanisms: Sequence[SpfMechanismInput],
        all_qualifier: SpfQualifier | None,
        redirect: str,
    ) -> SpfRecord:
        """Build the record for `domain`.

        Args:
            domain: the domain (A-label).
            relay_host: the configured relay host to authorise, or None.
            mechanisms: the caller's extra mechanisms, in order.
            all_qualifier: qualifier of the final ``all`` (None = softfail ``~all``).
            redirect: domain whose policy applies instead of ``all`` ("" for none).

        Raises:
            InvalidArgument: on ``mechanisms[i].kind``/``mechanisms[i].value``, ``all``,
                ``redirect`` or ``mechanisms`` (lookup budget, size).
        """
        violations: list[FieldViolation] = []
        terms: list[tuple[int | None, Term]] = []  # (request index or None for the relay)
        if relay_host:
            terms.append((None, relay_term(relay_host)))
        if len(mechanisms) > _MAX_MECHANISMS:
            raise InvalidArgument.single(
                "mechanisms", f"at most {_MAX_MECHANISMS} mechanisms; got {len(mechanisms)}"
            )
        for index, raw in enumerate(mechanisms):
            try:
                term = parse_term(raw)
            except _KindError as exc:
                violations.append(FieldViolation(f"mechanisms[{index}].kind", str(exc)))
                continue
            except _TermError as exc:
                violations.append(FieldViolation(f"mechanisms[{index}].value", str(exc)))
                continue
            if any(t.render().lstrip("+-~?") == term.render().lstrip("+-~?") for _, t in terms):
                continue  # e.g. the caller repeated the relay's own mechanism
            terms.append((index, term))
        redirect_target = ""
        if redirect.strip():
            try:
                redirect_target = check_domain_spec(redirect)
            except _TermError as exc:
                violations.append(FieldViolation("redirect", str(exc)))
            if all_qualifier is not None:
                violations.append(
                    FieldViolation(
                        "all", "leave it unset with a redirect: a record with all ignores redirect"
                    )
                )
        elif all_qualifier is SpfQualifier.PASS:
            violations.append(
                FieldViolation("all", "+all would authorise every host on the Internet")
            )
        if violations:
            raise InvalidArgument(violations)

        budget = _Budget(warnings=[])
        costs: list[str] = []
        for position, term in terms:
            spent = await self._term_cost(term, budget, {domain}, position, violations)
            if spent:
                costs.append(f"{term.render()} costs {spent}")
        if redirect_target:
            before = budget.count
            budget.count += 1
            await self._nested(redirect_target, budget, {domain}, "redirect", violations)
            costs.append(f"redirect={redirect_target} costs {budget.count - before}")
        if violations:
            raise InvalidArgument(violations)
        if budget.count > LOOKUP_LIMIT:
            raise InvalidArgument.single(
                "mechanisms",
                f"the record needs {'at least ' if budget.capped else ''}{budget.count} DNS "
                f"lookups; receivers allow "
                f"{LOOKUP_LIMIT} (RFC 7208 §4.6.4): {'; '.join(costs)}",
            )

        parts = ["v=spf1", *(t.render() for _, t in terms)]
        if redirect_target:
            parts.append(f"redirect={redirect_target}")
        else:
            qualifier = (all_qualifier or SpfQualifier.SOFTFAIL).value
            parts.append(f"{'' if qualifier == '+' else qualifier}all")
        value = " ".join(parts)
        size = len(value.encode())
        if size > MAX_TXT_OCTETS:
            raise InvalidArgument.single(
                "mechanisms", f"the record would be {size} octets; the maximum is {MAX_TXT_OCTETS}"
            )
        warnings = budget.warnings
        if size > _UDP_SAFE_OCTETS:
            warnings.append(
                f"the record is {size} octets; above {_UDP_SAFE_OCTETS} some receivers need TCP "
                "to fetch it (RFC 7208 §3.4): consider an include"
            )
        if not relay_host:
            warnings.append("no relay is configured, so no relay mechanism was added")
        published = await self._published(domain, warnings)
        return SpfRecord(
            record_name=domain,
            value=value,
            strings=split_txt(value),
            dns_lookups=budget.count,
            warnings=tuple(warnings),
            published=published,
        )

    async def _published(self, domain: str, warnings: list[str]) -> tuple[str, ...]:
        lookup = await self._dns.txt(domain)
        if not lookup.outcome.definite:
            warnings.append(f"could not read the SPF records at {domain}: {lookup.detail}")
            return ()
        found = tuple(v for v in lookup.values if is_spf_record(v))
        if len(found) > 1:
            warnings.append(
                f"{domain} publishes {len(found)} SPF records; receivers treat more than one as "
                "a permanent error (RFC 7208 §3.2): replace them all with this single record"
            )
        return found

    async def _term_cost(
        self,
        term: Term,
        budget: _Budget,
        path: set[str],
        index: int | None,
        violations: list[FieldViolation],
    ) -> int:
        if term.kind not in _LOOKUP_KINDS:
            return 0
        before = budget.count
        budget.count += 1
        if term.kind == "include":
            field = f"mechanisms[{index}].value" if index is not None else "mechanisms"
            await self._nested(term.target, budget, path, field, violations)
        return budget.count - before

    async def _nested(
        self,
        target: str,
        budget: _Budget,
        path: set[str],
        field: str,
        violations: list[FieldViolation],
    ) -> None:
        """Add the lookups of `target`'s own record (an include or redirect target)."""
        if budget.count > _COUNT_CAP:
            budget.capped = True  # far over already: stop fetching, report "at least"
            return
        if "%" in target:
            budget.warnings.append(
                f"{target} contains macros, so its own lookups cannot be counted in advance"
            )
            return
        if target in path:
            violations.append(FieldViolation(field, f"{target} includes itself (a loop)"))
            return
        lookup = await self._dns.txt(target)
        if not lookup.outcome.definite:
            budget.warnings.append(
                f"could not fetch the SPF record of {target} ({lookup.detail}); "
                "its lookups are not counted"
            )
            return
        records = [v for v in lookup.values if is_spf_record(v)]
        if lookup.outcome is not LookupOutcome.FOUND or not records:
            violations.append(
                FieldViolation(field, f"{target} publishes no SPF record (a permerror)")
            )
            return
        if len(records) > 1:
            violations.append(
                FieldViolation(field, f"{target} publishes {len(records)} SPF records")
            )
            return
        terms = _record_terms(records[0])
        has_all = any(name == "all" for name, _ in terms)
        for name, argument in terms:
            if name in _LOOKUP_KINDS:
                budget.count += 1
                if name == "include" and argument.startswith(":"):
                    await self._nested(argument[1:], budget, path | {target}, field, violations)
            elif name == "redirect" and not has_all and argument.startswith("="):
                budget.count += 1
                await self._nested(argument[1:], budget, path | {target}, field, violations)


__all__ = ["KINDS", "LOOKUP_LIMIT", "SpfBuilder", "Term", "check_domain_spec", "is_spf_record"]
