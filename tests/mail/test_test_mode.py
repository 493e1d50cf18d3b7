"""Test mode end to end: test API keys, simulated outcomes, nothing relayed, marked events.

The mail service in-process on FerretDB (`local_mail`), API keys created and resolved by the
session's real domain service, a real aiosmtpd relay configured for the sending domain (so a
relay exists and would be used if anything were relayed: it must count zero messages), a
delivery worker, the event publisher and the webhook dispatcher as their processes run them,
and an aiohttp receiver subscribed to every event that verifies each request with the
`standardwebhooks` library.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from typing import Any

import grpc
import pytest
from azora.iam.v1 import api_keys_pb2, api_keys_pb2_grpc
from azora.mail.v1 import (
    events_pb2,
    events_pb2_grpc,
    mail_pb2,
    suppressions_pb2,
    suppressions_pb2_grpc,
    webhooks_pb2,
    webhooks_pb2_grpc,
)
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client import REGISTRY
from standardwebhooks import Webhook as Verifier

from services.mail.relay_directory import SigningKey
from services.mail.simulation import TEST_DOMAIN
from tests.conftest import Tenant
from tests.mail.conftest import LocalMail, Script, ScriptedRelay
from tests.mail.test_webhook_end_to_end import deliver_feedback
from tests.support.grpc_errors import failure_of
from tests.support.smtp_relay import StartRelay
from tests.support.webhook_receiver import Receiver

E = mail_pb2
Metadata = tuple[tuple[str, str], ...]
SEND_SCOPES = ("emails:send", "emails:read", "emails:write", "api_keys:manage")


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """An HTTP receiver on loopback that answers 200 to everything."""
    running = await Receiver().start()
    yield running
    await running.close()


@pytest.fixture
def api_keys(domain_channel: grpc.aio.Channel) -> api_keys_pb2_grpc.ApiKeyServiceAsyncStub:
    """The session domain service's ApiKeyService (it owns the keys the mail service resolves)."""
    return api_keys_pb2_grpc.ApiKeyServiceStub(domain_channel)


async def new_key(
    api_keys: api_keys_pb2_grpc.ApiKeyServiceAsyncStub,
    creator: Metadata,
    *,
    test: bool,
    scopes: Sequence[str] = SEND_SCOPES,
) -> api_keys_pb2.CreateApiKeyResponse:
    """A new API key of the creator's tenant."""
    return await api_keys.CreateApiKey(
        api_keys_pb2.CreateApiKeyRequest(name="ci", scopes=list(scopes), test=test),
        metadata=creator,
    )


def bearer(secret: str) -> Metadata:
    """Call metadata authenticating with an API key."""
    return (("authorization", f"Bearer {secret}"),)


def signed_messages() -> float:
    """DKIM signatures added so far by this process (the metric every signed message counts)."""
    return REGISTRY.get_sample_value("azora_dkim_signatures_total", {"outcome": "signed"}) or 0.0


def add_signed_domain(local_mail: LocalMail, tenant: Tenant, port: int) -> str:
    """An active domain of `tenant` with its relay on `port` and an active DKIM key."""
    domain_id, name = local_mail.add_domain(tenant, port=port)
    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    local_mail.relays.add_key(
        tenant_id=tenant.id, key=SigningKey(domain_id, name, "sel1", "rsa-sha256", pem)
    )
    return name


def send_request(name: str, *to: str, **fields: Any) -> mail_pb2.SendEmailRequest:
    """A plain send request from `name`."""
    return mail_pb2.SendEmailRequest(
        from_address=f"app@{name}", to=list(to), subject="hi", text="body", **fields
    )


async def test_each_simulated_outcome_fires_its_events_and_webhooks_and_nothing_is_relayed(
    local_mail: LocalMail,
    tenant: Tenant,
    start_smtp_relay: StartRelay,
    receiver: Receiver,
    api_keys: api_keys_pb2_grpc.ApiKeyServiceAsyncStub,
) -> None:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{local_mail.app.running.port}")
    local_mail.app.running.channels.append(channel)
    webhooks = webhooks_pb2_grpc.WebhookServiceStub(channel)
    events_api = events_pb2_grpc.EventServiceStub(channel)
    suppressions = suppressions_pb2_grpc.SuppressionServiceStub(channel)
    endpoint = await webhooks.CreateWebhook(
        webhooks_pb2.CreateWebhookRequest(url=receiver.url), metadata=tenant.metadata
    )
    relay = await start_smtp_relay()
    name = add_signed_domain(local_mail, tenant, relay.port)
    key = await new_key(api_keys, tenant.metadata, test=True)
    assert key.secret.startswith("azk_test_")
    assert key.api_key.test

    addresses = {
        "delivered": f"delivered@{TEST_DOMAIN}",
        "bounce": f"bounce@{TEST_DOMAIN}",
        "defer": f"defer@{TEST_DOMAIN}",
        "suppressed": f"suppressed@{TEST_DOMAIN}",
        "complaint": f"complaint@{TEST_DOMAIN}",
        "anyone": "someone@example.org",
    }
    sent = {
        word: await local_mail.stub.SendEmail(
            send_request(name, address, tags=["ci"]), metadata=bearer(key.secret)
        )
        for word, address in addresses.items()
    }
    assert all(email.test for email in sent.values())
    assert sent["suppressed"].status == E.EMAIL_STATUS_SUPPRESSED
    assert list(sent["suppressed"].suppressed_recipients) == [addresses["suppressed"]]
    signed_before = signed_messages()

    # Five attempts (suppressed@ never gets one), each signed, none relayed.
    assert await local_mail.worker().run_once() == 5
    assert signed_messages() - signed_before == 5
    assert (relay.messages, relay.handler.arrived) == ([], 0)
    status = {word: (await local_mail.get(tenant, email.id)).status for word, email in sent.items()}
    assert status == {
        "delivered": E.EMAIL_STATUS_SENT,
        "bounce": E.EMAIL_STATUS_BOUNCED,
        "defer": E.EMAIL_STATUS_DEFERRED,
        "suppressed": E.EMAIL_STATUS_SUPPRESSED,
        "complaint": E.EMAIL_STATUS_SENT,
        "anyone": E.EMAIL_STATUS_SENT,
    }

    # Every webhook verifies, is marked test, and tells each email's simulated story.
    await deliver_feedback(local_mail)
    payloads = [Verifier(endpoint.secret).verify(r.body, r.headers) for r in receiver.requests]
    assert payloads
    assert all(p["test"] is True for p in payloads)
    by_email: dict[str, list[dict[str, Any]]] = {}
    for payload in payloads:
        by_email.setdefault(payload["emailId"], []).append(payload)
    stories = {
        "delivered": [("accepted", ""), ("sent", addresses["delivered"])],
        "bounce": [("accepted", ""), ("bounced", addresses["bounce"])],
        "defer": [("accepted", ""), ("deferred", addresses["defer"])],
        "suppressed": [("accepted", ""), ("suppressed", addresses["suppressed"])],
        "complaint": [
            ("accepted", ""),
            ("sent", addresses["complaint"]),
            ("complained", addresses["complaint"]),
        ],
        "anyone": [("accepted", ""), ("sent", addresses["anyone"])],
    }
    for word, story in stories.items():
        got = by_email[sent[word].id]
        assert sorted((p["type"], p.get("recipient", "")) for p in got) == sorted(story), word
        # The events API lists the same events, each marked test.
        listed = await events_api.ListEvents(
            events_pb2.ListEventsRequest(email_id=sent[word].id), metadata=tenant.metadata
        )
        assert {e.id for e in listed.events} == {p["id"] for p in got}
        assert all(e.test for e in listed.events)
    (bounce,) = [p for p in by_email[sent["bounce"].id] if p["type"] == "bounced"]
    assert (bounce["smtp"]["code"], bounce["smtp"]["enhancedCode"]) == (550, "5.1.1")
    (deferral,) = [p for p in by_email[sent["defer"].id] if p["type"] == "deferred"]
    assert (deferral["smtp"]["code"], deferral["smtp"]["enhancedCode"]) == (451, "4.3.0")
    (suppressed,) = [p for p in by_email[sent["suppressed"].id] if p["type"] == "suppressed"]
    assert suppressed["reason"] == "hard_bounce"

    # The simulated hard bounce suppressed the address like a real one, naming its event.
    entry = await suppressions.GetSuppression(
        suppressions_pb2.GetSuppressionRequest(address=addresses["bounce"]),
        metadata=tenant.metadata,
    )
    assert (entry.reason, entry.event_id) == ("hard_bounce", bounce["id"])

    # complaint@ was delivered, then complained like a real feedback report: suppressed too.
    (complaint,) = [p for p in by_email[sent["complaint"].id] if p["type"] == "complained"]
    entry = await suppressions.GetSuppression(
        suppressions_pb2.GetSuppressionRequest(address=addresses["complaint"]),
        metadata=tenant.metadata,
    )
    assert (entry.reason, entry.event_id) == ("complaint", complaint["id"])

    # defer@ defers at every attempt, then fails at the maximum lifetime like a real
    # deferral (RETRY_ENV: 60 s doubling to 600 s, give up after 3600 s).
    for _ in range(12):
        local_mail.clock.advance(timedelta(seconds=600))
        await local_mail.worker().run_once()
        if (await local_mail.get(tenant, sent["defer"].id)).status != E.EMAIL_STATUS_DEFERRED:
            break
    deferred = await local_mail.get(tenant, sent["defer"].id)
    assert deferred.status == E.EMAIL_STATUS_FAILED
    assert deferred.attempts > 2
    assert deferred.events[-1].detail.startswith("gave up after the maximum lifetime")
    assert (relay.messages, relay.handler.arrived) == ([], 0)


async def test_a_live_key_never_simulates(
    local_mail: LocalMail,
    tenant: Tenant,
    start_smtp_relay: StartRelay,
    api_keys: api_keys_pb2_grpc.ApiKeyServiceAsyncStub,
) -> None:
    # The simulator's addresses mean nothing to a live key: its email goes to the relay.
    relay = await start_smtp_relay()
    _, name = local_mail.add_domain(tenant, port=relay.port)
    key = await new_key(api_keys, tenant.metadata, test=False)
    assert not key.secret.startswith("azk_test_")
    assert not key.api_key.test
    email = await local_mail.stub.SendEmail(
        send_request(name, f"bounce@{TEST_DOMAIN}", f"suppressed@{TEST_DOMAIN}"),
        metadata=bearer(key.secret),
    )
    assert not email.test
    assert email.status == E.EMAIL_STATUS_QUEUED
    assert await local_mail.worker().run_once() == 1
    assert sorted(r for e in relay.envelopes for r in e.rcpt_tos) == [
        f"bounce@{TEST_DOMAIN}",
        f"suppressed@{TEST_DOMAIN}",
    ]
    assert (await local_mail.get(tenant, email.id)).status == E.EMAIL_STATUS_SENT


async def test_a_test_key_never_leads_to_a_live_send(
    local_mail: LocalMail,
    tenant: Tenant,
    scripted_relay: Any,
    api_keys: api_keys_pb2_grpc.ApiKeyServiceAsyncStub,
) -> None:
    # A test key mints test keys only, resends test emails only, and needs its scopes.
    relay: ScriptedRelay = await scripted_relay(
        Script(rcpt={"gone@example.org": "550 5.1.1 no such user"})
    )
    _, name = local_mail.add_domain(tenant, port=relay.port)
    key = await new_key(api_keys, tenant.metadata, test=True)
    refused = await failure_of(new_key(api_keys, bearer(key.secret), test=False))
    assert refused.code == grpc.StatusCode.PERMISSION_DENIED
    assert refused.reason == "TEST_KEY_CANNOT_CREATE_LIVE_KEY"
    child = await new_key(api_keys, bearer(key.secret), test=True)
    assert child.api_key.test
    assert child.secret.startswith("azk_test_")
    listed = await api_keys.ListApiKeys(api_keys_pb2.ListApiKeysRequest(), metadata=tenant.metadata)
    assert {k.id for k in listed.api_keys if k.test} == {key.api_key.id, child.api_key.id}

    # A live bounce and a simulated one.
    live = await local_mail.send(tenant, **_fields(send_request(name, "gone@example.org")))
    test = await local_mail.stub.SendEmail(
        send_request(name, f"bounce@{TEST_DOMAIN}"), metadata=bearer(key.secret)
    )
    assert await local_mail.worker().run_once() == 2
    assert (await local_mail.get(tenant, live.id)).status == E.EMAIL_STATUS_BOUNCED
    assert (await local_mail.get(tenant, test.id)).status == E.EMAIL_STATUS_BOUNCED
    connections = relay.connections
    for email_id, metadata in ((live.id, bearer(key.secret)), (test.id, tenant.metadata)):
        mismatch = await failure_of(
            local_mail.stub.ResendEmail(E.ResendEmailRequest(id=email_id), metadata=metadata)
        )
        assert mismatch.code == grpc.StatusCode.FAILED_PRECONDITION
        assert mismatch.reason == "TEST_MODE_MISMATCH"
    again = await local_mail.stub.ResendEmail(
        E.ResendEmailRequest(id=test.id), metadata=bearer(key.secret)
    )
    # A test email, and its address is on the list since the simulated bounce: suppressed.
    assert again.test
    assert again.status == E.EMAIL_STATUS_SUPPRESSED
    # SMTP submission's hand-over and batches with a test key make test emails too.
    raw = f"From: app@{name}\r\nTo: x@example.org\r\nSubject: s\r\n\r\nhi\r\n".encode()
    submitted = await local_mail.stub.SubmitMessage(
        E.SubmitMessageRequest(
            raw_message=raw,
            envelope_from=f"app@{name}",
            envelope_to=["x@example.org"],
        ),
        metadata=bearer(key.secret),
    )
    batch = await local_mail.stub.SendEmailBatch(
        E.SendEmailBatchRequest(messages=[send_request(name, "y@example.org")]),
        metadata=bearer(key.secret),
    )
    batched = await local_mail.get(tenant, batch.results[0].id)
    assert submitted.test
    assert batched.test
    assert await local_mail.worker().run_once() == 2
    assert relay.connections == connections  # nothing of the test key's reached the relay
    assert [r.rcpt_to for r in relay.received] == []

    # Scopes hold for test keys as for any key.
    reader = await new_key(api_keys, tenant.metadata, test=True, scopes=["emails:read"])
    missing = await failure_of(
        local_mail.stub.SendEmail(
            send_request(name, "z@example.org"), metadata=bearer(reader.secret)
        )
    )
    assert (missing.code, missing.reason) == (grpc.StatusCode.PERMISSION_DENIED, "MISSING_SCOPE")


def _fields(request: mail_pb2.SendEmailRequest) -> dict[str, Any]:
    """A send request's set fields as keyword arguments (for `LocalMail.send`)."""
    return {f.name: v for f, v in request.ListFields()}


async def test_test_emails_are_listed_and_counted_only_with_the_test_filter(
    local_mail: LocalMail,
    tenant: Tenant,
    start_smtp_relay: StartRelay,
    api_keys: api_keys_pb2_grpc.ApiKeyServiceAsyncStub,
) -> None:
    relay = await start_smtp_relay()
    _, name = local_mail.add_domain(tenant, port=relay.port)
    key = await new_key(api_keys, tenant.metadata, test=True)
    # Inside the default stats window (it ends at the next whole minute after now).
    local_mail.clock.advance(timedelta(seconds=1))
    live = await local_mail.send(tenant, **_fields(send_request(name, "same@example.org")))
    test = await local_mail.stub.SendEmail(
        send_request(name, "same@example.org", tags=["ci"]), metadata=bearer(key.secret)
    )
    stub = local_mail.stub

    async def ids(**filters: Any) -> list[str]:
        page = await stub.ListEmails(E.ListEmailsRequest(**filters), metadata=tenant.metadata)
        return [e.id for e in page.emails]

    # Whoever asks (a JWT here), the filter decides: live only, or test only.
    assert await ids() == [live.id]
    assert await ids(test=True) == [test.id]
    assert await ids(recipient="same@example.org") == [live.id]
    assert await ids(recipient="same@example.org", test=True) == [test.id]
    assert await ids(tag="ci") == []
    assert await ids(tag="ci", test=True) == [test.id]
    assert await ids(status=E.EMAIL_STATUS_QUEUED, test=True) == [test.id]
    # An email is found by its id either way.
    assert (await local_mail.get(tenant, test.id)).test

    async def counted(test_filter: bool) -> dict[int, int]:
        stats = await stub.GetEmailStats(
            E.GetEmailStatsRequest(test=test_filter), metadata=tenant.metadata
        )
        return {c.status: c.count for c in stats.counts}

    assert await counted(False) == {E.EMAIL_STATUS_QUEUED: 1}
    assert await counted(True) == {E.EMAIL_STATUS_QUEUED: 1}
    await local_mail.worker().run_once()
    assert await counted(False) == {E.EMAIL_STATUS_SENT: 1}
    assert await counted(True) == {E.EMAIL_STATUS_SENT: 1}
    assert len(relay.messages) == 1  # the live one


async def test_finished_test_emails_are_swept_after_the_test_retention(
    local_mail: LocalMail,
    tenant: Tenant,
    start_smtp_relay: StartRelay,
    api_keys: api_keys_pb2_grpc.ApiKeyServiceAsyncStub,
) -> None:
    # AZORA_TEST_RETENTION_HOURS (24) applies to test emails; live ones keep their 30 days.
    relay = await start_smtp_relay()
    _, name = local_mail.add_domain(tenant, port=relay.port)
    key = await new_key(api_keys, tenant.metadata, test=True)
    live = await local_mail.send(tenant, **_fields(send_request(name, "a@example.org")))
    test = await local_mail.stub.SendEmail(
        send_request(name, f"delivered@{TEST_DOMAIN}"), metadata=bearer(key.secret)
    )
    waiting = await local_mail.stub.SendEmail(
        send_request(name, f"defer@{TEST_DOMAIN}"), metadata=bearer(key.secret)
    )
    assert await local_mail.worker().run_once() == 3
    local_mail.clock.advance(timedelta(hours=23))
    assert await local_mail.app.mail.sweep_retention() == 0
    local_mail.clock.advance(timedelta(hours=2))
    assert await local_mail.app.mail.sweep_retention() == 1
    gone = await failure_of(local_mail.get(tenant, test.id))
    assert gone.code == grpc.StatusCode.NOT_FOUND
    assert (await local_mail.get(tenant, live.id)).status == E.EMAIL_STATUS_SENT
    # An unfinished test email is not swept: it still has its verdict to reach.
    assert (await local_mail.get(tenant, waiting.id)).status == E.EMAIL_STATUS_DEFERRED
