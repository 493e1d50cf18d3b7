"""SSRF guard for outgoing connections: which addresses a relay (or webhook URL) may resolve to.

Used by the SMTP service (connection tests), by the mail service's delivery and by webhook
delivery, so a relay or endpoint name is judged again at every connection, not only when it
was saved.

A tenant chooses the relay host, so without a guard the service could be pointed at loopback
services, the private network or a cloud metadata endpoint. The rule: resolve the host once,
refuse it if ANY address is non-public (a rebinding name that mixes a public and a private
address is refused whole), then connect to exactly the address that was checked, never
resolving again (so a second, different answer cannot slip through), and check that address
again right before connecting. ``AZORA_SMTP_ALLOW_PRIVATE_HOSTS`` (on outside production)
turns the refusal off for local relays and tests.

IPv6 forms that embed an IPv4 address (IPv4-mapped, IPv4-compatible, NAT64 64:ff9b::/96 and
6to4 2002::/16) are judged by the embedded IPv4 address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from services.core.dns import DnsResolver, LookupOutcome
from services.core.settings import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

METADATA_ADDRESSES = frozenset(
    {
        ipaddress.ip_address("169.254.169.254"),  # AWS, GCP, Azure, OpenStack, ...
        ipaddress.ip_address("fd00:ec2::254"),  # AWS over IPv6
        ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
    }
)
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_COMPAT = ipaddress.ip_network("::/96")


def classify(address: IPAddress) -> str | None:
    """Why `address` is not a public Internet address, or None if it is one.

    Returns:
        A short description such as "a loopback address", or None.
    """
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            reason = classify(embedded)
            return f"{reason} (embedded in {address})" if reason else None
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if address.is_unspecified:
        return "the unspecified address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if isinstance(address, ipaddress.IPv4Address) and address in _CGNAT:
        return "a carrier-grade NAT (shared) address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_reserved:
        return "a reserved, non-public address"
    if address.is_private:
        return "a private address"
    if not address.is_global:
        return "a reserved, non-public address"
    return None


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _COMPAT and int(address) > 1:  # not :: or ::1, which are judged as IPv6
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


@dataclass(frozen=True, slots=True)
class AddressPolicy:
    """Which addresses an outgoing connection (to a relay, a webhook endpoint) may reach."""

    allow_private: bool
    # What is connected to, and the setting that allows other addresses (for the message).
    what: str = "relays"
    setting: str = "AZORA_SMTP_ALLOW_PRIVATE_HOSTS"

    def refusal(self, address: IPAddress) -> str | None:
        """Why connecting to `address` is refused, or None when it is allowed."""
        if self.allow_private:
            return None
        reason = classify(address)
        if reason is None:
            return None
        return (
            f"{address} is {reason}; {self.what} must be public hosts "
            f"({self.setting} allows others)"
        )


class ResolveError(Exception):
    """The relay host could not be resolved; the message says why (safe to show)."""


class HostResolver(Protocol):
    """Turns a relay host name into addresses."""

    async def resolve(self, host: str) -> list[IPAddress]:
        """All addresses of `host`, IPv4 first.

        Raises:
            ResolveError: the name does not exist, has no addresses, or the lookup failed.
        """
        ...


class DnsHostResolver:
    """Resolves through the configured nameservers (``AZORA_DNS_NAMESERVERS``)."""

    def __init__(self, dns: DnsResolver) -> None:
        self._dns = dns

    async def resolve(self, host: str) -> list[IPAddress]:
        """See `HostResolver.resolve`."""
        lookup = await self._dns.addresses(host)
        if lookup.outcome is not LookupOutcome.FOUND:
            raise ResolveError(lookup.detail or f"{host} has no addresses")
        return _ordered([ipaddress.ip_address(v) for v in lookup.values])


class SystemHostResolver:
    """Resolves with the operating system (getaddrinfo: /etc/hosts, then DNS)."""

    async def resolve(self, host: str) -> list[IPAddress]:
        """See `HostResolver.resolve`."""
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ResolveError(f"{host} could not be resolved: {exc.strerror}") from None
        found: list[IPAddress] = []
        for _family, _type, _proto, _name, sockaddr in infos:
            address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            if address not in found:
                found.append(address)
        if not found:
            raise ResolveError(f"{host} has no addresses")
        return _ordered(found)


def host_resolver(settings: Settings, *, dns: DnsResolver | None = None) -> HostResolver:
    """The resolver relay hosts go through.

    The configured nameservers (one DNS view with ownership checks), else the operating
    system's, which also reads /etc/hosts.
    """
    if settings.dns_nameservers:
        return DnsHostResolver(dns or DnsResolver.from_settings(settings))
    return SystemHostResolver()


async def addresses_of(
    host: str, *, resolver: HostResolver, policy: AddressPolicy
) -> list[IPAddress]:
    """The addresses to connect to for `host` (an address or a name), all of them allowed.

    Raises:
        ResolveError: the name does not resolve.
        PermissionError: the policy refuses one of its addresses (the name is refused whole).
    """
    try:
        found = [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        found = await resolver.resolve(host)
    for address in found:
        refusal = policy.refusal(address)
        if refusal is not None:
            raise PermissionError(f"{host}: {refusal}")
    return found


def _ordered(addresses: Sequence[IPAddress]) -> list[IPAddress]:
    unique = list(dict.fromkeys(addresses))
    return [a for a in unique if a.version == 4] + [a for a in unique if a.version == 6]


async def connect_checked(
    address: IPAddress, port: int, *, policy: AddressPolicy, seconds: float
) -> socket.socket:
    """Open a TCP connection to exactly `address` after checking it once more.

    Returns:
        The connected, non-blocking socket (the caller owns it).

    Raises:
        PermissionError: the policy refuses the address.
        OSError: the connection failed (refused, unreachable).
        TimeoutError: it did not complete within `seconds`.
    """
    refusal = policy.refusal(address)
    if refusal is not None:
        raise PermissionError(refusal)
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(seconds):
            await asyncio.get_running_loop().sock_connect(sock, (str(address), port))
        peer = ipaddress.ip_address(sock.getpeername()[0])
        if peer != address:  # defence in depth: the kernel connected where we asked
            raise PermissionError(f"connected to {peer}, not to the checked {address}")
    except BaseException:
        sock.close()
        raise
    return sock


__all__ = [
    "METADATA_ADDRESSES",
    "AddressPolicy",
    "DnsHostResolver",
    "addresses_of",
    "HostResolver",
    "IPAddress",
    "ResolveError",
    "SystemHostResolver",
    "classify",
    "connect_checked",
    "host_resolver",
]
