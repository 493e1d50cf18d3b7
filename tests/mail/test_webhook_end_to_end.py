"""Delivery feedback end to end: real mail flow to a signed webhook on a real receiver.

The mail service in-process on FerretDB with its WebhookService, a real SMTP relay on loopback
(`ScriptedRelay`, which can answer 450 or 550 5.1.1 per address), a delivery worker, the event
publisher and the webhook dispatcher as their processes run them, and an aiohttp receiver
subscribed to every event. What the receiver verifies with the `standardwebhooks` library must
tell the same story as the events API, GetEmail's timeline and the suppression list.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import grpc
import pytest
from azora.mail.v1 import (
    events_pb2,
    events_pb2_grpc,
    mail_pb2,
    suppressions_pb2,
    suppressions_pb2_grpc,
    webhooks_pb2,
    webhooks_pb2_grpc,
)
from standardwebhooks import Webhook as Verifier

from services.mail.feedback.event_log import EventPublisher
from services.mail.feedback.webhook_dispatcher import build_dispatcher
from tests.conftest import Tenant
from tests.mail.conftest import LocalMail, Script, ScriptedRelay
from tests.support.webhook_receiver import Receiver

Start = Callable[[Script], "asyncio.Future[ScriptedRelay]"]
E = mail_pb2


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """An HTTP receiver on loopback that answers 200 to everything."""
    running = await Receiver().start()
    yield running
    await running.close()


async def deliver_feedback(mail: LocalMail) -> None:
    """What the publisher and the dispatcher processes do, one round each, until quiet."""
    await EventPublisher(mail.app.running.database.db, clock=mail.clock).run(rounds=100)
    dispatcher, transport = build_dispatcher(
        mail.settings, mail.app.running.database.db, clock=mail.clock
    )
    try:
        # Rounds until one starts nothing: each round starts at most the endpoint's
        # concurrency, so a story of many events takes several.
        for _ in range(100):
            started = await dispatcher.step()
            await dispatcher.drain()
            if not started:
                break
    finally:
        await transport.close()


def listed(events: list[events_pb2.Event]) -> list[tuple[str, str, str, str]]:
    return [(e.id, e.type, e.email_id, e.recipient) for e in events]


def received(payloads: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    return [(p["id"], p["type"], p["emailId"], p.get("recipient", "")) for p in payloads]


async def test_signed_webhooks_tell_the_same_story_as_the_api_and_feed_suppression(
    local_mail: LocalMail, tenant: Tenant, scripted_relay: Start, receiver: Receiver
) -> None:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{local_mail.app.running.port}")
    local_mail.app.running.channels.append(channel)
    webhooks = webhooks_pb2_grpc.WebhookServiceStub(channel)
    events_api = events_pb2_grpc.EventServiceStub(channel)
    suppressions = suppressions_pb2_grpc.SuppressionServiceStub(channel)
    endpoint = await webhooks.CreateWebhook(
        webhooks_pb2.CreateWebhookRequest(url=receiver.url, description="all events"),
        metadata=tenant.metadata,
    )
    assert endpoint.secret.startswith("whsec_")

    relay = await scripted_relay(
        Script(
            rcpt={
                "busy@example.org": "450 4.2.0 mailbox busy",
                "gone@example.org": "550 5.1.1 no such user",
            }
        )
    )
    _, name = local_mail.add_domain(tenant, port=relay.port)

    async def send(to: str) -> mail_pb2.Email:
        return await local_mail.send(
            tenant, from_address=f"s@{name}", to=[to], subject="hi", text="body", tags=["t"]
        )

    delivered = await send("ok@example.org")
    deferred = await send("busy@example.org")
    bounced = await send("gone@example.org")
    assert await local_mail.worker().run_once() == 3
    # The busy mailbox takes the retry.
    relay.script = Script(rcpt={"gone@example.org": "550 5.1.1 no such user"})
    local_mail.clock.advance(timedelta(seconds=60))
    assert await local_mail.worker().run_once() == 1
    await deliver_feedback(local_mail)

    # Every request verifies with the reference library; the payload is the event.
    payloads = [Verifier(endpoint.secret).verify(r.body, r.headers) for r in receiver.requests]
    assert all(r.webhook_id == p["id"] for r, p in zip(receiver.requests, payloads, strict=True))
    by_email: dict[str, list[dict[str, Any]]] = {}
    for payload in payloads:
        by_email.setdefault(payload["emailId"], []).append(payload)
    expected = {
        delivered.id: [("accepted", ""), ("sent", "ok@example.org")],
        deferred.id: [
            ("accepted", ""),
            ("deferred", "busy@example.org"),
            ("sent", "busy@example.org"),
        ],
        bounced.id: [("accepted", ""), ("bounced", "gone@example.org")],
    }
    for email_id, story in expected.items():
        got = sorted(by_email[email_id], key=lambda p: str(p["id"]))
        assert [(p["type"], p.get("recipient", "")) for p in got] == story
        # The events API and the email's timeline say the same.
        answer = await events_api.ListEvents(
            events_pb2.ListEventsRequest(email_id=email_id, page_size=50),
            metadata=tenant.metadata,
        )
        assert listed(list(reversed(answer.events))) == received(got)
        email = await local_mail.get(tenant, email_id)
        assert [
            (E.EventType.Name(e.type).removeprefix("EVENT_TYPE_").lower(), e.recipient)
            for e in email.events
            if e.type != E.EVENT_TYPE_CLAIMED
        ] == story
    (bounce,) = [p for p in by_email[bounced.id] if p["type"] == "bounced"]
    assert bounce["smtp"]["code"] == 550
    assert bounce["smtp"]["enhancedCode"] == "5.1.1"
    assert bounce["tags"] == ["t"]

    # The bounce suppressed the address, naming the event the webhook carried.
    entry = await suppressions.GetSuppression(
        suppressions_pb2.GetSuppressionRequest(address="gone@example.org"),
        metadata=tenant.metadata,
    )
    assert entry.event_id == bounce["id"]

    # The next email to it is SUPPRESSED, never reaches the relay, and its webhook says so.
    before = (len(relay.received), relay.connections)
    again = await send("gone@example.org")
    assert again.status == E.EMAIL_STATUS_SUPPRESSED
    assert await local_mail.worker().run_once() == 0
    assert (len(relay.received), relay.connections) == before
    seen = len(receiver.requests)
    await deliver_feedback(local_mail)
    latest = [Verifier(endpoint.secret).verify(r.body, r.headers) for r in receiver.requests[seen:]]
    assert sorted((p["type"], p.get("recipient", "")) for p in latest) == [
        ("accepted", ""),
        ("suppressed", "gone@example.org"),
    ]
    assert {p["emailId"] for p in latest} == {again.id}
