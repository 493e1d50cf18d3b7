"""`internal_only` rpcs: only service tokens get in, whatever other credentials claim.

The rules are read from the real descriptors (the SMTP service's internal rpcs), and the
principals are made the way requests make them: no credentials (the development tenant),
a user JWT with every scope, an API key, and a service JWT. A service JWT is one signed with
AZORA_SERVICE_TOKEN_SECRET and carrying the service issuer and audience: whoever holds
JWT_SECRET (the user-token issuer) cannot make one.
"""

from __future__ import annotations

import time

import jwt
import pytest

from services.core.auth import (
    SERVICE_TOKEN_AUDIENCE,
    SERVICE_TOKEN_ISSUER,
    Authenticator,
    MethodRules,
    ServiceTokens,
    issue_jwt,
)
from services.core.context import Principal
from services.core.errors import PermissionDenied, Unauthenticated
from services.core.settings import Settings

INTERNAL_METHODS = (
    "/azora.smtp.v1.SmtpService/GetRelayCredentials",
    "/azora.smtp.v1.SmtpService/GetSigningKey",
    "/azora.smtp.v1.SmtpService/DeleteDomainData",
)


class StaticApiKeys:
    """An API key resolver that knows one key with every scope."""

    async def resolve(self, *, secret: str) -> Principal | None:
        """Any well-formed key is tenant t1's all-powerful key."""
        return Principal("t1", "apikey:k1", frozenset({"*"}))


def bearer(token: str) -> dict[str, str]:
    """Request metadata carrying a bearer token."""
    return {"authorization": f"Bearer {token}"}


@pytest.fixture
def authenticator(settings: Settings) -> Authenticator:
    """The authenticator the services use, with the test settings (development rules apply)."""
    assert settings.allow_anonymous_development
    return Authenticator(settings, StaticApiKeys())


def test_internal_rpcs_are_marked_in_the_descriptors() -> None:
    # The proto option reaches the rules; public rpcs stay public.
    rules = MethodRules()
    for method in INTERNAL_METHODS:
        assert rules.rule(method).internal_only, method
    assert not rules.rule("/azora.smtp.v1.SmtpService/GetSmtpConfig").internal_only
    assert not rules.rule("/grpc.health.v1.Health/Check").internal_only


@pytest.mark.parametrize("method", INTERNAL_METHODS)
async def test_non_service_principals_are_denied(
    authenticator: Authenticator, settings: Settings, method: str
) -> None:
    # Anonymous (development tenant), a user JWT with "*", and an API key are all refused.
    rule = MethodRules().rule(method)
    user = issue_jwt(secret=settings.jwt_secret, tenant_id="t1", subject="alice", scopes=["*"])
    for metadata in ({}, bearer(user), {"x-api-key": "azk_" + "x" * 40}, bearer("azk_" + "y" * 40)):
        with pytest.raises(PermissionDenied) as denied:
            await authenticator.authorize(rule, metadata)
        assert denied.value.reason == "INTERNAL_ONLY"


async def test_service_tokens_are_admitted_with_their_scope(
    authenticator: Authenticator, settings: Settings
) -> None:
    # A service JWT passes, keeps its "service:" subject and tenant, and still needs the scope.
    rule = MethodRules().rule("/azora.smtp.v1.SmtpService/GetSigningKey")
    tokens = ServiceTokens.from_settings(settings, subject="service:mail", scopes=["smtp:read"])
    principal = await authenticator.authorize(rule, dict(tokens.metadata("t9")))
    assert principal is not None
    assert principal.subject == "service:mail"
    assert principal.tenant_id == "t9"
    unscoped = ServiceTokens.from_settings(settings, subject="service:mail", scopes=["emails:read"])
    with pytest.raises(PermissionDenied) as denied:
        await authenticator.authorize(rule, dict(unscoped.metadata("t9")))
    assert denied.value.reason == "MISSING_SCOPE"


def test_the_service_key_is_not_the_user_key(settings: Settings) -> None:
    # Two keys: knowing JWT_SECRET tells nothing about the key of service tokens.
    assert len(settings.service_token_secret) >= 32
    assert settings.service_token_secret != settings.jwt_secret


@pytest.mark.parametrize("method", INTERNAL_METHODS)
async def test_service_shaped_user_tokens_are_refused(
    authenticator: Authenticator, settings: Settings, method: str
) -> None:
    # Signed with JWT_SECRET, sub "service:mail" (with or without the service issuer and
    # audience): never a service, not even an ordinary user; UNAUTHENTICATED.
    rule = MethodRules().rule(method)
    for issuer, audience in (("", ""), (SERVICE_TOKEN_ISSUER, SERVICE_TOKEN_AUDIENCE)):
        forged = issue_jwt(
            secret=settings.jwt_secret,
            tenant_id="t1",
            subject="service:mail",
            scopes=["*"],
            issuer=issuer,
            audience=audience,
        )
        with pytest.raises(Unauthenticated) as refused:
            await authenticator.authorize(rule, bearer(forged))
        assert refused.value.reason == "INVALID_TOKEN"


async def test_service_key_tokens_need_the_service_issuer_audience_and_subject(
    authenticator: Authenticator, settings: Settings
) -> None:
    # The service key alone is not enough: without the service issuer and audience, or with a
    # subject that is not a service, the token is refused.
    rule = MethodRules().rule("/azora.smtp.v1.SmtpService/GetSigningKey")
    key = settings.service_token_secret
    for subject, issuer, audience in (
        ("service:mail", "", ""),
        ("service:mail", "other", SERVICE_TOKEN_AUDIENCE),
        ("service:mail", SERVICE_TOKEN_ISSUER, "other"),
        ("alice", SERVICE_TOKEN_ISSUER, SERVICE_TOKEN_AUDIENCE),
    ):
        token = issue_jwt(
            secret=key,
            tenant_id="t1",
            subject=subject,
            scopes=["*"],
            issuer=issuer,
            audience=audience,
        )
        with pytest.raises(Unauthenticated):
            await authenticator.authorize(rule, bearer(token))


async def test_user_subjects_stay_namespaced(
    authenticator: Authenticator, settings: Settings
) -> None:
    # Ordinary JWT subjects are still "user:<sub>", so only service tokens carry "service:".
    rule = MethodRules().rule("/azora.smtp.v1.SmtpService/GetSmtpConfig")
    token = issue_jwt(secret=settings.jwt_secret, tenant_id="t1", subject="bob", scopes=["*"])
    principal = await authenticator.authorize(rule, bearer(token))
    assert principal is not None
    assert principal.subject == "user:bob"


async def test_the_tenant_claim_has_one_spelling(
    authenticator: Authenticator, settings: Settings
) -> None:
    # "tenant" is the claim; a token naming its tenant as "tenant_id" (alone or besides
    # "tenant") is refused, so no token can name two tenants or be read two ways.
    rule = MethodRules().rule("/azora.smtp.v1.SmtpService/GetSmtpConfig")
    now = int(time.time())
    for claims in (
        {"sub": "bob", "tenant_id": "t1", "exp": now + 60},
        {"sub": "bob", "tenant": "t1", "tenant_id": "t2", "exp": now + 60},
    ):
        token = jwt.encode(claims, settings.jwt_secret, algorithm="HS256")
        with pytest.raises(Unauthenticated) as refused:
            await authenticator.authorize(rule, bearer(token))
        assert refused.value.reason == "INVALID_TOKEN"
        assert "tenant" in str(refused.value)
