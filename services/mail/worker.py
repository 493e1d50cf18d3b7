"""`python -m services.mail.worker`: a delivery worker process without an API.

Scale-out is more of these on the same database; leases are the only coordination. On SIGTERM
(or SIGINT) the worker stops claiming, finishes the deliveries it is in for up to
AZORA_SHUTDOWN_GRACE seconds (recording their outcomes, which waits while the database is away),
hands back whatever it has not started, and exits. An outcome still unrecorded then keeps its
lease: the email is attempted again once the lease expires, not before.

It starts like every other process (`services.core.runtime.start_process`: JSON logs,
OpenTelemetry tracing when configured, its Prometheus endpoint on
AZORA_METRICS_PORT_MAIL_WORKER). Like the services, it watches its database client
(`services.core.runtime.watch_database`): wedged while the database answers a new client, the
worker stops the same way and exits with `EXIT_DATABASE_CLIENT_WEDGED`, for its supervisor to
start a fresh process.

With AZORA_MAIL_WORKER_PROCESSES above 1 it runs that many worker processes instead (each this
module with one process, its own event loop, database client and leases: Python runs one core
per process) and supervises them: a child that exits is started again with a backoff, SIGTERM
is passed on and waited for (each child's grace period, plus a little). Child i is worker
``<AZORA_MAIL_WORKER_ID or host-pid>-<i>`` and serves its metrics on
AZORA_METRICS_PORT_MAIL_WORKER + i; the supervisor serves none.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys

from services.core.clock import SystemClock
from services.core.embedded_db import die_with_parent_preexec
from services.core.event_loop import run_event_loop
from services.core.metrics import start_exposition
from services.core.runtime import (
    Database,
    StopWatch,
    prepare_database,
    start_process,
)
from services.mail.app import MAIL_INDEXES, RELAY_HEALTH_REFRESH, make_worker
from services.mail.feedback.event_wiring import suppression_list_from
from services.mail.relay_health import RelayHealthStore
from services.mail.relay_lookup import smtp_service_relays
from services.mail.repository import MongoEmailRepository
from services.mail.settings import MailSettings

SERVICE_NAME = "mail-worker"
log = logging.getLogger(__name__)


async def serve(settings: MailSettings) -> int:
    """Run one worker until SIGTERM/SIGINT (or a wedged database client); the exit status."""
    database = Database.connect(settings)
    relays, channel = smtp_service_relays(settings)
    try:
        await prepare_database(database.db, MAIL_INDEXES)
        emails = MongoEmailRepository(
            database.db,
            inline_limit=settings.mail_inline_content_limit,
            suppressions=suppression_list_from(settings, database.db, SystemClock()),
        )
        worker = make_worker(
            settings,
            emails=emails,
            relays=relays,
            clock=SystemClock(),
            worker_id=os.environ.get("AZORA_MAIL_WORKER_ID") or None,
            relay_health=RelayHealthStore(database.db, refresh=RELAY_HEALTH_REFRESH),
        )
        stops = StopWatch(database.db, settings, worker.stop)
        task = asyncio.create_task(worker.run())
        log.info("worker started", extra={"fields": {"worker": worker.worker_id}})
        stopping = asyncio.create_task(worker.wait_stopping())
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        try:
            # Deliveries in progress get the grace period to finish and record; then they
            # are cancelled: those not past the relay release their leases, those whose
            # outcome is still unrecorded keep them.
            await asyncio.wait_for(asyncio.shield(task), timeout=settings.shutdown_grace)
        except TimeoutError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        stopping.cancel()
        await stops.close()
        kept = await emails.delivery_queue.flush_outcomes(within=0)
        if kept:
            log.warning(
                "outcomes not recorded at shutdown; their leases are kept",
                extra={"fields": {"outcomes": kept}},
            )
        # Stats counts whose write failed earlier (database away) get a last chance.
        with contextlib.suppress(Exception):
            await emails.tallies.flush()
        log.info("worker stopped", extra={"fields": {"worker": worker.worker_id}})
        return stops.status
    finally:
        await channel.close()
        await database.close()


# Restart backoff of a child worker process that exited: first wait, cap, and how long a child
# must have run for the next exit to start from the first wait again.
_RESTART_FIRST = 1.0
_RESTART_MAX = 30.0
_STABLE_AFTER = 60.0


async def supervise(settings: MailSettings, count: int) -> int:
    """Run `count` worker processes until SIGTERM/SIGINT, restarting any that exits."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    base_id = os.environ.get("AZORA_MAIL_WORKER_ID") or f"{socket.gethostname()}-{os.getpid()}"

    async def child(index: int) -> None:
        port = settings.metrics_port + index if settings.metrics_port else 0
        env = {
            **os.environ,
            "AZORA_MAIL_WORKER_PROCESSES": "1",
            "AZORA_MAIL_WORKER_ID": f"{base_id}-{index}",
            "AZORA_METRICS_PORT_MAIL_WORKER": str(port),
        }
        wait = _RESTART_FIRST
        while not stopping.is_set():
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "services.mail.worker",
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                # A supervisor killed outright must not leave its workers running unsupervised.
                preexec_fn=die_with_parent_preexec(),
            )
            started = loop.time()
            log.info("worker process started", extra={"fields": {"index": index, "pid": proc.pid}})
            exited = asyncio.ensure_future(proc.wait())
            stop = asyncio.ensure_future(stopping.wait())
            await asyncio.wait({exited, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if stopping.is_set():
                if proc.returncode is None:
                    proc.terminate()
                    try:
                        await asyncio.wait_for(exited, timeout=settings.shutdown_grace + 5)
                    except TimeoutError:
                        proc.kill()
                        await proc.wait()
                return
            if loop.time() - started >= _STABLE_AFTER:
                wait = _RESTART_FIRST
            log.warning(
                "worker process exited; restarting it",
                extra={"fields": {"index": index, "status": proc.returncode, "restart_in_s": wait}},
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=wait)
            wait = min(wait * 2, _RESTART_MAX)

    await asyncio.gather(*(child(i) for i in range(count)))
    return 0


def main() -> None:
    """Entry point: the shared process start (settings, logs, tracing, metrics), then serve.

    More than one worker process configured: this process only supervises them.
    """
    settings = start_process(SERVICE_NAME, MailSettings, metrics=False)
    if settings.mail_worker_processes > 1:
        status = run_event_loop(supervise(settings, settings.mail_worker_processes), settings)
    else:
        start_exposition(settings.metrics_host, settings.metrics_port)
        status = run_event_loop(serve(settings), settings)
    if status:
        raise SystemExit(status)


if __name__ == "__main__":
    main()
