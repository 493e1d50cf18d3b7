"""A database outage while deliveries are in flight: what the relay accepted is recorded once.

A FerretDB of the test's own is stopped while a real aiosmtpd relay holds every delivery at
DATA, the relay then accepts them all (250) with the database away, and the database comes
back on the same port and data. The outcomes the relay gave must be kept and written once the
database answers: after the leases would have expired, no email may be delivered a second
time (counted by Message-ID at the relay).
"""

from __future__ import annotations

import asyncio
import inspect
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta
from email.parser import BytesHeaderParser
from pathlib import Path

import grpc
import pytest
from azora.mail.v1 import mail_pb2, mail_pb2_grpc
from pymongo import AsyncMongoClient

from services.core.clock import ManualClock
from services.core.embedded_db import EmbeddedFerretDB, find_ferretdb_binary, pick_free_port
from services.core.mongo import Document
from services.mail.app import build_app, make_worker
from services.mail.relay_directory import InMemoryRelayDirectory
from services.mail.relay_lookup import DirectoryRelayLookup
from services.mail.repository import MongoEmailRepository
from services.mail.senders import StaticSenderDirectory
from tests.conftest import REPO_ROOT, Tenant, make_settings
from tests.mail.conftest import RETRY_ENV, START, LocalMail
from tests.support.smtp_relay import RunningRelay, start_relay

# Deliveries in flight when the database goes away (one per delivery loop).
IN_FLIGHT = 8
# How long the database stays away: several server-selection timeouts (1 s here), so that
# every delivery loop has tried, and failed, to record its outcome meanwhile.
OUTAGE_SECONDS = 4.0
# Guards against a hang only; never a measure of speed.
HANG_GUARD_SECONDS = 120


def message_ids(relay: RunningRelay) -> list[str]:
    """The Message-IDs of what the relay answered 250 to, in order."""
    return [
        str(BytesHeaderParser().parsebytes(content)["Message-ID"]).strip().strip("<>")
        for content in relay.messages
    ]


@pytest.fixture
def own_ferretdb(tmp_path: Path) -> Iterator[EmbeddedFerretDB]:
    """A FerretDB only this test uses, on a fixed port so that a restart keeps its address."""
    server = EmbeddedFerretDB(
        binary=find_ferretdb_binary(REPO_ROOT),
        data_dir=tmp_path / "ferretdb",
        port=pick_free_port(),
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def outage_mail(
    own_ferretdb: EmbeddedFerretDB, domain_app: object
) -> AsyncIterator[LocalMail]:
    """A mail service on `own_ferretdb` with in-memory domains and relays, no workers."""
    from services.domain.app import DomainApp

    assert isinstance(domain_app, DomainApp)
    settings = make_settings(
        own_ferretdb.uri,
        f"azora_outage_{secrets.token_hex(4)}",
        AZORA_DOMAIN_SERVICE_TARGET=f"127.0.0.1:{domain_app.running.port}",
        **{**RETRY_ENV, "AZORA_MAIL_WORKER_CONCURRENCY": str(IN_FLIGHT)},
    )
    # Fail fast while the database is away, so the outage is felt by every delivery loop.
    settings = settings.with_overrides(mongodb_server_selection_timeout=1.0)
    clock = ManualClock(START)
    senders = StaticSenderDirectory()
    relays = InMemoryRelayDirectory()
    lookup = DirectoryRelayLookup(relays)
    app = await build_app(
        settings, clock=clock, bind="127.0.0.1:0", senders=senders, relays=lookup, run_workers=False
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.running.port}") as channel:
        yield LocalMail(
            app, mail_pb2_grpc.MailServiceStub(channel), clock, settings, senders, relays, lookup
        )
    await app.running.stop(None)


async def wait_until(check: Callable[[], bool | Awaitable[bool]]) -> None:
    """Poll `check` until it holds (bounded only by the caller's hang guard)."""
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.05)


async def test_outcomes_given_by_the_relay_survive_a_database_outage(
    outage_mail: LocalMail, own_ferretdb: EmbeddedFerretDB, tenant: Tenant
) -> None:
    # The relay accepts while the database is away; after it is back and the leases have run
    # out, every email is SENT and the relay got each Message-ID exactly once.
    gate = asyncio.Event()
    relay = await start_relay(gate=gate)
    worker = outage_mail.worker(
        AZORA_MAIL_WORKER_CONCURRENCY=str(IN_FLIGHT), AZORA_MAIL_RELAY_CONNECTIONS=str(IN_FLIGHT)
    )
    run: asyncio.Task[None] | None = None
    try:
        # A relay timeout longer than the test: the relay's slowness is not what is tested.
        _, name = outage_mail.add_domain(tenant, port=relay.port, timeout=HANG_GUARD_SECONDS)
        sent = [
            await outage_mail.send(
                tenant, from_address=f"s@{name}", to=[f"r{i}@example.org"], subject="x", text="y"
            )
            for i in range(IN_FLIGHT)
        ]
        async with asyncio.timeout(HANG_GUARD_SECONDS):
            run = asyncio.create_task(worker.run())
            await wait_until(lambda: relay.handler.arrived == IN_FLIGHT)
            await asyncio.to_thread(own_ferretdb.stop)
            gate.set()
            await wait_until(lambda: len(relay.messages) == IN_FLIGHT)
            await asyncio.sleep(OUTAGE_SECONDS)  # the database stays away a while
            await asyncio.to_thread(own_ferretdb.start)
            # Past every lease: an unrecorded email would now be claimed and sent again.
            outage_mail.clock.advance(timedelta(seconds=float(RETRY_ENV["AZORA_MAIL_LEASE"]) * 2))

            async def all_finished() -> bool:
                for email in sent:
                    got = await outage_mail.get(tenant, email.id)
                    if got.status != mail_pb2.EMAIL_STATUS_SENT:
                        return False
                return True

            await wait_until(all_finished)
            # A few more polls of the worker: nothing is due any more, nothing is sent again.
            await asyncio.sleep(1.0)
            worker.stop()
            await run
    finally:
        if run is not None and not run.done():
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
        await relay.close()
    copies = Counter(message_ids(relay))
    assert set(copies) == {email.message_id for email in sent}
    assert {mid: n for mid, n in copies.items() if n > 1} == {}


async def test_shutdown_during_an_outage_keeps_the_leases_of_unrecorded_outcomes(
    outage_mail: LocalMail, own_ferretdb: EmbeddedFerretDB, tenant: Tenant
) -> None:
    # SIGTERM with outcomes the database has not taken: the grace period ends with the
    # deliveries still recording, they are cancelled, and their leases are kept (not released),
    # so another process claims nothing while they last; the outcomes are written once the
    # database answers, and nothing is delivered twice.
    gate = asyncio.Event()
    relay = await start_relay(gate=gate)
    worker = outage_mail.worker(
        AZORA_MAIL_WORKER_CONCURRENCY=str(IN_FLIGHT), AZORA_MAIL_RELAY_CONNECTIONS=str(IN_FLIGHT)
    )
    other_client: AsyncMongoClient[Document] = AsyncMongoClient(own_ferretdb.uri, tz_aware=True)
    # A worker of another process: its own client and repository, same database and clock.
    other = make_worker(
        outage_mail.settings,
        emails=MongoEmailRepository(
            other_client[outage_mail.settings.mongodb_database], inline_limit=256 * 1024
        ),
        relays=outage_mail.lookup,
        clock=outage_mail.clock,
    )
    run: asyncio.Task[None] | None = None
    try:
        _, name = outage_mail.add_domain(tenant, port=relay.port, timeout=HANG_GUARD_SECONDS)
        sent = [
            await outage_mail.send(
                tenant, from_address=f"s@{name}", to=[f"r{i}@example.org"], subject="x", text="y"
            )
            for i in range(IN_FLIGHT)
        ]
        async with asyncio.timeout(HANG_GUARD_SECONDS):
            run = asyncio.create_task(worker.run())
            await wait_until(lambda: relay.handler.arrived == IN_FLIGHT)
            await asyncio.to_thread(own_ferretdb.stop)
            gate.set()
            await wait_until(lambda: len(relay.messages) == IN_FLIGHT)
            # SIGTERM: stop claiming, a (short) grace period, then cancel what is left.
            worker.stop()
            assert await worker.wait_quiet(OUTAGE_SECONDS) is False
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
            await asyncio.to_thread(own_ferretdb.start)
            # Another process, within the lease: every email is still held.
            assert await other.run_once() == 0

            async def all_sent() -> bool:
                for email in sent:
                    got = await outage_mail.get(tenant, email.id)
                    if got.status != mail_pb2.EMAIL_STATUS_SENT:
                        return False
                return True

            # This process's kept outcomes are written once the database answers.
            await wait_until(all_sent)
            outage_mail.clock.advance(timedelta(seconds=float(RETRY_ENV["AZORA_MAIL_LEASE"]) * 2))
            assert await other.run_once() == 0
    finally:
        if run is not None and not run.done():
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
        await other_client.close()
        await relay.close()
    assert sorted(message_ids(relay)) == sorted(email.message_id for email in sent)
