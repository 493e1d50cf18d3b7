"""Real DNS servers on loopback for tests.

`KnotServer` runs a private, authoritative Knot DNS (`knotd`, Debian package
`knot`, 3.2.x) on 127.0.0.1 with its own config, rundir, control socket,
storage and zone files, all under one work directory. It never uses
`/etc/knot`, `/run/knot` or `/var/lib/knot`, so it cannot collide with (or
depend on) a system Knot instance. Zones are added, changed and removed at
runtime through `knotc` on the private control socket; every mutating call
returns only once the server *answers* with the new state, so a test can query
right after.

`SilentDnsServer` binds the same UDP+TCP port on 127.0.0.1 and never answers,
for exercising client timeouts.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import pathlib
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.zone

LOOPBACK = "127.0.0.1"

# Where Debian installs knotd/knotc. /usr/sbin is not on PATH for non-root
# users (and in some minimal containers), so look there explicitly.
_EXTRA_BIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")

# Bounded waits: long enough for a loaded CI box, short enough that a broken
# server fails the test run quickly instead of hanging it.
STARTUP_TIMEOUT_S = 10.0
CHANGE_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
_KNOTC_TIMEOUT_S = 10

# TTL written into every zone. Authoritative answers ignore it; it only matters
# to caching resolvers under test, and a short one keeps them from pinning
# stale data across zone updates for long.
DEFAULT_TTL = 60

# SOA MNAME/RNAME and the apex NS point outside every test zone (".invalid" is
# reserved by RFC 6761): an in-zone NS target would need glue A records, which
# would add names to the zone a test did not ask for (and break NXDOMAIN tests).
_NS_TARGET = "ns.azora-test.invalid."
_HOSTMASTER = "hostmaster.azora-test.invalid."

# sun_path in struct sockaddr_un is 108 bytes including the NUL terminator.
_MAX_UNIX_SOCKET_PATH = 107

_PR_SET_PDEATHSIG = 1


class KnotNotInstalledError(RuntimeError):
    """knotd/knotc are not available on this machine."""


class KnotServerError(RuntimeError):
    """knotd failed to start, or did not apply a change in time."""


def find_knot_binary(name: str) -> str:
    """Return the absolute path of a Knot binary (`knotd`, `knotc`) or raise."""
    search_path = os.pathsep.join([os.environ.get("PATH", os.defpath), *_EXTRA_BIN_DIRS])
    found = shutil.which(name, path=search_path)
    if found is None:
        raise KnotNotInstalledError(
            f"{name} not found (looked in PATH and {', '.join(_EXTRA_BIN_DIRS) or '-'}). "
            "Run `make deps` (it installs the Debian package `knot`)."
        )
    return found


def pick_free_port(host: str = LOOPBACK) -> int:
    """Return a port that is currently free for BOTH UDP and TCP on `host`.

    DNS servers bind both protocols on the same port, and a port the kernel
    hands out for TCP may well be taken for UDP. The port is released again
    before returning, so there is a small race; `KnotServer.start` retries with
    a new port if knotd then fails to bind.
    """
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port: int = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((host, port))
                except OSError:
                    continue
                return port
    raise OSError(f"no port free for both UDP and TCP on {host}")


def _die_with_parent_preexec() -> Callable[[], None] | None:
    """Make knotd get SIGTERM if the test process dies without tearing down.

    A SIGKILLed or crashed pytest never runs fixture teardown; without this an
    orphaned knotd would keep running. Linux only (prctl). The signal fires
    when the *thread* that spawned knotd exits, so start the server from a
    long-lived thread (pytest fixtures run in the main thread).
    """
    if not sys.platform.startswith("linux"):
        return None
    # Load libc in the parent: doing the dlopen between fork and exec is unsafe.
    libc = ctypes.CDLL(None, use_errno=True)
    parent_pid = os.getpid()

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        # The parent may have died before prctl took effect.
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec


def _zone_name(origin: str) -> dns.name.Name:
    return dns.name.from_text(origin)


def _zone_key(name: dns.name.Name) -> str:
    """Canonical text form knotc accepts and we use as a dict key: 'example.com.'."""
    return name.canonicalize().to_text()


def _zone_file_stem(name: dns.name.Name) -> str:
    text = name.canonicalize().to_text(omit_final_dot=True)
    return text if text not in ("", ".") else "root"


class KnotServer:
    """An authoritative Knot DNS server on 127.0.0.1:<free port> serving zones from a temp dir.

    Usage::

        server = KnotServer(tmp_path)
        server.start()
        server.set_zone("example.com", [("@", "TXT", '"v=abc"'), ("www", "A", "192.0.2.1")])
        ...  # query server.host:server.port
        server.remove_zone("example.com")   # now REFUSED
        server.stop()

    The server is shared state: tests sharing one instance should use distinct
    zone origins (or remove their zones). Calls are serialized with a lock
    because Knot has a single, global configuration transaction.
    """

    host: str
    port: int

    def __init__(self, workdir: pathlib.Path) -> None:
        self.workdir = workdir.resolve()
        self.host = LOOPBACK
        self.port = 0
        self.config_path = self.workdir / "knot.conf"
        self.control_socket = self.workdir / "knot.sock"
        self.log_path = self.workdir / "knot.log"
        self.stderr_path = self.workdir / "knotd.stderr"
        self.zone_dir = self.workdir / "zones"
        self._storage_dir = self.workdir / "db"
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()
        # One counter for the whole server, not per zone: a zone that is
        # removed and re-added still gets a serial above anything Knot saw.
        self._serials: Iterator[int] = itertools.count(1)
        self._zones: dict[str, int] = {}  # zone key -> serial currently served

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> KnotServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def zones(self) -> dict[str, int]:
        """Zones currently served, as {'example.com.': serial}."""
        with self._lock:
            return dict(self._zones)

    def start(self) -> None:
        """Write knot.conf, start knotd and wait until it answers queries and knotc."""
        with self._lock:
            if self._proc is not None:
                raise RuntimeError("KnotServer already started")
            knotd = find_knot_binary("knotd")
            find_knot_binary("knotc")  # fail now rather than at the first set_zone
            if len(os.fsencode(str(self.control_socket))) > _MAX_UNIX_SOCKET_PATH:
                raise ValueError(
                    f"control socket path too long for a unix socket: {self.control_socket} "
                    "(use a shorter workdir)"
                )
            self.workdir.mkdir(parents=True, exist_ok=True)
            # A restart forgets runtime-added zones (they live only in knotd's
            # memory), so start from a clean zone set and storage.
            shutil.rmtree(self.zone_dir, ignore_errors=True)
            shutil.rmtree(self._storage_dir, ignore_errors=True)
            self.zone_dir.mkdir()
            self._storage_dir.mkdir()
            self._zones.clear()

            # pick_free_port releases the port before knotd binds it; if
            # something grabs it in between, knotd exits with "address already
            # in use" and we simply try another port.
            last_error: KnotServerError | None = None
            for _ in range(3):
                self.port = pick_free_port(self.host)
                try:
                    self._spawn_and_wait(knotd)
                    return
                except KnotServerError as err:
                    last_error = err
                    if "already in use" not in str(err):
                        raise
            assert last_error is not None
            raise last_error

    def stop(self) -> None:
        """Terminate knotd (SIGTERM, then SIGKILL after a timeout). Idempotent."""
        with self._lock:
            proc, self._proc = self._proc, None
            self._zones.clear()
            if proc is None:
                return
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=STOP_TIMEOUT_S)

    # ------------------------------------------------------------------ zones

    def set_zone(self, origin: str, records: list[tuple[str, str, str]]) -> None:
        """Create or replace zone `origin` with SOA + NS + `records`.

        `records` are (owner, rtype, rdata) with owner relative to the origin
        or '@' (absolute names ending in '.' also work), e.g.
        ("@", "TXT", '"azora-verify=abc"') or ("www", "A", "192.0.2.1").
        Returns once the server serves the new serial.
        """
        with self._lock:
            self._require_running()
            name = _zone_name(origin)
            key = _zone_key(name)
            serial = next(self._serials)
            text = self._render_zone(name, serial, records)
            zone_file = self.zone_dir / f"{_zone_file_stem(name)}.zone"
            # Atomic replace: knotd must never parse a half-written file.
            tmp = zone_file.with_suffix(".zone.tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, zone_file)

            if key not in self._zones:
                self._conf_transaction(
                    ["conf-set", f"zone[{key}]"],
                    ["conf-set", f"zone[{key}].file", str(zone_file)],
                )
                # From here on knotd knows the zone; if loading it fails, the
                # next set_zone must reload rather than re-add it.
                self._zones[key] = 0
            # A blocking zone-reload makes knotc exit non-zero right away when
            # Knot rejects the file (e.g. a semantic check dnspython does not
            # do), instead of us polling until the timeout. It also forces a
            # re-read regardless of file mtime, so two updates within one mtime
            # tick are not missed. For a just-added zone it only repeats the
            # load that conf-commit scheduled.
            self._knotc("-b", "zone-reload", key)
            self._wait_for(
                lambda: self._served_serial(name) == serial,
                f"zone {key} to be served with serial {serial}",
            )
            self._zones[key] = serial

    def remove_zone(self, origin: str) -> None:
        """Stop serving `origin` (queries for it then get REFUSED). Waits until effective."""
        with self._lock:
            self._require_running()
            name = _zone_name(origin)
            key = _zone_key(name)
            if key not in self._zones:
                raise KeyError(f"zone {key} is not served by this KnotServer")
            self._conf_transaction(["conf-unset", f"zone[{key}]"])
            del self._zones[key]
            (self.zone_dir / f"{_zone_file_stem(name)}.zone").unlink(missing_ok=True)
            self._wait_for(
                lambda: self._rcode(name) == dns.rcode.REFUSED,
                f"zone {key} to be removed (REFUSED)",
            )

    # ------------------------------------------------------------------ internals

    def _config_text(self) -> str:
        w = self.workdir
        # No remotes, no ACLs, no DNSSEC, no notify, no dbus: nothing here makes
        # knotd talk to anything but its loopback listener and unix socket.
        # Zones are added at runtime via knotc, so none are listed here.
        return f"""\
# Generated by tests/support/dns_server.py -- private test instance.
server:
    rundir: "{w}"
    pidfile: "{w}/knot.pid"
    listen: {self.host}@{self.port}
    # Tiny thread pools: a test server needs no parallelism and this keeps
    # startup fast and resource use low.
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1

control:
    listen: "{self.control_socket}"

log:
  - target: "{self.log_path}"
    any: info

database:
    storage: "{self._storage_dir}"

template:
  - id: default
    storage: "{self.zone_dir}"
    # The zone file is the single source of truth: load it whole, never write
    # it back (zonefile-sync -1) and keep no journal that could resurrect an
    # older version of a zone that is removed and re-added.
    zonefile-load: whole
    zonefile-sync: -1
    journal-content: none
    semantic-checks: off
"""

    def _spawn_and_wait(self, knotd: str) -> None:
        self.config_path.write_text(self._config_text(), encoding="utf-8")
        self.control_socket.unlink(missing_ok=True)
        self.log_path.unlink(missing_ok=True)
        env = dict(os.environ)
        env["TMPDIR"] = str(self.workdir)  # keep any knotd temp files in the workdir
        with open(self.stderr_path, "wb") as stderr:
            # Output goes to files, not pipes: nobody reads a pipe while knotd
            # runs, and a full pipe buffer would block knotd.
            self._proc = subprocess.Popen(
                [knotd, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                cwd=self.workdir,
                env=env,
                preexec_fn=_die_with_parent_preexec(),
            )
        try:
            self._wait_for(
                self._ready, f"knotd to answer on {self.host}:{self.port}", STARTUP_TIMEOUT_S
            )
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        if not self.control_socket.exists():
            return False
        # Any response (REFUSED, as no zone is loaded yet) proves the listener
        # is up; knotd binds UDP and TCP together before it serves either.
        if self._rcode(dns.name.root, timeout=0.2) is None:
            return False
        status = subprocess.run(
            self._knotc_argv("status"), capture_output=True, timeout=_KNOTC_TIMEOUT_S, check=False
        )
        return status.returncode == 0

    def _require_running(self) -> None:
        if not self.running:
            raise KnotServerError("knotd is not running" + self._diagnostics())

    def _render_zone(
        self, name: dns.name.Name, serial: int, records: list[tuple[str, str, str]]
    ) -> str:
        origin = name.to_text()
        lines = [
            f"$ORIGIN {origin}",
            f"$TTL {DEFAULT_TTL}",
            # refresh/retry/expire/minimum are irrelevant for a primary with no
            # secondaries; minimum (negative-caching TTL) kept short.
            f"@ SOA {_NS_TARGET} {_HOSTMASTER} {serial} 3600 600 86400 5",
            f"@ NS {_NS_TARGET}",
        ]
        for owner, rtype, rdata in records:
            if dns.rdatatype.from_text(rtype) == dns.rdatatype.SOA:
                raise ValueError("records must not contain SOA; KnotServer manages it (serial)")
            for field in (owner, rtype, rdata):
                if "\n" in field or "\r" in field:
                    raise ValueError(f"newline in record field {field!r}")
            if not owner or any(c.isspace() for c in owner) or owner.startswith(";"):
                raise ValueError(f"invalid owner name {owner!r}")
            lines.append(f"{owner} {rtype} {rdata}")
        text = "\n".join(lines) + "\n"
        # Validate with dnspython first: a zone Knot refuses to load would only
        # surface as a wait timeout, with the reason buried in knot.log.
        try:
            dns.zone.from_text(text, origin=name, relativize=False, check_origin=True)
        except (dns.exception.DNSException, KeyError, ValueError) as err:
            raise ValueError(
                f"invalid records for zone {origin}: {err}\n--- zone file ---\n{text}"
            ) from err
        return text

    def _knotc_argv(self, *args: str) -> list[str]:
        # -c points knotc at our config so it never reads /etc/knot/knot.conf.
        return [
            find_knot_binary("knotc"),
            "-c",
            str(self.config_path),
            "-s",
            str(self.control_socket),
            "-t",
            str(_KNOTC_TIMEOUT_S),
            *args,
        ]

    def _knotc(self, *args: str) -> str:
        result = subprocess.run(
            self._knotc_argv(*args),
            capture_output=True,
            text=True,
            timeout=_KNOTC_TIMEOUT_S + 5,
            check=False,
        )
        if result.returncode != 0:
            raise KnotServerError(
                f"knotc {' '.join(args)} failed (rc={result.returncode}): "
                f"{result.stdout.strip()} {result.stderr.strip()}" + self._diagnostics()
            )
        return result.stdout

    def _conf_transaction(self, *commands: list[str]) -> None:
        # Knot allows one config transaction at a time; abort on any failure so
        # a broken call does not leave the next conf-begin failing too.
        self._knotc("conf-begin")
        try:
            for command in commands:
                self._knotc(*command)
            self._knotc("conf-commit")
        except BaseException:
            with contextlib.suppress(KnotServerError):
                self._knotc("conf-abort")
            raise

    def _query(self, qname: dns.name.Name, timeout: float) -> dns.message.Message | None:
        query = dns.message.make_query(qname, dns.rdatatype.SOA)
        try:
            return dns.query.udp(query, self.host, port=self.port, timeout=timeout)
        except (dns.exception.Timeout, OSError):
            return None

    def _rcode(self, qname: dns.name.Name, timeout: float = 1.0) -> dns.rcode.Rcode | None:
        response = self._query(qname, timeout)
        return None if response is None else response.rcode()

    def _served_serial(self, name: dns.name.Name) -> int | None:
        response = self._query(name, 1.0)
        if response is None or response.rcode() != dns.rcode.NOERROR:
            return None
        for rrset in response.answer:
            if rrset.rdtype == dns.rdatatype.SOA and rrset.name == name:
                serial: int = rrset[0].serial
                return serial
        return None

    def _wait_for(
        self, condition: Callable[[], bool], what: str, timeout: float = CHANGE_TIMEOUT_S
    ) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise KnotServerError(
                    f"knotd exited (rc={code}) while waiting for {what}" + self._diagnostics()
                )
            if condition():
                return
            if time.monotonic() >= deadline:
                raise KnotServerError(
                    f"timed out after {timeout:.0f}s waiting for {what}" + self._diagnostics()
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _diagnostics(self) -> str:
        parts = [f"\n(workdir {self.workdir}, port {self.port})"]
        for label, path in (("knotd stderr", self.stderr_path), ("knot.log", self.log_path)):
            try:
                content = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            tail = "\n".join(content.strip().splitlines()[-40:])
            if tail:
                parts.append(f"--- {label} (tail) ---\n{tail}")
        return "\n".join(parts)


class SilentDnsServer:
    """A UDP+TCP socket on 127.0.0.1 that accepts queries and never answers (for timeout tests).

    UDP datagrams are read and discarded; TCP connections are accepted and held
    open without ever writing, so clients over either transport time out
    rather than getting a refusal or a reset.
    """

    host: str
    port: int
    udp_queries: int  # datagrams received (and never answered), so tests can see they arrived

    def __init__(self) -> None:
        self.host = LOOPBACK
        self.port = 0
        self.udp_queries = 0
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> SilentDnsServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("SilentDnsServer already started")
        # Keep both sockets bound (unlike pick_free_port), so no race: retry
        # until a TCP port from the kernel is also free for UDP.
        for _ in range(100):
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.bind((self.host, 0))
            port: int = tcp.getsockname()[1]
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                udp.bind((self.host, port))
            except OSError:
                tcp.close()
                udp.close()
                continue
            tcp.listen(64)
            tcp.setblocking(False)
            udp.setblocking(False)
            self._tcp, self._udp, self.port = tcp, udp, port
            break
        else:
            raise OSError(f"no port free for both UDP and TCP on {self.host}")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="silent-dns", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and close every socket. Idempotent."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join(timeout=5)
        for sock in [*self._conns, self._tcp, self._udp]:
            if sock is not None:
                sock.close()
        self._conns.clear()
        self._tcp = self._udp = None

    def _run(self) -> None:
        assert self._tcp is not None
        assert self._udp is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self._tcp, selectors.EVENT_READ)
            sel.register(self._udp, selectors.EVENT_READ)
            # Poll with a timeout so stop() is noticed: closing a socket does
            # not reliably wake a thread blocked on it.
            while not self._stop.is_set():
                for key, _ in sel.select(timeout=0.1):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    try:
                        if sock is self._tcp:
                            conn, _addr = sock.accept()
                            conn.setblocking(False)
                            # Hold the connection (never answer); drain what the
                            # client sends so its writes never block.
                            self._conns.append(conn)
                            sel.register(conn, selectors.EVENT_READ)
                        elif sock is self._udp:
                            sock.recvfrom(65535)  # swallow the query
                            self.udp_queries += 1
                        elif not sock.recv(65535):
                            self._drop(sel, sock)  # client closed its side
                    except (BlockingIOError, InterruptedError):
                        continue
                    except ConnectionError:
                        self._drop(sel, sock)

    def _drop(self, sel: selectors.BaseSelector, conn: socket.socket) -> None:
        if conn in self._conns:
            sel.unregister(conn)
            self._conns.remove(conn)
            conn.close()
