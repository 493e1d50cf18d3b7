"""Independent checkers of what the SMTP service produces, pointed at the test Knot server.

* DKIM: dkimpy (``dkim.verify`` with its documented ``dnsfunc`` hook, answered by a real DNS
  query to Knot) and OpenDKIM (Debian's ``opendkim`` in test mode ``-t``, resolving through
  libunbound configured to forward every query to Knot).
* Publishing records in Knot in the exact form the service returns them (TXT strings).

A missing ``opendkim`` fails the test rather than skipping it, like a missing knotd does.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import dkim  # type: ignore[import-untyped]  # dkimpy ships no type information
import dns.resolver
import pytest

from services.smtp.dkim_keys import signing_key_for_dkimpy
from services.smtp.models import SigningKey
from tests.support.dns_server import KnotServer

MESSAGE = (
    b"From: Sender <sender@{domain}>\r\n"
    b"To: someone@receiver.example\r\n"
    b"Subject: rotation check {tag}\r\n"
    b"Date: Mon, 23 Nov 2026 12:00:00 +0000\r\n"
    b"Message-ID: <{tag}@{domain}>\r\n"
    b"\r\n"
    b"Hello from the DKIM tests.\r\n"
)


def message(domain: str, tag: str = "1") -> bytes:
    """A small RFC 5322 message from `domain`."""
    return MESSAGE.replace(b"{domain}", domain.encode()).replace(b"{tag}", tag.encode())


def quoted(strings: Sequence[str]) -> str:
    """TXT rdata in zone-file form from the strings the service returned."""
    return " ".join(f'"{s}"' for s in strings)


def sign(key: SigningKey, payload: bytes) -> bytes:
    """The message with a DKIM-Signature made by `key` (dkimpy's signer)."""
    signature = dkim.sign(
        payload,
        key.selector.encode(),
        key.domain.encode(),
        signing_key_for_dkimpy(key.algorithm, key.private_key_pem),
        signature_algorithm=key.algorithm.signing_algorithm.encode(),
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
    )
    return bytes(signature) + payload


def knot_dnsfunc(knot: KnotServer) -> Callable[..., bytes]:
    """A dnsfunc for dkimpy: TXT lookups answered by Knot (strings of one record joined)."""

    def lookup(name: bytes, timeout: int = 5) -> bytes:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [knot.host]
        resolver.port = knot.port
        resolver.lifetime = timeout
        try:
            answer = resolver.resolve(name.decode().rstrip("."), "TXT", search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return b""
        for rdata in answer:
            return b"".join(rdata.strings)
        return b""

    return lookup


def dkimpy_verifies(knot: KnotServer, signed: bytes) -> bool:
    """Whether dkimpy verifies the message against the records served by Knot."""
    return bool(dkim.verify(signed, dnsfunc=knot_dnsfunc(knot)))


def opendkim_verdict(knot: KnotServer, signed: bytes, workdir: Path) -> str:
    """OpenDKIM's verdict line on `signed`, looking keys up in Knot (via libunbound).

    Returns:
        The "verification (...) succeeded|failed..." line opendkim printed.
    """
    binary = shutil.which("opendkim", path="/usr/sbin:/usr/bin:/sbin:/bin")
    if binary is None:
        pytest.fail("opendkim is required for these tests (Debian package opendkim)", pytrace=False)
    workdir.mkdir(parents=True, exist_ok=True)
    unbound = workdir / "unbound.conf"
    # Forward everything to Knot; libunbound refuses loopback servers unless told otherwise.
    unbound.write_text(
        "server:\n"
        "  do-not-query-localhost: no\n"
        "forward-zone:\n"
        '  name: "."\n'
        f"  forward-addr: {knot.host}@{knot.port}\n"
    )
    config = workdir / "opendkim.conf"
    config.write_text(f"Mode v\nSyslog no\nResolverConfiguration {unbound}\n")
    mail = workdir / "message.eml"
    mail.write_bytes(signed)
    result = subprocess.run(
        [binary, "-x", str(config), "-t", str(mail)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    for line in output.splitlines():
        if "verification (" in line:
            return line
    raise AssertionError(f"opendkim printed no verdict:\n{output}")
