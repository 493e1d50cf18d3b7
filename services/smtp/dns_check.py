"""Compares what a domain publishes in DNS with what it should publish.

One `RecordCheck` per expected record: the ownership token, each DKIM key, SPF, DMARC, DMARC
report authorisations and MX. ``ok`` means published as expected, ``missing`` that nothing
relevant is there, ``different`` that something else is (the check lists what), and ``error``
that the lookup itself failed (timeout, SERVFAIL) and says nothing about the record.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from services.core.clock import Clock
from services.core.dns import DnsResolver, Lookup, LookupOutcome
from services.core.ownership import expected_record, ownership_values
from services.smtp.dkim_keys import parse_tags, published_matches, record_name, record_value
from services.smtp.models import CheckStatus, DkimKey, RecordCheck
from services.smtp.spf import is_spf_record

_DMARC_RE = re.compile(r"^\s*v\s*=\s*DMARC1\s*(?:;|$)", re.IGNORECASE)


def _normalize_spf(value: str) -> str:
    return " ".join(value.lower().split())


def _is_dmarc(value: str) -> bool:
    # RFC 7489 §6.4: v=DMARC1 must be the first tag; anything else at _dmarc is not a record.
    return bool(_DMARC_RE.match(value))


def _dmarc_tags(value: str) -> dict[str, str]:
    tags = parse_tags(value)
    # Tag names and policy words are case-insensitive; report URIs are compared as written.
    return {k: (v if k in ("rua", "ruf") else v.lower()) for k, v in tags.items()}


class RecordChecker:
    """Looks records up and judges them."""

    def __init__(self, *, dns: DnsResolver, clock: Clock) -> None:
        self._dns = dns
        self._clock = clock

    def _result(
        self,
        purpose: str,
        rdtype: str,
        lookup: Lookup,
        expected: str,
        status: CheckStatus,
        found: tuple[str, ...],
        detail: str,
    ) -> RecordCheck:
        return RecordCheck(
            purpose=purpose,
            type=rdtype,
            record_name=lookup.name,
            expected=expected,
            found=found[:20],
            status=status,
            checked_at=self._clock.now(),
            detail=detail,
        )

    def _failed(self, purpose: str, rdtype: str, lookup: Lookup, expected: str) -> RecordCheck:
        return self._result(purpose, rdtype, lookup, expected, CheckStatus.ERROR, (), lookup.detail)

    async def dkim(self, domain: str, key: DkimKey) -> RecordCheck:
        """Is the key's TXT record published with this public key?"""
        expected = record_value(key.algorithm, key.public_key)
        lookup = await self._dns.txt(record_name(key.selector, domain))
        if not lookup.outcome.definite:
            return self._failed("dkim", "TXT", lookup, expected)
        if not lookup.values:
            return self._result(
                "dkim", "TXT", lookup, expected, CheckStatus.MISSING, (), lookup.detail
            )
        if any(published_matches(v, key.algorithm, key.public_key) for v in lookup.values):
            return self._result(
                "dkim", "TXT", lookup, expected, CheckStatus.OK, lookup.values, "published"
            )
        return self._result(
            "dkim",
            "TXT",
            lookup,
            expected,
            CheckStatus.DIFFERENT,
            lookup.values,
            "a record is published at this name, but not with this key",
        )

    async def verification(self, domain: str, token: str) -> RecordCheck:
        """Is the ownership token published at the domain?"""
        expected = expected_record(token)
        lookup = await self._dns.txt(domain)
        if not lookup.outcome.definite:
            return self._failed("verification", "TXT", lookup, expected)
        ours = ownership_values(lookup.values)
        if expected in ours:
            return self._result(
                "verification", "TXT", lookup, expected, CheckStatus.OK, ours, "published"
            )
        if ours:
            return self._result(
                "verification",
                "TXT",
                lookup,
                expected,
                CheckStatus.DIFFERENT,
                ours,
                "an ownership record with a different token is published",
            )
        return self._result(
            "verification",
            "TXT",
            lookup,
            expected,
            CheckStatus.MISSING,
            (),
            lookup.detail or "no ownership record",
        )

    async def spf(self, domain: str, expected: str | None) -> RecordCheck:
        """Is exactly one SPF record published (the generated one, if one was generated)?"""
        return await self._single_policy(
            purpose="spf",
            name=domain,
            expected=expected,
            placeholder="v=spf1 ... (one SPF record)",
            is_record=is_spf_record,
            same=lambda a, b: _normalize_spf(a) == _normalize_spf(b),
            missing_found_all=False,
            several="receivers need exactly one",
        )

    async def dmarc(self, domain: str, expected: str | None) -> RecordCheck:
        """Is exactly one DMARC record published (the generated one, if one was generated)?"""
        return await self._single_policy(
            purpose="dmarc",
            name=f"_dmarc.{domain}",
            expected=expected,
            placeholder="v=DMARC1; p=... (one DMARC record)",
            is_record=_is_dmarc,
            same=lambda a, b: _dmarc_tags(a) == _dmarc_tags(b),
            missing_found_all=True,
            several="receivers ignore them all",
        )

    async def _single_policy(
        self,
        *,
        purpose: str,
        name: str,
        expected: str | None,
        placeholder: str,
        is_record: Callable[[str], bool],
        same: Callable[[str, str], bool],
        missing_found_all: bool,
        several: str,
    ) -> RecordCheck:
        """Check the one-policy-record rule that SPF and DMARC share.

        Exactly one policy TXT record at `name`, equal to the last generated one when there is
        one. `missing_found_all` shows the other TXT values found when the policy is missing.
        """
        lookup = await self._dns.txt(name)
        shown = expected or placeholder
        if not lookup.outcome.definite:
            return self._failed(purpose, "TXT", lookup, shown)
        records = tuple(v for v in lookup.values if is_record(v))
        label = purpose.upper()
        if not records:
            found = lookup.values if missing_found_all else ()
            return self._result(
                purpose, "TXT", lookup, shown, CheckStatus.MISSING, found, f"no {label} record"
            )
        if len(records) > 1:
            return self._result(
                purpose,
                "TXT",
                lookup,
                shown,
                CheckStatus.DIFFERENT,
                records,
                f"{len(records)} {label} records are published; {several}",
            )
        if expected is not None and not same(records[0], expected):
            return self._result(
                purpose,
                "TXT",
                lookup,
                shown,
                CheckStatus.DIFFERENT,
                records,
                f"the published {label} record is not the one generated last",
            )
        return self._result(purpose, "TXT", lookup, shown, CheckStatus.OK, records, "published")

    async def report_authorization(self, name: str) -> RecordCheck:
        """Does a report domain authorise our reports (``v=DMARC1`` at `name`)?"""
        lookup = await self._dns.txt(name)
        purpose, expected = "dmarc_report_authorization", "v=DMARC1"
        if not lookup.outcome.definite:
            return self._failed(purpose, "TXT", lookup, expected)
        records = tuple(v for v in lookup.values if _is_dmarc(v))
        if records:
            return self._result(purpose, "TXT", lookup, expected, CheckStatus.OK, records, "")
        status = CheckStatus.DIFFERENT if lookup.values else CheckStatus.MISSING
        return self._result(
            purpose,
            "TXT",
            lookup,
            expected,
            status,
            lookup.values,
            "the report domain does not authorise reports about this domain",
        )

    async def mx(self, domain: str) -> RecordCheck:
        """Does the domain have MX records (bounces and DMARC reports need one)?"""
        lookup, hosts = await self._dns.mx(domain)
        expected = "at least one MX record"
        if not lookup.outcome.definite:
            return self._failed("mx", "MX", lookup, expected)
        if lookup.outcome is not LookupOutcome.FOUND or not hosts:
            return self._result(
                "mx",
                "MX",
                lookup,
                expected,
                CheckStatus.MISSING,
                (),
                "no MX record: replies and bounces to this domain cannot be delivered",
            )
        found = tuple(f"{h.preference} {h.exchange}" for h in hosts)
        return self._result("mx", "MX", lookup, expected, CheckStatus.OK, found, "published")


__all__ = ["RecordChecker"]
