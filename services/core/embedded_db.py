"""FerretDB as an embedded, local MongoDB: a child process on loopback with SQLite storage.

`make run` (scripts/run_suite.py) uses it when ``MONGODB_URI`` is unset, and the integration tests
use it for real storage. FerretDB 1.24 speaks the MongoDB wire protocol, so the services run the
same PyMongo code against it as against MongoDB 7 (DESIGN.md, "Storage"). The binary is built at a
pinned version by ``make deps`` into ``bin/ferretdb``.

The SQLite files hold every tenant's data (sealed secrets included), so the data directory is
kept 0700 and FerretDB runs with umask 077: its files are 0600 whatever the caller's umask.

Usage::

    with EmbeddedFerretDB(binary=find_ferretdb_binary(root), data_dir=root / "var/ferretdb") as db:
        client = AsyncMongoClient(db.uri)
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

import pymongo
import pymongo.errors

__all__ = [
    "EmbeddedFerretDB",
    "EmbeddedFerretDBError",
    "die_with_parent_preexec",
    "find_ferretdb_binary",
    "pick_free_port",
]

LOOPBACK = "127.0.0.1"

# prctl(2) option: signal delivered to this process when its parent thread dies.
_PR_SET_PDEATHSIG = 1

# Lines of FerretDB's log quoted in a start-up error.
_LOG_TAIL_LINES = 40

# Ports are picked by binding port 0 and releasing it before FerretDB binds it, so another process
# can take the port in between; start() then retries with fresh ports this many times.
_START_ATTEMPTS = 3


class EmbeddedFerretDBError(RuntimeError):
    """FerretDB did not start (or exited) — the message carries the tail of its log."""


def find_ferretdb_binary(repo_root: pathlib.Path) -> pathlib.Path:
    """Return the FerretDB binary: ``<repo_root>/bin/ferretdb``, else ``ferretdb`` on PATH.

    Args:
        repo_root: Root of the repository checkout (where ``make deps`` puts ``bin/``).

    Returns:
        Absolute path of an executable ``ferretdb``.

    Raises:
        FileNotFoundError: Neither exists; the message says how to build it.
    """
    built = repo_root / "bin" / "ferretdb"
    if built.is_file() and os.access(built, os.X_OK):
        return built.resolve()
    on_path = shutil.which("ferretdb")
    if on_path is not None:
        return pathlib.Path(on_path).resolve()
    raise FileNotFoundError(
        f"FerretDB not found at {built} nor on PATH; run `make deps` to build it "
        "(pinned in tools/ferretdb/go.mod)."
    )


def pick_free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port on `host` that is free right now (the kernel's choice for port 0).

    The port is released before returning, so a caller must cope with losing a race for it.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def die_with_parent_preexec() -> Callable[[], None] | None:
    """Return a preexec_fn that makes the child get SIGTERM when this process dies.

    Without it, a SIGKILLed or crashed parent (pytest, run_suite) never runs its teardown and
    FerretDB keeps running, holding its port and its SQLite files. Linux only (prctl); None
    elsewhere. The signal fires when the *thread* that spawned the child exits, so start children
    from a long-lived thread. Same approach as the Knot fixture in tests/support/dns_server.py;
    scripts/run_suite.py uses it for the services too.
    """
    if not sys.platform.startswith("linux"):
        return None
    # Load libc in the parent: a dlopen between fork and exec is not async-signal-safe.
    libc = ctypes.CDLL(None, use_errno=True)
    parent_pid = os.getpid()

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        # The parent may have died before prctl took effect; then nobody would stop us.
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec


def _make_private(directory: pathlib.Path) -> None:
    """Create `directory` (0700) or make an existing one 0700 with its files 0600.

    Existing files are tightened too: a directory created by an older version, or under a
    looser umask, may hold world-readable databases.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    for entry in directory.iterdir():
        if entry.is_file() and not entry.is_symlink():
            entry.chmod(0o600)


_FERRETDB_GOGC = "400"


class EmbeddedFerretDB:
    """FerretDB with its SQLite backend on loopback, as a child process.

    One SQLite file per MongoDB database is kept in `data_dir`, so data survives restarts when
    the same directory is reused (``make run`` uses ``var/ferretdb/``). Also a context manager:
    ``with EmbeddedFerretDB(...) as db:`` starts it and stops it on exit.

    Attributes:
        binary: The ``ferretdb`` executable.
        data_dir: SQLite directory; FerretDB's state (``state/``) and, by default, its log go
            there too.
        host: Address FerretDB listens on.
        port: Port FerretDB listens on; 0 before `start` means "pick a free one".
        log_path: File FerretDB's output is appended to.
        environment: ``FERRETDB_*`` variables to run it with (inherited ones are dropped);
            tests use ``FERRETDB_SQLITE_INDEX_PUSHDOWN=off`` to get the unpatched query plans.
    """

    def __init__(
        self,
        *,
        binary: pathlib.Path,
        data_dir: pathlib.Path,
        host: str = LOOPBACK,
        port: int = 0,
        log_path: pathlib.Path | None = None,
        environment: Mapping[str, str] | None = None,
    ) -> None:
        # FerretDB runs with data_dir as its working directory, so a relative path must be made
        # absolute now; a bare name ("ferretdb") is left for the PATH lookup.
        self.binary = binary if os.sep not in str(binary) else binary.resolve()
        self.data_dir = data_dir.resolve()
        self.host = host
        self.port = port
        self.log_path = (log_path or self.data_dir / "ferretdb.log").resolve()
        self.environment = dict(environment or {})
        # Remembered so that a restart with port=0 picks a fresh port again.
        self._requested_port = port
        self._debug_port = 0
        self._log_offset = 0
        self._proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ public API

    @property
    def uri(self) -> str:
        """MongoDB connection string, e.g. ``mongodb://127.0.0.1:27017/``.

        Raises:
            RuntimeError: The port is not known yet (port 0 and not started).
        """
        if self.port == 0:
            raise RuntimeError("EmbeddedFerretDB has no port yet; call start() first")
        return f"mongodb://{self.host}:{self.port}/"

    @property
    def pid(self) -> int | None:
        """Process id of the running FerretDB, or None when not started or stopped."""
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        """Whether the FerretDB process is alive (it may have exited on its own)."""
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 30.0) -> str:
        """Start FerretDB and wait until it answers a ``ping``.

        Args:
            timeout: Seconds to wait for the first successful ping (per attempt).

        Returns:
            The connection string (`uri`).

        Raises:
            RuntimeError: Already started.
            EmbeddedFerretDBError: FerretDB exited or did not answer in time.
        """
        if self.running:
            raise RuntimeError("EmbeddedFerretDB already started")
        self.stop()  # forget a process that exited on its own
        # FerretDB requires the SQLite directory to exist (it does not create it).
        _make_private(self.data_dir)
        _make_private(self.data_dir / "state")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)

        for attempt in range(1, _START_ATTEMPTS + 1):
            self.port = self._requested_port or pick_free_port(self.host)
            self._debug_port = pick_free_port(LOOPBACK)
            try:
                self._spawn()
                self._wait_until_ready(timeout)
            except BaseException as err:
                retry = attempt < _START_ATTEMPTS and self._lost_port_race(err)
                # Also on KeyboardInterrupt: never leave a half-started FerretDB behind.
                self.stop()
                if not retry:
                    raise
            else:
                return self.uri
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def stop(self, timeout: float = 10.0) -> None:
        """Stop FerretDB: SIGTERM, then SIGKILL after `timeout` seconds. Idempotent.

        Args:
            timeout: Seconds to wait for a clean exit (FerretDB closes its SQLite files on
                SIGTERM) before killing it.
        """
        proc, self._proc = self._proc, None
        if self._requested_port == 0:
            self.port = 0
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def poll(self) -> int | None:
        """Return FerretDB's exit status if it has exited, else None (also None if not started)."""
        return None if self._proc is None else self._proc.poll()

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """Return the last `lines` lines FerretDB logged since the latest `start`."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                content = log.read().decode("utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(content.strip().splitlines()[-lines:])

    def __enter__(self) -> EmbeddedFerretDB:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ internals

    def _lost_port_race(self, err: BaseException) -> bool:
        """Whether `err` is FerretDB failing to bind a port that we picked (worth a retry)."""
        if not isinstance(err, EmbeddedFerretDBError) or "address already in use" not in str(err):
            return False
        # A port the caller asked for stays taken however often we retry.
        return self._requested_port == 0 or f"{self.host}:{self.port}:" not in str(err)

    def _argv(self) -> list[str]:
        # The SQLite "URL" is a directory and must end with "/"; quote the path so a space or
        # "?" in it is not taken for URL syntax (FerretDB parses it with net/url).
        sqlite_url = "file:" + urllib.parse.quote(f"{self.data_dir}/", safe="/")
        return [
            str(self.binary),
            "--handler=sqlite",
            f"--sqlite-url={sqlite_url}",
            f"--listen-addr={self.host}:{self.port}",
            # Its default (127.0.0.1:8088) would collide between instances; nothing reads it.
            f"--debug-addr={LOOPBACK}:{self._debug_port}",
            # No reporting home from tests or developer machines.
            "--telemetry=disable",
            "--log-level=warn",
            "--log-format=json",
            # The instance UUID on every line is noise in a local log.
            "--no-log-uuid",
            f"--state-dir={self.data_dir / 'state'}",
        ]

    def _spawn(self) -> None:
        # FerretDB also reads FERRETDB_* variables; drop inherited ones so only our flags count.
        env = {k: v for k, v in os.environ.items() if not k.startswith("FERRETDB_")}
        # Go's collector at its default (100) took a tenth of FerretDB's CPU under load; its
        # heap is small (tens of MB), so collecting at four times the live heap costs little
        # memory. An inherited GOGC wins.
        env.setdefault("GOGC", _FERRETDB_GOGC)
        env.update(self.environment)
        # Created 0600, and tightened if an older run left it readable (it may quote data).
        descriptor = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(descriptor, 0o600)
        with os.fdopen(descriptor, "ab") as log:
            self._log_offset = log.tell()
            # Output goes to a file, never a pipe: nobody reads a pipe while FerretDB runs, and a
            # full pipe buffer would block it.
            self._proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                self._argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.data_dir,
                env=env,
                # Own process group: Ctrl+C in a terminal reaches only our parent, which then
                # stops FerretDB last, after the services that still use it.
                process_group=0,
                preexec_fn=die_with_parent_preexec(),
                # Every file FerretDB creates (SQLite databases, journals, state) is 0600.
                umask=0o077,
            )

    def _wait_until_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while True:
            assert self._proc is not None
            code = self._proc.poll()
            if code is not None:
                raise EmbeddedFerretDBError(
                    f"FerretDB exited with status {code} during start-up" + self._diagnostics()
                )
            try:
                self._ping()
            except pymongo.errors.PyMongoError as err:
                last_error = err
            else:
                return
            if time.monotonic() >= deadline:
                raise EmbeddedFerretDBError(
                    f"FerretDB did not answer ping on {self.host}:{self.port} within "
                    f"{timeout:.0f}s (last error: {last_error})" + self._diagnostics()
                )
            time.sleep(0.05)

    def _ping(self) -> None:
        # A synchronous client: start() is called before any event loop exists (run_suite) or
        # from a synchronous fixture. A short server selection keeps each attempt bounded.
        client: pymongo.MongoClient[dict[str, Any]]
        with pymongo.MongoClient(
            self.uri,
            serverSelectionTimeoutMS=500,
            connectTimeoutMS=500,
            directConnection=True,
        ) as client:
            client.admin.command("ping")

    def _diagnostics(self) -> str:
        parts = [f"\n(binary {self.binary}, data dir {self.data_dir}, log {self.log_path})"]
        tail = self.log_tail()
        if tail:
            parts.append(f"--- FerretDB log (tail) ---\n{tail}")
        return "\n".join(parts)
