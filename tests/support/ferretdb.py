"""FerretDB processes for tests that compare the local build's changes with upstream's code."""

from __future__ import annotations

import pathlib

from services.core.embedded_db import EmbeddedFerretDB, find_ferretdb_binary

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def start_ferretdb(tmp: pathlib.Path, name: str, environment: dict[str, str]) -> EmbeddedFerretDB:
    """A started bin/ferretdb with its data in `tmp/name` and `environment` (its switches)."""
    data = tmp / name
    data.mkdir()
    db = EmbeddedFerretDB(
        binary=find_ferretdb_binary(REPO_ROOT), data_dir=data, environment=environment
    )
    db.start()
    return db
