"""A send that fails after reserving its idempotency key gives the key back (real FerretDB).

The email repository is the real one, except that its first insert fails the way an
unexpected error would (the caller sees INTERNAL): the corrected retry with the same key must
be accepted, not refused for 24 hours as a "different request".
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from datetime import timedelta

import idna
import pytest
from pymongo.asynchronous.database import AsyncDatabase

from services.core.clock import ManualClock
from services.core.errors import AlreadyExists
from services.core.ids import new_id
from services.core.mongo import Document, create_client
from services.mail.app import policy_from
from services.mail.compose import SendInput
from services.mail.manager import MailManager
from services.mail.models import Email
from services.mail.relay_directory import InMemoryRelayDirectory, RelaySecurity, RelaySettings
from services.mail.relay_health import RelayHealthStore
from services.mail.relay_lookup import DirectoryRelayLookup
from services.mail.repository import MongoEmailRepository, MongoIdempotencyRepository, Screen
from services.mail.senders import SenderDomain, StaticSenderDirectory
from tests.conftest import make_settings, unique_domain
from tests.mail.conftest import START


class _Broken(RuntimeError):
    """What the failing insert raises (an error nobody expects)."""


class FailingInserts(MongoEmailRepository):
    """The real repository whose next `failures` inserts raise."""

    failures = 0

    async def insert(self, *, email: Email, screen: Screen | None = None) -> bool:
        """Fail while failures are left, then store for real."""
        if self.failures:
            self.failures -= 1
            raise _Broken("the disk is on fire")
        return await super().insert(email=email, screen=screen)


@pytest.fixture
async def db(ferretdb: str) -> AsyncIterator[AsyncDatabase[Document]]:
    """A fresh database, dropped afterwards."""
    name = f"azora_idem_{secrets.token_hex(4)}"
    client = create_client(make_settings(ferretdb, name))  # the services' client options
    yield client[name]
    await client.drop_database(name)
    await client.close()


async def test_an_unexpected_failure_does_not_burn_the_key(
    ferretdb: str, db: AsyncDatabase[Document]
) -> None:
    settings = make_settings(ferretdb, db.name)
    emails = FailingInserts(db, inline_limit=settings.mail_inline_content_limit)
    senders = StaticSenderDirectory()
    relays = InMemoryRelayDirectory()
    manager = MailManager(
        emails=emails,
        relay_health=RelayHealthStore(db, refresh=timedelta(seconds=30)),
        idempotency=MongoIdempotencyRepository(db),
        senders=senders,
        relays=DirectoryRelayLookup(relays),
        clock=ManualClock(START),
        policy=policy_from(settings),
    )
    tenant, domain_id = "t-" + secrets.token_hex(4), new_id()
    name = idna.encode(unique_domain(), uts46=True).decode()
    senders.domains[(tenant, name)] = SenderDomain(domain_id, name)
    relays.domains.add((tenant, domain_id))
    relays.add_relay(
        tenant_id=tenant, relay=RelaySettings(domain_id, "127.0.0.1", 9, RelaySecurity.NONE)
    )
    key = secrets.token_hex(8)

    def request(text: str) -> SendInput:
        return SendInput(f"a@{name}", to=["b@example.org"], text=text, idempotency_key=key)

    emails.failures = 1
    with pytest.raises(_Broken):
        await manager.send(tenant_id=tenant, request=request("first try"))
    first = await manager.send(tenant_id=tenant, request=request("corrected"))
    again = await manager.send(tenant_id=tenant, request=request("corrected"))
    assert again.id == first.id
    # Once an email is stored under the key, a different request is still a conflict.
    with pytest.raises(AlreadyExists):
        await manager.send(tenant_id=tenant, request=request("something else"))
