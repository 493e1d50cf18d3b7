"""VERP return paths: they name the email and the recipient, and only authentic ones parse."""

from __future__ import annotations

import base64

import pytest

from services.core import verp
from services.core.ids import new_id

KEY = b"k" * 32
DOMAIN = "bounces.example.net"


def test_round_trip_names_the_email_and_the_recipient() -> None:
    # The address parses back to the email id and matches its recipient only.
    email_id = new_id()
    address = verp.return_path(
        key=KEY, email_id=email_id, recipient="Jane.Doe@Example.ORG", bounce_domain=DOMAIN
    )
    local, _, domain = address.partition("@")
    assert domain == DOMAIN
    assert local.startswith(verp.LOCAL_PREFIX)
    assert len(local) <= 64
    token = verp.parse(address, key=KEY, bounce_domain=DOMAIN)
    assert token is not None
    assert token.email_id == email_id
    assert token.names("Jane.Doe@example.org")  # domain case does not matter
    assert not token.names("jane.doe@example.org")  # the local part is as sent
    assert not token.names("other@example.org")


def test_case_changes_by_remote_mtas_do_not_matter() -> None:
    # Some MTAs fold the local part to upper or lower case: the token still parses.
    email_id = new_id()
    address = verp.return_path(
        key=KEY, email_id=email_id, recipient="a@b.test", bounce_domain=DOMAIN
    )
    token = verp.parse(address.upper(), key=KEY, bounce_domain=DOMAIN)
    assert token is not None
    assert token.email_id == email_id


def test_forged_and_altered_tokens_are_ignored() -> None:
    # A wrong key, a changed email id, a truncated token, garbage, another domain: None.
    email_id = new_id()
    address = verp.return_path(
        key=KEY, email_id=email_id, recipient="a@b.test", bounce_domain=DOMAIN
    )
    assert verp.parse(address, key=b"x" * 32, bounce_domain=DOMAIN) is None
    local, _, domain = address.partition("@")
    raw = bytearray(base64.b32decode(local[len(verp.LOCAL_PREFIX) :].upper() + "======"))
    raw[5] ^= 0x01  # one bit of the email id
    altered = base64.b32encode(bytes(raw)).decode().rstrip("=").lower()
    assert verp.parse(f"{verp.LOCAL_PREFIX}{altered}@{domain}", key=KEY) is None
    assert verp.parse(f"{local[:-4]}@{domain}", key=KEY) is None
    assert verp.parse(f"{verp.LOCAL_PREFIX}not-base32!@{domain}", key=KEY) is None
    assert verp.parse(f"postmaster@{domain}", key=KEY) is None
    assert verp.parse(address, key=KEY, bounce_domain="elsewhere.example") is None
    assert verp.parse("no-at-sign", key=KEY) is None


def test_bad_inputs_are_refused() -> None:
    # Ids must be ours and keys long enough: a mistake here would make unverifiable tokens.
    with pytest.raises(ValueError, match="24 hexadecimal"):
        verp.return_path(key=KEY, email_id="abc", recipient="a@b.test", bounce_domain=DOMAIN)
    with pytest.raises(ValueError, match="16 bytes"):
        verp.return_path(
            key=b"short", email_id=new_id(), recipient="a@b.test", bounce_domain=DOMAIN
        )


def test_only_the_canonical_spelling_of_a_token_is_accepted() -> None:
    # The token's last base32 character carries two bits beyond its 31 bytes; decoding ignores
    # them, so flipping them gave a second spelling that parsed as the same token (a test that
    # altered the last character failed whenever it only touched those bits).
    address = verp.return_path(
        key=KEY, email_id=new_id(), recipient="a@example.org", bounce_domain="b.example"
    )
    local, _, domain = address.partition("@")
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    last = alphabet.index(local[-1])
    assert verp.parse(address, key=KEY) is not None
    for spare in (1, 2, 3):
        twin = f"{local[:-1]}{alphabet[last ^ spare]}@{domain}"
        assert verp.parse(twin, key=KEY) is None, twin
