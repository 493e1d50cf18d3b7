"""Ownership lookups: is ``azora-verify=<token>`` published as a TXT record at the domain?

The lookup itself is the shared `services.core.dns.DnsResolver` (configured nameservers, port
and timeout, so tests use their own authoritative server); this module only turns what it found
into a `VerificationCheck`. Nothing here raises for a lookup that failed, because "what was
found" is the answer the user needs.
"""

from __future__ import annotations

from services.core.clock import Clock
from services.core.dns import DnsResolver, LookupOutcome
from services.core.ownership import TOKEN_PREFIX, expected_record, ownership_values
from services.domain.models import VerificationCheck, VerificationOutcome

# Lookup failures map one to one; FOUND is decided by comparing the values.
_FAILED_LOOKUPS = {
    LookupOutcome.NO_RECORDS: VerificationOutcome.NO_RECORD,
    LookupOutcome.NXDOMAIN: VerificationOutcome.NXDOMAIN,
    LookupOutcome.TIMEOUT: VerificationOutcome.TIMEOUT,
    LookupOutcome.ERROR: VerificationOutcome.ERROR,
}


class OwnershipVerifier:
    """Looks up a domain's ownership TXT record."""

    def __init__(self, *, resolver: DnsResolver, clock: Clock) -> None:
        self._resolver = resolver
        self._clock = clock

    async def check(self, *, name: str, token: str) -> VerificationCheck:
        """Look up the TXT records at `name` and compare them with the expected token."""
        expected = expected_record(token)
        now = self._clock.now()
        lookup = await self._resolver.txt(name)
        if lookup.outcome is not LookupOutcome.FOUND:
            return VerificationCheck(_FAILED_LOOKUPS[lookup.outcome], now, name, (), lookup.detail)
        ours = ownership_values(lookup.values)
        found = (ours + tuple(v for v in lookup.values if not v.startswith(TOKEN_PREFIX)))[:20]
        if expected in ours:
            return VerificationCheck(
                VerificationOutcome.MATCHED, now, name, found, "ownership record found"
            )
        if ours:
            return VerificationCheck(
                VerificationOutcome.WRONG_TOKEN,
                now,
                name,
                found,
                f"found {TOKEN_PREFIX}... with a different token; publish {expected}",
            )
        return VerificationCheck(
            VerificationOutcome.NO_RECORD,
            now,
            name,
            found,
            f"{len(lookup.values)} TXT record(s) found, none is {expected}",
        )
