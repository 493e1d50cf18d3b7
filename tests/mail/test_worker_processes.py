"""`python -m services.mail.worker` with AZORA_MAIL_WORKER_PROCESSES=2 runs two worker processes.

The supervisor starts two children (each a whole worker: its own id, database client and
leases), starts a child again after `kill -9`, and on SIGTERM stops both gracefully and exits
0. `make run` starts that supervisor when the setting is 1 or more, and then keeps the mail
service from delivering itself unless told otherwise (`scripts/run_suite.suite_environment`).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scripts.run_suite import suite_environment
from tests.conftest import REPO_ROOT, TEST_JWT_SECRET, TEST_SERVICE_TOKEN_SECRET

# Three Python processes start on a machine that may be busy: a hang guard, not a measure.
HANG_GUARD_SECONDS = 180


def entries(log: Path, msg: str) -> list[dict[str, Any]]:
    """The JSON log entries of `log` whose message is `msg`."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("msg") == msg:
            found.append(entry)
    return found


def wait_for(check: Callable[[], bool], deadline: float, log: Path) -> None:
    """Poll `check` until it holds; fail at `deadline` (a hang guard)."""
    while not check():
        assert time.monotonic() < deadline, f"gave up waiting; log:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


def test_two_worker_processes_supervised(tmp_path: Path, ferretdb: str) -> None:
    # Two children with distinct worker ids; a killed one is replaced; SIGTERM stops both.
    env = {
        **os.environ,
        "AZORA_ENV": "test",
        "MONGODB_URI": ferretdb,
        "AZORA_MONGODB_DATABASE": f"azora_workers_{secrets.token_hex(4)}",
        "JWT_SECRET": TEST_JWT_SECRET,
        "AZORA_SERVICE_TOKEN_SECRET": TEST_SERVICE_TOKEN_SECRET,
        "AZORA_MAIL_WORKER_PROCESSES": "2",
        "AZORA_MAIL_WORKER_ID": "drill",
        "AZORA_METRICS_PORT_MAIL_WORKER": "0",
        "AZORA_SHUTDOWN_GRACE": "5",
        "PYTHONPATH": str(REPO_ROOT),
    }
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "services.mail.worker"],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + HANG_GUARD_SECONDS
    try:
        wait_for(lambda: len(entries(log_path, "worker started")) == 2, deadline, log_path)
        assert {e["worker"] for e in entries(log_path, "worker started")} == {
            "drill-0",
            "drill-1",
        }
        first = entries(log_path, "worker process started")
        assert len(first) == 2
        victim = int(first[0]["pid"])
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(entries(log_path, "worker started")) == 3, deadline, log_path)
        assert supervisor.poll() is None
        replaced = entries(log_path, "worker process started")[2]
        assert replaced["index"] == first[0]["index"]
        assert int(replaced["pid"]) != victim
    finally:
        supervisor.send_signal(signal.SIGTERM)
        try:
            supervisor.wait(60)
        except subprocess.TimeoutExpired:
            supervisor.kill()
            supervisor.wait()
    assert supervisor.returncode == 0, log_path.read_text()[-2000:]
    # The two live children stopped gracefully (the killed one could not).
    assert len(entries(log_path, "worker stopped")) == 2


def test_make_run_starts_separate_workers_only_when_asked() -> None:
    # With worker processes the mail service stops delivering itself, unless told explicitly.
    assert "AZORA_MAIL_RUN_WORKERS" not in suite_environment({})
    assert (
        suite_environment({"AZORA_MAIL_WORKER_PROCESSES": "0"}).get("AZORA_MAIL_RUN_WORKERS")
        is None
    )
    assert suite_environment({"AZORA_MAIL_WORKER_PROCESSES": "2"})["AZORA_MAIL_RUN_WORKERS"] == (
        "false"
    )
    explicit = {"AZORA_MAIL_WORKER_PROCESSES": "2", "AZORA_MAIL_RUN_WORKERS": "true"}
    assert suite_environment(explicit)["AZORA_MAIL_RUN_WORKERS"] == "true"
