"""The shared runtime as a real process and server.

Graceful shutdown on SIGTERM, JSON logs with request ids, deadlines flowing into database
calls, and no INTERNAL for surprises.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import uvloop
from azora.domain.v1 import domain_pb2, domain_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pymongo import AsyncMongoClient
from pymongo.errors import PyMongoError

from services.core.event_loop import run_event_loop
from services.core.interceptors import ErrorMappingInterceptor
from services.core.server import create_server
from services.core.settings import Settings, SettingsError
from tests.conftest import TEST_JWT_SECRET, new_tenant
from tests.support import ports
from tests.support.dns_server import SilentDnsServer
from tests.support.grpc_errors import decode

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_serving(stub: health_pb2_grpc.HealthStub, service: str) -> None:
    for _ in range(300):
        try:
            request = health_pb2.HealthCheckRequest(service=service)
            reply = await stub.Check(request, timeout=1)  # type: ignore[attr-defined]
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.1)
    pytest.fail(f"{service} never became SERVING")


async def test_sigterm_turns_health_off_first_and_lets_inflight_calls_finish(
    ferretdb: str, silent_dns_server: SilentDnsServer, tmp_path: Path, settings: Any
) -> None:
    # A real `python -m services.domain`: on SIGTERM the health watch sees NOT_SERVING, an
    # in-flight call (a verification waiting on a silent DNS server) still completes, the
    # process exits 0, and every log line is JSON carrying the service and request id.
    port = free_port()
    env = {
        **os.environ,
        "AZORA_ENV": "test",
        "MONGODB_URI": ferretdb,
        "AZORA_MONGODB_DATABASE": "azora_shutdown",
        "JWT_SECRET": TEST_JWT_SECRET,
        "AZORA_DOMAIN_GRPC_PORT": str(port),
        "AZORA_DNS_NAMESERVERS": silent_dns_server.host,
        "AZORA_DNS_PORT": str(silent_dns_server.port),
        "AZORA_DNS_TIMEOUT": "2",
        "AZORA_SHUTDOWN_GRACE": "10",
        "LOG_LEVEL": "info",
    }
    log_path = tmp_path / "domain.log"
    with log_path.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.domain", cwd=REPO_ROOT, env=env, stderr=log_file
        )
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                await wait_serving(health, "azora.domain.v1.DomainService")
                watch = health.Watch(  # type: ignore[attr-defined]
                    health_pb2.HealthCheckRequest(service="azora.domain.v1.DomainService")
                )
                first = await watch.read()
                assert first.status == health_pb2.HealthCheckResponse.SERVING
                stub = domain_pb2_grpc.DomainServiceStub(channel)
                tenant = new_tenant(settings)
                domain = await stub.CreateDomain(
                    domain_pb2.CreateDomainRequest(name="shutdown-check.example"),
                    metadata=tenant.metadata,
                )
                inflight = asyncio.ensure_future(
                    stub.VerifyDomain(
                        domain_pb2.VerifyDomainRequest(id=domain.id),
                        metadata=(*tenant.metadata, ("x-request-id", "inflight-1")),
                    )
                )
                await asyncio.sleep(0.5)
                process.send_signal(signal.SIGTERM)
                update = await asyncio.wait_for(watch.read(), timeout=5)
                assert update.status == health_pb2.HealthCheckResponse.NOT_SERVING
                result = await asyncio.wait_for(inflight, timeout=10)
                assert result.check.outcome == domain_pb2.VERIFICATION_OUTCOME_TIMEOUT
            assert await asyncio.wait_for(process.wait(), timeout=15) == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    assert lines, "the service logged nothing"
    assert all(entry["service"] == "domain-service" for entry in lines)
    access = [e for e in lines if e["msg"] == "rpc" and e.get("request_id") == "inflight-1"]
    assert len(access) == 1
    assert access[0]["method"] == "/azora.domain.v1.DomainService/VerifyDomain"
    assert access[0]["code"] == "OK"
    assert any(e["msg"] == "shutting down" for e in lines)
    assert TEST_JWT_SECRET not in log_path.read_text()
    assert tenant.token not in log_path.read_text()


async def test_deadline_bounds_database_calls(ferretdb: str) -> None:
    # Inside a handler, every database call runs under the caller's remaining deadline
    # (pymongo's client-side operation timeout); without a deadline none is imposed. A
    # database call that outlives the deadline then fails with DEADLINE_EXCEEDED, not INTERNAL.
    import pymongo._csot as csot  # private, read-only: the clearest evidence of what applies

    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(ferretdb)
    seen: list[float | None] = []

    async def probe(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        seen.append(csot.get_timeout())
        await client.admin.command("ping")
        if request == b"expire":
            await asyncio.sleep(0.4)  # the deadline passes while we work...
            await client.admin.command("ping")  # ...so this call is refused by the driver
        return b""

    handler = grpc.method_handlers_generic_handler(
        "azora.test.v1.Probe", {"Ping": grpc.unary_unary_rpc_method_handler(probe)}
    )
    server = await create_server(
        bind="127.0.0.1:0",
        service_names=("azora.test.v1.Probe",),
        registrars=(lambda s: s.add_generic_rpc_handlers((handler,)),),
        interceptors=[ErrorMappingInterceptor()],
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call: Any = channel.unary_unary("/azora.test.v1.Probe/Ping")
            await call(b"", timeout=5)
            await call(b"")
        assert seen[0] is not None
        assert 0 < seen[0] <= 5
        assert seen[1] is None
    finally:
        await server.stop(None)
        await client.close()


async def test_database_timeouts_map_to_deadline_exceeded(ferretdb: str) -> None:
    # The driver's timeout error once the request deadline passed becomes DEADLINE_EXCEEDED.
    from pymongo.errors import ExecutionTimeout

    from services.core.errors import DeadlineExceeded, Unavailable
    from services.core.mongo import translate_error

    timeout_error = ExecutionTimeout("operation exceeded time limit", code=50)
    assert isinstance(translate_error(timeout_error, deadline_expired=True), DeadlineExceeded)
    # With time left on the caller's deadline it is still a query that ran out of time (the
    # service's own database limit), never "unreachable".
    slow = translate_error(timeout_error, deadline_expired=False, time_limit=0.5)
    assert isinstance(slow, DeadlineExceeded)
    assert "ran out of time" in slow.message
    assert "0.5 s" in slow.message
    assert not isinstance(slow, Unavailable)
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(ferretdb)
    try:
        import pymongo

        with pymongo.timeout(0.000001):
            await asyncio.sleep(0.01)  # the block's deadline is now behind us
            with pytest.raises(PyMongoError) as caught:
                await client.admin.command("ping")
        assert caught.value.timeout
        assert isinstance(translate_error(caught.value, deadline_expired=True), DeadlineExceeded)
    finally:
        await client.close()


async def test_unreachable_database_is_unavailable_within_a_long_deadline() -> None:
    # The database is down and the caller allows 20 s: the service's own database limit (1 s
    # here, AZORA_MONGODB_REQUEST_TIMEOUT) ends the wait and the caller hears UNAVAILABLE
    # (retry), not DEADLINE_EXCEEDED after waiting its whole deadline.
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        f"mongodb://127.0.0.1:{ports.closed_port()}/",
        serverSelectionTimeoutMS=300,
        connectTimeoutMS=300,
    )

    async def ping(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        await client.admin.command("ping")
        return b""

    handler = grpc.method_handlers_generic_handler(
        "azora.test.v1.Probe", {"Ping": grpc.unary_unary_rpc_method_handler(ping)}
    )
    server = await create_server(
        bind="127.0.0.1:0",
        service_names=("azora.test.v1.Probe",),
        registrars=(lambda s: s.add_generic_rpc_handlers((handler,)),),
        interceptors=[ErrorMappingInterceptor(database_timeout=1.0)],
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call: Any = channel.unary_unary("/azora.test.v1.Probe/Ping")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(b"", timeout=20)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
    finally:
        await server.stop(None)
        await client.close()


async def test_slow_query_is_deadline_exceeded_and_a_stopped_database_unavailable(
    tmp_path: Path,
) -> None:
    # On a real FerretDB: a heavy scan that outlives the service's database limit is
    # DEADLINE_EXCEEDED saying the query ran out of time; once the database is stopped the same
    # rpc is UNAVAILABLE "the database is unreachable". (Before, both said "unreachable".)
    from services.core.embedded_db import EmbeddedFerretDB, find_ferretdb_binary

    server_db = EmbeddedFerretDB(binary=find_ferretdb_binary(REPO_ROOT), data_dir=tmp_path / "db")
    uri = server_db.start()
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        uri, serverSelectionTimeoutMS=500, connectTimeoutMS=500
    )
    collection = client["slow_query"]["docs"]
    blob = "x" * 3000
    # Many nested fields per document: decoding them is what makes the scan slow (about 0.4 s
    # here, four times the limit below), whatever the speed of FerretDB's decoder.
    fields = {f"f{i}": {"v": i, "w": [i, "y" * 10]} for i in range(60)}
    for start in range(0, 3000, 40):  # batches below FerretDB's statement cap
        await collection.insert_many(
            [{"n": n, "blob": blob, **fields} for n in range(start, start + 40)]
        )
    # The scan works and finds nothing when given time: only its duration makes it fail below.
    assert await collection.count_documents({"blob": {"$regex": "y"}}) == 0

    # The service's client once the database is gone: created after the stop, as a process
    # started (or a monitor that noticed) while it is down knows no server to talk to.
    later: list[AsyncMongoClient[dict[str, Any]]] = []

    async def scan(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        if request == b"scan":
            await collection.count_documents({"blob": {"$regex": "y"}})
        else:
            await later[0].admin.command("ping")
        return b""

    handler = grpc.method_handlers_generic_handler(
        "azora.test.v1.Probe", {"Scan": grpc.unary_unary_rpc_method_handler(scan)}
    )
    server = await create_server(
        bind="127.0.0.1:0",
        service_names=("azora.test.v1.Probe",),
        registrars=(lambda s: s.add_generic_rpc_handlers((handler,)),),
        interceptors=[ErrorMappingInterceptor(database_timeout=0.1)],
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call: Any = channel.unary_unary("/azora.test.v1.Probe/Scan")
            with pytest.raises(grpc.aio.AioRpcError) as slow:
                await call(b"scan", timeout=20)
            assert slow.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, slow.value.details()
            assert "ran out of time" in str(slow.value.details())
            assert "unreachable" not in str(slow.value.details())
            server_db.stop()
            later.append(AsyncMongoClient(uri, serverSelectionTimeoutMS=500, connectTimeoutMS=500))
            with pytest.raises(grpc.aio.AioRpcError) as down:
                await call(b"ping", timeout=20)
            assert down.value.code() == grpc.StatusCode.UNAVAILABLE, down.value.details()
            assert "unreachable" in str(down.value.details())
    finally:
        await server.stop(None)
        await client.close()
        for other in later:
            await other.close()
        server_db.stop()


async def test_unexpected_exceptions_are_internal_without_details(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A bug in a handler reaches the caller as a generic INTERNAL, with the traceback only in
    # the server log.
    async def broken(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        raise KeyError("secret internal detail")

    handler = grpc.method_handlers_generic_handler(
        "azora.test.v1.Probe", {"Broken": grpc.unary_unary_rpc_method_handler(broken)}
    )
    server = await create_server(
        bind="127.0.0.1:0",
        service_names=("azora.test.v1.Probe",),
        registrars=(lambda s: s.add_generic_rpc_handlers((handler,)),),
        interceptors=[ErrorMappingInterceptor()],
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            broken_call: Any = channel.unary_unary("/azora.test.v1.Probe/Broken")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await broken_call(b"")
        failure = decode(caught.value)
        assert failure.code == grpc.StatusCode.INTERNAL
        assert failure.message == "internal error"
        assert "secret internal detail" not in str(caught.value)
        assert any("secret internal detail" in (r.exc_text or "") for r in caplog.records)
    finally:
        await server.stop(None)


@pytest.fixture
def restored_garbage_collector() -> Iterator[None]:
    """Give this test process its collector back as it was (`run_event_loop` settles it)."""
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored_garbage_collector")
@pytest.mark.parametrize("choice", ["uvloop", "asyncio", "UVLOOP"])
def test_a_process_runs_on_the_event_loop_its_settings_name(choice: str) -> None:
    settings = Settings.from_env({"AZORA_EVENT_LOOP": choice}, service_name="loop-test")

    async def running_loop() -> asyncio.AbstractEventLoop:
        await asyncio.sleep(0)
        return asyncio.get_running_loop()

    loop = run_event_loop(running_loop(), settings)
    assert isinstance(loop, uvloop.Loop) == (choice.lower() == "uvloop")


@pytest.mark.usefixtures("restored_garbage_collector")
def test_a_process_runs_with_its_start_up_frozen_and_fewer_collections() -> None:
    # What the process holds before its loop starts is out of every later collection's walk,
    # and young collections come every 5,000 allocations, not CPython's 700.
    settings = Settings.from_env({}, service_name="loop-test")
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)

    async def inside() -> tuple[int, tuple[int, int, int]]:
        return gc.get_freeze_count(), gc.get_threshold()

    frozen, thresholds = run_event_loop(inside(), settings)
    assert frozen > 10_000  # the imported modules' objects, at least
    assert thresholds == (5000, 10, 10)


def test_an_unknown_event_loop_is_refused_naming_the_variable() -> None:
    with pytest.raises(SettingsError, match="AZORA_EVENT_LOOP"):
        Settings.from_env({"AZORA_EVENT_LOOP": "trio"}, service_name="loop-test")
