"""Rate limits: per client address and per principal, over gRPC and REST, shared by replicas.

Each test starts its own services with small budgets (tests/support/ratelimit_fixtures.py) on
a fresh database. Client addresses are chosen with x-forwarded-for, which the services believe
from loopback (the default AZORA_TRUSTED_PROXIES): that is how the gateway reaches them too.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections.abc import Callable
from typing import Any

import aiohttp
import grpc
import pytest
from azora.domain.v1 import domain_pb2, domain_pb2_grpc
from azora.health.v1 import health_pb2 as suite_pb2
from azora.health.v1 import health_pb2_grpc as suite_pb2_grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from pymongo import AsyncMongoClient

from services.core.auth import ALL_SCOPES, ServiceTokens
from services.core.context import Principal
from services.core.ratelimit import COLLECTION, Budget, RateLimiter, SharedCounters
from services.core.settings import Settings
from tests.conftest import Tenant, new_tenant
from tests.support.ratelimit_fixtures import (
    LimitedDomain,
    LimitedServices,
    ServiceProcess,
    limited,
    service_processes,
)

__all__ = ["limited", "service_processes"]

LIST = domain_pb2.ListDomainsRequest()


_ADDRESSES = itertools.count(1)


def _address() -> str:
    """A client address no other call of this session uses (198.18.0.0/15, for testing)."""
    n = next(_ADDRESSES)
    return f"198.{18 + n // 65536 % 2}.{n // 256 % 256}.{n % 256}"


def _metadata(tenant: Tenant, address: str | None = None) -> tuple[tuple[str, str], ...]:
    extra = (("x-forwarded-for", address),) if address else ()
    return (*tenant.metadata, *extra)


async def _list(service: LimitedDomain, tenant: Tenant, address: str | None) -> dict[str, str]:
    """ListDomains; returns the answer's initial metadata (raises on failure)."""
    call = service.stub.ListDomains(LIST, metadata=_metadata(tenant, address))
    await call
    return {k: v for k, v in (await call.initial_metadata() or ()) if isinstance(v, str)}


async def _refusal(call: Any) -> tuple[grpc.aio.AioRpcError, dict[str, Any]]:
    """Await a call that must be refused; returns the error and its decoded details."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    error = caught.value
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, error
    details: dict[str, Any] = {}
    for detail in status.details:
        for kind in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.RetryInfo,
            error_details_pb2.QuotaFailure,
        ):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                details[kind.__name__] = message
    return error, details


async def _domain(limited: LimitedServices, **env: str) -> LimitedDomain:
    return await limited.domain(limited.settings(**{"RATE_LIMIT_MAX": "3", **env}))


# The principal's budget holds whatever address it comes from; the refusal says why and when.
async def test_principal_budget_over_grpc(limited: LimitedServices, settings: Settings) -> None:
    service = await _domain(limited)
    tenant = new_tenant(settings)
    remaining = []
    for _ in range(3):
        headers = await _list(service, tenant, _address())
        assert headers["ratelimit-limit"] == "3"
        assert headers["ratelimit-policy"] == "3;w=900"
        assert 0 < int(headers["ratelimit-reset"]) <= 900
        remaining.append(headers["ratelimit-remaining"])
    assert remaining == ["2", "1", "0"]
    call = service.stub.ListDomains(LIST, metadata=_metadata(tenant, _address()))
    error, details = await _refusal(call)
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    info = details["ErrorInfo"]
    assert (info.reason, info.domain) == ("RATE_LIMIT_EXCEEDED", "domain.azora.dev")
    assert info.metadata["scope"] == "user"
    assert info.metadata["limit"] == "3"
    delay = details["RetryInfo"].retry_delay.seconds
    assert 0 < delay <= 900
    assert "3 requests" in (error.details() or "")
    headers = {str(k): str(v) for k, v in await call.initial_metadata() or ()}
    assert headers["ratelimit-remaining"] == "0"
    assert headers["retry-after"] == str(delay)
    # Another principal is not affected.
    await _list(service, new_tenant(settings), _address())


# One address's budget holds whichever principals it uses.
async def test_address_budget_over_grpc(limited: LimitedServices, settings: Settings) -> None:
    service = await _domain(limited)
    address = _address()
    for _ in range(3):
        await _list(service, new_tenant(settings), address)
    call = service.stub.ListDomains(LIST, metadata=_metadata(new_tenant(settings), address))
    error, details = await _refusal(call)
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details["ErrorInfo"].metadata["scope"] == "ip"
    assert details["RetryInfo"].retry_delay.seconds > 0
    await _list(service, new_tenant(settings), _address())


# x-forwarded-for from a peer that is not a trusted proxy is ignored: a direct caller cannot
# pick the address it is counted under.
async def test_forwarded_for_from_untrusted_peers_is_ignored(
    limited: LimitedServices, settings: Settings
) -> None:
    service = await _domain(limited, AZORA_TRUSTED_PROXIES="192.0.2.0/24")
    for _ in range(3):
        await _list(service, new_tenant(settings), _address())
    call = service.stub.ListDomains(LIST, metadata=_metadata(new_tenant(settings), _address()))
    _, details = await _refusal(call)
    assert details["ErrorInfo"].metadata["scope"] == "ip"  # all counted as 127.0.0.1


def test_client_address_rules() -> None:
    # The peer, unless it is a trusted proxy; then the rightmost untrusted x-forwarded-for hop.
    limiter = RateLimiter.from_settings(
        Settings.from_env({"AZORA_TRUSTED_PROXIES": "127.0.0.1/32,::1/128,10.0.0.0/8"}), None
    )
    assert limiter.client_ip("ipv4:127.0.0.1:5000", "") == "127.0.0.1"
    assert limiter.client_ip("ipv4:127.0.0.1:5000", "198.51.100.1, 203.0.113.9") == "203.0.113.9"
    assert limiter.client_ip("ipv6:[::1]:5000", "203.0.113.9, 10.1.2.3") == "203.0.113.9"
    assert limiter.client_ip("ipv4:192.0.2.8:5000", "203.0.113.9") == "192.0.2.8"
    assert limiter.client_ip("ipv4:127.0.0.1:5000", "junk, 10.1.2.3") == "10.1.2.3"
    assert limiter.client_ip("ipv6:[::ffff:192.0.2.8]:5000", "") == "192.0.2.8"
    assert limiter.client_ip("unix:/tmp/sock", "203.0.113.9") is None


# Health checks, reflection, the REST health routes and calls between our services (service
# identities) are never limited, whatever the budget.
async def test_health_reflection_and_services_are_not_limited(
    limited: LimitedServices, settings: Settings
) -> None:
    service = await _domain(limited, RATE_LIMIT_MAX="1")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.running.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        suite = suite_pb2_grpc.SuiteHealthServiceStub(channel)
        as_service = ServiceTokens.from_settings(
            settings, subject="service:mail", scopes=ALL_SCOPES
        ).metadata("t-svc")
        for _ in range(4):
            await health.Check(  # type: ignore[attr-defined]
                health_pb2.HealthCheckRequest(service="")
            )
            await suite.Ping(suite_pb2.PingRequest())
            await service.stub.ListDomains(LIST, metadata=as_service)
    # A user's budget of one is still enforced by the same service.
    tenant = new_tenant(settings)
    await _list(service, tenant, _address())
    error, _ = await _refusal(service.stub.ListDomains(LIST, metadata=_metadata(tenant)))
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


# REST: RateLimit headers on answers, 429 with Retry-After and a Status JSON when refused; the
# address counted is the one the gateway forwards.
async def test_rest_headers_and_429(
    limited: LimitedServices, settings: Settings, http: aiohttp.ClientSession
) -> None:
    service = await _domain(limited)
    base = await limited.gateway(
        service.settings, {"azora.domain.v1.DomainService": service.running.port}
    )
    tenant = new_tenant(settings)
    auth = {"Authorization": f"Bearer {tenant.token}"}
    url = f"{base}/api/v1/domains"
    for expected in ("2", "1", "0"):
        async with http.get(url, headers={**auth, "x-forwarded-for": _address()}) as response:
            assert response.status == 200, await response.text()
            assert response.headers["RateLimit-Limit"] == "3"
            assert response.headers["RateLimit-Remaining"] == expected
            assert int(response.headers["RateLimit-Reset"]) > 0
            assert response.headers["RateLimit-Policy"] == "3;w=900"
    async with http.get(url, headers=auth) as response:
        assert response.status == 429
        body = await response.json()
        retry_after = int(response.headers["Retry-After"])
        assert response.headers["RateLimit-Remaining"] == "0"
        # The security headers are on refusals too.
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert body["code"] == 8
    assert 0 < retry_after <= 900
    by_type = {d["@type"].rpartition("/")[2]: d for d in body["details"]}
    assert by_type["google.rpc.ErrorInfo"]["reason"] == "RATE_LIMIT_EXCEEDED"
    assert by_type["google.rpc.RetryInfo"]["retryDelay"] == f"{retry_after}s"
    # The address the gateway forwards is counted: three fresh tenants from one address.
    address = _address()
    for _ in range(3):
        other = {"Authorization": f"Bearer {new_tenant(settings).token}"}
        async with http.get(url, headers={**other, "x-forwarded-for": address}) as response:
            assert response.status == 200
    other = {"Authorization": f"Bearer {new_tenant(settings).token}", "x-forwarded-for": address}
    async with http.get(url, headers=other) as response:
        assert response.status == 429
        body = await response.json()
    by_type = {d["@type"].rpartition("/")[2]: d for d in body["details"]}
    assert by_type["google.rpc.ErrorInfo"]["metadata"]["scope"] == "ip"


# The sending rpcs have their own budget: using it up leaves the rest of the API usable and
# vice versa. ResendEmail counts as sending.
async def test_send_budget_is_separate(limited: LimitedServices, settings: Settings) -> None:
    from azora.mail.v1 import mail_pb2

    mail = await limited.mail(limited.settings(RATE_LIMIT_MAX="3", AZORA_SEND_RATE_LIMIT_MAX="2"))
    tenant = new_tenant(settings)
    domain = mail.add_domain(tenant)
    first = await mail.send(tenant, domain)
    await mail.send(tenant, domain)
    error, details = await _refusal(mail.send(tenant, domain))
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details["ErrorInfo"].reason == "SEND_RATE_LIMIT_EXCEEDED"
    assert details["ErrorInfo"].metadata["windowSeconds"] == "60"
    resend = mail.stub.ResendEmail(
        mail_pb2.ResendEmailRequest(id=first.id), metadata=tenant.metadata
    )
    _, details = await _refusal(resend)
    assert details["ErrorInfo"].reason == "SEND_RATE_LIMIT_EXCEEDED"
    # The API budget (3) is untouched by the sends.
    for _ in range(3):
        await mail.stub.GetEmail(mail_pb2.GetEmailRequest(id=first.id), metadata=tenant.metadata)
    error, details = await _refusal(
        mail.stub.GetEmail(mail_pb2.GetEmailRequest(id=first.id), metadata=tenant.metadata)
    )
    assert details["ErrorInfo"].reason == "RATE_LIMIT_EXCEEDED"


# Two service instances on one database enforce one budget: what one admitted, the other counts
# once both have synced (driven explicitly here, so the test does not depend on timing).
async def test_two_replicas_share_one_budget(limited: LimitedServices, settings: Settings) -> None:
    env = {"RATE_LIMIT_MAX": "6", "AZORA_RATE_LIMIT_SYNC_INTERVAL": "3600"}
    shared = limited.settings(**env)
    first = await limited.domain(shared)
    second = await limited.domain(shared)
    tenant = new_tenant(settings)
    address = _address()
    for _ in range(3):
        await _list(first, tenant, address)
    await first.limiter.counters.sync()
    await second.limiter.counters.sync()
    headers = await _list(second, tenant, address)
    assert headers["ratelimit-remaining"] == "2"  # 6 - 3 (first) - 1
    await _list(second, tenant, address)
    await _list(second, tenant, address)
    error, _ = await _refusal(second.stub.ListDomains(LIST, metadata=_metadata(tenant, address)))
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    # Once the first replica has read the second's counts, it refuses too.
    await second.limiter.counters.sync()
    await first.limiter.counters.sync()
    error, _ = await _refusal(first.stub.ListDomains(LIST, metadata=_metadata(tenant, address)))
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    # One document per replica and window: each has exactly one writer.
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(settings.mongodb_uri)
    try:
        docs = await client[shared.mongodb_database][COLLECTION].find({}).to_list()
    finally:
        await client.close()
    instances = {doc["instance"] for doc in docs if doc["window"].startswith("api:")}
    assert instances == {first.limiter.counters.instance, second.limiter.counters.instance}


# The same with the background sync loop: once the second replica has seen the first's counts,
# it refuses (waiting for that condition, not for a time).
async def test_background_sync_shares_the_budget(
    limited: LimitedServices, settings: Settings
) -> None:
    shared = limited.settings(RATE_LIMIT_MAX="4", AZORA_RATE_LIMIT_SYNC_INTERVAL="0.05")
    first = await limited.domain(shared)
    second = await limited.domain(shared)
    tenant = new_tenant(settings)
    address = _address()
    for _ in range(4):
        await _list(first, tenant, address)
    budget = second.limiter.policy.api
    key = f"principal:{tenant.id}/user:tester"
    counters = second.limiter.counters
    # A condition, not a duration: poll the second replica's view until it has synced.
    async with asyncio.timeout(30):
        while counters.total(budget, key, counters.now_ms())[0] < 4:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    error, details = await _refusal(
        second.stub.ListDomains(LIST, metadata=_metadata(tenant, address))
    )
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details["ErrorInfo"].reason == "RATE_LIMIT_EXCEEDED"


# Many replicas syncing at once lose no counts (unlike $inc on FerretDB 1.24): every document
# has one writer, so the sum read back is the sum admitted.
async def test_concurrent_replicas_lose_no_counts(limited: LimitedServices) -> None:
    database = limited.settings().mongodb_database
    budget = Budget("api", 1_000_000, 3_600_000, "RATE_LIMIT_EXCEEDED", "requests")
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(limited.mongodb_uri)
    try:
        collection = client[database][COLLECTION]
        replicas = [SharedCounters(collection, [budget], sync_interval=1) for _ in range(6)]

        async def work(counters: SharedCounters) -> None:
            for _ in range(20):
                for _ in range(5):
                    counters.add(budget, "principal:t/user:x", counters.now_ms())
                await counters.sync()

        await asyncio.gather(*(work(counters) for counters in replicas))
        reader = SharedCounters(collection, [budget], sync_interval=1)
        await reader.sync()
        total, _ = reader.total(budget, "principal:t/user:x", reader.now_ms())
    finally:
        await client.close()
    assert total == 6 * 20 * 5


async def test_refusal_leaves_the_count_unchanged() -> None:
    # A refused request is not counted, so a client that keeps retrying early is not punished
    # beyond the window; an admitted one is counted once per key.
    limiter = RateLimiter.from_settings(Settings.from_env({"RATE_LIMIT_MAX": "2"}), None)
    principal = Principal("t", "user:x", frozenset({"*"}))
    await limiter.admit(send=False, ip="192.0.2.1", principal=principal)
    await limiter.admit(send=False, ip="192.0.2.2", principal=principal)
    for _ in range(3):
        with pytest.raises(Exception, match="2 requests"):
            await limiter.admit(send=False, ip="192.0.2.3", principal=principal)
    budget = limiter.policy.api
    now = limiter.counters.now_ms()
    assert limiter.counters.total(budget, "ip:192.0.2.3", now)[0] == 0
    assert limiter.counters.total(budget, "principal:t/user:x", now)[0] == 2


SYNCS = "azora_rate_limit_syncs_total"


async def _highest_count(collection: Any) -> int:
    """The largest count any replica has published for any key of the API budget."""
    docs = await collection.find({"window": {"$regex": "^api:"}}).to_list()
    return max((int(v) for d in docs for v in d.get("counts", {}).values()), default=0)


# Two domain service *processes* on one database, with their background sync: once the second
# has synced after the first published its counts, it refuses the principal the first used up.
async def test_two_service_processes_enforce_one_budget(
    limited: LimitedServices,
    service_processes: Callable[..., ServiceProcess],
    settings: Settings,
    http: aiohttp.ClientSession,
) -> None:
    shared = limited.settings()
    env = {"RATE_LIMIT_MAX": "4", "AZORA_RATE_LIMIT_SYNC_INTERVAL": "0.1"}
    first, second = service_processes(shared, **env), service_processes(shared, **env)
    for process in (first, second):
        await process.wait_serving("azora.domain.v1.DomainService")
    tenant = new_tenant(settings)
    metadata = _metadata(tenant, _address())
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as one,
        grpc.aio.insecure_channel(f"127.0.0.1:{second.port}") as two,
    ):
        first_stub = domain_pb2_grpc.DomainServiceStub(one)
        second_stub = domain_pb2_grpc.DomainServiceStub(two)
        for _ in range(4):
            await first_stub.ListDomains(LIST, metadata=metadata)
        # Conditions, not durations: the first process's counts are in the database, then the
        # second process completes two syncs (the second one began after that write).
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(settings.mongodb_uri)
        try:
            collection = client[shared.mongodb_database][COLLECTION]
            async with asyncio.timeout(60):
                while await _highest_count(collection) < 4:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
                start = await second.metric(http, SYNCS, 'outcome="ok"')
                while await second.metric(http, SYNCS, 'outcome="ok"') < start + 2:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        finally:
            await client.close()
        for stub in (second_stub, first_stub):
            error, details = await _refusal(stub.ListDomains(LIST, metadata=metadata))
            assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert details["ErrorInfo"].reason == "RATE_LIMIT_EXCEEDED"


# Other services resolve users' API keys at the domain service with a service identity, so the
# lookups of all their users never use up the calling service's own address budget.
async def test_api_key_lookups_between_services_are_not_limited(
    limited: LimitedServices,
) -> None:
    from services.core.api_key_client import remote_api_key_resolver

    service = await _domain(limited, RATE_LIMIT_MAX="1")
    caller = service.settings.with_overrides(
        service_name="mail-service", domain_service_target=f"127.0.0.1:{service.running.port}"
    )
    resolver, channel = remote_api_key_resolver(caller)
    try:
        for _ in range(3):
            # Unknown keys: answered "no such key" every time, never "unavailable".
            assert await resolver.resolve(secret="azk_" + secrets.token_urlsafe(32)) is None
    finally:
        await channel.close()
