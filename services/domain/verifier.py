"""Ownership lookups: is ``azora-verify=<token>`` published as a TXT record at the domain?

dnspython's async resolver, pointed at the configured nameservers (port and timeout
configurable so tests use their own authoritative server), or the system resolver when none
are configured. Every DNS outcome becomes a `VerificationCheck`; nothing here raises for a
lookup that failed, because "what was found" is the answer the user needs.
"""

from __future__ import annotations

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

from services.core.clock import Clock
from services.domain.models import VerificationCheck, VerificationOutcome

TOKEN_PREFIX = "azora-verify="  # noqa: S105 - a record prefix, not a secret


def expected_record(token: str) -> str:
    """The TXT value a domain must publish to prove ownership."""
    return f"{TOKEN_PREFIX}{token}"


class OwnershipVerifier:
    """Looks up a domain's ownership TXT record."""

    def __init__(
        self, *, nameservers: tuple[str, ...], port: int, timeout: float, clock: Clock
    ) -> None:
        self._nameservers = nameservers
        self._port = port
        self._timeout = timeout
        self._clock = clock

    def _resolver(self) -> dns.asyncresolver.Resolver:
        # A fresh resolver per lookup: no cache, so a record published a second ago is seen.
        resolver = dns.asyncresolver.Resolver(configure=not self._nameservers)
        if self._nameservers:
            resolver.nameservers = list(self._nameservers)
            resolver.port = self._port
        resolver.lifetime = self._timeout
        resolver.timeout = self._timeout
        resolver.cache = None
        return resolver

    async def check(self, *, name: str, token: str) -> VerificationCheck:
        """Look up the TXT records at `name` and compare them with the expected token."""
        expected = expected_record(token)
        now = self._clock.now()
        try:
            answer = await self._resolver().resolve(name, dns.rdatatype.TXT, search=False)
        except dns.resolver.NXDOMAIN:
            return VerificationCheck(
                VerificationOutcome.NXDOMAIN, now, name, (), f"{name} does not exist in DNS"
            )
        except dns.resolver.NoAnswer:
            return VerificationCheck(
                VerificationOutcome.NO_RECORD, now, name, (), f"{name} has no TXT records"
            )
        except dns.resolver.LifetimeTimeout:
            return VerificationCheck(
                VerificationOutcome.TIMEOUT,
                now,
                name,
                (),
                f"no nameserver answered within {self._timeout:g}s",
            )
        except dns.resolver.NoNameservers as exc:
            return VerificationCheck(
                VerificationOutcome.ERROR, now, name, (), _short(f"no usable answer: {exc}")
            )
        except dns.exception.DNSException as exc:
            return VerificationCheck(
                VerificationOutcome.ERROR, now, name, (), _short(f"lookup failed: {exc}")
            )
        values = []
        for rdata in answer:
            strings = getattr(rdata, "strings", ())
            values.append(b"".join(strings).decode("utf-8", errors="replace"))
        ours = [v for v in values if v.startswith(TOKEN_PREFIX)]
        found = tuple(ours + [v for v in values if not v.startswith(TOKEN_PREFIX)])[:20]
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
            f"{len(values)} TXT record(s) found, none is {expected}",
        )


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
