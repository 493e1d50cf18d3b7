"""The suppression rules: which bounces suppress (RFC 3463 table) and how addresses compare."""

from __future__ import annotations

import pytest

from services.core.errors import InvalidArgument
from services.mail.feedback.suppression_rules import (
    bounce_suppresses,
    normalize_address,
    normalize_domain,
    normalize_prefix,
)


@pytest.mark.parametrize(
    ("code", "suppresses"),
    [
        # Bad mailbox, bad domain, bad syntax, moved, null MX, disabled: the address is dead.
        ("5.1.1", True),
        ("5.1.2", True),
        ("5.1.3", True),
        ("5.1.6", True),
        ("5.1.10", True),
        ("5.2.1", True),
        (" 5.1.1 ", True),
        # Mailbox full, policy and reputation, other permanent failures: not the address.
        ("5.2.2", False),
        ("5.7.1", False),
        ("5.7.26", False),
        ("5.7.0", False),
        ("5.1.7", False),
        ("5.1.8", False),
        ("5.3.4", False),
        ("5.4.4", False),
        ("5.5.0", False),
        ("5.6.0", False),
        # Transient or success: never.
        ("4.1.1", False),
        ("4.2.2", False),
        ("2.1.5", False),
        # Unclassifiable: never.
        ("", False),
        ("550", False),
        ("5.1", False),
        ("5.1.1.1", False),
        ("x.1.1", False),
        ("5.1.1000", False),
    ],
)
def test_bounce_classification_table(code: str, suppresses: bool) -> None:
    # The table of the module docstring, case by case.
    assert bounce_suppresses(code) is suppresses


def test_addresses_compare_case_insensitively_in_the_domain_only() -> None:
    # The domain part is lower-cased (A-label for IDN); the local part stays as typed.
    assert normalize_address("Bob@Example.COM", field="a") == "Bob@example.com"
    assert normalize_address("bob@example.com", field="a") == "bob@example.com"
    assert normalize_address("Bob@Example.COM", field="a") != normalize_address(
        "bob@example.com", field="a"
    )
    assert normalize_address("ann@Bücher.Example", field="a") == "ann@xn--bcher-kva.example"
    assert normalize_domain("Bücher.EXAMPLE", field="d") == "xn--bcher-kva.example"
    assert normalize_prefix("Bob@Exa") == "Bob@exa"
    assert normalize_prefix("Bo") == "Bo"


@pytest.mark.parametrize(
    "value",
    [
        "",
        "not an address",
        "a@b",
        "Bob <bob@example.com>",
        " bob@example.com",
        "a@@b.example",
        "@x.example",
    ],
)
def test_malformed_addresses_name_the_field(value: str) -> None:
    # Only a bare, valid address is accepted; the error names the field it came from.
    with pytest.raises(InvalidArgument) as caught:
        normalize_address(value, field="addresses[3]")
    assert [v.field for v in caught.value.violations] == ["addresses[3]"]
