"""Fixtures of the security tests: the whole suite behind the REST gateway, and its database.

The REST stack is the gateway tests' (`tests/gateway/conftest.py`), reused as is: the gateway
on loopback in front of the domain, SMTP and mail services, all on the session's FerretDB and
Knot DNS. On top of it: gRPC stubs of the same services (so a test can attack both
transports), the database those services write (to check what was stored, not only what was
answered), and helpers to mint tenants and credentials.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from azora.domain.v1 import domain_pb2, domain_pb2_grpc, routes_pb2_grpc
from azora.iam.v1 import api_keys_pb2_grpc
from azora.mail.v1 import (
    events_pb2_grpc,
    inbound_pb2_grpc,
    mail_pb2_grpc,
    suppressions_pb2_grpc,
    webhooks_pb2_grpc,
)
from azora.smtp.v1 import smtp_pb2, smtp_pb2_grpc
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from services.core.mongo import Document
from services.core.settings import Settings
from tests.conftest import Tenant, new_tenant, unique_domain
from tests.gateway.conftest import RestStack, bearer, http, rest_base_url, rest_stack
from tests.support.dns_server import KnotServer

__all__ = [
    "GrpcStubs",
    "RestStack",
    "bearer",
    "sending_domain",
    "verified_domain",
    "http",
    "rest_base_url",
    "rest_stack",
]


@dataclass(frozen=True)
class GrpcStubs:
    """Clients of the services behind the gateway (the same processes REST reaches)."""

    domains: domain_pb2_grpc.DomainServiceAsyncStub
    api_keys: api_keys_pb2_grpc.ApiKeyServiceAsyncStub
    smtp: smtp_pb2_grpc.SmtpServiceAsyncStub
    mail: mail_pb2_grpc.MailServiceAsyncStub
    events: events_pb2_grpc.EventServiceAsyncStub
    suppressions: suppressions_pb2_grpc.SuppressionServiceAsyncStub
    webhooks: webhooks_pb2_grpc.WebhookServiceAsyncStub
    routes: routes_pb2_grpc.RouteServiceAsyncStub
    inbound: inbound_pb2_grpc.InboundServiceAsyncStub


@pytest.fixture(scope="session")
async def stack_stubs(rest_stack: RestStack) -> AsyncIterator[GrpcStubs]:
    """Stubs of the domain, SMTP and mail services behind the gateway."""
    domain = grpc.aio.insecure_channel(f"127.0.0.1:{rest_stack.domain.running.port}")
    smtp = grpc.aio.insecure_channel(f"127.0.0.1:{rest_stack.smtp.port}")
    mail = grpc.aio.insecure_channel(f"127.0.0.1:{rest_stack.mail.port}")
    yield GrpcStubs(
        domains=domain_pb2_grpc.DomainServiceStub(domain),
        api_keys=api_keys_pb2_grpc.ApiKeyServiceStub(domain),
        smtp=smtp_pb2_grpc.SmtpServiceStub(smtp),
        mail=mail_pb2_grpc.MailServiceStub(mail),
        events=events_pb2_grpc.EventServiceStub(mail),
        suppressions=suppressions_pb2_grpc.SuppressionServiceStub(mail),
        webhooks=webhooks_pb2_grpc.WebhookServiceStub(mail),
        routes=routes_pb2_grpc.RouteServiceStub(domain),
        inbound=inbound_pb2_grpc.InboundServiceStub(mail),
    )
    for channel in (domain, smtp, mail):
        await channel.close()


@pytest.fixture(scope="session")
async def database(settings: Settings) -> AsyncIterator[AsyncDatabase[Document]]:
    """The database the session's services write (read-only use: checking what was stored)."""
    client: AsyncMongoClient[Document] = AsyncMongoClient(settings.mongodb_uri)
    yield client[settings.mongodb_database]
    await client.close()


@pytest.fixture
def tenant_a(settings: Settings) -> Tenant:
    """A fresh tenant: the owner of the objects a test attacks."""
    return new_tenant(settings)


@pytest.fixture
def tenant_b(settings: Settings) -> Tenant:
    """Another fresh tenant: the attacker."""
    return new_tenant(settings)


async def verified_domain(
    stubs: GrpcStubs, knot_server: KnotServer, tenant: Tenant, suffix: str = "security.test"
) -> domain_pb2.Domain:
    """A new domain of `tenant`, verified through the ownership TXT record published in Knot.

    The zone stays in Knot (names are unique, so it bothers nobody).
    """
    name = unique_domain(suffix)
    domain = await stubs.domains.CreateDomain(
        domain_pb2.CreateDomainRequest(name=name), metadata=tenant.metadata
    )
    knot_server.set_zone(name, [("@", "TXT", f'"azora-verify={domain.verification_token}"')])
    verified = await stubs.domains.VerifyDomain(
        domain_pb2.VerifyDomainRequest(id=domain.id), metadata=tenant.metadata
    )
    assert verified.domain.status == domain_pb2.DOMAIN_STATUS_ACTIVE
    return verified.domain


async def sending_domain(
    stubs: GrpcStubs, knot_server: KnotServer, tenant: Tenant, *, relay_port: int = 9
) -> domain_pb2.Domain:
    """A verified domain of `tenant` that may send: its relay is 127.0.0.1:`relay_port`.

    The default port (discard) refuses connections, so mail stays queued or deferred.
    """
    domain = await verified_domain(stubs, knot_server, tenant)
    await stubs.smtp.UpdateSmtpConfig(
        smtp_pb2.UpdateSmtpConfigRequest(
            domain_id=domain.id,
            host="127.0.0.1",
            port=relay_port,
            security="none",
        ),
        metadata=tenant.metadata,
    )
    return domain
