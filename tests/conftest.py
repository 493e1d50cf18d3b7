"""Suite-wide fixtures: a real FerretDB, a real Knot DNS server, and in-process services.

Everything is started on loopback by the tests themselves. Services run in this process on
port 0 (one event loop for the whole session); tests isolate themselves by using fresh tenants
and random domain names instead of fresh databases, which keeps the suite fast.
"""

from __future__ import annotations

import atexit
import secrets
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from azora.domain.v1 import domain_pb2_grpc
from azora.iam.v1 import api_keys_pb2_grpc

from services.core.auth import ALL_SCOPES, issue_jwt
from services.core.clock import ManualClock
from services.core.embedded_db import EmbeddedFerretDB, find_ferretdb_binary
from services.core.settings import Settings
from services.domain.app import DomainApp, build_app
from tests.support.dns_server import KnotServer
from tests.support.settings import SuiteSettings

pytest_plugins = [
    "tests.support.dns_fixtures",
    "tests.support.error_reasons",
    "tests.support.smtp_relay",
    "tests.support.tracing",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_JWT_SECRET = "test-jwt-secret-" + "x" * 32
# Set explicitly (not derived from JWT_SECRET) so that services started in production mode can
# share it with the session's services: production refuses a key derived from JWT_SECRET.
TEST_SERVICE_TOKEN_SECRET = "test-service-token-secret-" + "y" * 32


@pytest.fixture(scope="session")
def ferretdb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A FerretDB (SQLite backend) on loopback with a throwaway data directory; yields its URI."""
    server = EmbeddedFerretDB(
        binary=find_ferretdb_binary(REPO_ROOT), data_dir=tmp_path_factory.mktemp("ferretdb")
    )
    uri = server.start()
    yield uri
    server.stop()


# A loopback port bound for the whole session but never listening: a connection to it is
# refused at once, and nothing else can take it. Peers a test does not name point here, so a
# test never reaches whatever happens to listen on the default ports (a `make run` beside it).
_NO_PEER = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
_NO_PEER.bind(("127.0.0.1", 0))
atexit.register(_NO_PEER.close)
NO_PEER_TARGET = f"127.0.0.1:{_NO_PEER.getsockname()[1]}"


def make_settings(mongodb_uri: str, database: str, **env: str) -> SuiteSettings:
    """Test settings: test environment, our DB, our JWT secret, plus overrides.

    Peers (domain, SMTP, mail service targets) not given in `env` are a refused port, never
    the default ports.
    """
    return SuiteSettings.from_env(
        {
            "AZORA_ENV": "test",
            "AZORA_DOMAIN_SERVICE_TARGET": NO_PEER_TARGET,
            "AZORA_SMTP_SERVICE_TARGET": NO_PEER_TARGET,
            "AZORA_MAIL_SERVICE_TARGET": NO_PEER_TARGET,
            "MONGODB_URI": mongodb_uri,
            "AZORA_MONGODB_DATABASE": database,
            "JWT_SECRET": TEST_JWT_SECRET,
            "AZORA_SERVICE_TOKEN_SECRET": TEST_SERVICE_TOKEN_SECRET,
            "LOG_LEVEL": "warn",
            # Every test client is 127.0.0.1: the suite's traffic must not trip the rate limits
            # (tests/security sets its own small budgets on services of their own).
            "RATE_LIMIT_MAX": "1000000",
            "AZORA_SEND_RATE_LIMIT_MAX": "1000000",
            # Each live process that serves 127.0.0.1 holds a block of the window until it stops
            # or idles (services/core/ratelimit.py `SharedBlocks`); with more than 32 at once,
            # one without a block refuses for about a second until others give back, and one
            # killed keeps its block until the window ends. 1,000 blocks of 1,000 requests.
            "AZORA_RATE_LIMIT_BLOCKS": "1000",
            "AZORA_QUOTA_EMAILS_PER_HOUR": "0",
            "AZORA_QUOTA_EMAILS_PER_DAY": "0",
            # Many tests send bad credentials on purpose, all from 127.0.0.1.
            "AZORA_AUTH_FAILURE_MAX": "0",
            **env,
        },
        service_name="test",
    )


@pytest.fixture(scope="session")
def clock() -> ManualClock:
    """The clock of the session-wide domain service."""
    return ManualClock(datetime(2026, 11, 23, 12, 0, tzinfo=UTC))


@pytest.fixture(scope="session")
def settings(ferretdb: str, knot_server: KnotServer) -> SuiteSettings:
    """Settings of the session-wide services: DNS lookups go to the test's Knot server."""
    return make_settings(
        ferretdb,
        "azora_test",
        AZORA_DNS_NAMESERVERS=knot_server.host,
        AZORA_DNS_PORT=str(knot_server.port),
        AZORA_DNS_TIMEOUT="2",
    )


@pytest.fixture(scope="session")
async def domain_app(settings: SuiteSettings, clock: ManualClock) -> AsyncIterator[DomainApp]:
    """The domain service process's server, in-process on a free port."""
    app = await build_app(settings, clock=clock, bind="127.0.0.1:0", run_lifecycle=False)
    yield app
    await app.running.stop(None)


@pytest.fixture(scope="session")
async def domain_channel(domain_app: DomainApp) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to the domain service."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{domain_app.running.port}") as channel:
        yield channel


@pytest.fixture(scope="session")
def domains_stub(domain_channel: grpc.aio.Channel) -> domain_pb2_grpc.DomainServiceAsyncStub:
    """DomainService client."""
    return domain_pb2_grpc.DomainServiceStub(domain_channel)


@pytest.fixture(scope="session")
def api_keys_stub(domain_channel: grpc.aio.Channel) -> api_keys_pb2_grpc.ApiKeyServiceAsyncStub:
    """ApiKeyService client."""
    return api_keys_pb2_grpc.ApiKeyServiceStub(domain_channel)


@dataclass(frozen=True)
class Tenant:
    """A fresh tenant with a full-scope token; `metadata` goes on every call."""

    id: str
    token: str

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata authenticating as this tenant."""
        return (("authorization", f"Bearer {self.token}"),)


def new_tenant(settings: Settings, scopes: frozenset[str] = ALL_SCOPES) -> Tenant:
    """A tenant nobody else uses, so tests never see each other's data."""
    tenant_id = "t-" + secrets.token_hex(6)
    token = issue_jwt(
        secret=settings.jwt_secret, tenant_id=tenant_id, subject="tester", scopes=scopes
    )
    return Tenant(tenant_id, token)


@pytest.fixture
def tenant(settings: Settings) -> Tenant:
    """A fresh tenant for one test."""
    return new_tenant(settings)


def unique_domain(suffix: str = "example") -> str:
    """A domain name no other test uses (names are claimed suite-wide once verified)."""
    return f"d{secrets.token_hex(5)}.{suffix}"
