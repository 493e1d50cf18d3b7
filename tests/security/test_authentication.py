"""Broken authentication and function-level authorization (OWASP API2 and API5).

Every rpc of the descriptor set is called with a token that has every scope but the one its
access rule requires (PERMISSION_DENIED naming the scope), internal rpcs with a user token
holding every scope (PERMISSION_DENIED, INTERNAL_ONLY). Bad credentials of every kind are sent
through the REST gateway to each service (each authenticates on its own): expired, signed with
another secret, tampered payload, unsigned (alg=none), another algorithm, garbage, a service
subject signed with the user-token key, the tenant claim spelled `tenant_id`, malformed,
unknown and revoked API keys; each is a 401 whose body does not echo the credentials.
tests/security/test_auth.py covers the same token kinds over gRPC on the domain service,
API key scopes and the production rule that a request without credentials is refused.
"""

from __future__ import annotations

import base64
import json
import time
import warnings
from collections.abc import Callable

import aiohttp
import grpc
import jwt
import pytest
from azora.iam.v1 import api_keys_pb2
from google.protobuf import descriptor_pool

from services.core.auth import ALL_SCOPES, MethodRules, issue_jwt
from services.core.ids import new_id
from services.core.settings import Settings
from tests.conftest import TEST_JWT_SECRET, new_tenant
from tests.security.conftest import GrpcStubs, RestStack
from tests.security.test_object_level_authorization import api_rpcs
from tests.support.grpc_errors import decode

# Importing the stubs registered every service in the default pool; the rules come from there.
RULES = MethodRules(descriptor_pool.Default())
SERVICE_PORTS = {
    "azora.domain.v1.DomainService": "domain",
    "azora.domain.v1.RouteService": "domain",
    "azora.iam.v1.ApiKeyService": "domain",
    "azora.health.v1.SuiteHealthService": "domain",
    "azora.smtp.v1.SmtpService": "smtp",
    "azora.mail.v1.MailService": "mail",
    "azora.mail.v1.EventService": "mail",
    "azora.mail.v1.WebhookService": "mail",
    "azora.mail.v1.SuppressionService": "mail",
    "azora.mail.v1.InboundService": "mail",
}


def _port(stack: RestStack, service: str) -> int:
    where = SERVICE_PORTS[service]
    if where == "domain":
        return stack.domain.running.port
    return stack.smtp.port if where == "smtp" else stack.mail.port


async def _call_raw(
    stack: RestStack, rpc: str, metadata: tuple[tuple[str, str], ...]
) -> grpc.aio.AioRpcError | None:
    """Call `rpc` with an empty request; the error, or None if it succeeded."""
    service, _, method = rpc.rpartition(".")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{_port(stack, service)}") as channel:
        call = channel.unary_unary(
            f"/{service}/{method}",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        try:
            await call(b"", metadata=metadata, timeout=10)
        except grpc.aio.AioRpcError as error:
            return error
    return None


def test_every_rpc_is_in_a_known_service() -> None:
    # The port table below covers every service, so no rpc escapes the scope test.
    assert {rpc.rpartition(".")[0] for rpc in api_rpcs()} <= set(SERVICE_PORTS)


@pytest.mark.parametrize("rpc", api_rpcs())
async def test_every_rpc_enforces_its_access_rule(
    rpc: str, rest_stack: RestStack, settings: Settings
) -> None:
    # A token lacking exactly the required scope is refused before the rpc runs; internal rpcs
    # refuse user tokens with every scope; anonymous rpcs need no scope at all.
    service, _, method = rpc.rpartition(".")
    rule = RULES.rule(f"/{service}/{method}")
    if rule.internal_only:
        user = new_tenant(settings, ALL_SCOPES)
        error = await _call_raw(rest_stack, rpc, user.metadata)
        assert error is not None
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert decode(error).reason == "INTERNAL_ONLY"
    elif rule.allow_anonymous:
        assert rule.required_scope == "", "an anonymous rpc with a scope is a contradiction"
        # Reaches the rpc itself (which may still refuse the empty request on its own terms).
        error = await _call_raw(rest_stack, rpc, ())
        if error is not None:
            assert error.code() != grpc.StatusCode.PERMISSION_DENIED
            assert decode(error).reason != "CREDENTIALS_MISSING"
    else:
        assert rule.required_scope in ALL_SCOPES, f"{rpc} requires no known scope"
        lacking = new_tenant(settings, ALL_SCOPES - {rule.required_scope})
        error = await _call_raw(rest_stack, rpc, lacking.metadata)
        assert error is not None
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert decode(error).metadata == {"requiredScope": rule.required_scope}


# --- bad credentials through the gateway -------------------------------------------------------

# One route per service behind the gateway (each service checks credentials itself).
ROUTES = [
    ("GET", "/api/v1/domains"),
    ("GET", "/api/v1/api-keys"),
    ("GET", f"/api/v1/smtp/domains/{new_id()}/config"),
    ("GET", "/api/v1/emails"),
]


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _claims(**extra: object) -> dict[str, object]:
    return {
        "sub": "mallory",
        "tenant": "t-victim",
        "scope": " ".join(sorted(ALL_SCOPES)),
        "exp": int(time.time()) + 600,
        **extra,
    }


def _tampered() -> str:
    # A valid token of tenant t-mallory whose payload is swapped for tenant t-victim.
    header, _, signature = issue_jwt(
        secret=TEST_JWT_SECRET, tenant_id="t-mallory", subject="m", scopes=ALL_SCOPES
    ).split(".")
    return f"{header}.{_b64(_claims())}.{signature}"


def _hs512() -> str:
    # The right secret under another algorithm: only HS256 is accepted.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jwt.warnings.InsecureKeyLengthWarning)
        return jwt.encode(_claims(), TEST_JWT_SECRET, algorithm="HS512")


BAD_TOKENS: dict[str, Callable[[], str]] = {
    "expired": lambda: issue_jwt(
        secret=TEST_JWT_SECRET,
        tenant_id="t-victim",
        subject="m",
        scopes=ALL_SCOPES,
        now=time.time() - 7200,
        ttl_seconds=60,
    ),
    "other secret": lambda: jwt.encode(_claims(), "not-the-secret-" + "z" * 32, algorithm="HS256"),
    "tampered payload": _tampered,
    "alg none": lambda: f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(_claims())}.",
    "alg none, upper case": lambda: f"{_b64({'alg': 'NONE', 'typ': 'JWT'})}.{_b64(_claims())}.",
    "HS512 with the right secret": _hs512,
    "garbage": lambda: "eyJ.garbage.token",
    # Only tokens signed with AZORA_SERVICE_TOKEN_SECRET are services; JWT_SECRET cannot mint one.
    "service subject signed with JWT_SECRET": lambda: issue_jwt(
        secret=TEST_JWT_SECRET, tenant_id="t-victim", subject="service:mail", scopes=ALL_SCOPES
    ),
    # The tenant claim has one spelling, "tenant".
    "tenant_id instead of tenant": lambda: jwt.encode(
        {k: v for k, v in _claims(tenant_id="t-victim").items() if k != "tenant"},
        TEST_JWT_SECRET,
        algorithm="HS256",
    ),
    "malformed API key": lambda: "azk_",
    "unknown API key": lambda: "azk_" + "A" * 43,
}


@pytest.mark.parametrize("kind", sorted(BAD_TOKENS))
@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_bad_credentials_are_401_on_every_service(
    http: aiohttp.ClientSession, rest_base_url: str, kind: str, method: str, path: str
) -> None:
    # Each kind of bad credential is 401 UNAUTHENTICATED; the answer never repeats it.
    token = BAD_TOKENS[kind]()
    for headers in ({"Authorization": f"Bearer {token}"}, {"x-api-key": token}):
        if "x-api-key" in headers and not token.startswith("azk_"):
            continue
        async with http.request(method, rest_base_url + path, headers=headers) as response:
            body = await response.text()
            assert response.status == 401, (kind, path, body)
            assert json.loads(body)["code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
            assert token not in body
            assert token not in str(response.headers)


async def test_revoked_api_keys_are_401_on_every_service(
    http: aiohttp.ClientSession, rest_base_url: str, stack_stubs: GrpcStubs, settings: Settings
) -> None:
    # A key revoked before its first use is refused by all services (none has it cached).
    owner = new_tenant(settings)
    created = await stack_stubs.api_keys.CreateApiKey(
        api_keys_pb2.CreateApiKeyRequest(name="doomed", scopes=sorted(ALL_SCOPES)),
        metadata=owner.metadata,
    )
    await stack_stubs.api_keys.RevokeApiKey(
        api_keys_pb2.RevokeApiKeyRequest(id=created.api_key.id), metadata=owner.metadata
    )
    for method, path in ROUTES:
        for headers in (
            {"Authorization": f"Bearer {created.secret}"},
            {"x-api-key": created.secret},
        ):
            async with http.request(method, rest_base_url + path, headers=headers) as response:
                assert response.status == 401, path
                assert created.secret not in await response.text()


async def test_a_valid_api_key_works_on_every_service(
    http: aiohttp.ClientSession, rest_base_url: str, stack_stubs: GrpcStubs, settings: Settings
) -> None:
    # The control for the two tests above: the same routes accept a live key.
    owner = new_tenant(settings)
    created = await stack_stubs.api_keys.CreateApiKey(
        api_keys_pb2.CreateApiKeyRequest(name="live", scopes=sorted(ALL_SCOPES)),
        metadata=owner.metadata,
    )
    for method, path in ROUTES:
        async with http.request(
            method, rest_base_url + path, headers={"x-api-key": created.secret}
        ) as response:
            assert response.status in (200, 404), (path, await response.text())
