"""The pre-commit hooks run exactly what `make lint` runs, with tools installed by `make deps`.

Two lists of the same checks drift apart unless something compares them: a check added to
`make lint` but not to the hooks (or the reverse) fails here.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# PyYAML comes with pre-commit (a dev dependency) and has no type stubs installed.
yaml: Any = importlib.import_module("yaml")
# How the Makefile spells the tools; the hooks name the same files directly.
MAKE_VARIABLES = {"$(BUF)": "node_modules/.bin/buf", "$(VENV)": ".venv"}


def _lint_commands() -> list[str]:
    """The commands of the Makefile's `lint` recipe, variables expanded, env prefixes dropped."""
    lines = (ROOT / "Makefile").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("lint:"))
    commands: list[str] = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        command = line.strip()
        if command.startswith("@#"):
            continue
        for variable, value in MAKE_VARIABLES.items():
            command = command.replace(variable, value)
        commands.append(re.sub(r"^(?:[A-Z_]+=\S+\s+)+", "", command))
    return commands


def _hooks() -> list[dict[str, Any]]:
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text(encoding="utf-8"))
    hooks: list[dict[str, Any]] = []
    for repo in config["repos"]:
        assert repo["repo"] == "local", "hooks must not be fetched from a git host"
        hooks.extend(repo["hooks"])
    return hooks


def test_pre_commit_hooks_run_what_make_lint_runs() -> None:
    commands = _lint_commands()
    assert len(commands) >= 5  # buf lint, buf breaking, ruff check, ruff format, mypy
    assert sorted(hook["entry"] for hook in _hooks()) == sorted(commands)


def test_pre_commit_hooks_use_the_installed_tools() -> None:
    for hook in _hooks():
        assert hook["language"] == "system", hook["id"]
        assert hook["pass_filenames"] is False, hook["id"]  # whole tree, as `make lint`
        tool = hook["entry"].split()[0]
        assert (ROOT / tool).exists() or tool.startswith((".venv/", "node_modules/")), tool
