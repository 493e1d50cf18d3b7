"""The OpenSSL-backed DKIM signer: standard signatures that dkimpy and OpenDKIM verify.

dkimpy verifies through a dict-backed ``dnsfunc`` (a unit-level check of the signature itself);
OpenDKIM (Debian's ``opendkim -t``) verifies against the key record published in the session's
Knot server, reusing the SMTP tests' helper. The body hash is compared byte for byte with
dkimpy's canonicalization over a corpus of awkward bodies.
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import Callable
from pathlib import Path

import dkim  # type: ignore[import-untyped]  # dkimpy ships no type information
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dkim.canonicalization import Relaxed  # type: ignore[import-untyped]

from services.core.dns_names import split_txt
from services.mail.dkim_signer import Algorithm, DkimSigner, relaxed_body
from tests.conftest import unique_domain
from tests.smtp.verifiers import opendkim_verdict, quoted
from tests.support.dns_server import KnotServer

SELECTOR = "mail2026"
DNS_NAME = re.compile(rb"^(?P<selector>[^.]+)\._domainkey\.(?P<domain>.+?)\.?$")


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    """An RSA-2048 key (the product's default DKIM key)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    """An Ed25519 key (RFC 8463)."""
    return ed25519.Ed25519PrivateKey.generate()


def pem(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    """PKCS#8 PEM, the form the SMTP service stores and hands out."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def record(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> str:
    """The DKIM TXT value publishing `key`'s public half."""
    if isinstance(key, rsa.RSAPrivateKey):
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"


Keys = dict[str, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey]


@pytest.fixture(scope="module")
def keys(rsa_key: rsa.RSAPrivateKey, ed_key: ed25519.Ed25519PrivateKey) -> Keys:
    """Key per algorithm."""
    return {"rsa-sha256": rsa_key, "ed25519-sha256": ed_key}


def dict_dnsfunc(records: dict[str, str]) -> Callable[..., bytes]:
    """A dkimpy dnsfunc answering TXT lookups from a dict keyed by owner name."""

    def lookup(name: bytes, timeout: int = 5) -> bytes:
        return records.get(name.decode().rstrip("."), "").encode()

    return lookup


def verifies(
    signed: bytes, domain: str, key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
) -> bool:
    """Whether dkimpy accepts `signed` with `key`'s record published for `domain`."""
    records = {f"{SELECTOR}._domainkey.{domain}": record(key)}
    return bool(dkim.verify(signed, dnsfunc=dict_dnsfunc(records)))


def signer(domain: str, algorithm: Algorithm, keys: Keys) -> DkimSigner:
    """A signer for `domain` with the module's key for `algorithm` (loaded from PEM)."""
    return DkimSigner(
        domain=domain, selector=SELECTOR, private_key=pem(keys[algorithm]), algorithm=algorithm
    )


def build(domain: str, *, headers: bytes = b"", body: bytes = b"Hello.\r\n") -> bytes:
    """A message from `domain` with extra `headers` (CRLF-terminated) and `body`."""
    return (
        (
            f"From: Sender <sender@{domain}>\r\n"
            "To: someone@receiver.example\r\n"
            "Subject: signer test\r\n"
            "Date: Mon, 23 Nov 2026 12:00:00 +0000\r\n"
            f"Message-ID: <t1@{domain}>\r\n"
            "MIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n"
        ).encode()
        + headers
        + b"\r\n"
        + body
    )


MANY = ", ".join(f"user{i}@receiver{i % 7}.example" for i in range(200))
MESSAGES: dict[str, tuple[bytes, bytes]] = {
    "plain": (b"", b"Hello from the signer tests.\r\n"),
    "folded headers": (
        b"Cc: first@receiver.example,\r\n\t second@receiver.example,\r\n   third@r.example\r\n"
        b"Reply-To:\r\n replies@receiver.example\r\n",
        b"Body.\r\n",
    ),
    "trailing whitespace": (
        b"X-Note: spaced   out   \r\n",
        b"line with trailing spaces   \r\n\tline\twith\ttabs\t\r\n   \r\n\r\n\r\n",
    ),
    "empty body": (b"", b""),
    "utf-8 headers": (
        "Cc: =?utf-8?q?J=C3=BCrgen?= <j@receiver.example>, Zoë <zoe@receiver.example>\r\n".encode(),
        "Grüße aus Zürich — ünïcödé body\r\n".encode(),
    ),
    "many recipients": (f"Cc: {MANY}\r\n".encode(), b"To everyone.\r\n"),
}


@pytest.mark.parametrize("algorithm", ["rsa-sha256", "ed25519-sha256"])
@pytest.mark.parametrize("case", list(MESSAGES))
def test_dkimpy_verifies_signatures(algorithm: Algorithm, case: str, keys: Keys) -> None:
    # Every kind of awkward message gets a signature dkimpy accepts, with our tags.
    domain = unique_domain()
    headers, body = MESSAGES[case]
    message = build(domain, headers=headers, body=body)
    header = signer(domain, algorithm, keys).sign(message, timestamp=1_795_000_000)
    assert header.startswith(b"DKIM-Signature: v=1; a=" + algorithm.encode())
    assert header.endswith(b"\r\n")
    assert not header.endswith(b"\r\n\r\n")
    assert all(len(line) <= 78 for line in header.split(b"\r\n"))
    tags = {
        k.strip(): "".join(v.split())
        for k, _, v in (t.partition("=") for t in header.decode().split(":", 1)[1].split(";"))
    }
    assert tags["c"] == "relaxed/relaxed"
    assert tags["d"] == domain
    assert tags["s"] == SELECTOR
    assert tags["t"] == "1795000000"
    assert tags["h"].split(":")[:2] == ["from", "from"]  # From is oversigned
    assert verifies(header + message, domain, keys[algorithm])


@pytest.mark.parametrize("algorithm", ["rsa-sha256", "ed25519-sha256"])
def test_tampering_breaks_the_signature(algorithm: Algorithm, keys: Keys) -> None:
    # A changed signed header, a changed body or an added From all fail verification.
    domain = unique_domain()
    message = build(domain)
    signed = signer(domain, algorithm, keys).sign(message) + message
    assert verifies(signed, domain, keys[algorithm])
    assert not verifies(signed.replace(b"signer test", b"signer tost"), domain, keys[algorithm])
    assert not verifies(signed.replace(b"Hello.", b"Hullo."), domain, keys[algorithm])
    added_from = signed.replace(b"To: ", b"From: evil@attacker.example\r\nTo: ", 1)
    assert not verifies(added_from, domain, keys[algorithm])
    # Whitespace changes that relaxed canonicalization forgives keep it valid.
    relaxed = signed.replace(b"Subject: signer test", b"Subject:   signer \t test  ")
    assert verifies(relaxed, domain, keys[algorithm])


def test_lf_only_input_is_signed_as_crlf(rsa_key: rsa.RSAPrivateKey, keys: Keys) -> None:
    # A message with bare LF line ends is signed as SMTP transport will carry it (CRLF).
    domain = unique_domain()
    message = build(domain, body=b"one\r\ntwo\r\n")
    header = signer(domain, "rsa-sha256", keys).sign(message.replace(b"\r\n", b"\n"))
    assert verifies(header + message, domain, rsa_key)


async def test_opendkim_verifies_signatures(
    keys: Keys, knot_server: KnotServer, tmp_path: Path
) -> None:
    # OpenDKIM, reading the records from Knot, accepts every case for both key types and
    # rejects tampered copies.
    domain = unique_domain()
    selectors = {"rsa-sha256": "rsa2026", "ed25519-sha256": "ed2026"}
    knot_server.set_zone(
        domain,
        [
            (f"{selectors[a]}._domainkey", "TXT", quoted(split_txt(record(keys[a]))))
            for a in selectors
        ],
    )
    for algorithm, selector in selectors.items():
        signing = DkimSigner(
            domain=domain,
            selector=selector,
            private_key=keys[algorithm],
            algorithm=algorithm,  # type: ignore[arg-type]
        )
        for index, (headers, body) in enumerate(MESSAGES.values()):
            message = build(domain, headers=headers, body=body)
            signed = signing.sign(message) + message
            workdir = tmp_path / f"{selector}-{index}"
            verdict = await asyncio.to_thread(opendkim_verdict, knot_server, signed, workdir)
            assert f"s={selector}" in verdict, verdict
            assert verdict.endswith("succeeded"), verdict
        message = build(domain)
        signed = signing.sign(message) + message
        for name, tampered in (
            ("header", signed.replace(b"signer test", b"signer tost")),
            ("body", signed.replace(b"Hello.", b"Hullo.")),
        ):
            workdir = tmp_path / f"{selector}-tampered-{name}"
            verdict = await asyncio.to_thread(opendkim_verdict, knot_server, tampered, workdir)
            assert "succeeded" not in verdict, verdict


BODIES = [
    b"",
    b"\r\n",
    b"\r\n\r\n\r\n",
    b"x",
    b"x  ",
    b"x\r\n",
    b"  leading\r\n",
    b"a \t b\r\n\t\r\n \r\n",
    b"trailing blank lines\r\n\r\n\r\n\r\n",
    b"tabs\t\t\tinside\t\r\n",
    b"no final newline  \t",
    b"\xc3\xbcnic\xc3\xb6de  bytes \xff\xfe\r\n",
    b"bare\rcarriage return\r\n",
    b"." * 1000 + b"\r\n" + b" " * 500 + b"\r\n",
    b"=20quoted=\r\nprintable=3D\r\n",
]


@pytest.mark.parametrize("body", BODIES)
def test_body_canonicalization_matches_dkimpy(body: bytes, rsa_key: rsa.RSAPrivateKey) -> None:
    # Our relaxed body equals dkimpy's, byte for byte, as the verifier will see the body
    # (SMTP adds the final CRLF a body lacks); so does the bh= of a full signature.
    transported = body if not body or body.endswith(b"\r\n") else body + b"\r\n"
    assert relaxed_body(body) == Relaxed.canonicalize_body(transported)
    domain = unique_domain()
    message = build(domain, body=transported)
    ours = DkimSigner(domain=domain, selector=SELECTOR, private_key=rsa_key, algorithm="rsa-sha256")
    theirs = dkim.sign(
        message,
        SELECTOR.encode(),
        domain.encode(),
        pem(rsa_key),
        canonicalize=(b"relaxed", b"relaxed"),
    )

    def bh(header: bytes) -> bytes:
        found = re.search(rb"bh=([^;]+);", b"".join(header.split()))
        assert found is not None
        return found.group(1)

    assert bh(ours.sign(message)) == bh(theirs)


def test_key_checks_and_repr(rsa_key: rsa.RSAPrivateKey, ed_key: ed25519.Ed25519PrivateKey) -> None:
    # Mismatched keys, bad names and garbage PEM are refused; repr never shows the key.
    with pytest.raises(ValueError, match="RSA"):
        DkimSigner(domain="a.example", selector="s", private_key=ed_key, algorithm="rsa-sha256")
    with pytest.raises(ValueError, match="Ed25519"):
        DkimSigner(
            domain="a.example", selector="s", private_key=rsa_key, algorithm="ed25519-sha256"
        )
    with pytest.raises(ValueError, match="selector"):
        DkimSigner(
            domain="a.example", selector="s;x=1", private_key=rsa_key, algorithm="rsa-sha256"
        )
    with pytest.raises(ValueError, match="domain"):
        DkimSigner(domain="a b.example", selector="s", private_key=rsa_key, algorithm="rsa-sha256")
    with pytest.raises(ValueError, match="PEM"):
        DkimSigner(domain="a.example", selector="s", private_key=b"junk", algorithm="rsa-sha256")
    signing = DkimSigner(
        domain="A.Example.", selector="S1", private_key=pem(rsa_key), algorithm="rsa-sha256"
    )
    assert (signing.domain, signing.selector) == ("a.example", "s1")
    assert "PRIVATE" not in repr(signing)
    assert "a.example" in repr(signing)


def test_message_without_from_is_refused(keys: Keys) -> None:
    # DKIM requires the From header to be signed; a message without one is a caller bug.
    message = b"To: x@receiver.example\r\nSubject: no sender\r\n\r\nbody\r\n"
    with pytest.raises(ValueError, match="From"):
        signer("a.example", "ed25519-sha256", keys).sign(message)
