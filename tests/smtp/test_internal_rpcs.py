"""The SMTP service's internal rpcs: relay credentials, signing keys, and the deletion purge.

They answer service tokens only (``internal_only``), scope everything to the token's tenant,
and have no REST route. The domain service's deletion cascade is driven against the real SMTP
service here (the session's domain service points at a different SMTP address).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from azora.smtp.v1 import smtp_pb2
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2, duration_pb2

from services.core.auth import (
    SERVICE_TOKEN_AUDIENCE,
    SERVICE_TOKEN_ISSUER,
    ServiceTokens,
    issue_jwt,
)
from services.core.settings import Settings
from services.domain.cascade import SmtpDataCascade
from services.domain.models import Domain, DomainStatus
from services.smtp.app import SmtpApp
from services.smtp.repository import CONFIGS, KEYRINGS
from tests.conftest import Tenant, new_tenant
from tests.smtp.conftest import PASSWORD, USERNAME, register
from tests.support.grpc_errors import failure_of

if TYPE_CHECKING:
    from azora.domain.v1 import domain_pb2, domain_pb2_grpc
    from azora.smtp.v1 import smtp_pb2_grpc

    DomainStub = domain_pb2_grpc.DomainServiceAsyncStub
    Stub = smtp_pb2_grpc.SmtpServiceAsyncStub

ROOT = Path(__file__).resolve().parents[2]
INTERNAL = ("GetRelayCredentials", "GetSigningKey", "DeleteDomainData")
ED25519 = "ed25519"


def service_metadata(
    settings: Settings, tenant_id: str, *, subject: str = "service:mail", scope: str = "*"
) -> tuple[tuple[str, str], ...]:
    """Call metadata with a service token for `tenant_id`, minted as the services mint them."""
    return ServiceTokens.from_settings(settings, subject=subject, scopes=[scope]).metadata(
        tenant_id
    )


async def configure(stub: Stub, tenant: Tenant, domain_id: str) -> None:
    """Give the domain a relay with a password."""
    await stub.UpdateSmtpConfig(
        smtp_pb2.UpdateSmtpConfigRequest(
            domain_id=domain_id,
            host="smtp.example.com",
            port=587,
            security="starttls",
            username=USERNAME,
            password=PASSWORD,
            timeout=duration_pb2.Duration(seconds=12),
        ),
        metadata=tenant.metadata,
    )


async def test_relay_credentials_carry_the_decrypted_password(
    smtp_stub: Stub, domains_stub: DomainStub, tenant: Tenant, smtp_settings: Settings
) -> None:
    # A service token gets the relay with its password in clear; the public rpc still hides it.
    domain = await register(domains_stub, tenant)
    await configure(smtp_stub, tenant, domain.id)
    relay = await smtp_stub.GetRelayCredentials(
        smtp_pb2.GetRelayCredentialsRequest(domain_id=domain.id),
        metadata=service_metadata(smtp_settings, tenant.id),
    )
    assert relay.domain_id == domain.id
    assert (relay.host, relay.port) == ("smtp.example.com", 587)
    assert relay.security == smtp_pb2.SECURITY_MODE_STARTTLS_REQUIRED
    assert (relay.username, relay.password) == (USERNAME, PASSWORD)
    assert relay.timeout.seconds == 12
    # The same instant the public config reports (both converted by the mapping module).
    public = await smtp_stub.GetSmtpConfig(
        smtp_pb2.GetSmtpConfigRequest(domain_id=domain.id), metadata=tenant.metadata
    )
    assert relay.HasField("update_time")
    assert relay.update_time == public.update_time
    # Naming the token's own tenant is fine; naming another finds nothing.
    same = await smtp_stub.GetRelayCredentials(
        smtp_pb2.GetRelayCredentialsRequest(domain_id=domain.id, tenant_id=tenant.id),
        metadata=service_metadata(smtp_settings, tenant.id),
    )
    assert same.password == PASSWORD
    other = await failure_of(
        smtp_stub.GetRelayCredentials(
            smtp_pb2.GetRelayCredentialsRequest(domain_id=domain.id, tenant_id="t-other"),
            metadata=service_metadata(smtp_settings, tenant.id),
        )
    )
    assert other.code == grpc.StatusCode.NOT_FOUND


async def test_relay_credentials_errors(
    smtp_stub: Stub, domains_stub: DomainStub, tenant: Tenant, smtp_settings: Settings
) -> None:
    # No relay is FAILED_PRECONDITION; another tenant's domain is NOT_FOUND.
    domain = await register(domains_stub, tenant)
    missing = await failure_of(
        smtp_stub.GetRelayCredentials(
            smtp_pb2.GetRelayCredentialsRequest(domain_id=domain.id),
            metadata=service_metadata(smtp_settings, tenant.id),
        )
    )
    assert missing.code == grpc.StatusCode.FAILED_PRECONDITION
    assert missing.reason == "RELAY_NOT_CONFIGURED"
    await configure(smtp_stub, tenant, domain.id)
    stranger = new_tenant(smtp_settings)
    foreign = await failure_of(
        smtp_stub.GetRelayCredentials(
            smtp_pb2.GetRelayCredentialsRequest(domain_id=domain.id),
            metadata=service_metadata(smtp_settings, stranger.id),
        )
    )
    assert foreign.code == grpc.StatusCode.NOT_FOUND


async def test_signing_key_is_the_active_key(
    smtp_stub: Stub,
    domains_stub: DomainStub,
    tenant: Tenant,
    smtp_settings: Settings,
    knot_server: object,
) -> None:
    # NOT_FOUND while no key is active (pending keys never sign); then the active key's PEM.
    from tests.smtp.verifiers import quoted

    domain = await register(domains_stub, tenant)
    metadata = service_metadata(smtp_settings, tenant.id)
    request = smtp_pb2.GetSigningKeyRequest(domain_id=domain.id)
    none = await failure_of(smtp_stub.GetSigningKey(request, metadata=metadata))
    assert none.code == grpc.StatusCode.NOT_FOUND
    key = await smtp_stub.GenerateDkimKey(
        smtp_pb2.GenerateDkimKeyRequest(domain_id=domain.id, algorithm=ED25519),
        metadata=tenant.metadata,
    )
    pending = await failure_of(smtp_stub.GetSigningKey(request, metadata=metadata))
    assert pending.code == grpc.StatusCode.NOT_FOUND
    knot_server.set_zone(  # type: ignore[attr-defined]
        domain.name, [(f"{key.selector}._domainkey", "TXT", quoted(key.record_strings))]
    )
    await smtp_stub.ActivateDkimKey(
        smtp_pb2.ActivateDkimKeyRequest(domain_id=domain.id, selector=key.selector),
        metadata=tenant.metadata,
    )
    signing = await smtp_stub.GetSigningKey(request, metadata=metadata)
    assert (signing.domain_id, signing.domain) == (domain.id, domain.name)
    assert signing.selector == key.selector
    assert signing.algorithm == "ed25519-sha256"
    assert signing.private_key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    stranger = new_tenant(smtp_settings)
    foreign = await failure_of(
        smtp_stub.GetSigningKey(request, metadata=service_metadata(smtp_settings, stranger.id))
    )
    assert foreign.code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("rpc", INTERNAL)
async def test_only_service_tokens_may_call(
    smtp_stub: Stub, domains_stub: DomainStub, tenant: Tenant, api_keys_stub: object, rpc: str
) -> None:
    # User tokens with every scope, API keys and anonymous callers are PERMISSION_DENIED.
    from azora.iam.v1 import api_keys_pb2

    domain = await register(domains_stub, tenant)
    created = await api_keys_stub.CreateApiKey(  # type: ignore[attr-defined]
        api_keys_pb2.CreateApiKeyRequest(name="smtp", scopes=["smtp:read", "smtp:write"]),
        metadata=tenant.metadata,
    )
    requests = {
        "GetRelayCredentials": smtp_pb2.GetRelayCredentialsRequest(domain_id=domain.id),
        "GetSigningKey": smtp_pb2.GetSigningKeyRequest(domain_id=domain.id),
        "DeleteDomainData": smtp_pb2.DeleteDomainDataRequest(domain_id=domain.id),
    }
    method = getattr(smtp_stub, rpc)
    for metadata in (tenant.metadata, (("x-api-key", created.secret),), ()):
        failure = await failure_of(method(requests[rpc], metadata=metadata))
        assert failure.code == grpc.StatusCode.PERMISSION_DENIED, metadata
        assert failure.reason == "INTERNAL_ONLY"


async def test_a_user_token_shaped_like_a_service_token_is_refused(
    smtp_stub: Stub, domains_stub: DomainStub, tenant: Tenant, smtp_settings: Settings
) -> None:
    # Whoever holds JWT_SECRET (the user-token issuer) signs sub "service:mail" for a tenant,
    # even with the service issuer and audience: no relay password comes back.
    domain = await register(domains_stub, tenant)
    await configure(smtp_stub, tenant, domain.id)
    request = smtp_pb2.GetRelayCredentialsRequest(domain_id=domain.id)
    for issuer, audience in (("", ""), (SERVICE_TOKEN_ISSUER, SERVICE_TOKEN_AUDIENCE)):
        forged = issue_jwt(
            secret=smtp_settings.jwt_secret,
            tenant_id=tenant.id,
            subject="service:mail",
            scopes=["*"],
            issuer=issuer,
            audience=audience,
        )
        failure = await failure_of(
            smtp_stub.GetRelayCredentials(
                request, metadata=(("authorization", f"Bearer {forged}"),)
            )
        )
        assert failure.code == grpc.StatusCode.UNAUTHENTICATED, issuer
        assert PASSWORD not in failure.message
    # The genuine article still works.
    relay = await smtp_stub.GetRelayCredentials(
        request, metadata=service_metadata(smtp_settings, tenant.id)
    )
    assert relay.password == PASSWORD


async def test_delete_domain_data_purges_and_is_idempotent(
    smtp_stub: Stub, domains_stub: DomainStub, tenant: Tenant, smtp_settings: Settings
) -> None:
    # Relay, keys and records go; a second purge (or one of a domain with nothing) succeeds.
    domain = await register(domains_stub, tenant)
    await configure(smtp_stub, tenant, domain.id)
    await smtp_stub.GenerateDkimKey(
        smtp_pb2.GenerateDkimKeyRequest(domain_id=domain.id, algorithm=ED25519),
        metadata=tenant.metadata,
    )
    metadata = service_metadata(smtp_settings, tenant.id, subject="service:domain")
    purge = smtp_pb2.DeleteDomainDataRequest(domain_id=domain.id)
    await smtp_stub.DeleteDomainData(purge, metadata=metadata)
    await smtp_stub.DeleteDomainData(purge, metadata=metadata)
    gone = await failure_of(
        smtp_stub.GetSmtpConfig(
            smtp_pb2.GetSmtpConfigRequest(domain_id=domain.id), metadata=tenant.metadata
        )
    )
    assert gone.code == grpc.StatusCode.NOT_FOUND
    keys = await smtp_stub.ListDkimKeys(
        smtp_pb2.ListDkimKeysRequest(domain_id=domain.id), metadata=tenant.metadata
    )
    assert list(keys.keys) == []


def as_model(domain: domain_pb2.Domain, tenant_id: str) -> Domain:
    """The domain service's model of a (deleted) domain, as its hooks receive it."""
    now = datetime.now(UTC)
    return Domain(
        id=domain.id,
        tenant_id=tenant_id,
        name=domain.name,
        unicode_name=domain.name,
        status=DomainStatus.PENDING,
        verification_token=domain.verification_token,
        created_at=now,
        updated_at=now,
    )


async def test_deletion_cascade_purges_the_smtp_data(
    smtp_stub: Stub,
    smtp_channel: grpc.aio.Channel,
    domains_stub: DomainStub,
    tenant: Tenant,
    smtp_settings: Settings,
    smtp_app: SmtpApp,
) -> None:
    # Deleting a domain and running the domain service's hook leaves no relay config or key
    # behind. Read from the SMTP service's collections: through the API, what a caller hears
    # right after the deletion depends on the service's few-seconds cache of domain lookups.
    from azora.domain.v1 import domain_pb2

    domain = await register(domains_stub, tenant)
    await configure(smtp_stub, tenant, domain.id)
    await smtp_stub.GenerateDkimKey(
        smtp_pb2.GenerateDkimKeyRequest(domain_id=domain.id), metadata=tenant.metadata
    )
    database = smtp_app.running.database.db
    stored = {c: await database[c].count_documents({"_id": domain.id}) for c in (CONFIGS, KEYRINGS)}
    assert stored == {CONFIGS: 1, KEYRINGS: 1}
    await domains_stub.DeleteDomain(
        domain_pb2.DeleteDomainRequest(id=domain.id), metadata=tenant.metadata
    )
    cascade = SmtpDataCascade(smtp_channel, settings=smtp_settings)
    await cascade(as_model(domain, tenant.id))
    left = {c: await database[c].count_documents({"_id": domain.id}) for c in (CONFIGS, KEYRINGS)}
    assert left == {CONFIGS: 0, KEYRINGS: 0}


async def test_deletion_cascade_survives_an_unreachable_smtp_service(
    domains_stub: DomainStub,
    tenant: Tenant,
    smtp_settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # With the SMTP service down the hook logs a warning instead of failing the deletion.
    from tests.support.dns_server import pick_free_port

    domain = await register(domains_stub, tenant)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{pick_free_port()}") as channel:
        cascade = SmtpDataCascade(channel, settings=smtp_settings, timeout=2.0)
        with caplog.at_level(logging.WARNING, logger="services.domain.cascade"):
            await cascade(as_model(domain, tenant.id))
    assert any("not purged" in r.getMessage() for r in caplog.records)


def test_internal_rpcs_have_no_rest_route() -> None:
    # No google.api.http rule, so neither the gateway nor the OpenAPI document knows them.
    service = smtp_pb2.DESCRIPTOR.services_by_name["SmtpService"]
    for name in INTERNAL:
        options = descriptor_pb2.MethodOptions()
        options.ParseFromString(service.methods_by_name[name].GetOptions().SerializeToString())
        assert not options.HasExtension(annotations_pb2.http), name
    openapi = json.loads((ROOT / "gen/openapi/azora.swagger.json").read_text())
    text = json.dumps(openapi)
    for name in (*INTERNAL, "RelayCredentials", "GetSigningKeyRequest"):
        assert name not in text, name
