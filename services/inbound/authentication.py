"""Authentication of an incoming message: SPF (pyspf), DKIM (dkimpy), DMARC alignment.

Results use RFC 8601's vocabulary and are also written as an ``Authentication-Results`` header
(our hostname as the authserv-id) that is stored on top of the message.

* SPF checks the MAIL FROM domain against the client address (the HELO name for a null sender,
  as bounces have), RFC 7208.
* DKIM verifies every signature; ``pass`` if one or more verify, with their d= domains.
* DMARC (RFC 7489): the From header's domain publishes a policy at ``_dmarc.<domain>`` (or at
  its organizational domain); ``pass`` when SPF passed for an aligned MAIL FROM domain or a DKIM
  signature verified for an aligned d= domain (relaxed alignment: the same organizational
  domain, by the Public Suffix List bundled with publicsuffixlist), ``fail`` otherwise, ``none``
  without a policy.

pyspf and dkimpy are synchronous, so each check runs in a worker thread. Both look names up
through the configured nameservers (``AZORA_DNS_*``): dkimpy through its ``dnsfunc``, pyspf
through dnspython's default resolver, which `configure_default_resolver` points at them (pyspf
has no resolver argument; this process has no other user of the default resolver).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.utils import getaddresses

import dkim  # type: ignore[import-untyped]  # dkimpy ships no type information
import dns.exception
import dns.resolver
import spf  # type: ignore[import-untyped]  # nor does pyspf
from publicsuffixlist import PublicSuffixList

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AuthenticationResults:
    """What the checks found (see the module docstring)."""

    spf: str = "none"
    spf_domain: str = ""
    dkim: str = "none"
    dkim_domains: tuple[str, ...] = ()
    dmarc: str = "none"
    from_domain: str = ""
    header: str = ""


@dataclass
class _Nameservers:
    addresses: Sequence[str] = field(default_factory=tuple)
    port: int = 53
    timeout: float = 5.0

    def resolver(self) -> dns.resolver.Resolver:
        resolver = dns.resolver.Resolver(configure=not self.addresses)
        if self.addresses:
            resolver.nameservers = list(self.addresses)
            resolver.port = self.port
        resolver.lifetime = self.timeout
        resolver.timeout = self.timeout
        return resolver


def configure_default_resolver(nameservers: Sequence[str], port: int, timeout: float) -> None:
    """Point dnspython's default resolver (pyspf's) at the configured nameservers, if any."""
    if nameservers:
        dns.resolver.default_resolver = _Nameservers(tuple(nameservers), port, timeout).resolver()


class MessageAuthenticator:
    """Runs the three checks for one message."""

    def __init__(
        self,
        *,
        hostname: str,
        nameservers: Sequence[str] = (),
        port: int = 53,
        timeout: float = 5.0,
    ) -> None:
        self._hostname = hostname
        self._dns = _Nameservers(tuple(nameservers), port, timeout)
        self._suffixes = PublicSuffixList()

    async def check(
        self, *, raw: bytes, client_address: str, helo: str, envelope_from: str
    ) -> AuthenticationResults:
        """Check `raw` as received from `client_address`; never raises for a bad message."""
        spf_result, spf_domain = await asyncio.to_thread(
            self._spf, client_address, helo, envelope_from
        )
        dkim_result, dkim_domains = await asyncio.to_thread(self._dkim, raw)
        from_domain = _from_domain(raw)
        dmarc_result = await asyncio.to_thread(
            self._dmarc, from_domain, spf_result, spf_domain, dkim_domains
        )
        parts = [
            f"spf={spf_result} smtp.{'mailfrom' if envelope_from else 'helo'}="
            f"{envelope_from or helo or 'unknown'}",
        ]
        if dkim_domains:
            parts += [f"dkim=pass header.d={d}" for d in dkim_domains]
        else:
            parts.append(f"dkim={dkim_result}")
        parts.append(f"dmarc={dmarc_result} header.from={from_domain or 'unknown'}")
        header = f"{self._hostname};\r\n\t" + ";\r\n\t".join(parts)
        return AuthenticationResults(
            spf=spf_result,
            spf_domain=spf_domain,
            dkim=dkim_result,
            dkim_domains=dkim_domains,
            dmarc=dmarc_result,
            from_domain=from_domain,
            header=header,
        )

    def _spf(self, client_address: str, helo: str, envelope_from: str) -> tuple[str, str]:
        sender = envelope_from or (f"postmaster@{helo}" if helo else "")
        domain = sender.rpartition("@")[2].lower()
        if not domain or not client_address:
            return "none", domain
        try:
            result, _explanation = spf.check2(i=client_address, s=sender, h=helo or domain)
        except Exception:  # pyspf raises bare Exceptions for malformed input
            log.info("SPF check failed", extra={"fields": {"domain": domain}}, exc_info=True)
            return "permerror", domain
        return str(result), domain

    def _dkim_txt(self, name: bytes, timeout: int = 5) -> bytes | None:
        try:
            answer = self._dns.resolver().resolve(name.decode("ascii").rstrip("."), "TXT")
        except (dns.exception.DNSException, UnicodeDecodeError):
            return None
        for record in answer:
            return b"".join(record.strings)
        return None

    def _dkim(self, raw: bytes) -> tuple[str, tuple[str, ...]]:
        try:
            return self._verify_signatures(raw)
        except Exception:  # dkimpy on a message it cannot even parse
            log.info("DKIM check failed", exc_info=True)
            return "permerror", ()

    def _verify_signatures(self, raw: bytes) -> tuple[str, tuple[str, ...]]:
        count = len(_signatures(raw))
        if not count:
            return "none", ()
        checker = dkim.DKIM(raw)
        domains: list[str] = []
        failed = False
        for index in range(count):
            try:
                ok = checker.verify(idx=index, dnsfunc=self._dkim_txt)
            except dkim.DKIMException:
                ok = False
            if ok and checker.domain:
                domains.append(checker.domain.decode("ascii", "replace").lower())
            else:
                failed = True
        if domains:
            return "pass", tuple(dict.fromkeys(domains))
        return ("fail" if failed else "none"), ()

    def _dmarc(
        self, from_domain: str, spf_result: str, spf_domain: str, dkim_domains: tuple[str, ...]
    ) -> str:
        if not from_domain:
            return "none"
        if not self._has_policy(from_domain):
            return "none"
        org = _organizational(self._suffixes, from_domain)
        if spf_result == "pass" and _organizational(self._suffixes, spf_domain) == org:
            return "pass"
        if any(_organizational(self._suffixes, d) == org for d in dkim_domains):
            return "pass"
        return "fail"

    def _has_policy(self, domain: str) -> bool:
        for name in dict.fromkeys((domain, _organizational(self._suffixes, domain))):
            try:
                answer = self._dns.resolver().resolve(f"_dmarc.{name}", "TXT")
            except dns.exception.DNSException:
                continue
            for record in answer:
                text = b"".join(record.strings).decode("ascii", "replace")
                if text.lower().startswith("v=dmarc1"):
                    return True
        return False


def _signatures(raw: bytes) -> list[str]:
    headers = BytesHeaderParser().parsebytes(raw)
    return list(headers.get_all("DKIM-Signature") or [])


def _from_domain(raw: bytes) -> str:
    headers = BytesHeaderParser().parsebytes(raw)
    found = getaddresses([str(v) for v in headers.get_all("From") or []])
    for _name, address in found:
        if "@" in address:
            return address.rpartition("@")[2].lower().rstrip(">")
    return ""


def _organizational(suffixes: PublicSuffixList, domain: str) -> str:
    if not domain:
        return ""
    found = suffixes.privatesuffix(domain.lower().rstrip("."))
    # A public suffix itself (or an unparsable name) has no organizational domain but itself.
    return str(found) if found else domain.lower()


__all__ = ["AuthenticationResults", "MessageAuthenticator", "configure_default_resolver"]
