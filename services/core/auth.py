"""Authentication and authorisation of every request.

Credentials: a JWT bearer token (HS256, signed with JWT_SECRET, tenant and scopes in claims,
expiry required) or an API key (``azk_...``, as a bearer token or in ``x-api-key``). API keys
are owned by the domain service; other services resolve them over gRPC through an
`ApiKeyResolver` and cache the answer briefly (revocation takes effect within that TTL).

Service tokens, which the services mint for each other, are JWTs too, but signed with their own
key (AZORA_SERVICE_TOKEN_SECRET) and carrying their own issuer and audience. Only they make a
principal a service (the one kind allowed into `internal_only` rpcs, which hand out relay
passwords and DKIM private keys): a token signed with JWT_SECRET is always a user's, and one
whose subject pretends to be a service is refused. So whoever issues user tokens cannot mint a
service identity.

Each rpc's access rule is declared in its proto (`azora.iam.v1.access`) and read here from the
descriptor, so the rule is written once, next to the rpc.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import jwt
from azora.iam.v1 import options_pb2
from google.protobuf import descriptor_pool

from services.core.cache import TtlCache
from services.core.context import Principal
from services.core.errors import PermissionDenied, Unauthenticated
from services.core.settings import DEV_TENANT_ID, Settings

API_KEY_PREFIX = "azk_"
# Test keys' secrets start with this (also an API_KEY_PREFIX): recognisable in a config file.
# What makes a key a test key is the stored key, not the spelling of its secret.
TEST_API_KEY_PREFIX = "azk_test_"
# Subjects of service JWTs, which services mint for each other (e.g. "service:mail").
SERVICE_SUBJECT_PREFIX = "service:"
# Issuer and audience of service JWTs; a token needs both (and the service key) to be one.
SERVICE_TOKEN_ISSUER = "azora-services"  # noqa: S105 - a claim value, not a secret
SERVICE_TOKEN_AUDIENCE = "azora-services"  # noqa: S105 - a claim value, not a secret
# The one spelling of the tenant claim; "tenant_id" is refused rather than guessed at.
TENANT_CLAIM = "tenant"
ALL_SCOPES = frozenset(
    {
        "domains:read",
        "domains:write",
        "smtp:read",
        "smtp:write",
        "emails:read",
        "emails:send",
        "emails:write",
        "api_keys:manage",
        "templates:read",
        "templates:write",
        "webhooks:read",
        "webhooks:write",
    }
)
# Below gRPC's 8 KiB metadata soft limit, where grpc starts rejecting calls at random.
_MAX_CREDENTIAL_LENGTH = 4096


def hash_api_key(secret: str) -> str:
    """The stored form of an API key secret (SHA-256; the secret has 256 bits of entropy)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_api_key_secret(*, test: bool = False) -> str:
    """A fresh API key secret (``azk_test_...`` for a test key, never for a live one)."""
    if test:
        return TEST_API_KEY_PREFIX + secrets.token_urlsafe(32)
    while True:  # a live secret that reads like a test key's would mislead whoever holds it
        secret = API_KEY_PREFIX + secrets.token_urlsafe(32)
        if not secret.startswith(TEST_API_KEY_PREFIX):
            return secret


def constant_time_equal(a: str, b: str) -> bool:
    """Compare secrets (or their hashes) without leaking where they differ."""
    return hmac.compare_digest(a.encode(), b.encode())


def issue_jwt(
    *,
    secret: str,
    tenant_id: str,
    subject: str,
    scopes: Iterable[str],
    ttl_seconds: float = 3600.0,
    now: float | None = None,
    issuer: str = "",
    audience: str = "",
) -> str:
    """Sign a token the services accept (used by tests, tooling and trusted issuers)."""
    issued = int(now if now is not None else time.time())
    claims: dict[str, object] = {
        "sub": subject,
        "tenant": tenant_id,
        "scope": " ".join(sorted(scopes)),
        "iat": issued,
        "exp": issued + int(ttl_seconds),
    }
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    return jwt.encode(claims, secret, algorithm="HS256")


class ServiceTokens:
    """Service JWTs a process mints to call another service on behalf of a tenant.

    Subject ``service:<name>``, signed with AZORA_SERVICE_TOKEN_SECRET and carrying the service
    issuer and audience (only holders of that key can mint them, which is what `internal_only`
    rpcs rely on). A token lives a minute and is reused for half of that, so a busy worker does
    not sign one per call.
    """

    TTL_SECONDS = 60
    REUSE_SECONDS = 30.0

    def __init__(
        self,
        *,
        secret: str,
        subject: str,
        scopes: Iterable[str],
        issuer: str = "",
        audience: str = "",
        max_entries: int = 10_000,
    ) -> None:
        if not subject.startswith(SERVICE_SUBJECT_PREFIX):
            raise ValueError(f"service subjects start with {SERVICE_SUBJECT_PREFIX!r}")
        self._secret = secret
        self._subject = subject
        self._scopes = tuple(scopes)
        self._issuer = issuer
        self._audience = audience
        # Reused for half their lifetime: a token handed out is always valid for 30 s more.
        self._tokens: TtlCache[str, str] = TtlCache(ttl=self.REUSE_SECONDS, max_entries=max_entries)

    @classmethod
    def from_settings(
        cls, settings: Settings, *, subject: str, scopes: Iterable[str]
    ) -> ServiceTokens:
        """Tokens signed with AZORA_SERVICE_TOKEN_SECRET, with the service issuer and audience."""
        return cls(
            secret=settings.service_token_secret,
            subject=subject,
            scopes=scopes,
            issuer=SERVICE_TOKEN_ISSUER,
            audience=SERVICE_TOKEN_AUDIENCE,
        )

    def metadata(self, tenant_id: str) -> tuple[tuple[str, str], ...]:
        """Call metadata authenticating this service for `tenant_id`."""
        token = self._tokens.get(tenant_id)
        if token is None:
            token = self._tokens.put(
                tenant_id,
                issue_jwt(
                    secret=self._secret,
                    tenant_id=tenant_id,
                    subject=self._subject,
                    scopes=self._scopes,
                    ttl_seconds=self.TTL_SECONDS,
                    issuer=self._issuer,
                    audience=self._audience,
                ),
            )
        return (("authorization", f"Bearer {token}"),)


class ApiKeyResolver(Protocol):
    """Turns an API key secret into its principal."""

    async def resolve(self, *, secret: str) -> Principal | None:
        """Return the key's principal, or None if the key is unknown, revoked or expired.

        Raises:
            Unavailable: the key owner cannot be asked right now.
        """
        ...


class CachingApiKeyResolver:
    """Remembers answers (valid or not) for `ttl` seconds to spare the owner a call per request."""

    def __init__(self, inner: ApiKeyResolver, *, ttl: float, max_entries: int = 10_000) -> None:
        self._inner = inner
        # Answers are wrapped in a 1-tuple so that a cached "no such key" (None) is a hit.
        self._answers: TtlCache[str, tuple[Principal | None]] = TtlCache(
            ttl=ttl, max_entries=max_entries
        )

    async def resolve(self, *, secret: str) -> Principal | None:
        """Return a cached answer younger than the TTL, else ask the inner resolver."""
        key = hash_api_key(secret)  # keep no raw secrets in memory structures
        cached = self._answers.get(key)
        if cached is None:
            cached = self._answers.put(key, (await self._inner.resolve(secret=secret),))
        return cached[0]


@dataclass(frozen=True, slots=True)
class MethodRule:
    """Access rule of one rpc."""

    required_scope: str = ""
    allow_anonymous: bool = False
    # Only service JWTs (subject "service:...") may call: internal plumbing between services.
    internal_only: bool = False


class MethodRules:
    """Reads `azora.iam.v1.access` options of rpcs from the descriptor pool, once per method."""

    def __init__(self, pool: descriptor_pool.DescriptorPool | None = None) -> None:
        self._pool = pool or descriptor_pool.Default()
        self._cache: dict[str, MethodRule] = {}

    def rule(self, full_method: str) -> MethodRule:
        """The rule for "/package.Service/Method"; gRPC's own services need no credentials."""
        cached = self._cache.get(full_method)
        if cached is not None:
            return cached
        service, _, method = full_method.lstrip("/").partition("/")
        if service.startswith("grpc."):
            rule = MethodRule(allow_anonymous=True)  # health checks and reflection
        else:
            try:
                descriptor = self._pool.FindMethodByName(f"{service}.{method}")
            except KeyError:
                rule = MethodRule()
            else:
                options = descriptor.GetOptions()
                if options.HasExtension(options_pb2.access):
                    access = options.Extensions[options_pb2.access]
                    rule = MethodRule(
                        access.required_scope, access.allow_anonymous, access.internal_only
                    )
                else:
                    rule = MethodRule()
        self._cache[full_method] = rule
        return rule


class Authenticator:
    """Finds and checks the credentials of a request."""

    def __init__(self, settings: Settings, api_keys: ApiKeyResolver) -> None:
        self._settings = settings
        self._api_keys = api_keys

    async def authenticate(self, metadata: Mapping[str, str]) -> Principal | None:
        """Return the request's principal, or None when it carries no credentials.

        Raises:
            Unauthenticated: credentials are present but malformed, expired, forged or revoked.
        """
        authorization = metadata.get("authorization", "").strip()
        api_key = metadata.get("x-api-key", "").strip()
        if not authorization and not api_key:
            return None
        if len(authorization) > _MAX_CREDENTIAL_LENGTH or len(api_key) > _MAX_CREDENTIAL_LENGTH:
            raise Unauthenticated("credentials too long", reason="MALFORMED_CREDENTIALS")
        if authorization:
            scheme, _, token = authorization.partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                raise Unauthenticated(
                    "Authorization must be 'Bearer <token>'", reason="MALFORMED_CREDENTIALS"
                )
            if token.startswith(API_KEY_PREFIX):
                return await self._from_api_key(token, authorization)
            return self._from_jwt(token, authorization)
        return await self._from_api_key(api_key, f"Bearer {api_key}")

    async def _from_api_key(self, secret: str, credentials: str) -> Principal:
        if not secret.startswith(API_KEY_PREFIX):
            raise Unauthenticated("malformed API key", reason="MALFORMED_CREDENTIALS")
        principal = await self._api_keys.resolve(secret=secret)
        if principal is None:
            raise Unauthenticated("API key unknown, revoked or expired", reason="INVALID_API_KEY")
        return Principal(
            principal.tenant_id, principal.subject, principal.scopes, credentials, principal.test
        )

    def _from_jwt(self, token: str, credentials: str) -> Principal:
        service = self._service_claims(token)
        if service is not None:
            sub = str(service["sub"])
            if not sub.startswith(SERVICE_SUBJECT_PREFIX):
                raise Unauthenticated("invalid token", reason="INVALID_TOKEN")
            return Principal(_tenant(service), sub, _scopes_from_claims(service), credentials)
        claims = _decode(
            token,
            self._settings.jwt_secret,
            issuer=self._settings.jwt_issuer or None,
            audience=self._settings.jwt_audience or None,
        )
        sub = str(claims["sub"])
        if sub.startswith(SERVICE_SUBJECT_PREFIX):
            # Only a token signed with the service key is a service; a user token shaped like
            # one is a forgery attempt (or a misconfigured issuer), never an ordinary user.
            raise Unauthenticated(
                f"a user token cannot have a {SERVICE_SUBJECT_PREFIX!r} subject",
                reason="INVALID_TOKEN",
            )
        # Namespaced, so that no user subject can ever look like a service.
        return Principal(_tenant(claims), f"user:{sub}", _scopes_from_claims(claims), credentials)

    def _service_claims(self, token: str) -> dict[str, object] | None:
        """The claims of a valid service token, or None when `token` is not signed as one.

        Raises:
            Unauthenticated: signed with the service key but expired or otherwise invalid.
        """
        try:
            return _decode(
                token,
                self._settings.service_token_secret,
                issuer=SERVICE_TOKEN_ISSUER,
                audience=SERVICE_TOKEN_AUDIENCE,
                signature_only=True,
            )
        except _NotSignedWithKey:
            return None

    def development_principal(self) -> Principal:
        """The built-in development tenant used for requests without credentials."""
        return Principal(DEV_TENANT_ID, "dev", frozenset({"*"}))

    async def authorize(self, rule: MethodRule, metadata: Mapping[str, str]) -> Principal | None:
        """Authenticate and check the method's scope.

        Returns:
            The principal, or None for an anonymous call to a method that allows it.

        Raises:
            Unauthenticated: no or bad credentials where they are required.
            PermissionDenied: the principal lacks the required scope, or the method is internal
                and the principal is not a service.
        """
        principal = await self.authenticate(metadata)
        # Checked before anything else: an internal rpc hands out secrets (relay passwords,
        # DKIM private keys), so neither anonymity, the development tenant, a user token nor
        # an API key with "*" may reach it, whatever the other flags say.
        if rule.internal_only and (
            principal is None or not principal.subject.startswith(SERVICE_SUBJECT_PREFIX)
        ):
            raise PermissionDenied(
                "this call is internal to the Azora services",
                reason="INTERNAL_ONLY",
            )
        if principal is None:
            if rule.allow_anonymous:
                return None
            if not self._settings.allow_anonymous_development:
                raise Unauthenticated("credentials required", reason="CREDENTIALS_MISSING")
            principal = self.development_principal()
        if not rule.allow_anonymous and not principal.has_scope(rule.required_scope):
            raise PermissionDenied(
                f"this call requires the scope {rule.required_scope!r}",
                reason="MISSING_SCOPE",
                metadata={"requiredScope": rule.required_scope},
            )
        return principal


class _NotSignedWithKey(Exception):
    """The token is not (a JWT) signed with the key tried: maybe it is of another kind."""


def _decode(
    token: str,
    key: str,
    *,
    issuer: str | None,
    audience: str | None,
    signature_only: bool = False,
) -> dict[str, object]:
    """Verify an HS256 token with `key` (signature first, then expiry, issuer, audience).

    Raises:
        _NotSignedWithKey: with `signature_only`, when the signature does not verify.
        Unauthenticated: the token is malformed, forged, expired or for someone else.
    """
    options: dict[str, object] = {"require": ["exp", "sub"]}
    try:
        claims: dict[str, object] = jwt.decode(
            token,
            key,
            algorithms=["HS256"],
            options=options,  # type: ignore[arg-type]
            issuer=issuer,
            audience=audience,
            leeway=30,
        )
    except jwt.ExpiredSignatureError:
        raise Unauthenticated("token expired", reason="TOKEN_EXPIRED") from None
    except jwt.DecodeError:
        # PyJWT checks the signature before any claim: a DecodeError (InvalidSignatureError
        # among them) means the token was not signed with this key, or is no JWT at all.
        if signature_only:
            raise _NotSignedWithKey from None
        raise Unauthenticated("invalid token", reason="INVALID_TOKEN") from None
    except jwt.InvalidTokenError:
        raise Unauthenticated("invalid token", reason="INVALID_TOKEN") from None
    return claims


def _tenant(claims: Mapping[str, object]) -> str:
    """The token's tenant claim.

    Raises:
        Unauthenticated: it is missing, or spelled ``tenant_id`` (one spelling only, so that a
            token can never name two tenants).
    """
    if "tenant_id" in claims:
        raise Unauthenticated(
            f"the tenant claim is spelled {TENANT_CLAIM!r}; 'tenant_id' is not accepted",
            reason="INVALID_TOKEN",
        )
    tenant = claims.get(TENANT_CLAIM)
    if not isinstance(tenant, str) or not tenant:
        raise Unauthenticated("token has no tenant claim", reason="INVALID_TOKEN")
    if any(ord(c) < 32 or ord(c) == 127 for c in tenant):
        # Storage keys join a tenant to other parts with control characters (e.g. the mail
        # service's test partition): a tenant holding one could reach into another's.
        raise Unauthenticated("the tenant claim holds control characters", reason="INVALID_TOKEN")
    return tenant


def _scopes_from_claims(claims: Mapping[str, object]) -> frozenset[str]:
    scope = claims.get("scope")
    listed = claims.get("scopes")
    found: set[str] = set()
    if isinstance(scope, str):
        found.update(s for s in scope.split() if s)
    if isinstance(listed, list):
        found.update(s for s in listed if isinstance(s, str) and s)
    return frozenset(found)
