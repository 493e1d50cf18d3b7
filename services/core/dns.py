"""DNS lookups shared by the services: one resolver factory, outcomes instead of exceptions.

dnspython's async resolver, pointed at ``AZORA_DNS_NAMESERVERS`` (with ``AZORA_DNS_PORT`` and
``AZORA_DNS_TIMEOUT``, so tests use their own authoritative server) or at the system resolver
when none are configured. A fresh resolver per lookup and no cache: a record published a second
ago must be seen. Every DNS outcome becomes a `Lookup`, because "what was found" (or why nothing
was) is the answer users need; only programming errors raise. A lookup's detail is shown to
tenants, so it says what the nameservers answered but never which nameservers they are: their
addresses and ports are internal topology.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver
from opentelemetry.trace import SpanKind

from services.core.metrics import DNS_LOOKUPS
from services.core.settings import Settings
from services.core.tracing import tracer

_MAX_DETAIL = 300


class LookupOutcome(enum.StrEnum):
    """How a lookup ended."""

    FOUND = "found"  # at least one record of the type
    NO_RECORDS = "no_records"  # the name exists, but has no record of the type
    NXDOMAIN = "nxdomain"  # the name does not exist
    TIMEOUT = "timeout"  # no nameserver answered in time
    ERROR = "error"  # SERVFAIL, REFUSED, malformed answers

    @property
    def definite(self) -> bool:
        """Whether the answer is authoritative (found or provably absent), not a failure."""
        return self in (LookupOutcome.FOUND, LookupOutcome.NO_RECORDS, LookupOutcome.NXDOMAIN)


@dataclass(frozen=True, slots=True)
class Lookup:
    """The result of one lookup: outcome, the values in presentation form, and a detail."""

    name: str
    rdtype: str
    outcome: LookupOutcome
    values: tuple[str, ...] = ()
    detail: str = ""


@dataclass(frozen=True, slots=True)
class MxHost:
    """One MX record."""

    preference: int
    exchange: str


class DnsResolver:
    """Looks records up through the configured nameservers (or the system's)."""

    def __init__(self, *, nameservers: Sequence[str], port: int, timeout: float) -> None:
        self._nameservers = tuple(nameservers)
        self._port = port
        self._timeout = timeout

    @classmethod
    def from_settings(cls, settings: Settings) -> DnsResolver:
        """A resolver for ``AZORA_DNS_*``."""
        return cls(
            nameservers=settings.dns_nameservers,
            port=settings.dns_port,
            timeout=settings.dns_timeout,
        )

    @property
    def timeout(self) -> float:
        """Seconds one lookup may take in total."""
        return self._timeout

    def resolver(self) -> dns.asyncresolver.Resolver:
        """A fresh, cache-less dnspython resolver configured like this one."""
        resolver = dns.asyncresolver.Resolver(configure=not self._nameservers)
        if self._nameservers:
            resolver.nameservers = list(self._nameservers)
            resolver.port = self._port
        resolver.lifetime = self._timeout
        resolver.timeout = self._timeout
        resolver.cache = None
        return resolver

    async def txt(self, name: str) -> Lookup:
        """TXT records at `name`, each record's strings joined (as SPF/DKIM/DMARC read them)."""
        return await self._lookup(name, "TXT")

    async def addresses(self, name: str) -> Lookup:
        """A and AAAA records at `name` (IPv4 first).

        FOUND when either type has records; otherwise the more informative of the two outcomes.
        """
        v4 = await self._lookup(name, "A")
        v6 = await self._lookup(name, "AAAA")
        if v4.outcome is LookupOutcome.FOUND or v6.outcome is LookupOutcome.FOUND:
            return Lookup(name, "A/AAAA", LookupOutcome.FOUND, v4.values + v6.values)
        worst = v4 if not v4.outcome.definite else v6
        return Lookup(name, "A/AAAA", worst.outcome, (), worst.detail)

    async def mx(self, name: str) -> tuple[Lookup, list[MxHost]]:
        """MX records at `name`, by preference; values read ``"<pref> <host>"``."""
        lookup = await self._lookup(name, "MX")
        hosts: list[MxHost] = []
        for value in lookup.values:
            preference, _, exchange = value.partition(" ")
            hosts.append(MxHost(int(preference), exchange.rstrip(".").lower()))
        hosts.sort(key=lambda h: (h.preference, h.exchange))
        return lookup, hosts

    async def _lookup(self, name: str, rdtype: str) -> Lookup:
        # One span per query (name and outcome as attributes) and the outcome counter.
        with tracer().start_as_current_span(
            f"dns {rdtype}",
            kind=SpanKind.CLIENT,
            attributes={"dns.question.name": name, "dns.question.type": rdtype},
        ) as span:
            lookup = await self._query(name, rdtype)
            span.set_attribute("dns.outcome", lookup.outcome.value)
        DNS_LOOKUPS.labels(lookup.outcome.value).inc()
        return lookup

    async def _query(self, name: str, rdtype: str) -> Lookup:
        try:
            answer = await self.resolver().resolve(
                name, dns.rdatatype.from_text(rdtype), search=False
            )
        except dns.resolver.NXDOMAIN:
            return Lookup(name, rdtype, LookupOutcome.NXDOMAIN, (), f"{name} does not exist")
        except dns.resolver.NoAnswer:
            return Lookup(
                name, rdtype, LookupOutcome.NO_RECORDS, (), f"{name} has no {rdtype} records"
            )
        except dns.resolver.LifetimeTimeout:
            return Lookup(
                name,
                rdtype,
                LookupOutcome.TIMEOUT,
                (),
                f"no nameserver answered within {self._timeout:g}s",
            )
        except dns.resolver.NoNameservers as exc:
            detail = f"no usable answer: {_answers(exc)}"
            return Lookup(name, rdtype, LookupOutcome.ERROR, (), _short(detail))
        except dns.exception.DNSException as exc:
            # dnspython's own message may name the nameserver; its class says what went wrong.
            what = (type(exc).__doc__ or type(exc).__name__).strip().splitlines()[0]
            return Lookup(name, rdtype, LookupOutcome.ERROR, (), _short(f"lookup failed: {what}"))
        values: list[str] = []
        for rdata in answer:
            strings = getattr(rdata, "strings", None)
            if strings is not None:
                values.append(b"".join(strings).decode("utf-8", errors="replace"))
            else:
                values.append(rdata.to_text())
        return Lookup(name, rdtype, LookupOutcome.FOUND, tuple(values))


def _answers(exc: dns.resolver.NoNameservers) -> str:
    """What the nameservers answered, e.g. "the nameserver answered REFUSED", naming none.

    dnspython's own message reads "Server Do53:<address>@<port> answered REFUSED".
    """
    said: list[str] = []
    # dnspython records (nameserver, tcp, port, rcode text or exception, response) per try.
    for attempt in exc.kwargs.get("errors", []):
        problem = attempt[3] if len(attempt) > 3 else None
        if isinstance(problem, str):
            text = f"the nameserver answered {problem}"
        elif isinstance(problem, OSError) and problem.strerror:
            text = f"the nameserver could not be reached ({problem.strerror})"
        elif problem is not None:
            text = f"the nameserver's answer was unusable ({type(problem).__name__})"
        else:
            continue
        if text not in said:
            said.append(text)
    return "; ".join(said) or "no nameserver gave a usable answer"


def _short(text: str) -> str:
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."


__all__ = ["DnsResolver", "Lookup", "LookupOutcome", "MxHost"]
