"""The README's layout names every top-level folder, so a newcomer can find where things live.

A new folder at the repository root fails here until the README says what it holds.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Tool caches and packaging metadata that appear after running tools; they are not our layout.
NOT_LAYOUT = {
    ".git",
    ".hypothesis",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    "__pycache__",
}


def _layout_block() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^## Layout\n\n```\n(.*?)^```", readme, flags=re.MULTILINE | re.DOTALL)
    assert match, "README.md has no '## Layout' section with a code block"
    return match.group(1)


def test_layout_lists_every_top_level_folder() -> None:
    named = set(re.findall(r"(?:^|\s)(\.?[A-Za-z_][\w.-]*)/", _layout_block(), re.MULTILINE))
    folders = {
        path.name
        for path in ROOT.iterdir()
        if path.is_dir() and path.name not in NOT_LAYOUT and not path.name.endswith(".egg-info")
    }
    assert folders - named == set()
