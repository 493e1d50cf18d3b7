"""DKIM signing throughput: our OpenSSL-backed signer against dkimpy, on 2 KB messages.

Prints signatures per second on one core for RSA-2048 and Ed25519, for `DkimSigner` and for
dkimpy's ``dkim.sign`` (pure-Python RSA), then our RSA signer on every core through a thread
pool (OpenSSL releases the GIL while it signs). A benchmark that prints figures, not a test:

    .venv/bin/python -m bench.dkim_signing [--seconds 3]
"""

from __future__ import annotations

import argparse
import base64
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import dkim  # type: ignore[import-untyped]  # dkimpy ships no type information
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from services.mail.dkim_signer import DkimSigner

DOMAIN = "bench.example"
SELECTOR = "bench"


def message(size: int = 2048) -> bytes:
    """A typical transactional message of about `size` bytes."""
    head = (
        f"From: Azora Bench <noreply@{DOMAIN}>\r\n"
        "To: recipient@receiver.example\r\n"
        "Subject: Your receipt for order 12345\r\n"
        "Date: Mon, 23 Nov 2026 12:00:00 +0000\r\n"
        f"Message-ID: <bench.1@{DOMAIN}>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 7bit\r\n"
        "\r\n"
    ).encode()
    line = b"Thank you for your order. This line pads the body to a realistic size.\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body


def rate(sign: Callable[[], object], seconds: float) -> float:
    """Signatures per second of `sign`, run for about `seconds` after a warm-up."""
    for _ in range(5):
        sign()
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(10):
            sign()
        count += 10
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - start)


def parallel_rate(signer: DkimSigner, payload: bytes, workers: int, seconds: float) -> float:
    """Signatures per second with `workers` threads signing at once."""

    def work() -> int:
        done = 0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            for _ in range(10):
                signer.sign(payload)
            done += 10
        return done

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        total = sum(pool.map(lambda _: work(), range(workers)))
    return total / (time.perf_counter() - start)


def main() -> None:
    """Run the measurements and print them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    args = parser.parse_args()
    payload = message()
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    rsa_pem = rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # dkimpy takes Ed25519 keys as the base64 of the raw 32-byte seed.
    ed_seed = base64.b64encode(
        ed_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
    )
    ours_rsa = DkimSigner(
        domain=DOMAIN, selector=SELECTOR, private_key=rsa_pem, algorithm="rsa-sha256"
    )
    ours_ed = DkimSigner(
        domain=DOMAIN, selector=SELECTOR, private_key=ed_key, algorithm="ed25519-sha256"
    )
    headers = [b"from", b"to", b"subject", b"date", b"message-id"]

    def dkimpy(key: bytes, algorithm: bytes) -> Callable[[], object]:
        return lambda: dkim.sign(
            payload,
            SELECTOR.encode(),
            DOMAIN.encode(),
            key,
            canonicalize=(b"relaxed", b"relaxed"),
            signature_algorithm=algorithm,
            include_headers=headers,
        )

    cores = os.cpu_count() or 1
    print(f"DKIM signing, {len(payload)}-byte messages, {cores} cores, {args.seconds:g} s each")
    rows = [
        ("DkimSigner  rsa-sha256 (RSA-2048)", lambda: ours_rsa.sign(payload)),
        ("dkimpy      rsa-sha256 (RSA-2048)", dkimpy(rsa_pem, b"rsa-sha256")),
        ("DkimSigner  ed25519-sha256", lambda: ours_ed.sign(payload)),
        ("dkimpy      ed25519-sha256", dkimpy(ed_seed, b"ed25519-sha256")),
    ]
    for label, sign in rows:
        print(f"  {label:38s} 1 core: {rate(sign, args.seconds):10,.0f} signatures/s")
    for label, signer in (("rsa-sha256 (RSA-2048)", ours_rsa), ("ed25519-sha256", ours_ed)):
        per_second = parallel_rate(signer, payload, cores, args.seconds)
        print(f"  DkimSigner  {label:26s} {cores} threads: {per_second:8,.0f} signatures/s")


if __name__ == "__main__":
    main()
