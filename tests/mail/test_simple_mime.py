"""The direct writer of simple messages against the stdlib path, byte for byte, and DKIM on both.

A seeded generator makes send requests around the edges of `simple_mime.is_simple` (header
lines of 77 to 80 characters, body lines of 78 and 79, quotes and commas in display names,
``=?`` in subjects, tabs, non-ASCII, structured custom headers such as ``Resent-Date``, LF,
CR and CRLF line ends, lines starting with "From " or "."); every request that validates is
built by `compose.build_message` and by `compose.build_message_with_stdlib` with the same
injected boundary and must give the same bytes; the directly written ones cover every transfer
encoding the stdlib picks for text (7bit, 8bit, quoted-printable, base64). Signed with the
service's DKIM signer, both are verified by dkimpy and, for a few, by OpenDKIM against keys
published in Knot.
"""

from __future__ import annotations

import asyncio
import base64
import random
import re
import string
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from services.core.dns_names import split_txt
from services.core.errors import InvalidArgument
from services.mail import simple_mime
from services.mail.compose import (
    Limits,
    SendInput,
    ValidRequest,
    build_message,
    build_message_with_stdlib,
    message_headers,
    validate,
    written_directly,
)
from services.mail.dkim_signer import DkimSigner
from tests.conftest import unique_domain
from tests.smtp.verifiers import dkimpy_verifies, opendkim_verdict, quoted
from tests.support.dns_server import KnotServer

LIMITS = Limits(
    max_recipients=50,
    max_attachment_size=1 << 20,
    max_message_size=10 << 20,
    schedule_horizon=timedelta(days=30),
)
NOW = datetime(2026, 12, 5, 8, 30, 15, tzinfo=UTC)
# The stdlib's own boundary shape (folded onto a second header line) and a short one (not).
BOUNDARIES = ("===============4242424242424242424==", "b1")
SELECTOR = "fast2026"
WORDS = ["hello", "Invoice", "x", "re:", "a,b", "(note)", "50%", "end.", "`q`", "#1", "~", "--"]
NAME_PARTS = [*WORDS, 'say "hi"', "O'Neil", "Doe, John", "back\\slash", "Zoë", "J. R."]


def _text(rng: random.Random, *, width: int) -> str:
    """A line of mostly printable ASCII words, about `width` characters."""
    out: list[str] = []
    while sum(len(w) + 1 for w in out) < width:
        out.append(rng.choice(WORDS) if rng.random() < 0.7 else _word(rng))
    return " ".join(out)[: max(width, 0)]


def _word(rng: random.Random) -> str:
    alphabet = string.ascii_letters + string.digits + string.punctuation
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))


def _spice(rng: random.Random, value: str, spice: float) -> str:
    """Sometimes (more often with a larger `spice`) add what only the stdlib path handles."""
    roll = rng.random() if rng.random() < spice else 1.0
    if roll < 0.06:
        return value + " =?utf-8?q?J=C3=BCrgen?="
    if roll < 0.10:
        return value + "\tx"
    if roll < 0.14:
        return "Grüße " + value
    if roll < 0.17:
        return " " + value
    if roll < 0.20:
        return value + " "
    if roll < 0.22:
        return value + "  double"
    return value


def _address(rng: random.Random, domain: str, i: int, spice: float) -> str:
    local = f"user{i}.{rng.choice(['a', 'b+tag', 'c_d'])}"
    if rng.random() < 0.4:
        return f"{local}@{domain}"
    parts = NAME_PARTS if rng.random() < spice else WORDS
    name = " ".join(rng.choice(parts) for _ in range(rng.randint(1, 3)))
    return f"{name} <{local}@{domain}>"


def _body(rng: random.Random, spice: float) -> str:
    lines = []
    for _ in range(rng.randint(0, 30)):
        # With a small `spice`, the special lines (some force the stdlib path) are rare.
        roll = rng.random() if rng.random() < spice else 1.0
        if roll < 0.05:
            lines.append("x" * rng.choice([77, 78, 79, 80]))
        elif roll < 0.08:
            lines.append("From the desk of " + _text(rng, width=20))
        elif roll < 0.10:
            lines.append(".")
        elif roll < 0.12:
            lines.append("tab\there\x0bvt\x0cff")
        elif roll < 0.14:
            lines.append("naïve café")
        elif roll < 0.16:
            lines.append("")
        elif roll < 0.18:
            lines.append("   indented  and trailing   ")
        elif roll < 0.20:
            lines.append("Grüße aus Zürich, " * rng.randint(3, 8))
        elif roll < 0.22:
            lines.append("日本語のテキスト" * rng.randint(2, 12))
        elif roll < 0.24:
            lines.append("a=b \t" * rng.randint(10, 40) + "  ")
        else:
            lines.append(_text(rng, width=rng.randint(0, 78)))
    ending = rng.choice(["\n", "\r\n", "\r"])
    return ending.join(lines) + (ending if rng.random() < 0.7 else "")


def _subject(rng: random.Random, spice: float) -> str:
    roll = rng.random()
    if roll < 0.05:
        return ""
    if roll < 0.25:
        # "Subject: " is 9 characters: lengths 68..71 put the line at 77..80.
        return _word(rng)[:1] + "s" * (rng.randint(68, 71) - 1)
    return _spice(rng, _text(rng, width=rng.randint(1, 60)).strip() or "hi", spice)


CUSTOM_NAMES = ["X-Campaign", "List-Unsubscribe", "In-Reply-To", "References", "X-Long"]
STRUCTURED = ["Resent-Date", "Resent-To", "Orig-Date", "Resent-From"]
STRUCTURED_VALUES = {
    "Resent-Date": "Mon, 1 Jan 2024 00:00:00 GMT",
    "Orig-Date": "Tue, 2 Jan 2024 10:00:00 +0100",
    "Resent-To": "someone@receiver.example",
    "Resent-From": "Someone Else <else@receiver.example>",
}


def _headers(rng: random.Random, spice: float) -> list[tuple[str, str]]:
    headers = []
    for _ in range(rng.choice([0, 0, 1, 2, 3])):
        if rng.random() < 0.15 * spice:
            name = rng.choice(STRUCTURED)
            headers.append((name, STRUCTURED_VALUES[name]))
            continue
        name = rng.choice(CUSTOM_NAMES)
        if name == "X-Long":
            headers.append((name, "v" * rng.randint(70, 73)))
        elif name == "List-Unsubscribe":
            headers.append((name, f"<mailto:unsub+{rng.randint(1, 999)}@sender.example>"))
        else:
            value = _text(rng, width=rng.randint(1, 50)).strip()
            headers.append((name, _spice(rng, value, spice)))
    return headers


def _request(rng: random.Random, domain: str) -> SendInput:
    kind = rng.choice(["text", "html", "both", "both"])
    # Half the corpus leans towards simple messages, half towards everything else.
    spice = rng.choice([0.01, 1.0])
    # Bodies of any kind are written directly: they vary on their own.
    body_spice = rng.choice([0.02, 0.3, 1.0])
    text = _body(rng, body_spice) if kind in ("text", "both") else ""
    html = "<html><body>\n" + _body(rng, body_spice) + "\n</body></html>" if kind != "text" else ""
    return SendInput(
        from_address=_address(rng, domain, 0, spice),
        to=[_address(rng, "receiver.example", i, spice) for i in range(rng.randint(0, 2))],
        cc=[_address(rng, "copy.example", i, spice) for i in range(rng.choice([0, 0, 1, 3]))],
        bcc=["hidden@receiver.example"] if rng.random() < 0.2 else [],
        reply_to=[_address(rng, domain, 9, spice)] if rng.random() < 0.2 else [],
        subject=_subject(rng, spice),
        text=text or ("" if html else "x"),
        html=html,
        headers=_headers(rng, spice),
    )


def _now(rng: random.Random) -> datetime:
    offset = timezone(timedelta(minutes=rng.choice([0, 0, 60, -300, 330])))
    return (NOW + timedelta(seconds=rng.randint(0, 10**7))).astimezone(offset)


def corpus(seed: int, count: int, domain: str) -> list[tuple[ValidRequest, datetime]]:
    """`count` generated requests that pass validation, with the time each is sent."""
    rng = random.Random(seed)  # noqa: S311 - a reproducible corpus, not a secret
    found: list[tuple[ValidRequest, datetime]] = []
    while len(found) < count:
        request = _request(rng, domain)
        try:
            valid = validate(request, limits=LIMITS, now=NOW)
        except InvalidArgument:
            continue
        found.append((valid, _now(rng)))
    return found


def direct(valid: ValidRequest, email_id: str, domain: str, now: datetime) -> bool:
    """Whether `build_message` takes the direct path for this message."""
    headers = message_headers(valid, message_id=f"<{email_id}@{domain}>", now=now)
    return written_directly(valid, headers)


def test_both_paths_give_the_same_bytes_on_a_generated_corpus() -> None:
    # Every generated message: the direct writer and the stdlib agree byte for byte (the
    # stdlib ones trivially); a good share of the corpus really takes the direct path, with
    # every transfer encoding, and a good share (the unsimple ones) really does not.
    domain = "sender.example"
    direct_count = 0
    encodings: set[bytes] = set()
    messages = corpus(seed=20261205, count=1500, domain=domain)
    for index, (valid, now) in enumerate(messages):
        email_id = f"{index:024x}"
        boundary = BOUNDARIES[index % 2]
        ours, _ = build_message(valid, email_id=email_id, domain=domain, now=now, boundary=boundary)
        stdlib, _ = build_message_with_stdlib(
            valid, email_id=email_id, domain=domain, now=now, boundary=boundary
        )
        assert ours == stdlib, (index, valid.request)
        if direct(valid, email_id, domain, now):
            direct_count += 1
            encodings.update(re.findall(rb"Content-Transfer-Encoding: ([\w-]+)", ours))
    assert 300 < direct_count < len(messages) - 300, direct_count
    # The direct path met every transfer encoding the stdlib picks for text.
    assert encodings == {b"7bit", b"8bit", b"quoted-printable", b"base64"}


@pytest.mark.parametrize(
    ("subject", "simple"),
    [
        ("s" * 69, True),  # "Subject: " + 69 = 78 characters: one line for the stdlib too
        ("s" * 70, False),  # 79: the stdlib folds it
        ("", True),
        ("=?utf-8?q?x?=", False),
        ('He said "hi", (twice) <ok>', True),
        ("café", False),
        ("a\tb", False),
        (" lead", False),
    ],
)
def test_predicate_edges(subject: str, simple: bool) -> None:
    # The predicate's edges, each checked against the stdlib's bytes as well.
    valid = validate(
        SendInput(
            from_address="a@sender.example", to=["b@receiver.example"], subject=subject, text="hi"
        ),
        limits=LIMITS,
        now=NOW,
    )
    assert direct(valid, "e1", "sender.example", NOW) is simple
    ours, _ = build_message(valid, email_id="e1", domain="sender.example", now=NOW)
    stdlib, _ = build_message_with_stdlib(valid, email_id="e1", domain="sender.example", now=NOW)
    assert ours == stdlib


def test_random_boundaries_are_fresh_and_absent_from_the_bodies() -> None:
    # Without an injected boundary each text + HTML message gets its own, of the stdlib's
    # shape, and the only difference from the stdlib's bytes is that boundary.
    valid = validate(
        SendInput(
            from_address="a@sender.example", to=["b@receiver.example"], text="t", html="<p>h</p>"
        ),
        limits=LIMITS,
        now=NOW,
    )
    first, _ = build_message(valid, email_id="e1", domain="sender.example", now=NOW)
    second, _ = build_message(valid, email_id="e1", domain="sender.example", now=NOW)
    assert first != second
    boundary = first.split(b'boundary="', 1)[1].split(b'"', 1)[0].decode()
    assert len(boundary) == 36
    assert boundary.startswith("=" * 15)
    assert boundary.endswith("==")
    stdlib, _ = build_message_with_stdlib(
        valid, email_id="e1", domain="sender.example", now=NOW, boundary=boundary
    )
    assert first == stdlib
    with pytest.raises(ValueError, match="boundary"):
        simple_mime.build([("From", "a@b.example")], "t", "h", boundary='has "quotes"')


def _signer(domain: str, key: rsa.RSAPrivateKey) -> DkimSigner:
    return DkimSigner(domain=domain, selector=SELECTOR, private_key=key, algorithm="rsa-sha256")


def _publish(knot: KnotServer, domain: str, key: rsa.RSAPrivateKey) -> None:
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    value = f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
    knot.set_zone(domain, [(f"{SELECTOR}._domainkey", "TXT", quoted(split_txt(value)))])


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    """An RSA-2048 key (the product's default DKIM key)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


async def test_dkimpy_and_opendkim_verify_both_paths(
    knot_server: KnotServer, rsa_key: rsa.RSAPrivateKey, tmp_path: Path
) -> None:
    # Signed by the service's signer, messages from both paths verify with dkimpy (keys in
    # Knot); a few direct-path ones, of every shape, also with OpenDKIM.
    domain = unique_domain()
    _publish(knot_server, domain, rsa_key)
    signer = _signer(domain, rsa_key)
    shapes: dict[str, bytes] = {}
    for index, (valid, now) in enumerate(corpus(seed=7, count=60, domain=domain)):
        email_id = f"{index:024x}"
        for build in (build_message, build_message_with_stdlib):
            message, _ = build(valid, email_id=email_id, domain=domain, now=now)
            signed = signer.sign(message) + message
            assert await asyncio.to_thread(dkimpy_verifies, knot_server, signed), index
        if direct(valid, email_id, domain, now):
            request = valid.request
            shape = "both" if request.text and request.html else "html" if request.html else "text"
            shapes.setdefault(shape, signer.sign(message) + message)
    assert set(shapes) == {"text", "html", "both"}
    for shape, signed in shapes.items():
        verdict = await asyncio.to_thread(opendkim_verdict, knot_server, signed, tmp_path / shape)
        assert verdict.endswith("succeeded"), (shape, verdict)
        tampered = signed.replace(b"\r\n\r\n", b"\r\n\r\nX", 1)
        verdict = await asyncio.to_thread(
            opendkim_verdict, knot_server, tampered, tmp_path / f"{shape}-tampered"
        )
        assert "succeeded" not in verdict, (shape, verdict)


@pytest.mark.parametrize(
    ("headers", "field"),
    [
        # The stdlib raised ValueError (an INTERNAL answer) on a second Orig-Date.
        ([("Orig-Date", "Tue, 2 Jan 2024 10:00:00 +0100")] * 2, "headers[1].name"),
        # ... and wrote a date field that is not a date as an empty field, dropping the value.
        ([("Resent-Date", "next tuesday")], "headers[0].value"),
        ([("X-Ok", "1"), ("Orig-Date", "garbage")], "headers[1].value"),
    ],
)
def test_structured_custom_headers_the_stdlib_cannot_write_are_refused(
    headers: list[tuple[str, str]], field: str
) -> None:
    # A custom header the stdlib would refuse or empty is a clear error naming it.
    request = SendInput(
        from_address="a@sender.example", to=["b@receiver.example"], text="hi", headers=headers
    )
    with pytest.raises(InvalidArgument) as caught:
        validate(request, limits=LIMITS, now=NOW)
    assert [v.field for v in caught.value.violations] == [field]


def test_repeatable_structured_headers_stay_accepted() -> None:
    # Resent-Date may appear more than once (one per resending): both are kept, as dates.
    valid = validate(
        SendInput(
            from_address="a@sender.example",
            to=["b@receiver.example"],
            text="hi",
            headers=[("Resent-Date", "Mon, 1 Jan 2024 00:00:00 +0000")] * 2,
        ),
        limits=LIMITS,
        now=NOW,
    )
    message, _ = build_message(valid, email_id="e1", domain="sender.example", now=NOW)
    assert message.count(b"Resent-Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n") == 2
