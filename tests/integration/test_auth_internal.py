"""`internal_only` rpcs: only service tokens get in, whatever other credentials claim.

The rules are read from the real descriptors (the SMTP service's internal rpcs), and the
principals are made the way requests make them: no credentials (the development tenant),
a user JWT with every scope, an API key, and a service JWT.
"""

from __future__ import annotations

import pytest

from services.core.auth import Authenticator, MethodRules, issue_jwt
from services.core.context import Principal
from services.core.errors import PermissionDenied
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
    token = issue_jwt(
        secret=settings.jwt_secret, tenant_id="t9", subject="service:mail", scopes=["smtp:read"]
    )
    principal = await authenticator.authorize(rule, bearer(token))
    assert principal is not None
    assert principal.subject == "service:mail"
    assert principal.tenant_id == "t9"
    unscoped = issue_jwt(
        secret=settings.jwt_secret, tenant_id="t9", subject="service:mail", scopes=["emails:read"]
    )
    with pytest.raises(PermissionDenied) as denied:
        await authenticator.authorize(rule, bearer(unscoped))
    assert denied.value.reason == "MISSING_SCOPE"


async def test_user_subjects_stay_namespaced(
    authenticator: Authenticator, settings: Settings
) -> None:
    # Ordinary JWT subjects are still "user:<sub>", so only service tokens carry "service:".
    rule = MethodRules().rule("/azora.smtp.v1.SmtpService/GetSmtpConfig")
    token = issue_jwt(secret=settings.jwt_secret, tenant_id="t1", subject="bob", scopes=["*"])
    principal = await authenticator.authorize(rule, bearer(token))
    assert principal is not None
    assert principal.subject == "user:bob"
