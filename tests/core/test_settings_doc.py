"""docs/operations.md's settings table is made from the declarations; each is declared once."""

from __future__ import annotations

from collections import Counter

from scripts.settings_table import BEGIN, DOC, OWNERS, render


def test_the_docs_table_is_generated_from_the_declarations() -> None:
    # A setting added, renamed or re-documented in code without `--write` fails here.
    document = DOC.read_text(encoding="utf-8")
    assert render(document) == document, "run: python -m scripts.settings_table --write"


def test_a_stale_table_is_noticed() -> None:
    # The comparison above can fail: a table that lost a row differs from the rendered one.
    document = DOC.read_text(encoding="utf-8")
    stale = document.replace("| `AZORA_MAIL_LEASE` |", "| `AZORA_MAIL_LEASE_OLD` |")
    assert stale != document
    assert render(stale) != stale
    assert BEGIN in document


def test_every_variable_is_declared_once() -> None:
    # One declaration per variable across the shared, per-service and gateway settings (a
    # variable may only be a fallback of another, as the gateway's body limit is).
    primary = Counter(
        spec.names[0] for _, cls in OWNERS for _, _, spec in cls.declared() if spec.names
    )
    assert [name for name, count in primary.items() if count > 1] == []
    assert len(primary) > 90
