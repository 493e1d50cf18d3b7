"""pytest fixtures for real loopback DNS servers.

Load them in a conftest with ``pytest_plugins = ["tests.support.dns_fixtures"]``
(root conftest only), or import the fixture functions into a test module.

Both fixtures are session-scoped: starting knotd takes a few hundred
milliseconds at most, but there is no reason to pay it per test. Tests sharing
`knot_server` must use distinct zone origins (or remove their zones).

A missing knotd FAILS the test instead of skipping it: a silently skipped DNS
suite looks green while testing nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.dns_server import (
    KnotNotInstalledError,
    KnotServer,
    SilentDnsServer,
    find_knot_binary,
)

# Leave room for "/knot.sock" within the 107-byte unix socket path limit.
_MAX_WORKDIR_LEN = 90


@pytest.fixture(scope="session")
def knot_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KnotServer]:
    """A started, authoritative Knot DNS server on 127.0.0.1 (no zones yet)."""
    missing: str | None = None
    try:
        find_knot_binary("knotd")
        find_knot_binary("knotc")
    except KnotNotInstalledError as err:
        missing = str(err)
    if missing is not None:
        # Failed outside the except block so the report is just this message,
        # not a chained traceback.
        pytest.fail(f"Knot DNS is required for these tests: {missing}", pytrace=False)

    workdir = tmp_path_factory.mktemp("knot")
    short_dir: str | None = None
    if len(os.fsencode(str(workdir.resolve()))) > _MAX_WORKDIR_LEN:
        # A deep --basetemp would overflow the unix socket path limit for
        # knotc's control socket; fall back to a short private dir.
        short_dir = tempfile.mkdtemp(prefix="knot-")
        workdir = Path(short_dir)

    server = KnotServer(workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        if short_dir is not None:
            shutil.rmtree(short_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def silent_dns_server() -> Iterator[SilentDnsServer]:
    """A UDP+TCP port on 127.0.0.1 that swallows DNS queries and never answers."""
    server = SilentDnsServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()
