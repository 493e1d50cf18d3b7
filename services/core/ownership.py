"""The domain-ownership TXT record: ``azora-verify=<token>`` published at the domain itself.

The domain service verifies it and the smtp service reports it among a domain's DNS checks; both
take the record's shape from here so they can never disagree on what counts as published.
"""

from __future__ import annotations

from collections.abc import Iterable

TOKEN_PREFIX = "azora-verify="  # noqa: S105 - a record prefix, not a secret


def expected_record(token: str) -> str:
    """The TXT value a domain must publish to prove ownership."""
    return f"{TOKEN_PREFIX}{token}"


def ownership_values(values: Iterable[str]) -> tuple[str, ...]:
    """The TXT values that are ownership records (of any token), in their published order."""
    return tuple(v for v in values if v.startswith(TOKEN_PREFIX))
