"""Processes recover by themselves: a wedged database client is noticed, a dead child restarted.

* The readiness watcher's watchdog (`services.core.runtime.DatabaseWatch`): our client failing
  while a new client reaches the database means ours is wedged, and the process asks to exit
  (non-zero) for its supervisor to restart it; a database that is really down is not that.
* `make run`'s supervisor (scripts/run_suite.py) restarts a child killed with SIGKILL, and the
  child serves again.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pymongo import AsyncMongoClient

from services.core.mongo import Document
from services.core.runtime import EXIT_DATABASE_CLIENT_WEDGED, DatabaseWatch, watch_readiness
from services.core.server import ServiceServer, create_server
from tests.conftest import REPO_ROOT, make_settings
from tests.support import ports

SERVICE = "x.v1.X"
# Guards against a hang only; never a measure of speed.
HANG_GUARD_SECONDS = 120
SUITE_HANG_GUARD_SECONDS = 240


async def grpc_status(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=SERVICE)
        reply = await stub.Check(request, timeout=5)  # type: ignore[attr-defined]
        return int(reply.status)


def counted(watch: DatabaseWatch, *, park_after: int = 0) -> tuple[DatabaseWatch, list[bool]]:
    """`watch` with a record of what each fresh-client check found.

    After `park_after` checks (0: never) the watcher is parked for good, so that stopping the
    test's server cancels it while it waits on nothing (a database call cancelled mid-connect
    can leave its socket to the garbage collector, a ResourceWarning).
    """
    answers: list[bool] = []

    async def fresh_answers() -> bool:
        answered = await watch.fresh_answers()
        answers.append(answered)
        if park_after and len(answers) >= park_after:
            await asyncio.Event().wait()
        return answered

    return DatabaseWatch(watch.after, fresh_answers), answers


async def serving_server() -> ServiceServer:
    server = await create_server(bind="127.0.0.1:0", service_names=(SERVICE,), registrars=())
    await server.set_serving(True)
    return server


async def test_a_wedged_client_makes_the_process_exit_for_a_restart(ferretdb: str) -> None:
    # Our client fails every operation (here: closed) while the database answers a new one:
    # NOT_SERVING first, then the watchdog asks the process to exit with its own status.
    settings = make_settings(ferretdb, "azora_watchdog").with_overrides(database_watchdog=0.3)
    watch = DatabaseWatch.from_settings(settings)
    assert watch is not None
    watch, answers = counted(watch)
    ours: AsyncMongoClient[Document] = AsyncMongoClient(ferretdb, serverSelectionTimeoutMS=200)
    await ours.close()
    server = await serving_server()
    server.background.append(
        asyncio.create_task(watch_readiness(server, ours["x"], 0.05, watchdog=watch))
    )
    try:
        async with asyncio.timeout(HANG_GUARD_SECONDS):
            await server.failed.wait()
        assert server.exit_code == EXIT_DATABASE_CLIENT_WEDGED
        assert answers == [True]
        assert await grpc_status(server.port) == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await server.stop(None)


async def test_a_database_that_is_down_is_not_a_wedged_client() -> None:
    # Nobody reaches the database: a restart would not help, so the process stays (NOT_SERVING)
    # and asks again a period later.
    uri = f"mongodb://127.0.0.1:{ports.closed_port()}/"
    settings = make_settings(uri, "azora_watchdog").with_overrides(
        database_watchdog=0.2,
        mongodb_server_selection_timeout=0.2,
    )
    watch = DatabaseWatch.from_settings(settings)
    assert watch is not None
    watch, answers = counted(watch, park_after=2)
    # Our client fails at once without opening sockets (closed); the database is down for the
    # new clients the watchdog makes too.
    ours: AsyncMongoClient[Document] = AsyncMongoClient(uri, serverSelectionTimeoutMS=200)
    await ours.close()
    server = await serving_server()
    server.background.append(
        asyncio.create_task(watch_readiness(server, ours["x"], 0.05, watchdog=watch))
    )
    try:
        async with asyncio.timeout(HANG_GUARD_SECONDS):
            while True:
                if len(answers) >= 2:
                    break
                await asyncio.sleep(0.05)
        assert answers[:2] == [False, False]
        assert not server.failed.is_set()
        assert await grpc_status(server.port) == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await server.stop(None)
        # A client closed while its monitor's connection to a dead port is being refused
        # leaves that socket to the garbage collector (PyMongo): collected here, not in a
        # later test that would take the ResourceWarning for its own.
        await asyncio.sleep(0.1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()


def suite_env(tmp_path: Path, ferretdb: str) -> dict[str, str]:
    """The environment of `make run` on free ports, with the test's FerretDB and a fast backoff."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZORA_", "MONGODB_"))}
    env.update(
        {
            "MONGODB_URI": ferretdb,
            "AZORA_MONGODB_DATABASE": "azora_supervised",
            "AZORA_ENV": "development",
            "LOG_LEVEL": "warn",
            "AZORA_DOMAIN_GRPC_PORT": str(ports.closed_port()),
            "AZORA_SMTP_GRPC_PORT": str(ports.closed_port()),
            "AZORA_MAIL_GRPC_PORT": str(ports.closed_port()),
            "PORT": str(ports.closed_port()),
            "AZORA_WEBHOOK_DISPATCHER_HEALTH_PORT": str(ports.closed_port()),
            "AZORA_WEBHOOK_DISPATCHER_METRICS_PORT": "0",
            "AZORA_METRICS_PORT_DOMAIN": "0",
            "AZORA_METRICS_PORT_SMTP": "0",
            "AZORA_METRICS_PORT_MAIL": "0",
            "AZORA_METRICS_PORT_GATEWAY": "0",
            "AZORA_MAIL_RUN_WORKERS": "false",
            "AZORA_RESTART_BACKOFF": "0.2",
            "PYTHONPATH": str(REPO_ROOT),
        }
    )
    return env


def wait_for(check: Callable[[], bool], deadline: float, log: Path) -> None:
    """Poll `check` until it holds; fail at `deadline` (a hang guard, not a measure of speed)."""
    while not check():
        assert time.monotonic() < deadline, f"gave up waiting; log:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


def mail_serving(port: int) -> bool:
    """Whether the process on `port` answers grpc.health.v1 SERVING."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[attr-defined]
                health_pb2.HealthCheckRequest(), timeout=2
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def test_the_supervisor_restarts_a_killed_child(tmp_path: Path, ferretdb: str) -> None:
    # make run's supervisor: kill -9 of the mail service does not stop the suite; the mail
    # service comes back (a new process) and serves, the others were never restarted.
    env = suite_env(tmp_path, ferretdb)
    log_path = tmp_path / "suite.log"
    with log_path.open("wb") as log:
        suite = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "scripts" / "run_suite.py")],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    mail_port = int(env["AZORA_MAIL_GRPC_PORT"])

    def started(child: str) -> list[int]:
        pids = []
        for line in log_path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("msg") == "service started" and entry.get("child") == child:
                pids.append(int(entry["pid"]))
        return pids

    # Four Python processes start on a machine that may be busy: a generous guard.
    deadline = time.monotonic() + SUITE_HANG_GUARD_SECONDS
    try:
        wait_for(lambda: mail_serving(mail_port), deadline, log_path)
        [first] = started("mail")
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: len(started("mail")) == 2 or suite.poll() is not None, deadline, log_path)
        assert suite.poll() is None, log_path.read_text()[-2000:]
        wait_for(lambda: mail_serving(mail_port), deadline, log_path)
        second = started("mail")[1]
        assert second != first
        assert len(started("domain")) == 1
        assert len(started("gateway")) == 1
    finally:
        suite.send_signal(signal.SIGTERM)
        try:
            suite.wait(60)
        except subprocess.TimeoutExpired:
            suite.kill()
            suite.wait()
    assert suite.returncode == 0, log_path.read_text()[-2000:]
