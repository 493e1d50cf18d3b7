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
from azora.domain.v1 import domain_pb2_grpc
from azora.iam.v1 import api_keys_pb2_grpc
from azora.mail.v1 import mail_pb2_grpc
from azora.smtp.v1 import smtp_pb2_grpc
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from services.core.mongo import Document
from services.core.settings import Settings
from tests.conftest import Tenant, new_tenant
from tests.gateway.conftest import RestStack, bearer, http, rest_base_url, rest_stack

__all__ = ["GrpcStubs", "RestStack", "bearer", "http", "rest_base_url", "rest_stack"]


@dataclass(frozen=True)
class GrpcStubs:
    """Clients of the services behind the gateway (the same processes REST reaches)."""

    domains: domain_pb2_grpc.DomainServiceAsyncStub
    api_keys: api_keys_pb2_grpc.ApiKeyServiceAsyncStub
    smtp: smtp_pb2_grpc.SmtpServiceAsyncStub
    mail: mail_pb2_grpc.MailServiceAsyncStub


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
