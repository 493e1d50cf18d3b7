"""Authentication and authorisation.

JWTs, API keys (also across services), scopes, and the development/production rules for
requests without credentials.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
import jwt
import pytest
from azora.domain.v1 import domain_pb2, domain_pb2_grpc
from azora.iam.v1 import api_keys_pb2, api_keys_pb2_grpc
from azora.smtp.v1 import smtp_pb2, smtp_pb2_grpc

from services.core.auth import issue_jwt
from services.core.runtime import RunningService
from services.domain.app import DomainApp, build_app
from services.smtp.app import build as build_smtp
from tests.conftest import TEST_JWT_SECRET, Tenant, make_settings, new_tenant
from tests.support.grpc_errors import failure_of
from tests.support.settings import SuiteSettings

if TYPE_CHECKING:
    Stub = domain_pb2_grpc.DomainServiceAsyncStub


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def list_with(stub: Stub, metadata: tuple[tuple[str, str], ...]) -> object:
    return await stub.ListDomains(domain_pb2.ListDomainsRequest(), metadata=metadata)


@pytest.mark.parametrize(
    ("token_factory", "reason"),
    [
        (
            lambda: issue_jwt(
                secret=TEST_JWT_SECRET,
                tenant_id="t1",
                subject="u",
                scopes=["domains:read"],
                now=time.time() - 7200,
                ttl_seconds=60,
            ),
            "TOKEN_EXPIRED",
        ),
        (
            lambda: issue_jwt(
                secret="another-secret-" + "y" * 32,
                tenant_id="t1",
                subject="u",
                scopes=["domains:read"],
            ),
            "INVALID_TOKEN",
        ),
        (
            lambda: jwt.encode(
                {"sub": "u", "tenant": "t1", "scope": "domains:read"},
                TEST_JWT_SECRET,
                algorithm="HS256",
            ),
            "INVALID_TOKEN",  # no exp claim
        ),
        (
            lambda: jwt.encode(
                {"sub": "u", "scope": "domains:read", "exp": int(time.time()) + 60},
                TEST_JWT_SECRET,
                algorithm="HS256",
            ),
            "INVALID_TOKEN",  # no tenant claim
        ),
        (
            lambda: issue_jwt(
                secret=TEST_JWT_SECRET,
                tenant_id="t1\x1ftest",
                subject="u",
                scopes=["domains:read"],
            ),
            # A control character in a tenant could name another tenant's storage partition
            # (the mail service keeps a tenant's test emails under tenant + "\x1ftest").
            "INVALID_TOKEN",
        ),
        (lambda: "not.a.jwt", "INVALID_TOKEN"),
        (
            lambda: jwt.encode(
                {"sub": "u", "tenant": "t1", "exp": int(time.time()) + 60},
                None,  # type: ignore[arg-type]
                algorithm="none",
            ),
            "INVALID_TOKEN",  # unsigned ("alg": "none") tokens are refused
        ),
    ],
)
async def test_bad_tokens_are_unauthenticated(
    domains_stub: Stub, token_factory: object, reason: str
) -> None:
    # Expired, badly signed, claim-less, malformed and unsigned tokens: UNAUTHENTICATED.
    token = token_factory()  # type: ignore[operator]
    failure = await failure_of(list_with(domains_stub, bearer(token)))
    assert failure.code == grpc.StatusCode.UNAUTHENTICATED
    assert failure.reason == reason


async def test_malformed_authorization_header(domains_stub: Stub) -> None:
    # Something other than a bearer token, or an oversized one: UNAUTHENTICATED.
    for value in ("Basic dXNlcjpwYXNz", "Bearer", "Bearer " + "a" * 5000):
        failure = await failure_of(list_with(domains_stub, (("authorization", value),)))
        assert failure.code == grpc.StatusCode.UNAUTHENTICATED


async def test_wrong_scope_is_permission_denied(
    domains_stub: Stub, settings: SuiteSettings
) -> None:
    # A read-only token can list but not create; the error names the missing scope.
    reader = new_tenant(settings, frozenset({"domains:read"}))
    await list_with(domains_stub, reader.metadata)
    failure = await failure_of(
        domains_stub.CreateDomain(
            domain_pb2.CreateDomainRequest(name="x.example"), metadata=reader.metadata
        )
    )
    assert failure.code == grpc.StatusCode.PERMISSION_DENIED
    assert failure.metadata == {"requiredScope": "domains:write"}


async def test_anonymous_requests_act_as_the_development_tenant_outside_production(
    domains_stub: Stub,
) -> None:
    # Without credentials (development/test mode) calls succeed as the built-in tenant.
    listed = await domains_stub.ListDomains(domain_pb2.ListDomainsRequest())
    assert listed.total_size >= 0


async def test_api_key_lifecycle(
    api_keys_stub: api_keys_pb2_grpc.ApiKeyServiceAsyncStub, domains_stub: Stub, tenant: Tenant
) -> None:
    # A key is shown once, authenticates with its scopes as the creating tenant, is listed
    # without its secret, and is refused once revoked.
    created = await api_keys_stub.CreateApiKey(
        api_keys_pb2.CreateApiKeyRequest(name="ci", scopes=["domains:read"]),
        metadata=tenant.metadata,
    )
    secret = created.secret
    assert secret.startswith("azk_")
    assert created.api_key.prefix == secret[:10]
    domain = await domains_stub.CreateDomain(
        domain_pb2.CreateDomainRequest(name="k" + created.api_key.id + ".example"),
        metadata=tenant.metadata,
    )
    for metadata in (bearer(secret), (("x-api-key", secret),)):
        seen = await domains_stub.GetDomain(
            domain_pb2.GetDomainRequest(id=domain.id), metadata=metadata
        )
        assert seen.id == domain.id
    denied = await failure_of(
        domains_stub.DeleteDomain(
            domain_pb2.DeleteDomainRequest(id=domain.id), metadata=bearer(secret)
        )
    )
    assert denied.code == grpc.StatusCode.PERMISSION_DENIED
    listed = await api_keys_stub.ListApiKeys(
        api_keys_pb2.ListApiKeysRequest(), metadata=tenant.metadata
    )
    assert [k.id for k in listed.api_keys] == [created.api_key.id]
    assert secret not in str(listed)
    revoked = await api_keys_stub.RevokeApiKey(
        api_keys_pb2.RevokeApiKeyRequest(id=created.api_key.id), metadata=tenant.metadata
    )
    assert revoked.HasField("revoke_time")
    again = await api_keys_stub.RevokeApiKey(
        api_keys_pb2.RevokeApiKeyRequest(id=created.api_key.id), metadata=tenant.metadata
    )
    assert again.revoke_time == revoked.revoke_time
    failure = await failure_of(list_with(domains_stub, bearer(secret)))
    assert failure.code == grpc.StatusCode.UNAUTHENTICATED
    assert failure.reason == "INVALID_API_KEY"


async def test_unknown_and_malformed_api_keys(domains_stub: Stub) -> None:
    # Keys that were never issued, or do not look like keys, are UNAUTHENTICATED.
    for key in ("azk_" + "A" * 43, "not-a-key"):
        failure = await failure_of(list_with(domains_stub, (("x-api-key", key),)))
        assert failure.code == grpc.StatusCode.UNAUTHENTICATED


async def test_api_keys_cannot_escalate_scopes(
    api_keys_stub: api_keys_pb2_grpc.ApiKeyServiceAsyncStub, settings: SuiteSettings
) -> None:
    # A principal cannot mint a key with scopes it does not hold, or with unknown scopes.
    manager = new_tenant(settings, frozenset({"api_keys:manage", "domains:read"}))
    escalate = await failure_of(
        api_keys_stub.CreateApiKey(
            api_keys_pb2.CreateApiKeyRequest(name="x", scopes=["domains:write"]),
            metadata=manager.metadata,
        )
    )
    assert escalate.code == grpc.StatusCode.PERMISSION_DENIED
    unknown = await failure_of(
        api_keys_stub.CreateApiKey(
            api_keys_pb2.CreateApiKeyRequest(name="", scopes=["root"]),
            metadata=manager.metadata,
        )
    )
    assert unknown.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {"name", "scopes[0]"} <= set(unknown.field_violations)


async def test_api_keys_of_another_tenant_are_not_found(
    api_keys_stub: api_keys_pb2_grpc.ApiKeyServiceAsyncStub, tenant: Tenant, settings: SuiteSettings
) -> None:
    # Revoking another tenant's key is NOT_FOUND, and its keys are not listed.
    created = await api_keys_stub.CreateApiKey(
        api_keys_pb2.CreateApiKeyRequest(name="mine"), metadata=tenant.metadata
    )
    other = new_tenant(settings)
    failure = await failure_of(
        api_keys_stub.RevokeApiKey(
            api_keys_pb2.RevokeApiKeyRequest(id=created.api_key.id), metadata=other.metadata
        )
    )
    assert failure.code == grpc.StatusCode.NOT_FOUND
    listed = await api_keys_stub.ListApiKeys(
        api_keys_pb2.ListApiKeysRequest(), metadata=other.metadata
    )
    assert list(listed.api_keys) == []


@pytest.fixture(scope="module")
async def smtp_service(
    settings: SuiteSettings, domain_app: DomainApp
) -> AsyncIterator[RunningService]:
    """The SMTP service process, resolving API keys through the domain service over gRPC."""
    smtp_settings = settings.with_overrides(
        domain_service_target=f"127.0.0.1:{domain_app.running.port}", api_key_cache_ttl=0.0
    )
    running = await build_smtp(smtp_settings, bind="127.0.0.1:0")
    yield running
    await running.stop(None)


async def test_other_services_authenticate_api_keys_through_the_domain_service(
    smtp_service: RunningService,
    api_keys_stub: api_keys_pb2_grpc.ApiKeyServiceAsyncStub,
    tenant: Tenant,
) -> None:
    # The SMTP service accepts a valid key (the call then reaches the rpc, which finds no such
    # domain) and refuses a revoked one, asking the key owner over gRPC.
    created = await api_keys_stub.CreateApiKey(
        api_keys_pb2.CreateApiKeyRequest(name="smtp", scopes=["smtp:read"]),
        metadata=tenant.metadata,
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{smtp_service.port}") as channel:
        smtp = smtp_pb2_grpc.SmtpServiceStub(channel)
        request = smtp_pb2.GetSmtpConfigRequest(domain_id="a" * 24)
        accepted = await failure_of(smtp.GetSmtpConfig(request, metadata=bearer(created.secret)))
        assert accepted.code == grpc.StatusCode.NOT_FOUND
        assert accepted.domain == "smtp.azora.dev"
        await api_keys_stub.RevokeApiKey(
            api_keys_pb2.RevokeApiKeyRequest(id=created.api_key.id), metadata=tenant.metadata
        )
        refused = await failure_of(smtp.GetSmtpConfig(request, metadata=bearer(created.secret)))
        assert refused.code == grpc.StatusCode.UNAUTHENTICATED


async def test_production_mode_requires_credentials(ferretdb: str) -> None:
    # In production an anonymous call is UNAUTHENTICATED, while a valid token works.
    settings = make_settings(
        ferretdb,
        "azora_production_auth",
        AZORA_ENV="production",
        AZORA_SECRETS_KEY="c2VjcmV0cy1rZXktZm9yLXRoZS10ZXN0LXN1aXRlISE=",
    )
    app = await build_app(settings, bind="127.0.0.1:0", run_lifecycle=False)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.running.port}") as channel:
            stub = domain_pb2_grpc.DomainServiceStub(channel)
            failure = await failure_of(stub.ListDomains(domain_pb2.ListDomainsRequest()))
            assert failure.code == grpc.StatusCode.UNAUTHENTICATED
            assert failure.reason == "CREDENTIALS_MISSING"
            await stub.ListDomains(
                domain_pb2.ListDomainsRequest(), metadata=new_tenant(settings).metadata
            )
    finally:
        await app.running.stop(None)
