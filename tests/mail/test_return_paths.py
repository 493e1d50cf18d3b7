"""Return paths of outgoing mail: one per email and recipient, and the mail that keeps its own."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest

from services.mail.models import Email
from services.mail.return_paths import ReturnPaths
from tests.conftest import make_settings
from tests.support.emails import an_email

NOW = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
KEY = base64.b64encode(b"k" * 32).decode()
OLD_KEY = base64.b64encode(b"o" * 32).decode()


def email(envelope_from: str) -> Email:
    return an_email(
        at=NOW,
        domain_name="shop.example",
        from_address="orders@shop.example",
        envelope_from=envelope_from,
        message_id="m@shop.example",
    )


def paths(**env: str) -> ReturnPaths:
    return ReturnPaths.from_settings(
        make_settings("mongodb://127.0.0.1:1/", "unused", AZORA_SECRETS_KEY=KEY, **env)
    )


def test_each_recipient_gets_its_own_authentic_return_path_on_the_bounce_domain() -> None:
    made = paths()
    a = made.for_email(email("orders@shop.example"), "a@example.org")
    b = made.for_email(email("orders@shop.example"), "b@example.org")
    assert a != b
    assert a.startswith("bounce-")
    assert a.endswith("@bounces.shop.example")
    token = made.parse(a)
    assert token is not None
    assert token.email_id == "0123456789abcdef01234567"
    assert (token.names("a@example.org"), token.names("b@example.org")) == (True, False)
    # A remote MTA that changes the case of the address changes nothing.
    assert made.parse(a.upper()) == token


def test_a_shared_bounce_domain_and_a_rotated_master_key() -> None:
    shared = paths(AZORA_BOUNCE_DOMAIN="bounces.azora.example")
    address = shared.for_email(email("orders@shop.example"), "a@example.org")
    assert address.endswith("@bounces.azora.example")
    # Mail sent before AZORA_SECRETS_KEY was replaced still has its bounces recognised.
    rotated = ReturnPaths.from_settings(
        make_settings(
            "mongodb://127.0.0.1:1/",
            "unused",
            AZORA_SECRETS_KEY=OLD_KEY,
            AZORA_SECRETS_PREVIOUS_KEYS=KEY,
            AZORA_BOUNCE_DOMAIN="bounces.azora.example",
        )
    )
    assert rotated.parse(address) is not None
    # Not of our shape, or elsewhere: not ours.
    assert shared.parse(address.replace("@bounces.azora.example", "@elsewhere.example")) is None
    assert paths(AZORA_BOUNCE_DOMAIN="bounces.other.example").parse(address) is None


@pytest.mark.parametrize(
    "sender", ["", "SRS0=HHHH=TT=example.org=alice@shop.example", "srs1=x=y==z@shop.example"]
)
def test_null_senders_and_srs_addresses_keep_their_envelope_sender(sender: str) -> None:
    # Relayed for somebody else: a report never causes another; a forwarded message's bounces
    # belong to its original sender.
    assert paths().for_email(email(sender), "a@example.org") == sender


@pytest.mark.parametrize("value", ["bounces", "{domain}", "bounces.{domain}.x", "b_o.{dom}"])
def test_the_bounce_domain_setting_is_checked(value: str) -> None:
    with pytest.raises(ValueError, match="AZORA_BOUNCE_DOMAIN"):
        paths(AZORA_BOUNCE_DOMAIN=value)
