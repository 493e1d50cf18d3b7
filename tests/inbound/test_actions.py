"""The webhook and forward route actions end to end, swaks on the inbound port to the far side.

Webhook: the route names a webhook endpoint of the tenant; the webhook dispatcher (as its
process runs it) POSTs the message's JSON to a real aiohttp receiver, which verifies the
Standard Webhooks signature with the endpoint's secret; the authentication results are those of
a message DKIM-signed with a key in the tests' Knot zone, and of an unsigned one. The delivery
is in the endpoint's log and replays like an event's.

Forward: the delivery worker takes the queued email to an aiosmtpd relay; the envelope sender is
the SRS address at the receiving domain, the message is byte for byte what arrived (the
original DKIM signature verifies with dkimpy), and a suppressed target is never sent to.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import dkim  # type: ignore[import-untyped]  # dkimpy ships no type information
import grpc
from azora.domain.v1 import routes_pb2
from azora.mail.v1 import (
    inbound_pb2,
    mail_pb2,
    suppressions_pb2,
    suppressions_pb2_grpc,
    webhooks_pb2,
)
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from standardwebhooks import Webhook as Verifier

from services.mail.inbound.wiring import srs_rewriter
from services.mail.relay_directory import SigningKey
from tests.conftest import new_tenant
from tests.inbound.conftest import Inbound, SenderDomain, dispatch, webhooks_of
from tests.inbound.test_inbound import message, stored, swaks
from tests.support.dns_server import KnotServer
from tests.support.grpc_errors import failure_of
from tests.support.settings import SuiteSettings
from tests.support.smtp_relay import StartRelay
from tests.support.webhook_receiver import Receiver


async def test_webhook_route_posts_signed_json_with_authentication_results(
    inbound: Inbound, sender_domain: SenderDomain, receiver: Receiver
) -> None:
    # A signed and an unsigned message reach the receiver signed with the endpoint's secret.
    hooks = webhooks_of(inbound)
    endpoint = await hooks.CreateWebhook(
        webhooks_pb2.CreateWebhookRequest(url=receiver.url), metadata=inbound.tenant.metadata
    )
    route = await inbound.add_route(match="hooks", action="webhook", webhook_id=endpoint.id)
    assert route.webhook_id == endpoint.id
    recipient = f"hooks@{inbound.domain.name}"
    sender = f"alice@{sender_domain.name}"
    signed = sender_domain.sign(message(sender, recipient, "signed one"))
    unsigned = message(sender, recipient, "unsigned one")
    for raw in (signed, unsigned):
        transcript = await swaks(inbound, "--from", sender, "--to", recipient, data=raw)
        assert "250 2.0.0 Ok: stored as" in transcript
    pending = await stored(inbound)
    assert [m.outcome for m in pending] == ["webhook_pending", "webhook_pending"]

    await dispatch(inbound, receiver, 2)
    verifier = Verifier(endpoint.secret)
    payloads: dict[str, dict[str, Any]] = {}
    for request in receiver.requests:
        checked = verifier.verify(request.body, request.headers)
        assert checked == json.loads(request.body)
        assert request.webhook_id == checked["id"]
        payloads[checked["subject"]] = checked
    assert set(payloads) == {"signed one", "unsigned one"}
    good, plain = payloads["signed one"], payloads["unsigned one"]
    for payload in (good, plain):
        assert payload["type"] == "inbound.received"
        assert payload["envelope"]["from"] == sender
        assert payload["envelope"]["to"] == recipient
        assert (payload["from"], payload["to"], payload["routeId"]) == (
            sender,
            [recipient],
            route.id,
        )
        assert payload["text"] == "plain body\n"
        assert payload["html"] == "<p>html body</p>\n"
        [attachment] = payload["attachments"]
        assert (attachment["filename"], attachment["contentType"]) == ("a.pdf", "application/pdf")
        assert base64.b64decode(attachment["content"]) == b"%PDF-1.4 tiny"
        assert payload["rawUrl"] == f"/api/v1/inbound/{payload['inboundMessageId']}/raw"
        assert payload["authentication"]["spf"] == "pass"
        assert payload["authentication"]["dmarc"] == "pass"  # SPF aligned
        assert payload["authenticationResults"].startswith("mx.test; spf=pass smtp.mailfrom=")
        assert "\n" not in payload["authenticationResults"]
    assert good["authentication"]["dkim"] == "pass"
    assert good["authentication"]["dkimDomains"] == [sender_domain.name]
    assert f"dkim=pass header.d={sender_domain.name}" in good["authenticationResults"]
    assert plain["authentication"]["dkim"] == "none"
    assert "dkim=none" in plain["authenticationResults"]

    # Listed with its outcome and delivery; the endpoint's log has it and replays it.
    listed = {m.id: m for m in await stored(inbound)}
    record = listed[good["inboundMessageId"]]
    assert (record.action, record.outcome, record.webhook_id) == (
        "webhook",
        "webhook_delivered",
        endpoint.id,
    )
    assert record.outcome_detail == "1 attempt(s); last: HTTP 200"
    log = await hooks.ListWebhookDeliveries(
        webhooks_pb2.ListWebhookDeliveriesRequest(id=endpoint.id),
        metadata=inbound.tenant.metadata,
    )
    assert record.webhook_delivery_id in {d.id for d in log.deliveries}
    await hooks.ReplayWebhookDelivery(
        webhooks_pb2.ReplayWebhookDeliveryRequest(
            id=endpoint.id, delivery_id=record.webhook_delivery_id
        ),
        metadata=inbound.tenant.metadata,
    )
    await dispatch(inbound, receiver, 3)
    assert receiver.requests[2].webhook_id == good["id"]
    assert verifier.verify(receiver.requests[2].body, receiver.requests[2].headers) == good


async def test_webhook_route_needs_an_enabled_endpoint_of_the_tenant(
    inbound: Inbound, receiver: Receiver, settings: SuiteSettings
) -> None:
    # Unknown or another tenant's endpoint: INVALID_ARGUMENT on webhookId; a disabled one:
    # FAILED_PRECONDITION. Nothing is written.
    hooks = webhooks_of(inbound)
    other = new_tenant(settings)
    theirs = await hooks.CreateWebhook(
        webhooks_pb2.CreateWebhookRequest(url=receiver.url), metadata=other.metadata
    )
    for webhook_id in ("0" * 24, theirs.id):
        failure = await failure_of(
            inbound.add_route(match="*", action="webhook", webhook_id=webhook_id)
        )
        assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "webhookId" in failure.field_violations
    off = await hooks.CreateWebhook(
        webhooks_pb2.CreateWebhookRequest(url=receiver.url, enabled=False),
        metadata=inbound.tenant.metadata,
    )
    failure = await failure_of(inbound.add_route(match="*", action="webhook", webhook_id=off.id))
    assert failure.code == grpc.StatusCode.FAILED_PRECONDITION
    assert failure.reason == "INBOUND_ACTION_NOT_AVAILABLE"
    listed = await inbound.routes.ListRoutes(
        routes_pb2.ListRoutesRequest(domain_id=inbound.domain.id), metadata=inbound.tenant.metadata
    )
    assert list(listed.routes) == []


async def test_forward_route_keeps_the_message_and_rewrites_the_envelope_sender(
    inbound: Inbound,
    sender_domain: SenderDomain,
    start_smtp_relay: StartRelay,
    knot_server: KnotServer,
) -> None:
    # The relay gets the original bytes (its DKIM signature verifies) from an SRS sender.
    relay = await start_smtp_relay()
    domain_id, _ = inbound.mail.add_domain(
        inbound.tenant, port=relay.port, name=inbound.domain.name
    )
    # The receiving domain has a DKIM key (published in the tests' zone): the worker adds its
    # signature on top, as to every email; the original one stays valid beneath it.
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    knot_server.set_zone(
        inbound.domain.name,
        [("fw1._domainkey", "TXT", f'"v=DKIM1; k=rsa; p={base64.b64encode(public).decode()}"')],
    )
    inbound.mail.relays.add_key(
        tenant_id=inbound.tenant.id,
        key=SigningKey(
            domain_id=domain_id,
            domain=inbound.domain.name,
            selector="fw1",
            algorithm="rsa-sha256",
            private_key_pem=key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        ),
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{inbound.mail.app.running.port}")
    inbound.mail.app.running.channels.append(channel)
    await suppressions_pb2_grpc.SuppressionServiceStub(channel).AddSuppressions(
        suppressions_pb2.AddSuppressionsRequest(addresses=["blocked@elsewhere.example"]),
        metadata=inbound.tenant.metadata,
    )
    targets = ["one@elsewhere.example", "two@other.example", "blocked@elsewhere.example"]
    await inbound.add_route(match="team", action="forward", forward_to=targets)
    recipient = f"team@{inbound.domain.name}"
    sender = f"alice@{sender_domain.name}"
    raw = sender_domain.sign(message(sender, recipient, "please forward"))
    transcript = await swaks(inbound, "--from", sender, "--to", recipient, data=raw)
    assert "250 2.0.0 Ok: stored as" in transcript
    [queued] = await stored(inbound)
    assert (queued.action, queued.outcome) == ("forward", "forward_queued")
    assert list(queued.forward_to) == targets
    email = await inbound.mail.get(inbound.tenant, queued.forward_email_id)
    statuses = {r.address: mail_pb2.RecipientStatus.Name(r.status) for r in email.recipients}
    assert statuses["blocked@elsewhere.example"] == "RECIPIENT_STATUS_SUPPRESSED"

    await inbound.mail.worker().run_once()
    # One transaction per recipient, each keeping the SRS envelope sender (no return path:
    # the bounces of forwarded mail belong to the original sender).
    assert sorted(r for e in relay.envelopes for r in e.rcpt_tos) == [
        "one@elsewhere.example",
        "two@other.example",
    ]
    envelope = relay.envelopes[0]
    assert all(len(e.rcpt_tos) == 1 for e in relay.envelopes)
    assert all(e.mail_from == envelope.mail_from for e in relay.envelopes)
    srs = srs_rewriter(inbound.mail.settings)
    assert envelope.mail_from.startswith("SRS0=")
    assert envelope.mail_from.endswith(f"@{inbound.domain.name}")
    assert srs.reverse(envelope.mail_from) == sender
    # Byte for byte what is stored: our Authentication-Results and Received on top of what
    # arrived, so the original signature still verifies.
    kept = await inbound.inbound.GetInboundMessageRaw(
        inbound_pb2.GetInboundMessageRawRequest(id=queued.id), metadata=inbound.tenant.metadata
    )
    ours, _, forwarded = envelope.content.partition(b"Authentication-Results: ")
    assert ours.startswith(b"DKIM-Signature: ")
    assert f"d={inbound.domain.name};".encode() in ours
    assert (b"Authentication-Results: " + forwarded).rstrip(b"\r\n") == kept.data.rstrip(b"\r\n")
    assert raw.rstrip(b"\r\n") in envelope.content
    checker = dkim.DKIM(envelope.content)
    assert checker.verify(idx=0)  # ours
    assert checker.verify(idx=1)  # the original sender's
    [done] = await stored(inbound)
    assert done.outcome == "forward_partially_sent"
    assert done.outcome_detail == (
        "one@elsewhere.example: sent, two@other.example: sent, "
        "blocked@elsewhere.example: suppressed"
    )


async def test_forward_without_a_relay_is_recorded_as_failed_and_kept(
    inbound: Inbound, sender_domain: SenderDomain
) -> None:
    # The domain cannot send (no relay here): the message is still stored, the reason shown.
    await inbound.add_route(match="*", action="forward", forward_to=["x@elsewhere.example"])
    recipient = f"anyone@{inbound.domain.name}"
    raw = message(f"bob@{sender_domain.name}", recipient)
    transcript = await swaks(
        inbound, "--from", f"bob@{sender_domain.name}", "--to", recipient, data=raw
    )
    assert "250 2.0.0 Ok: stored as" in transcript
    [record] = await stored(inbound)
    assert record.outcome == "failed"
    assert "not forwarded" in record.outcome_detail
    body = await inbound.inbound.GetInboundMessageRaw(
        inbound_pb2.GetInboundMessageRawRequest(id=record.id), metadata=inbound.tenant.metadata
    )
    assert raw.rstrip(b"\r\n") in body.data
