"""Run the whole suite locally.

FerretDB (unless MONGODB_URI is set), the three gRPC services, the local REST gateway, the
SMTP submission server, the webhook dispatcher and the inbound SMTP server.

Used by ``make run`` and ``make dev`` (which restarts it on code changes); ``make deps`` has
already built everything. Configuration is the services' own environment, passed through:

- ``MONGODB_URI`` unset: an embedded FerretDB is started with its data in ``var/ferretdb/``
  (kept across runs), on port 27017 if that is free, else on any free port, and its URI is
  given to the services as ``MONGODB_URI``.
- ``AZORA_DOMAIN_GRPC_PORT``, ``AZORA_SMTP_GRPC_PORT``, ``AZORA_MAIL_GRPC_PORT`` (defaults
  50051, 50052, 50053) and ``AZORA_HOST`` only decide what is printed here; the services read
  them themselves.
- ``AZORA_MAIL_WORKER_PROCESSES`` (default 0): with 1 or more, delivery runs in that many
  separate worker processes (``python -m services.mail.worker``, started and restarted like
  the services) and the mail service delivers nothing itself unless ``AZORA_MAIL_RUN_WORKERS``
  says otherwise; on 2 vCPUs, 2 processes deliver more than the in-process workers
  (docs/benchmarks.md).
- ``AZORA_METRICS_PEERS`` unset: set to the suite's own smtp, mail and gateway scrape endpoints
  (``AZORA_METRICS_PORT_*``), so ``GET /metrics`` shows every process's counters (the email
  counters live in the mail process) without configuration. Set it (even empty) to choose.

SIGTERM or SIGINT stops the services (SIGTERM, then SIGKILL after a grace period) and then
FerretDB, which the services need while they drain.

A child that exits on its own (crash, ``kill -9``, or a service that found its database client
wedged and exited for a restart) is started again, alone, after a backoff that starts at
``AZORA_RESTART_BACKOFF`` seconds (default 1) and doubles up to 30 s while it keeps failing; a
child that stayed up for a minute starts from the short backoff again. FerretDB is restarted
the same way on the same port and data, so the services' ``MONGODB_URI`` stays valid. The other
children keep serving meanwhile: one crash never stops the suite.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import FrameType
from typing import Any

from services.core.embedded_db import (
    EmbeddedFerretDB,
    die_with_parent_preexec,
    find_ferretdb_binary,
    pick_free_port,
)
from services.core.settings import METRICS_PORTS

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
FERRETDB_DATA_DIR = REPO_ROOT / "var" / "ferretdb"
FERRETDB_DEFAULT_PORT = 27017
# How long the services get to finish in-flight calls after SIGTERM before they are killed.
SHUTDOWN_GRACE_S = 15.0
# Restart backoff of a child that exited: first wait (AZORA_RESTART_BACKOFF), doubling up to
# the cap; reset once the child has run this long.
RESTART_BACKOFF_S = 1.0
RESTART_BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0
# (name, python module, port variable, default port)
SERVICES = (
    ("domain", "services.domain", "AZORA_DOMAIN_GRPC_PORT", 50051),
    ("smtp", "services.smtp", "AZORA_SMTP_GRPC_PORT", 50052),
    ("mail", "services.mail", "AZORA_MAIL_GRPC_PORT", 50053),
    # The local REST gateway (HTTP, not gRPC) transcodes to the three services above.
    ("gateway", "gateway", "PORT", 3006),
    # SMTP submission for applications (STARTTLS port; implicit TLS on AZORA_SUBMISSION_TLS_PORT,
    # default 2465; development certificate generated under var/submission/).
    ("submission", "services.submission", "AZORA_SUBMISSION_PORT", 2587),
    # Webhook delivery (the mail service's events to tenants' endpoints); its port is the
    # grpc.health.v1 server of its probes.
    (
        "webhooks",
        "services.mail.feedback.webhook_dispatcher",
        "AZORA_WEBHOOK_DISPATCHER_HEALTH_PORT",
        50055,
    ),
    # Inbound SMTP (the MX of the hosted domains; 25 in production; development certificate for
    # STARTTLS generated under var/inbound/).
    ("inbound", "services.inbound", "AZORA_INBOUND_PORT", 2525),
)
# Separate delivery workers, started when AZORA_MAIL_WORKER_PROCESSES is 1 or more: one
# `python -m services.mail.worker`, which runs (and supervises) that many processes. It serves
# no port of its own; its metrics are on AZORA_METRICS_PORT_MAIL_WORKER (+ i per process).
MAIL_WORKER = ("mail-worker", "services.mail.worker", "AZORA_METRICS_PORT_MAIL_WORKER", 9105)


def log(level: str, msg: str, **fields: Any) -> None:
    """Write one JSON line to stderr, in the same shape as the services' logs."""
    entry = {
        "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "level": level,
        "service": "run_suite",
        "msg": msg,
        **fields,
    }
    print(json.dumps(entry, default=str), file=sys.stderr, flush=True)


def port_is_free(host: str, port: int) -> bool:
    """Return whether a TCP listener could bind `host:port` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


# The processes whose expositions the domain process merges into GET /metrics (it serves its
# own registry itself): settings' service name, as METRICS_PORTS spells it.
METRICS_PEERS = ("smtp-service", "mail-service", "gateway")


def suite_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment the suite's children get: ours, plus the defaults that wire them.

    The peers are reached on loopback: a wildcard AZORA_METRICS_HOST still listens there.
    A port set to 0 (metrics off) leaves that process out.
    """
    env = dict(environ)
    if worker_processes(env) and "AZORA_MAIL_RUN_WORKERS" not in env:
        # The separate workers deliver; the mail service only accepts and answers.
        env["AZORA_MAIL_RUN_WORKERS"] = "false"
    if "AZORA_METRICS_PEERS" not in env:
        host = env.get("AZORA_METRICS_HOST", "").strip() or "127.0.0.1"
        if host in ("0.0.0.0", "::"):  # noqa: S104 - a listen address, not a bind
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        peers = []
        for name in METRICS_PEERS:
            variable, default = METRICS_PORTS[name]
            port = env.get(variable, "").strip() or str(default)
            if port != "0":
                peers.append(f"{name}=http://{host}:{port}/metrics")
        env["AZORA_METRICS_PEERS"] = ",".join(peers)
    return env


def worker_processes(env: Mapping[str, str]) -> int:
    """AZORA_MAIL_WORKER_PROCESSES (0 when unset; a bad value is the services' to refuse)."""
    try:
        return max(0, int(env.get("AZORA_MAIL_WORKER_PROCESSES", "").strip() or 0))
    except ValueError:
        return 0


def start_ferretdb() -> EmbeddedFerretDB:
    """Start FerretDB on var/ferretdb/, preferring MongoDB's usual port.

    The port is fixed now (not picked at each start) so that a restart keeps the address the
    services were given.
    """
    free = port_is_free("127.0.0.1", FERRETDB_DEFAULT_PORT)
    port = FERRETDB_DEFAULT_PORT if free else pick_free_port()
    db = EmbeddedFerretDB(
        binary=find_ferretdb_binary(REPO_ROOT), data_dir=FERRETDB_DATA_DIR, port=port
    )
    db.start()
    log("info", "FerretDB listening", uri=db.uri, data_dir=str(db.data_dir), log=str(db.log_path))
    return db


def start_service(module: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start `python -m module` with the suite's environment; its output goes to ours."""
    return subprocess.Popen(
        [sys.executable, "-m", module],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        # Own process group: Ctrl+C in the terminal reaches only this script, which then stops
        # the services first and FerretDB last, instead of everything dying at once.
        process_group=0,
        # ...and if this script is SIGKILLed, the services still get SIGTERM.
        preexec_fn=die_with_parent_preexec(),
    )


@dataclass
class Restarts:
    """When an exited child may start again, and how long the next wait is."""

    first_wait: float
    wait: float = 0.0
    due: float | None = None  # monotonic time of the pending restart
    started_at: float = 0.0

    def exited(self, now: float) -> float:
        """Schedule the restart of a child that just exited; the wait chosen."""
        if now - self.started_at >= STABLE_AFTER_S or not self.wait:
            self.wait = self.first_wait
        else:
            self.wait = min(self.wait * 2, RESTART_BACKOFF_MAX_S)
        self.due = now + self.wait
        return self.wait


def stop_services(children: dict[str, subprocess.Popen[bytes]]) -> None:
    """SIGTERM every running service, wait up to the grace period, then SIGKILL the rest."""
    for proc in children.values():
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + SHUTDOWN_GRACE_S
    for name, proc in children.items():
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log("warn", "service did not stop in time; killing it", child=name)
            proc.kill()
            proc.wait()


def main() -> int:
    """Run the suite until a signal arrives, restarting children that exit; the exit status."""
    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    env = suite_environment(os.environ)
    first_wait = float(env.get("AZORA_RESTART_BACKOFF") or RESTART_BACKOFF_S)
    db: EmbeddedFerretDB | None = None
    children: dict[str, subprocess.Popen[bytes]] = {}
    restarts: dict[str, Restarts] = {}
    children_to_run = (*SERVICES, MAIL_WORKER) if worker_processes(env) else SERVICES
    modules = {name: module for name, module, _, _ in children_to_run}
    status = 0

    def start_child(name: str) -> None:
        children[name] = start_service(modules[name], env)
        restarts.setdefault(name, Restarts(first_wait)).started_at = time.monotonic()
        port_var, default_port = next((v, p) for n, _, v, p in children_to_run if n == name)
        log(
            "info",
            "service started",
            child=name,
            pid=children[name].pid,
            listen=f"{env.get('AZORA_HOST', '127.0.0.1')}:{env.get(port_var, str(default_port))}",
        )

    try:
        if not env.get("MONGODB_URI"):
            db = start_ferretdb()
            restarts["ferretdb"] = Restarts(first_wait, started_at=time.monotonic())
            env["MONGODB_URI"] = db.uri
        else:
            log("info", "using MONGODB_URI from the environment; no embedded FerretDB")

        for name, _module, _port_var, _default_port in children_to_run:
            if stop.is_set():
                break
            start_child(name)

        while not stop.wait(0.2):
            now = time.monotonic()
            if db is not None:
                supervise_ferretdb(db, restarts["ferretdb"], now)
            for name, proc in list(children.items()):
                plan = restarts[name]
                if plan.due is None and proc.poll() is not None:
                    wait = plan.exited(now)
                    log(
                        "warn",
                        "child exited; restarting it",
                        child=name,
                        status=proc.returncode,
                        restart_in_s=wait,
                    )
                elif plan.due is not None and now >= plan.due:
                    plan.due = None
                    start_child(name)
        if received:
            log("info", "stopping the suite", signal=received[0])
    except Exception as err:
        log("error", "suite failed to start", error=str(err))
        status = 1
    finally:
        # A second Ctrl+C during shutdown must not skip stopping FerretDB.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop_services(children)
        if db is not None:
            db.stop()
        log("info", "suite stopped", status=status)
    return status


def supervise_ferretdb(db: EmbeddedFerretDB, plan: Restarts, now: float) -> None:
    """Restart an embedded FerretDB that exited (same port and data), with backoff."""
    if plan.due is None and db.poll() is not None:
        wait = plan.exited(now)
        log("warn", "FerretDB exited; restarting it", status=db.poll(), restart_in_s=wait)
    elif plan.due is not None and now >= plan.due:
        plan.due = None
        plan.started_at = now
        try:
            db.start()
        except Exception as err:
            # Not fatal: the services wait for their database; try again after a backoff.
            log("error", "FerretDB did not start", error=str(err)[:500])
            plan.exited(time.monotonic())
            return
        log("info", "FerretDB listening", uri=db.uri)


if __name__ == "__main__":
    sys.exit(main())
