"""Webhooks end to end: the API, the dispatcher and a real receiver on loopback.

Events are inserted into the events collection directly, as the events contract describes them
(the mail service records them; this file tests what webhooks make of them). The dispatcher is
driven step by step with a manual clock, so retry times are exact without waiting for them.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import grpc
import pytest
from azora.mail.v1 import webhooks_pb2, webhooks_pb2_grpc
from prometheus_client import REGISTRY
from standardwebhooks import Webhook as Verifier
from standardwebhooks.webhooks import WebhookVerificationError

from services.core.clock import ManualClock, SystemClock
from services.core.ids import new_ulid
from services.core.mongo import Document
from services.core.netguard import IPAddress, ResolveError
from services.core.settings import Environment
from services.mail.app import MailApp, build_app
from services.mail.feedback.webhook_dispatcher import WebhookDispatcher, build_dispatcher
from services.mail.feedback.webhook_store import WebhookStore
from services.mail.feedback.webhook_transport import WebhookTransport, address_policy
from services.mail.relay_directory import InMemoryRelayDirectory
from services.mail.relay_lookup import DirectoryRelayLookup
from services.mail.senders import StaticSenderDirectory
from services.mail.settings import MailSettings, WebhookSettings
from tests.conftest import REPO_ROOT, Tenant, make_settings, new_tenant
from tests.support.grpc_errors import failure_of
from tests.support.webhook_receiver import Receiver

# A short schedule (5 s, then 300 s, then failed), no jitter, a quick timeout, and endpoints
# disabled after a minute of failures: what the tests below can reach with a manual clock.
WEBHOOK_ENV = {
    "AZORA_WEBHOOK_RETRY_SCHEDULE": "5,300",
    "AZORA_WEBHOOK_RETRY_JITTER": "0",
    "AZORA_WEBHOOK_TIMEOUT": "1",
    "AZORA_WEBHOOK_DISABLE_AFTER": "60",
    "AZORA_WEBHOOK_ENDPOINT_CONCURRENCY": "1",
}


@dataclass
class Hooks:
    """A mail service with WebhookService, its database, clock and a dispatcher factory."""

    app: MailApp
    stub: webhooks_pb2_grpc.WebhookServiceAsyncStub
    clock: ManualClock
    settings: MailSettings
    receivers: list[Receiver]
    _transports: list[WebhookTransport] = field(default_factory=list)

    @property
    def db(self) -> Any:
        """The service's database."""
        return self.app.running.database.db

    async def receiver(self, *answers: int | str, default: int | str = 200) -> Receiver:
        """A receiver for this test (closed afterwards)."""
        receiver = await Receiver(answers=list(answers), default=default).start()
        self.receivers.append(receiver)
        return receiver

    async def endpoint(self, tenant: Tenant, url: str, **fields: Any) -> webhooks_pb2.Webhook:
        """CreateWebhook as `tenant`."""
        return await self.stub.CreateWebhook(
            webhooks_pb2.CreateWebhookRequest(url=url, **fields), metadata=tenant.metadata
        )

    async def event(self, tenant: Tenant, type_: str = "sent", **fields: Any) -> Document:
        """Insert an event as the mail service records it (events contract)."""
        now = self.clock.now()
        doc: Document = {
            "_id": f"evt_{new_ulid(now)}",
            "tenantId": tenant.id,
            "type": type_,
            "occurredAt": now,
            "emailId": "e" * 24,
            "recipient": "rcpt@example.org",
            "domain": "sender.example",
            "tags": ["welcome"],
            "metadata": [{"k": "user", "v": "42"}],  # pairs, as the mail service stores them
            **fields,
        }
        await self.db["events"].insert_one(doc)
        return doc

    def dispatcher(self, wall_clock: ManualClock | None = None) -> WebhookDispatcher:
        """A dispatcher on this database and clock (its transport closed after the test).

        `wall_clock` is what webhook-timestamp is signed with (default: the real time).
        """
        dispatcher, transport = build_dispatcher(
            self.settings, self.db, clock=self.clock, wall_clock=wall_clock
        )
        self._transports.append(transport)
        return dispatcher

    async def deliveries(self, tenant: Tenant, webhook_id: str) -> list[Any]:
        """ListWebhookDeliveries as `tenant`."""
        answer = await self.stub.ListWebhookDeliveries(
            webhooks_pb2.ListWebhookDeliveriesRequest(id=webhook_id), metadata=tenant.metadata
        )
        return list(answer.deliveries)


def attempts_counted(outcome: str) -> float:
    """The dispatcher's attempt counter (this process's registry)."""
    value = REGISTRY.get_sample_value("azora_webhook_attempts_total", {"outcome": outcome})
    return value or 0.0


async def run(dispatcher: WebhookDispatcher) -> None:
    """One dispatcher round, waiting for the requests it started."""
    await dispatcher.step()
    await dispatcher.drain()


@pytest.fixture
async def hooks(ferretdb: str, domain_app: object) -> AsyncIterator[Hooks]:
    """A mail service (no delivery workers) on a fresh database, clocked near real time.

    Near real time because receivers check webhook-timestamp against their own clock.
    """
    from services.domain.app import DomainApp

    assert isinstance(domain_app, DomainApp)
    settings = make_settings(
        ferretdb,
        f"azora_webhooks_{secrets.token_hex(4)}",
        AZORA_DOMAIN_SERVICE_TARGET=f"127.0.0.1:{domain_app.running.port}",
        **WEBHOOK_ENV,
    )
    clock = ManualClock(SystemClock().now())
    app = await build_app(
        settings,
        clock=clock,
        bind="127.0.0.1:0",
        senders=StaticSenderDirectory(),
        relays=DirectoryRelayLookup(InMemoryRelayDirectory()),
        run_workers=False,
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.running.port}") as channel:
        state = Hooks(app, webhooks_pb2_grpc.WebhookServiceStub(channel), clock, settings, [])
        yield state
        for transport in state._transports:
            await transport.close()
        for receiver in state.receivers:
            await receiver.close()
    await app.running.database.client.drop_database(settings.mongodb_database)
    await app.running.stop(None)


def verify(secret: str, request: Any) -> dict[str, Any]:
    """What the standardwebhooks library makes of a received request (raises if forged)."""
    result: dict[str, Any] = Verifier(secret).verify(request.body, request.headers)
    return result


async def test_events_arrive_signed_and_verify_with_standardwebhooks(
    hooks: Hooks, tenant: Tenant
) -> None:
    # The receiver verifies the payload with the reference library; the body is the event as
    # the events API names it, and webhook-id is the event id.
    receiver = await hooks.receiver()
    endpoint = await hooks.endpoint(tenant, receiver.url)
    assert endpoint.secret.startswith("whsec_")
    event = await hooks.event(
        tenant, "bounced", smtp={"code": 550, "enhancedCode": "5.1.1", "message": "no such user"}
    )
    await run(hooks.dispatcher())
    (request,) = receiver.requests
    payload = verify(endpoint.secret, request)
    assert request.webhook_id == event["_id"]
    assert payload == {
        "id": event["_id"],
        "type": "bounced",
        "occurredAt": event["occurredAt"].isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "tenantId": tenant.id,
        "emailId": "e" * 24,
        "recipient": "rcpt@example.org",
        "domain": "sender.example",
        "tags": ["welcome"],
        "metadata": {"user": "42"},
        "smtp": {"code": 550, "enhancedCode": "5.1.1", "message": "no such user"},
    }
    tampered = request.body.replace(b"bounced", b"sent_xx")
    with pytest.raises(WebhookVerificationError):
        Verifier(endpoint.secret).verify(tampered, request.headers)
    with pytest.raises(WebhookVerificationError):
        Verifier("whsec_" + "A" * 43 + "=").verify(request.body, request.headers)
    (delivery,) = await hooks.deliveries(tenant, endpoint.id)
    assert delivery.state == webhooks_pb2.WEBHOOK_DELIVERY_STATE_SUCCEEDED
    assert delivery.event_id == event["_id"]
    assert [a.status_code for a in delivery.attempts] == [200]
    assert delivery.attempts[0].response_body == "ok"


async def test_a_request_signed_long_ago_fails_verification(hooks: Hooks, tenant: Tenant) -> None:
    # A dispatcher whose wall clock is 10 minutes behind signs a timestamp the library refuses.
    receiver = await hooks.receiver()
    endpoint = await hooks.endpoint(tenant, receiver.url)
    await hooks.event(tenant)
    await run(hooks.dispatcher(ManualClock(SystemClock().now() - timedelta(minutes=10))))
    (request,) = receiver.requests
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify(endpoint.secret, request)


async def test_failed_answers_are_retried_on_the_schedule_logged_and_replayable(
    hooks: Hooks, tenant: Tenant
) -> None:
    # 500 first, then 200: the second attempt comes exactly one schedule step (5 s) later;
    # both attempts are in the log; a replay sends the same event again (same webhook-id).
    receiver = await hooks.receiver(500, 200)
    receiver.body = "boom"
    endpoint = await hooks.endpoint(tenant, receiver.url)
    event = await hooks.event(tenant)
    dispatcher = hooks.dispatcher()
    first = hooks.clock.now()
    errors_before = attempts_counted("http_error")
    await run(dispatcher)
    assert len(receiver.requests) == 1
    assert attempts_counted("http_error") == errors_before + 1
    (delivery,) = await hooks.deliveries(tenant, endpoint.id)
    assert delivery.state == webhooks_pb2.WEBHOOK_DELIVERY_STATE_PENDING
    assert delivery.next_attempt_time.ToDatetime() == (first + timedelta(seconds=5)).replace(
        tzinfo=None
    )
    hooks.clock.advance(timedelta(seconds=4))
    await run(dispatcher)
    assert len(receiver.requests) == 1  # not due yet
    hooks.clock.advance(timedelta(seconds=1))
    await run(dispatcher)
    assert len(receiver.requests) == 2
    (delivery,) = await hooks.deliveries(tenant, endpoint.id)
    assert delivery.state == webhooks_pb2.WEBHOOK_DELIVERY_STATE_SUCCEEDED
    assert [a.status_code for a in delivery.attempts] == [500, 200]
    assert [a.response_body for a in delivery.attempts] == ["boom", "boom"]
    assert [a.success for a in delivery.attempts] == [False, True]
    gap = (
        delivery.attempts[1].attempt_time.ToDatetime()
        - delivery.attempts[0].attempt_time.ToDatetime()
    )
    assert gap == timedelta(seconds=5)
    assert all(a.latency_ms >= 0 for a in delivery.attempts)

    replayed = await hooks.stub.ReplayWebhookDelivery(
        webhooks_pb2.ReplayWebhookDeliveryRequest(id=endpoint.id, delivery_id=delivery.id),
        metadata=tenant.metadata,
    )
    assert replayed.state == webhooks_pb2.WEBHOOK_DELIVERY_STATE_PENDING
    await run(dispatcher)
    assert [r.webhook_id for r in receiver.requests] == [event["_id"]] * 3
    verify(endpoint.secret, receiver.requests[2])
    (delivery,) = await hooks.deliveries(tenant, endpoint.id)
    assert delivery.state == webhooks_pb2.WEBHOOK_DELIVERY_STATE_SUCCEEDED
    assert [a.status_code for a in delivery.attempts] == [500, 200, 200]


async def test_a_delivery_fails_after_the_last_step_of_the_schedule(
    hooks: Hooks, tenant: Tenant
) -> None:
    # Schedule 5 s, 300 s: three attempts, then FAILED with nothing more due.
    receiver = await hooks.receiver(default=503)
    endpoint = await hooks.endpoint(tenant, receiver.url)
    await hooks.event(tenant)
    dispatcher = hooks.dispatcher()
    for wait in (0, 5, 300, 3600):
        hooks.clock.advance(timedelta(seconds=wait))
        await run(dispatcher)
    assert len(receiver.requests) == 3
    (delivery,) = await hooks.deliveries(tenant, endpoint.id)
    assert delivery.state == webhooks_pb2.WEBHOOK_DELIVERY_STATE_FAILED
    assert not delivery.HasField("next_attempt_time")
    assert [a.status_code for a in delivery.attempts] == [503, 503, 503]


async def test_an_endpoint_that_never_answers_is_disabled_with_an_event(
    hooks: Hooks, tenant: Tenant
) -> None:
    # Every attempt times out; the first failure after 60 s of failing disables the endpoint,
    # records why, and a webhook.disabled event reaches the tenant's other endpoint.
    silent = await hooks.receiver(default="HANG")
    watcher = await hooks.receiver()
    dead = await hooks.endpoint(tenant, silent.url, event_types=["sent"])
    other = await hooks.endpoint(tenant, watcher.url, event_types=["webhook.disabled"])
    await hooks.event(tenant)
    dispatcher = hooks.dispatcher()
    await run(dispatcher)  # attempt 1 at T: the failure streak starts
    hooks.clock.advance(timedelta(seconds=5))
    await run(dispatcher)  # attempt 2 at T+5 s: failing for 5 s only
    got = await hooks.stub.GetWebhook(
        webhooks_pb2.GetWebhookRequest(id=dead.id), metadata=tenant.metadata
    )
    assert got.enabled
    assert got.HasField("failing_since")
    hooks.clock.advance(timedelta(seconds=300))
    await run(dispatcher)  # attempt 3 at T+305 s: past the 60 s period
    got = await hooks.stub.GetWebhook(
        webhooks_pb2.GetWebhookRequest(id=dead.id), metadata=tenant.metadata
    )
    assert not got.enabled
    assert "every attempt failed since" in got.disabled_reason
    assert "no answer within 1 s" in got.disabled_reason
    (stored,) = [
        e async for e in hooks.db["events"].find({"type": "webhook.disabled", "webhookId": dead.id})
    ]
    assert stored["tenantId"] == tenant.id
    await run(dispatcher)
    (request,) = watcher.requests
    payload = verify(other.secret, request)
    assert payload["type"] == "webhook.disabled"
    assert payload["webhookId"] == dead.id
    assert payload["reason"] == got.disabled_reason
    assert len(silent.requests) == 3
    # Disabled: nothing is sent any more, and a replay is refused until it is enabled again.
    (delivery,) = await hooks.deliveries(tenant, dead.id)
    failure = await failure_of(
        hooks.stub.ReplayWebhookDelivery(
            webhooks_pb2.ReplayWebhookDeliveryRequest(id=dead.id, delivery_id=delivery.id),
            metadata=tenant.metadata,
        )
    )
    assert failure.code == grpc.StatusCode.FAILED_PRECONDITION
    assert failure.reason == "WEBHOOK_DISABLED"
    enabled = await hooks.stub.UpdateWebhook(
        webhooks_pb2.UpdateWebhookRequest(
            id=dead.id, url=watcher.url, event_types=["sent"], enabled=True
        ),
        metadata=tenant.metadata,
    )
    assert enabled.enabled
    assert enabled.disabled_reason == ""
    assert not enabled.HasField("failing_since")


async def test_a_slow_endpoint_does_not_hold_up_another(hooks: Hooks) -> None:
    # Tenant A's endpoint hangs on its first request (one request at a time per endpoint);
    # B's event is delivered while A's request is still open, and A's other events wait.
    slow_tenant, quick_tenant = new_tenant(hooks.settings), new_tenant(hooks.settings)
    slow = await hooks.receiver("HANG", "HANG", "HANG")
    quick = await hooks.receiver()
    await hooks.endpoint(slow_tenant, slow.url)
    await hooks.endpoint(quick_tenant, quick.url)
    for _ in range(3):
        await hooks.event(slow_tenant)
    await hooks.event(quick_tenant)
    dispatcher = hooks.dispatcher()
    await dispatcher.step()
    await quick.wait_for(1)
    await slow.wait_for(1)
    assert slow.hanging == 1
    assert len(slow.requests) == 1  # the endpoint's limit: its other two events wait
    await dispatcher.drain()


async def test_a_backlog_larger_than_the_window_does_not_starve_another_endpoint(
    hooks: Hooks,
) -> None:
    # A dispatcher with 2 slots reads a window of 12 overdue deliveries: a hanging endpoint's
    # backlog of 20 fills it, yet a later event of another endpoint is sent (its own lookup).
    slow_tenant, quick_tenant = new_tenant(hooks.settings), new_tenant(hooks.settings)
    slow = await hooks.receiver(default="HANG")
    quick = await hooks.receiver()
    slow_endpoint = await hooks.endpoint(slow_tenant, slow.url)
    await hooks.endpoint(quick_tenant, quick.url)
    for _ in range(20):
        await hooks.event(slow_tenant)
    small = hooks.settings.with_overrides(
        webhooks=hooks.settings.webhooks.with_overrides(concurrency=2, timeout=30)
    )
    dispatcher, transport = build_dispatcher(small, hooks.db, clock=hooks.clock)
    hooks._transports.append(transport)
    await dispatcher.step()
    await slow.wait_for(1)
    hooks.clock.advance(timedelta(seconds=1))
    await hooks.event(quick_tenant)
    # What the window sees (12 at most): only the hanging endpoint's backlog.
    overdue = await WebhookStore(hooks.db).due(now=hooks.clock.now(), limit=12)
    assert len(overdue) == 12
    assert {d.webhook_id for d in overdue} == {slow_endpoint.id}
    await dispatcher.step()
    await quick.wait_for(1)
    assert slow.hanging == 1
    await slow.close()
    await dispatcher.drain()


async def test_a_late_event_is_found_by_a_restarted_dispatcher_and_sent_once(
    hooks: Hooks, tenant: Tenant
) -> None:
    # An event whose id is older than what was already scanned (a late insert) is picked up
    # by the look-back window; fan-out is idempotent, so nothing is sent twice.
    receiver = await hooks.receiver()
    await hooks.endpoint(tenant, receiver.url)
    first = hooks.dispatcher()
    hooks.clock.advance(timedelta(seconds=60))
    newer = await hooks.event(tenant)
    await run(first)
    hooks.clock.advance(timedelta(seconds=-60))
    older = await hooks.event(tenant)
    hooks.clock.advance(timedelta(seconds=60))
    assert older["_id"] < newer["_id"]
    await run(first)  # a minute below the highest id it saw: beyond its settle span, not yet
    assert [r.webhook_id for r in receiver.requests] == [newer["_id"]]
    restarted = hooks.dispatcher()
    await run(restarted)
    await run(first)
    assert sorted(r.webhook_id for r in receiver.requests) == sorted([newer["_id"], older["_id"]])


async def test_an_event_stored_after_a_later_one_is_sent_on_the_next_poll(
    hooks: Hooks, tenant: Tenant
) -> None:
    # An event id is made when the change happens; the event becomes visible when the
    # publisher copies it, a second or more later and not in id order. The dispatcher has
    # already read a later id; its next poll a quarter of the settle span (3 s) later finds
    # the earlier event (no wait for the rescan).
    receiver = await hooks.receiver()
    await hooks.endpoint(tenant, receiver.url)
    dispatcher = hooks.dispatcher()
    made = hooks.clock.now()
    hooks.clock.advance(timedelta(seconds=2))
    newer = await hooks.event(tenant)
    await run(dispatcher)
    assert [r.webhook_id for r in receiver.requests] == [newer["_id"]]
    older = await hooks.event(tenant, _id=f"evt_{new_ulid(made)}", occurredAt=made)
    hooks.clock.advance(timedelta(seconds=1))
    await run(dispatcher)
    assert sorted(r.webhook_id for r in receiver.requests) == sorted([newer["_id"], older["_id"]])


async def test_an_event_later_than_the_settle_span_is_found_by_the_rescan_and_widens_it(
    hooks: Hooks, tenant: Tenant
) -> None:
    # 15 s late is beyond the first settle span (3 s): the look-back rescan, begun half the
    # look-back window later, finds it. From then on the span covers such lateness (it is 30 s
    # now), so the next event as late is found by its next read, a quarter of the span later.
    receiver = await hooks.receiver()
    await hooks.endpoint(tenant, receiver.url)
    dispatcher = hooks.dispatcher()
    start = hooks.clock.now()
    hooks.clock.advance(timedelta(seconds=15))
    newest = await hooks.event(tenant)
    await run(dispatcher)
    late = await hooks.event(tenant, _id=f"evt_{new_ulid(start)}", occurredAt=start)
    await run(dispatcher)
    assert [r.webhook_id for r in receiver.requests] == [newest["_id"]]
    hooks.clock.advance(timedelta(seconds=hooks.settings.webhooks.lookback / 2))
    await run(dispatcher)
    assert sorted(r.webhook_id for r in receiver.requests) == sorted([newest["_id"], late["_id"]])
    made = start + timedelta(seconds=1)
    as_late = await hooks.event(tenant, _id=f"evt_{new_ulid(made)}", occurredAt=made)
    hooks.clock.advance(timedelta(seconds=8))
    await run(dispatcher)
    assert receiver.requests[-1].webhook_id == as_late["_id"]
    assert len(receiver.requests) == 3


async def test_event_types_and_domains_select_events(hooks: Hooks, tenant: Tenant) -> None:
    # Only the subscribed types of the listed sender domains are sent; other tenants' events
    # never are.
    receiver = await hooks.receiver()
    await hooks.endpoint(tenant, receiver.url, event_types=["bounced"], domains=["Sender.Example"])
    wanted = await hooks.event(tenant, "bounced")
    await hooks.event(tenant, "sent")
    await hooks.event(tenant, "bounced", domain="other.example")
    await hooks.event(new_tenant(hooks.settings), "bounced")
    await run(hooks.dispatcher())
    assert [r.webhook_id for r in receiver.requests] == [wanted["_id"]]


async def test_test_sends_a_signed_event_now_and_logs_it(hooks: Hooks, tenant: Tenant) -> None:
    receiver = await hooks.receiver()
    endpoint = await hooks.endpoint(tenant, receiver.url)
    attempt = await hooks.stub.TestWebhook(
        webhooks_pb2.TestWebhookRequest(id=endpoint.id), metadata=tenant.metadata
    )
    assert attempt.success
    assert attempt.status_code == 200
    (request,) = receiver.requests
    payload = verify(endpoint.secret, request)
    assert payload["type"] == "webhook.test"
    assert payload["webhookId"] == endpoint.id
    (delivery,) = await hooks.deliveries(tenant, endpoint.id)
    assert delivery.id == attempt.delivery_id
    assert delivery.event_type == "webhook.test"
    # A refused connection is an attempt too, with the error and no status.
    await receiver.close()
    refused = await hooks.stub.TestWebhook(
        webhooks_pb2.TestWebhookRequest(id=endpoint.id), metadata=tenant.metadata
    )
    assert not refused.success
    assert refused.status_code == 0
    assert "connection failed" in refused.error


async def test_the_secret_is_shown_once_and_rotation_signs_with_both_for_the_overlap(
    hooks: Hooks, tenant: Tenant
) -> None:
    receiver = await hooks.receiver()
    created = await hooks.endpoint(tenant, receiver.url, description="orders")
    old = created.secret
    m = tenant.metadata
    got = await hooks.stub.GetWebhook(webhooks_pb2.GetWebhookRequest(id=created.id), metadata=m)
    listed = await hooks.stub.ListWebhooks(webhooks_pb2.ListWebhooksRequest(), metadata=m)
    updated = await hooks.stub.UpdateWebhook(
        webhooks_pb2.UpdateWebhookRequest(id=created.id, url=receiver.url, description="x"),
        metadata=m,
    )
    for answer in (got, *listed.webhooks, updated):
        assert answer.secret == ""
        assert old not in str(answer)
    stored = await hooks.db["webhooks"].find_one({"_id": created.id})
    assert old not in str(stored)
    assert old.removeprefix("whsec_") not in str(stored)

    rotated = await hooks.stub.RotateWebhookSecret(
        webhooks_pb2.RotateWebhookSecretRequest(id=created.id), metadata=m
    )
    new = rotated.secret
    assert new.startswith("whsec_")
    assert new != old
    assert rotated.previous_secret_expire_time.ToDatetime() == (
        hooks.clock.now() + timedelta(hours=24)
    ).replace(tzinfo=None)
    await hooks.event(tenant)
    await run(hooks.dispatcher())
    (during,) = receiver.requests
    assert len(during.headers["webhook-signature"].split(" ")) == 2
    verify(old, during)
    verify(new, during)

    hooks.clock.advance(timedelta(hours=24, seconds=1))
    await hooks.event(tenant)
    await run(hooks.dispatcher())
    after = receiver.requests[1]
    assert len(after.headers["webhook-signature"].split(" ")) == 1
    verify(new, after)
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        verify(old, after)


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"url": ""}, "url", "required"),
        ({"url": "ftp://hooks.example/x"}, "url", "http"),
        ({"url": "not a url"}, "url", "spaces"),
        ({"url": "https:///nohost"}, "url", "host"),
        ({"url": "https://user:pw@hooks.example/"}, "url", "credentials"),
        (
            {"url": "https://hooks.example/", "event_types": ["sent", "opened"]},
            "eventTypes[1]",
            "unknown event type",
        ),
        (
            {"url": "https://hooks.example/", "event_types": ["sent", "sent"]},
            "eventTypes[1]",
            "repeated",
        ),
        ({"url": "https://hooks.example/", "domains": ["not a domain"]}, "domains[0]", ""),
        ({"url": "https://hooks.example/", "description": "x" * 501}, "description", "500"),
    ],
)
async def test_every_validation_error_names_its_field(
    hooks: Hooks, tenant: Tenant, fields: dict[str, Any], field: str, words: str
) -> None:
    failure = await failure_of(
        hooks.stub.CreateWebhook(
            webhooks_pb2.CreateWebhookRequest(**fields), metadata=tenant.metadata
        )
    )
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in failure.field_violations, failure
    assert words in failure.field_violations[field]
    listed = await hooks.stub.ListWebhooks(
        webhooks_pb2.ListWebhooksRequest(), metadata=tenant.metadata
    )
    assert list(listed.webhooks) == []  # nothing half-written


async def test_unknown_ids_and_states_are_clear_errors(hooks: Hooks, tenant: Tenant) -> None:
    m = tenant.metadata
    malformed = await failure_of(
        hooks.stub.GetWebhook(webhooks_pb2.GetWebhookRequest(id="nope"), metadata=m)
    )
    assert malformed.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "id" in malformed.field_violations
    receiver = await hooks.receiver()
    endpoint = await hooks.endpoint(tenant, receiver.url)
    bad_state = await failure_of(
        hooks.stub.ListWebhookDeliveries(
            webhooks_pb2.ListWebhookDeliveriesRequest(id=endpoint.id, state="done"), metadata=m
        )
    )
    assert bad_state.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "state" in bad_state.field_violations
    missing = await failure_of(
        hooks.stub.ReplayWebhookDelivery(
            webhooks_pb2.ReplayWebhookDeliveryRequest(id=endpoint.id, delivery_id="evt_x:y"),
            metadata=m,
        )
    )
    assert missing.code == grpc.StatusCode.NOT_FOUND
    assert missing.reason == "WEBHOOK_DELIVERY_NOT_FOUND"
    await hooks.stub.DeleteWebhook(webhooks_pb2.DeleteWebhookRequest(id=endpoint.id), metadata=m)
    gone = await failure_of(
        hooks.stub.GetWebhook(webhooks_pb2.GetWebhookRequest(id=endpoint.id), metadata=m)
    )
    assert gone.reason == "WEBHOOK_NOT_FOUND"


async def test_a_tenant_has_at_most_twenty_endpoints(hooks: Hooks, tenant: Tenant) -> None:
    # Every event is matched against all of a tenant's endpoints: their number is bounded.
    for index in range(20):
        await hooks.endpoint(tenant, f"https://hooks.example/{index}")
    failure = await failure_of(hooks.endpoint(tenant, "https://hooks.example/extra"))
    assert failure.code == grpc.StatusCode.FAILED_PRECONDITION
    assert failure.reason == "TOO_MANY_WEBHOOKS"
    listed = await hooks.stub.ListWebhooks(
        webhooks_pb2.ListWebhooksRequest(page_size=15), metadata=tenant.metadata
    )
    rest = await hooks.stub.ListWebhooks(
        webhooks_pb2.ListWebhooksRequest(page_size=15, page_token=listed.next_page_token),
        metadata=tenant.metadata,
    )
    assert len(listed.webhooks) + len(rest.webhooks) == 20
    assert rest.next_page_token == ""
    assert len({w.id for w in [*listed.webhooks, *rest.webhooks]}) == 20


# --- SSRF guard in production mode ------------------------------------------------------------


def test_production_refuses_private_hosts_and_plain_http_by_default() -> None:
    production = MailSettings.from_env(
        {
            "AZORA_ENV": "production",
            "JWT_SECRET": "j" * 40,
            "AZORA_SERVICE_TOKEN_SECRET": "s" * 40,
            "AZORA_SECRETS_KEY": "cHJvZHVjdGlvbi1zZWNyZXRzLWtleS0zMi1ieXRlcyE=",
        }
    )
    assert production.environment is Environment.PRODUCTION
    assert production.webhooks.allow_private_hosts is False
    assert production.webhooks.allow_http is False


class NameTo:
    """Our own resolver interface answering one name with a fixed address (DNS rebinding)."""

    def __init__(self, address: IPAddress) -> None:
        self.address = address
        self.asked: list[str] = []

    async def resolve(self, host: str) -> list[IPAddress]:
        self.asked.append(host)
        if host != "hooks.example":
            raise ResolveError(f"{host} has no addresses")
        return [self.address]


PRODUCTION_HOOKS = WebhookSettings(allow_private_hosts=False, allow_http=False, timeout=2)


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://hooks.example/x", "https"),
        ("https://127.0.0.1/x", "loopback"),
        ("https://[::1]/x", "loopback"),
        ("https://169.254.169.254/latest/meta-data", "metadata"),
        ("https://10.1.2.3/x", "private"),
        ("https://localhost/x", "loopback"),
    ],
)
async def test_production_refuses_non_public_webhook_urls(
    hooks: Hooks, url: str, words: str
) -> None:
    from services.core.errors import InvalidArgument
    from services.mail.feedback.webhook_manager import WebhookInput, check_input

    with pytest.raises(InvalidArgument) as refused:
        check_input(WebhookInput(url, [], [], None, ""), PRODUCTION_HOOKS)
    assert refused.value.violations[0].field == "url"
    assert words in refused.value.violations[0].description


async def test_production_guard_checks_the_address_at_connection_time(hooks: Hooks) -> None:
    # A public-looking name that resolves to loopback, where a receiver listens: the request
    # never reaches it, and the attempt says why. The same receiver by IP literal: refused too.
    receiver = await hooks.receiver()
    port = receiver.url.split(":")[2].split("/")[0]
    import ipaddress

    resolver = NameTo(ipaddress.ip_address("127.0.0.1"))
    transport = WebhookTransport(
        resolver=resolver, policy=address_policy(PRODUCTION_HOOKS), timeout=2
    )
    try:
        now = hooks.clock.now()
        by_name = await transport.post(
            url=f"https://hooks.example:{port}/x", headers={}, body="{}", at=now
        )
        by_literal = await transport.post(
            url=f"https://127.0.0.1:{port}/x", headers={}, body="{}", at=now
        )
    finally:
        await transport.close()
    assert resolver.asked == ["hooks.example"]
    assert by_name.status_code == 0
    assert "loopback" in by_name.error
    assert "AZORA_WEBHOOK_ALLOW_PRIVATE_HOSTS" in by_name.error
    assert "loopback" in by_literal.error
    assert receiver.requests == []
    # Outside production the same name reaches the receiver (the guard was what stopped it).
    open_transport = WebhookTransport(
        resolver=resolver, policy=address_policy(WebhookSettings()), timeout=2
    )
    try:
        allowed = await open_transport.post(
            url=f"http://hooks.example:{port}/x", headers={}, body="{}", at=now
        )
    finally:
        await open_transport.close()
    assert allowed.status_code == 200
    assert len(receiver.requests) == 1


# --- the dispatcher process -------------------------------------------------------------------


def dispatcher_process(settings: MailSettings, **env: str) -> subprocess.Popen[bytes]:
    """`python -m services.mail.feedback.webhook_dispatcher` on the test's database."""
    return subprocess.Popen(
        [sys.executable, "-m", "services.mail.feedback.webhook_dispatcher"],
        cwd=REPO_ROOT,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("AZORA_")},
            "AZORA_ENV": "test",
            "MONGODB_URI": settings.mongodb_uri,
            "AZORA_MONGODB_DATABASE": settings.mongodb_database,
            "JWT_SECRET": settings.jwt_secret,
            "AZORA_SERVICE_TOKEN_SECRET": settings.service_token_secret,
            "AZORA_SECRETS_KEY": settings.secrets_key,
            "AZORA_WEBHOOK_DISPATCHER_HEALTH_PORT": "0",
            "AZORA_WEBHOOK_DISPATCHER_METRICS_PORT": "0",
            "AZORA_WEBHOOK_TIMEOUT": "1",
            "AZORA_WEBHOOK_POLL_INTERVAL": "0.1",
            "AZORA_WEBHOOK_RETRY_SCHEDULE": "1",
            "LOG_LEVEL": "warning",
            # Leases of a killed dispatcher expire after 7 s (twice the timeout plus 5 s).
            "AZORA_WEBHOOK_LEASE": "3",
            **env,
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def test_kill_9_of_the_dispatcher_loses_no_event(hooks: Hooks, tenant: Tenant) -> None:
    # Killed while requests are in flight, the next dispatcher takes the expired leases over:
    # every event reaches the receiver at least once (by webhook-id = event id).
    receiver = await hooks.receiver()
    receiver.delay = 0.3
    endpoint = await hooks.endpoint(tenant, receiver.url)
    events = [await hooks.event(tenant) for _ in range(20)]
    first = dispatcher_process(hooks.settings, AZORA_WEBHOOK_ENDPOINT_CONCURRENCY="4")
    try:
        await receiver.wait_for(3, within=60)
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=30)
    assert first.returncode == -signal.SIGKILL
    cut_off = len(receiver.requests)
    second = dispatcher_process(hooks.settings)
    deliveries = hooks.db["webhook_deliveries"]
    try:
        async with asyncio.timeout(120):
            # Requests cut off by the kill are sent again once their lease has expired.
            while await deliveries.count_documents({"state": "succeeded"}) < len(events):  # noqa: ASYNC110
                await asyncio.sleep(0.2)
    finally:
        second.send_signal(signal.SIGTERM)
        _, stderr = second.communicate(timeout=30)
    assert second.returncode == 0, stderr.decode()[-2000:]
    assert cut_off < len(events)  # the kill really came in the middle
    received = {r.webhook_id for r in receiver.requests}
    assert received == {e["_id"] for e in events}
    for request in receiver.requests:
        verify(endpoint.secret, request)
