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
import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiohttp
import grpc
import pytest
from azora.domain.v1 import domain_pb2, domain_pb2_grpc
from azora.health.v1 import health_pb2 as suite_pb2
from azora.health.v1 import health_pb2_grpc as suite_pb2_grpc
from azora.mail.v1 import mail_pb2

from services.core.auth import ServiceTokens
from services.core.ratelimit import RateLimiter
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
