"""Per-tenant sending quotas (per hour and per UTC day): accepted emails only, shared by replicas.

Each test starts its own mail service (in-memory sender domains, no delivery workers) with
small quotas on a fresh database; the send rate limits stay out of the way.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import grpc
import pytest
from azora.iam.v1 import api_keys_pb2, api_keys_pb2_grpc
from azora.mail.v1 import mail_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.core.settings import Settings, SettingsError
from tests.conftest import Tenant, new_tenant
from tests.support.ratelimit_fixtures import LimitedMail, LimitedServices, limited

__all__ = ["limited"]


async def _refused(call: Any) -> tuple[grpc.StatusCode, dict[str, Any]]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    status = rpc_status.from_call(caught.value)  # type: ignore[arg-type]
    assert status is not None
    details: dict[str, Any] = {}
    for detail in status.details:
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                details[kind.__name__] = message
    return caught.value.code(), details


async def _mail(limited: LimitedServices, **env: str) -> LimitedMail:
    quotas = {"AZORA_QUOTA_EMAILS_PER_HOUR": "0", "AZORA_QUOTA_EMAILS_PER_DAY": "0", **env}
    return await limited.mail(limited.settings(**quotas))


# The hourly quota refuses the email after the last one allowed, for that tenant only.
async def test_hourly_quota(limited: LimitedServices, settings: Settings) -> None:
    mail = await _mail(limited, AZORA_QUOTA_EMAILS_PER_HOUR="2")
    tenant, other = new_tenant(settings), new_tenant(settings)
    domain, other_domain = mail.add_domain(tenant), mail.add_domain(other)
    await mail.send(tenant, domain)
    await mail.send(tenant, domain)
    code, details = await _refused(mail.send(tenant, domain))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    info = details["ErrorInfo"]
    assert (info.reason, info.metadata["scope"]) == ("SENDING_QUOTA_EXCEEDED", "tenant")
    assert info.metadata["windowSeconds"] == "3600"
    assert 0 < details["RetryInfo"].retry_delay.seconds <= 3600
    await mail.send(other, other_domain)


# The daily quota, and only accepted emails count: a refused (invalid) send uses nothing.
async def test_daily_quota_counts_accepted_emails_only(
    limited: LimitedServices, settings: Settings
) -> None:
    mail = await _mail(limited, AZORA_QUOTA_EMAILS_PER_DAY="1")
    tenant = new_tenant(settings)
    domain = mail.add_domain(tenant)
    code, _ = await _refused(mail.send(tenant, domain, to=[]))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    await mail.send(tenant, domain)
    code, details = await _refused(mail.send(tenant, domain))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details["ErrorInfo"].metadata["windowSeconds"] == "86400"
    assert 0 < details["RetryInfo"].retry_delay.seconds <= 86400


# 0 means unlimited (and is the value the rest of the suite runs with).
async def test_zero_is_unlimited(limited: LimitedServices, settings: Settings) -> None:
    mail = await _mail(limited, AZORA_SEND_RATE_LIMIT_MAX="1000")
    tenant = new_tenant(settings)
    domain = mail.add_domain(tenant)
    for _ in range(5):
        await mail.send(tenant, domain)
    assert mail.limiter.policy.hourly.limit == 0
    defaults = Settings.from_env({})
    assert (defaults.quota_emails_per_hour, defaults.quota_emails_per_day) == (1000, 10000)
    with pytest.raises(SettingsError, match="AZORA_QUOTA_EMAILS_PER_HOUR"):
        Settings.from_env({"AZORA_QUOTA_EMAILS_PER_HOUR": "-1"})


# Two mail service replicas on one database share the tenant's quota.
async def test_quota_is_shared_by_replicas(limited: LimitedServices, settings: Settings) -> None:
    shared = limited.settings(
        AZORA_QUOTA_EMAILS_PER_HOUR="2",
        AZORA_QUOTA_EMAILS_PER_DAY="0",
        AZORA_RATE_LIMIT_SYNC_INTERVAL="3600",
    )
    first, second = await limited.mail(shared), await limited.mail(shared)
    tenant = new_tenant(settings)
    domain = first.add_domain(tenant)
    second.senders.domains.update(first.senders.domains)
    second.relays.domains.update(first.relays.domains)
    second.relays.relays.update(first.relays.relays)
    await first.send(tenant, domain)
    await second.send(tenant, domain)
    await first.limiter.counters.sync()
    await second.limiter.counters.sync()
    await first.limiter.counters.sync()
    for replica in (first, second):
        code, details = await _refused(replica.send(tenant, domain))
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details["ErrorInfo"].reason == "SENDING_QUOTA_EXCEEDED"


# Over REST the quota is a 429 with Retry-After and a google.rpc.Status body.
async def test_quota_over_rest(
    limited: LimitedServices, settings: Settings, http: aiohttp.ClientSession
) -> None:
    mail = await _mail(limited, AZORA_QUOTA_EMAILS_PER_HOUR="1")
    base = await limited.gateway(mail.settings, {"azora.mail.v1.MailService": mail.running.port})
    tenant = new_tenant(settings)
    domain = mail.add_domain(tenant)
    auth = {"Authorization": f"Bearer {tenant.token}"}
    body = {"from": f"s@{domain}", "to": ["a@example.org"], "subject": "s", "text": "t"}
    async with http.post(f"{base}/api/v1/emails", json=body, headers=auth) as response:
        assert response.status == 200, await response.text()
        assert response.headers["RateLimit-Limit"]
    async with http.post(f"{base}/api/v1/emails", json=body, headers=auth) as response:
        assert response.status == 429
        assert 0 < int(response.headers["Retry-After"]) <= 3600
        error = await response.json()
    assert error["code"] == 8
    reasons = [d.get("reason") for d in error["details"]]
    assert "SENDING_QUOTA_EXCEEDED" in reasons


# A batch counts each message: against the quota before it runs (a batch larger than what is
# left is refused whole), and afterwards only the messages it accepted are used up.
async def test_batch_counts_each_message(limited: LimitedServices, settings: Settings) -> None:
    mail = await _mail(limited, AZORA_QUOTA_EMAILS_PER_HOUR="4")
    tenant = new_tenant(settings)
    domain = mail.add_domain(tenant)

    def batch(*to: list[str]) -> Any:
        return mail.stub.SendEmailBatch(
            mail_pb2.SendEmailBatchRequest(
                messages=[
                    mail_pb2.SendEmailRequest(from_address=f"s@{domain}", to=t, text="t")
                    for t in to
                ]
            ),
            metadata=tenant.metadata,
        )

    answer = await batch(["a@example.org"], ["not an address"])
    assert answer.accepted_count == 1
    answer = await batch(["a@example.org"], ["b@example.org"])
    assert answer.accepted_count == 2
    code, details = await _refused(batch(["a@example.org"], ["b@example.org"]))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details["ErrorInfo"].reason == "SENDING_QUOTA_EXCEEDED"
    await mail.send(tenant, domain)  # the fourth email still fits
    code, _ = await _refused(mail.send(tenant, domain))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED


# A test key's emails never leave the building: they use none of the tenant's quota, however
# many, and live sends keep their whole quota (the send rate budget still applies to both).
async def test_test_keys_use_no_quota(limited: LimitedServices, settings: Settings) -> None:
    keys = await limited.domain(limited.settings())
    mail = await _mail(
        limited,
        AZORA_QUOTA_EMAILS_PER_HOUR="1",
        AZORA_DOMAIN_SERVICE_TARGET=f"127.0.0.1:{keys.running.port}",
    )
    tenant = new_tenant(settings)
    domain = mail.add_domain(tenant)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keys.running.port}") as channel:
        created = await api_keys_pb2_grpc.ApiKeyServiceStub(channel).CreateApiKey(
            api_keys_pb2.CreateApiKeyRequest(name="ci", scopes=["emails:send"], test=True),
            metadata=tenant.metadata,
        )
    # The key, sent as a bearer token: the same tenant, in test mode.
    test_key = Tenant(tenant.id, created.secret)
    for _ in range(3):
        assert (await mail.send(test_key, domain)).test
    assert not (await mail.send(tenant, domain)).test
    code, details = await _refused(mail.send(tenant, domain))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details["ErrorInfo"].reason == "SENDING_QUOTA_EXCEEDED"
