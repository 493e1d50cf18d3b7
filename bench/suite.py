"""The whole suite as separate processes, for the benchmarks, the soak and the drills.

Started the way ``scripts/run_suite.py`` starts it (``python -m services.<name>``, ``python -m
gateway``), but on free ports, with its own FerretDB data directory under the run directory (so
the database can be stopped and restarted on the same data and port), its own Knot DNS server
(domain verification and DKIM activation look records up there), our counting sink as the
domain's relay, and optionally separate delivery workers (``python -m services.mail.worker``).
Every child's output goes to ``<run dir>/<name>.log``.

Children are started without a ``preexec_fn``: once this process has used gRPC (whose threads
are running), running Python code between fork and exec can crash the child (FerretDB
restarted by the database drill died with SIGSEGV before exec). So children do not get
PDEATHSIG; `stop` (always called in ``finally``) ends them, each in its own process group.

`setup_domain` does what a customer does: create the domain, generate a DKIM key (RSA-2048),
publish both records, verify the domain, activate the key, point the relay at the sink.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pymongo
from azora.domain.v1 import domain_pb2, domain_pb2_grpc
from azora.smtp.v1 import smtp_pb2, smtp_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

import services.core.embedded_db
from bench.postfix import wait_port
from services.core.embedded_db import EmbeddedFerretDB, find_ferretdb_binary, pick_free_port
from tests.support import dns_server
from tests.support.dns_server import KnotServer

REPO = Path(__file__).resolve().parent.parent
DOMAIN = "bench.example"
DATABASE = "azora_bench"
# (name, module, port variable)
SERVICES = (
    ("domain", "services.domain", "AZORA_DOMAIN_GRPC_PORT"),
    ("smtp", "services.smtp", "AZORA_SMTP_GRPC_PORT"),
    ("mail", "services.mail", "AZORA_MAIL_GRPC_PORT"),
    ("gateway", "gateway", "PORT"),
)


@contextlib.contextmanager
def _no_preexec() -> Iterator[None]:
    """EmbeddedFerretDB and KnotServer start children with a preexec_fn; switch it off."""
    ferret, knot = (
        services.core.embedded_db.die_with_parent_preexec,
        dns_server._die_with_parent_preexec,
    )
    services.core.embedded_db.die_with_parent_preexec = lambda: None
    dns_server._die_with_parent_preexec = lambda: None
    try:
        yield
    finally:
        services.core.embedded_db.die_with_parent_preexec = ferret
        dns_server._die_with_parent_preexec = knot


@dataclass
class Suite:
    """FerretDB + Knot + sink + domain/smtp/mail services + gateway (+ workers) on loopback."""

    workdir: Path
    env_overrides: dict[str, str] = field(default_factory=dict)
    mail_workers_in_process: bool = True
    ferret: EmbeddedFerretDB | None = None
    knot: KnotServer | None = None
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    sink_port: int = 0
    sink_log: Path = field(default_factory=Path)
    sink: subprocess.Popen[bytes] | None = None

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start everything but separate workers, and wait until every service is SERVING."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ferret = EmbeddedFerretDB(
            binary=find_ferretdb_binary(REPO),
            data_dir=self.workdir / "ferretdb",
            port=pick_free_port(),
        )
        self.start_ferret()
        self.knot = KnotServer(self.workdir / "knot")
        with _no_preexec():
            self.knot.start()
        self.sink_port = pick_free_port()
        self.sink_log = self.workdir / "sink.log"
        self.start_sink()
        for name, _module, variable in SERVICES:
            self.ports[name] = pick_free_port()
            self.env_overrides.setdefault(variable, str(self.ports[name]))
        for name, module, _variable in SERVICES:
            self.start_process(name, module)
        self.wait_ready()

    def start_ferret(self) -> None:
        """(Re)start FerretDB on the same data directory and port."""
        assert self.ferret is not None
        with _no_preexec():
            self.ferret.start()

    def env(self, **extra: str) -> dict[str, str]:
        """The environment every child gets."""
        assert self.ferret is not None
        assert self.knot is not None
        env = dict(os.environ)
        env.update(
            {
                "MONGODB_URI": f"mongodb://127.0.0.1:{self.ferret.port}/",
                "AZORA_MONGODB_DATABASE": DATABASE,
                "LOG_LEVEL": "warn",
                "AZORA_DNS_NAMESERVERS": "127.0.0.1",
                "AZORA_DNS_PORT": str(self.knot.port),
                "AZORA_MAIL_RUN_WORKERS": "true" if self.mail_workers_in_process else "false",
                # Several workers per machine: no fixed metrics ports.
                "AZORA_METRICS_PORT_DOMAIN": "0",
                "AZORA_METRICS_PORT_SMTP": "0",
                "AZORA_METRICS_PORT_MAIL": "0",
                "AZORA_METRICS_PORT_GATEWAY": "0",
                "AZORA_METRICS_PORT_MAIL_WORKER": "0",
                "PYTHONPATH": str(REPO),
                # Rate limits and sending quotas (product spec: 100 requests per 15 minutes;
                # 100 sends a minute, 1,000 an hour, 10,000 a day per tenant) would turn a
                # benchmark into a test of the limiter.
                "RATE_LIMIT_MAX": "100000000",
                "AZORA_SEND_RATE_LIMIT_MAX": "100000000",
                "AZORA_QUOTA_EMAILS_PER_HOUR": "100000000",
                "AZORA_QUOTA_EMAILS_PER_DAY": "100000000",
            }
        )
        env.update(self.env_overrides)
        env.update(extra)
        return env

    def start_process(self, name: str, module: str, **extra: str) -> subprocess.Popen[bytes]:
        """Start `python -m module` as `name` (its output appended to <name>.log)."""
        log = (self.workdir / f"{name}.log").open("ab")
        proc = subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", module],
            cwd=REPO,
            env=self.env(**extra),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            process_group=0,
        )
        log.close()
        self.procs[name] = proc
        return proc

    def start_worker(self, name: str) -> subprocess.Popen[bytes]:
        """Start one separate delivery worker process."""
        return self.start_process(name, "services.mail.worker", AZORA_MAIL_WORKER_ID=name)

    def restart(self, name: str) -> subprocess.Popen[bytes]:
        """Start `name` again (after it exited or was killed) with the same module."""
        modules = {n: m for n, m, _ in SERVICES}
        if name in modules:
            return self.start_process(name, modules[name])
        return self.start_worker(name)

    def signal(self, name: str, sig: signal.Signals) -> None:
        """Send `sig` to one child."""
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(sig)

    def wait_exit(self, name: str, timeout: float) -> int | None:
        """Wait for a child to exit; its status, or None when it is still running."""
        try:
            return self.procs[name].wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def start_sink(
        self, *, tempfail_until: float = 0.0, reject_prefix: str = "", data_delay: float = 0.0
    ) -> None:
        """(Re)start the counting sink on the suite's sink port, appending to the same log."""
        self.sink = subprocess.Popen(  # noqa: S603
            [
                sys.executable, "-m", "bench.sink", "--port", str(self.sink_port),
                "--log", str(self.sink_log), "--tempfail-until", str(tempfail_until),
                "--reject-prefix", reject_prefix, "--data-delay", str(data_delay),
            ],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            process_group=0,
        )  # fmt: skip
        wait_port(self.sink_port, 10)

    def stop_sink(self) -> None:
        """Stop the sink (the relay is then down: connections are refused)."""
        if self.sink is not None and self.sink.poll() is None:
            self.sink.terminate()
            self.sink.wait(10)

    def stop(self) -> None:
        """SIGTERM every child, SIGKILL stragglers, then stop the sink, Knot and FerretDB."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 20
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.stop_sink()
        if self.knot is not None:
            self.knot.stop()
        if self.ferret is not None:
            self.ferret.stop()

    def pids(self) -> dict[str, int]:
        """Process ids of everything running, by name (FerretDB and the sink included)."""
        found = {name: p.pid for name, p in self.procs.items() if p.poll() is None}
        if self.ferret is not None and self.ferret.pid is not None:
            found["ferretdb"] = self.ferret.pid
        if self.sink is not None and self.sink.poll() is None:
            found["sink"] = self.sink.pid
        return found

    # ----------------------------------------------------------------- readiness

    def wait_ready(self, names: tuple[str, ...] = ("domain", "smtp", "mail", "gateway")) -> None:
        """Wait until the named services answer (gRPC health SERVING; the gateway's port)."""
        asyncio.run(self.wait_ready_async(names))

    async def wait_ready_async(
        self, names: tuple[str, ...] = ("domain", "smtp", "mail", "gateway"), wait_s: float = 60
    ) -> None:
        """Async `wait_ready`."""
        deadline = time.monotonic() + wait_s
        for name in names:
            while not await self.serving(name):
                proc = self.procs.get(name)
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}); see {name}.log")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} not ready after {wait_s} s")
                await asyncio.sleep(0.2)

    async def serving(self, name: str) -> bool:
        """Whether a service answers SERVING (the gateway: accepts connections)."""
        port = self.ports[name]
        if name == "gateway":
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                return False
            writer.close()
            return True
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                # grpcio-health-checking's stub is untyped (same ignore as services/health).
                reply = await health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[attr-defined]
                    health_pb2.HealthCheckRequest(), timeout=2
                )
            except grpc.aio.AioRpcError:
                return False
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    # ----------------------------------------------------------------- data

    async def setup_domain(self, name: str = DOMAIN) -> str:
        """Verified domain, active RSA-2048 DKIM key, relay = the sink. Returns the domain id."""
        assert self.knot is not None
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{self.ports['domain']}") as dch,
            grpc.aio.insecure_channel(f"127.0.0.1:{self.ports['smtp']}") as sch,
        ):
            domains = domain_pb2_grpc.DomainServiceStub(dch)
            smtp = smtp_pb2_grpc.SmtpServiceStub(sch)
            domain = await domains.CreateDomain(domain_pb2.CreateDomainRequest(name=name))
            key = await smtp.GenerateDkimKey(
                smtp_pb2.GenerateDkimKeyRequest(domain_id=domain.id, key_bits=2048)
            )
            txt = " ".join(f'"{s}"' for s in key.record_strings)
            self.knot.set_zone(
                name,
                [
                    ("@", "TXT", f'"azora-verify={domain.verification_token}"'),
                    (f"{key.selector}._domainkey", "TXT", txt),
                ],
            )
            await domains.VerifyDomain(domain_pb2.VerifyDomainRequest(id=domain.id))
            await smtp.ActivateDkimKey(
                smtp_pb2.ActivateDkimKeyRequest(domain_id=domain.id, selector=key.selector)
            )
            await smtp.UpdateSmtpConfig(
                smtp_pb2.UpdateSmtpConfigRequest(
                    domain_id=domain.id,
                    host="127.0.0.1",
                    port=self.sink_port,
                    security="none",
                )
            )
            return str(domain.id)

    def mongo(self) -> pymongo.MongoClient[dict[str, Any]]:
        """A synchronous client on the suite's database server (for checks between phases)."""
        assert self.ferret is not None
        return pymongo.MongoClient(
            f"mongodb://127.0.0.1:{self.ferret.port}/", serverSelectionTimeoutMS=30_000
        )

    def emails(self, tag: str) -> list[dict[str, Any]]:
        """Stored emails with `tag`: id, message_id, status, created_at, events."""
        with self.mongo() as client:
            return list(
                client[DATABASE]["emails"].find(
                    {"tags": tag},
                    {"message_id": 1, "status": 1, "created_at": 1, "events": 1, "to": 1},
                )
            )

    def queue_depth(self) -> int:
        """Unfinished emails (all tags)."""
        with self.mongo() as client:
            return int(
                client[DATABASE]["emails"].count_documents(
                    {"status": {"$in": ["queued", "scheduled", "sending", "deferred"]}}
                )
            )
