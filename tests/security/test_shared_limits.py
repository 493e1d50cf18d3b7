"""One budget per client and per principal across processes; guessing credentials is slowed.

A burst spread over several processes (three real domain service processes, or a domain and a
mail service in-process) on one FerretDB is admitted at most RATE_LIMIT_MAX times: budgets are
claimed in blocks with unique inserts (services/core/ratelimit.py `SharedBlocks`), not counted
per process and synced later. Failed authentications are counted per client address and the
address is refused with RESOURCE_EXHAUSTED past AZORA_AUTH_FAILURE_MAX, over gRPC and REST.
In production, loopback is no trusted proxy unless configured.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import random
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import aiohttp
import grpc
import pytest
from azora.domain.v1 import domain_pb2, domain_pb2_grpc
from azora.health.v1 import health_pb2 as suite_pb2
from azora.health.v1 import health_pb2_grpc as suite_pb2_grpc
from azora.mail.v1 import mail_pb2
from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection

from services.core.auth import ServiceTokens
from services.core.ratelimit import (
    BLOCKS_COLLECTION,
    COLLECTION,
    Budget,
    RateLimiter,
    RateLimitExceeded,
    RateLimitPolicy,
    SharedBlocks,
    SharedCounters,
)
from services.core.settings import Settings, SettingsError
from tests.conftest import new_tenant
from tests.support.grpc_errors import decode
from tests.support.ratelimit_fixtures import (
    LimitedServices,
    ServiceProcess,
    limited,
    service_processes,
)

__all__ = ["limited", "service_processes"]

LIMIT = 30
BURST = 4 * LIMIT
_ADDRESSES = itertools.count(1)


def _address() -> str:
    """A client address no other test uses (198.51.100.0/24 is for documentation)."""
    return f"198.51.100.{next(_ADDRESSES) % 250 + 1}"


async def _outcomes(calls: Sequence[Awaitable[Any]]) -> tuple[int, set[str]]:
    """How many calls succeeded, and the reasons of the refused ones (all must be refusals)."""
    admitted, reasons = 0, set()
    for result in await asyncio.gather(*calls, return_exceptions=True):
        if isinstance(result, grpc.aio.AioRpcError):
            failure = decode(result)
            assert failure.code is grpc.StatusCode.RESOURCE_EXHAUSTED, failure
            reasons.add(failure.reason)
        elif isinstance(result, BaseException):
            raise result
        else:
            admitted += 1
    return admitted, reasons


# Three real processes, a concurrent burst spread over them: never more than the budget, and
# once the burst is over every process refuses (the budget is used up, not 3x it).
async def test_three_service_processes_share_one_budget(
    limited: LimitedServices,
    service_processes: Callable[..., ServiceProcess],
    settings: Settings,
) -> None:
    shared = limited.settings()
    env = {"RATE_LIMIT_MAX": str(LIMIT)}
    processes = [service_processes(shared, **env) for _ in range(3)]
    for process in processes:
        await process.wait_serving("azora.domain.v1.DomainService")
    tenant = new_tenant(settings)
    metadata = (*tenant.metadata, ("x-forwarded-for", _address()))
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{p.port}") for p in processes]
    try:
        stubs = [domain_pb2_grpc.DomainServiceStub(channel) for channel in channels]
        calls = [
            stubs[i % 3].ListDomains(domain_pb2.ListDomainsRequest(), metadata=metadata)
            for i in range(BURST)
        ]
        admitted, reasons = await _outcomes(calls)
        # Blocks of one request each here (30 <= AZORA_RATE_LIMIT_BLOCKS): exact but for the
        # few taken for one key and given back when the other key refused.
        assert LIMIT - 4 <= admitted <= LIMIT
        assert reasons == {"RATE_LIMIT_EXCEEDED"}
        for stub in stubs:
            late, _ = await _outcomes(
                [
                    asyncio.ensure_future(
                        stub.ListDomains(domain_pb2.ListDomainsRequest(), metadata=metadata)
                    )
                ]
            )
            assert late == 0
    finally:
        for channel in channels:
            await channel.close()


# Different services (domain and mail routes) share the same budget too; so do the address
# and the principal budgets separately.
async def test_domain_and_mail_routes_share_one_budget(
    limited: LimitedServices, settings: Settings
) -> None:
    shared = limited.settings(RATE_LIMIT_MAX=str(LIMIT))
    domain = await limited.domain(shared)
    mail = await limited.mail(shared)
    tenant = new_tenant(settings)
    address = _address()
    metadata = (*tenant.metadata, ("x-forwarded-for", address))
    calls: list[Awaitable[Any]] = []
    for i in range(BURST):
        call: Awaitable[Any]
        if i % 2:
            call = mail.stub.ListEmails(mail_pb2.ListEmailsRequest(), metadata=metadata)
        else:
            call = domain.stub.ListDomains(domain_pb2.ListDomainsRequest(), metadata=metadata)
        calls.append(call)
    admitted, _ = await _outcomes(calls)
    assert LIMIT - 2 <= admitted <= LIMIT
    # The same address with other principals: its own budget is used up as well.
    other = (*new_tenant(settings).metadata, ("x-forwarded-for", address))
    late, reasons = await _outcomes(
        [mail.stub.ListEmails(mail_pb2.ListEmailsRequest(), metadata=other)]
    )
    assert (late, reasons) == (0, {"RATE_LIMIT_EXCEEDED"})


def _bad_key() -> tuple[tuple[str, str], ...]:
    return (("x-api-key", "azk_" + secrets.token_urlsafe(32)),)


# Past AZORA_AUTH_FAILURE_MAX failures an address is refused before its credentials are looked
# at (right or wrong, the same 429), other addresses are not, and our services' own tokens
# still pass (one guesser on a shared host must not cut the services off each other).
async def test_failed_authentications_are_limited_per_address(
    limited: LimitedServices, settings: Settings
) -> None:
    service = await limited.domain(limited.settings(AZORA_AUTH_FAILURE_MAX="3"))
    address = _address()
    forwarded = (("x-forwarded-for", address),)
    request = domain_pb2.ListDomainsRequest()
    for _ in range(3):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await service.stub.ListDomains(request, metadata=(*_bad_key(), *forwarded))
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
    tenant = new_tenant(settings)
    for metadata in (_bad_key(), tenant.metadata):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await service.stub.ListDomains(request, metadata=(*metadata, *forwarded))
        failure = decode(caught.value)
        assert failure.code is grpc.StatusCode.RESOURCE_EXHAUSTED, failure
        assert failure.reason == "TOO_MANY_FAILED_AUTHENTICATIONS"
        assert failure.metadata["scope"] == "ip"
    # Another address is served; a service token from the blocked address passes.
    await service.stub.ListDomains(
        request, metadata=(*tenant.metadata, ("x-forwarded-for", _address()))
    )
    tokens = ServiceTokens.from_settings(
        service.settings, subject="service:mail", scopes={"domains:read"}
    )
    await service.stub.ListDomains(request, metadata=(*tokens.metadata(tenant.id), *forwarded))
    # Health answers the blocked address (probes and scrapers must always get through).
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.running.port}") as channel:
        suite = suite_pb2_grpc.SuiteHealthServiceStub(channel)
        await suite.Ping(suite_pb2.PingRequest(), metadata=forwarded)


# The same over REST: 401 until the limit, then 429 with Retry-After, for any credentials.
async def test_failed_authentications_are_limited_over_rest(
    limited: LimitedServices, settings: Settings
) -> None:
    shared = limited.settings(AZORA_AUTH_FAILURE_MAX="2")
    service = await limited.domain(shared)
    base_url = await limited.gateway(
        shared, {"azora.domain.v1.DomainService": service.running.port}
    )
    forwarded = {"X-Forwarded-For": _address()}
    url = f"{base_url}/api/v1/domains"
    async with aiohttp.ClientSession() as http:
        statuses = []
        for _ in range(3):
            headers = {**forwarded, "Authorization": "Bearer azk_" + secrets.token_urlsafe(32)}
            async with http.get(url, headers=headers) as response:
                statuses.append(response.status)
        assert statuses == [401, 401, 429]
        headers = {**forwarded, "Authorization": f"Bearer {new_tenant(settings).token}"}
        async with http.get(url, headers=headers) as response:
            assert response.status == 429
            assert int(response.headers["Retry-After"]) > 0
            body = await response.json()
        assert body["details"][0]["reason"] == "TOO_MANY_FAILED_AUTHENTICATIONS"


def _production(**env: str) -> Settings:
    return Settings.from_env(
        {
            "AZORA_ENV": "production",
            "JWT_SECRET": secrets.token_urlsafe(32),
            "AZORA_SECRETS_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
            "AZORA_SERVICE_TOKEN_SECRET": secrets.token_urlsafe(32),
            **env,
        }
    )


def test_loopback_is_no_trusted_proxy_in_production() -> None:
    # A process on the same host cannot choose the address it is counted under in production.
    limiter = RateLimiter.from_settings(_production(), None)
    assert limiter.policy.trusted_proxies == ()
    assert limiter.client_ip("ipv4:127.0.0.1:5000", "203.0.113.9") == "127.0.0.1"
    configured = RateLimiter.from_settings(_production(AZORA_TRUSTED_PROXIES="10.0.0.0/8"), None)
    assert configured.client_ip("ipv4:10.1.2.3:5000", "203.0.113.9") == "203.0.113.9"
    development = RateLimiter.from_settings(Settings.from_env({}), None)
    assert development.client_ip("ipv4:127.0.0.1:5000", "203.0.113.9") == "203.0.113.9"


def test_limit_settings_are_read() -> None:
    # Failed-authentication and block settings are read like the other limits.
    settings = Settings.from_env(
        {
            "AZORA_AUTH_FAILURE_MAX": "7",
            "AZORA_AUTH_FAILURE_WINDOW": "60000",
            "AZORA_RATE_LIMIT_BLOCKS": "4",
        }
    )
    assert (settings.auth_failure_max, settings.auth_failure_window_ms) == (7, 60000)
    assert settings.rate_limit_blocks == 4
    with pytest.raises(SettingsError, match="AZORA_RATE_LIMIT_BLOCKS"):
        Settings.from_env({"AZORA_RATE_LIMIT_BLOCKS": "0"})


# More service processes than blocks, each serving one client a few requests and then stopping
# gracefully (restarts, scale-ins): each gives back what it did not use of its blocks, so the
# next one is served. Before, every stopped process kept its block until the window ended and
# the fifth process here (four blocks) refused the client everything.
async def test_processes_beyond_the_block_count_are_served_after_graceful_stops(
    limited: LimitedServices, settings: Settings
) -> None:
    shared = limited.settings(RATE_LIMIT_MAX="1000000", AZORA_RATE_LIMIT_BLOCKS="4")
    tenant = new_tenant(settings)
    metadata = (*tenant.metadata, ("x-forwarded-for", _address()))
    served = 0
    for _ in range(6):
        domain = await limited.domain(shared)
        for _ in range(3):
            await domain.stub.ListDomains(domain_pb2.ListDomainsRequest(), metadata=metadata)
            served += 1
        limited.services.remove(domain.running)
        await domain.running.stop(None)
    assert served == 18


# Budget objects driven directly: `now_ms` is given, so "idle" needs no waiting.
_API = Budget("api", 1_000_000, 15 * 60 * 1000, reason="RATE_LIMIT_EXCEEDED", what="requests")
_T0 = _API.window_start(1_790_000_000_000) + 1000


@pytest.fixture
async def blocks_collection(
    limited: LimitedServices,
) -> AsyncIterator[AsyncCollection[dict[str, Any]]]:
    """The blocks collection of a fresh database (dropped at teardown)."""
    database = limited.settings().mongodb_database
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(limited.mongodb_uri)
    yield client[database][BLOCKS_COLLECTION]
    await client.close()


async def _takes(blocks: SharedBlocks, budget: Budget, key: str, now: int, count: int) -> int:
    """How many of `count` events `blocks` could take."""
    taken = 0
    for _ in range(count):
        if await blocks.take(budget, key, now, counted=0):
            taken += 1
    return taken


# 34 live processes, 32 blocks (the reproduction of the defect): the 33rd and 34th are refused
# while the 32 that served the client hold a block each; once those have not admitted from
# their blocks for the idle time, they give back the rest and the others are served. With
# more live processes than blocks each serving a client now and then, every one is served
# once the others have been idle for that long.
async def test_live_processes_beyond_the_block_count_are_served_once_others_idle(
    blocks_collection: AsyncCollection[dict[str, Any]],
) -> None:
    instances = [
        SharedBlocks(blocks_collection, blocks_per_window=32, instance=f"p{i}") for i in range(34)
    ]
    key = f"ip:{_address()}"
    for blocks in instances[:32]:
        assert await _takes(blocks, _API, key, _T0, 3) == 3
    # Held by live processes that used them a moment ago: not available yet (the documented
    # price; no block number is left).
    assert await _takes(instances[32], _API, key, _T0, 1) == 0
    idle = _T0 + 30_000
    for blocks in instances:
        await blocks.release_idle(idle)
    for blocks in instances[32:]:
        assert await _takes(blocks, _API, key, idle + 1000, 3) == 3
    # Rounds of every process serving a little, each followed by an idle time.
    now = idle + 1000
    for _ in range(3):
        now += 31_000
        for blocks in instances:
            await blocks.release_idle(now)
        for blocks in instances:
            assert await _takes(blocks, _API, key, now, 2) == 2
    # A claim per process and round (each gave its block back while idle), not per request:
    # the 32 blocks, 2 halves, then 34 halves in each of the 3 rounds.
    assert await blocks_collection.count_documents({}) == 32 + 2 + 3 * 34


# Never more than the budget, however blocks go round: 12 processes, a budget of 64 in 8
# blocks, served concurrently in rounds, some giving back idle blocks, some stopping (and
# being replaced), one killed (-9: never gives back). The budget is admitted exactly, but for
# what the killed process held and had not used.
async def test_given_back_blocks_never_admit_more_than_the_budget(
    blocks_collection: AsyncCollection[dict[str, Any]],
) -> None:
    budget = Budget("send", 64, 15 * 60 * 1000, reason="SEND_RATE_LIMIT_EXCEEDED", what="sends")
    now = budget.window_start(_T0) + 1
    key = f"principal:{secrets.token_hex(4)}"
    rng = random.Random(7)  # noqa: S311 (a reproducible schedule, not a secret)
    names = itertools.count()
    processes = [
        SharedBlocks(blocks_collection, blocks_per_window=8, instance=f"p{next(names)}")
        for _ in range(12)
    ]
    killed = processes.pop()
    killed_taken = await _takes(killed, budget, key, now, 3)
    assert killed_taken == 3  # it holds a block of 8 and never gives back the other 5
    admitted = killed_taken
    for _ in range(40):
        now += 1100  # past the re-check of processes that found nothing
        counts = await asyncio.gather(
            *(_takes(p, budget, key, now, rng.randint(0, 3)) for p in processes)
        )
        admitted += sum(counts)
        assert admitted <= budget.limit
        for index, process in enumerate(processes):
            choice = rng.random()
            if choice < 0.2:
                await process.release_all(now)
                processes[index] = SharedBlocks(
                    blocks_collection, blocks_per_window=8, instance=f"p{next(names)}"
                )
            elif choice < 0.5:
                await process.release_idle(now + 30_000)
    for process in processes:
        await process.release_all(now)
    now += 1100
    for process in processes:
        admitted += await _takes(process, budget, key, now, budget.limit)
    assert admitted == budget.limit - 5
    # It went through halves of given-back blocks, not only the 8 numbered ones.
    halves = await blocks_collection.count_documents({"_id": {"$regex": r"\."}})
    assert halves > 8, halves


# More live processes than blocks, all busy with one client (each gets a request every sync
# interval, so none is ever idle): the ones without a block say so through the counts they
# share; the holders give back what their blocks left, and each is claimed in halves, so within
# about a second (the re-check of a process that found nothing) every process serves.
async def test_busy_processes_beyond_the_block_count_are_served_within_a_second(
    limited: LimitedServices,
) -> None:
    shared = limited.settings(RATE_LIMIT_MAX="1000000", AZORA_RATE_LIMIT_BLOCKS="4")
    policy = RateLimitPolicy.from_settings(shared)
    clock = [_T0 / 1000]
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(limited.mongodb_uri)
    database = client[shared.mongodb_database]
    limiters = []
    for _ in range(6):
        counters = SharedCounters(
            database[COLLECTION], policy.budgets, sync_interval=0.25, clock=lambda: clock[0]
        )
        blocks = SharedBlocks(
            database[BLOCKS_COLLECTION], blocks_per_window=4, instance=counters.instance
        )
        limiters.append(RateLimiter(policy, counters, blocks))
    address = _address()

    async def refused() -> list[int]:
        """Every process gets one request; which refused it."""
        refusals = []
        for index, limiter in enumerate(limiters):
            try:
                await limiter.admit(send=False, ip=address, principal=None)
            except RateLimitExceeded:
                refusals.append(index)
        return refusals

    try:
        assert await refused() == [4, 5]
        history = []
        for _ in range(16):
            clock[0] += 0.25
            # One round of every process's background loop: publish, read, give back.
            for limiter in limiters:
                await limiter.counters.sync()
            for limiter in limiters:
                await limiter.counters.sync()
                await limiter.release_spare()
            history.append(await refused())
        assert history[:3] == [[4, 5]] * 3  # the re-check of a process that found nothing: 1 s
        assert history[3:] == [[]] * 13
        # The 4 blocks, and one half of each for the 6 processes.
        assert await database[BLOCKS_COLLECTION].count_documents({}) == 10
    finally:
        await client.close()


# The same with real processes stopped by SIGTERM (what a restart or a scale-in does).
async def test_processes_beyond_the_block_count_are_served_after_sigterm(
    limited: LimitedServices,
    service_processes: Callable[..., ServiceProcess],
    settings: Settings,
) -> None:
    shared = limited.settings()
    tenant = new_tenant(settings)
    metadata = (*tenant.metadata, ("x-forwarded-for", _address()))
    served = 0
    for _ in range(6):
        process = service_processes(shared, RATE_LIMIT_MAX="1000000", AZORA_RATE_LIMIT_BLOCKS="4")
        await process.wait_serving("azora.domain.v1.DomainService")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{process.port}") as channel:
            stub = domain_pb2_grpc.DomainServiceStub(channel)
            for _ in range(3):
                await stub.ListDomains(domain_pb2.ListDomainsRequest(), metadata=metadata)
                served += 1
        process.stop()
        assert process.process.returncode == 0, process.log.read_text()
    assert served == 18
