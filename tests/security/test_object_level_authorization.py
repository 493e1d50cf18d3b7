"""Object-level authorization (OWASP API1) on every rpc of the API, enumerated from the descriptor.

Tenant A owns one of everything: a verified domain, its relay config, a DKIM key, SPF and DMARC
records, a queued email, a test email (sent with its test API key), an API key, a published
template, a suppressed address, an event, an inbound route and a received message. Tenant B,
with every scope, aims each rpc at them: an object rpc answers NOT_FOUND exactly as for an id
that does not exist (never PERMISSION_DENIED, which would confirm the object exists), a list
never shows them, a create cannot borrow them, an internal rpc refuses B's user token and finds
nothing for a service token minted for B.
After every case A's objects are unchanged.

The rpcs come from gen/azora.binpb, so a new rpc without a case here fails this test. This is
the suite's one tenant-isolation suite: add a tenant-isolation check here, not elsewhere.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from azora.domain.v1 import domain_pb2, routes_pb2
from azora.health.v1 import health_pb2, health_pb2_grpc
from azora.iam.v1 import api_keys_pb2
from azora.mail.v1 import events_pb2, inbound_pb2, mail_pb2, suppressions_pb2, webhooks_pb2
from azora.smtp.v1 import smtp_pb2
from google.protobuf import descriptor_pb2, json_format, timestamp_pb2
from google.protobuf.message import Message
from pymongo import AsyncMongoClient

from services.core.auth import ServiceTokens
from services.core.clock import SystemClock
from services.core.ids import new_id
from services.core.mongo import Document
from services.core.settings import Settings
from services.mail.feedback.event_log import OUTBOX_FIELD, EventPublisher
from tests.conftest import REPO_ROOT, Tenant, new_tenant, unique_domain
from tests.security.conftest import GrpcStubs, RestStack
from tests.support.dns_server import KnotServer
from tests.support.grpc_errors import RpcFailure, failure_of

DESCRIPTOR_SET = Path(REPO_ROOT) / "gen" / "azora.binpb"


def api_rpcs() -> list[str]:
    """Full names ("package.Service.Method") of every rpc in the generated descriptor set."""
    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes())
    return sorted(
        f"{file.package}.{service.name}.{method.name}"
        for file in files.file
        if file.package.startswith("azora.")
        for service in file.service
        for method in service.method
    )


@dataclass
class Victim:
    """Tenant A and what it owns."""

    tenant: Tenant
    domain: domain_pb2.Domain
    selector: str
    email_id: str
    # Sent with A's test API key: kept in A's test partition, listed only with `test`.
    test_email_id: str
    api_key_id: str
    api_key_secret: str
    relay_host: str
    template: mail_pb2.Template
    suppression: suppressions_pb2.Suppression
    event_id: str
    webhook: webhooks_pb2.Webhook
    webhook_delivery_id: str
    route: routes_pb2.Route
    inbound: inbound_pb2.InboundMessage


@dataclass
class Attack:
    """What a case gets: the services, the victim, the intruder and its service credentials."""

    stubs: GrpcStubs
    health: health_pb2_grpc.SuiteHealthServiceAsyncStub
    victim: Victim
    intruder: Tenant
    service_tokens: ServiceTokens
    settings: Settings

    @property
    def b(self) -> tuple[tuple[str, str], ...]:
        """Call metadata of the intruder."""
        return self.intruder.metadata

    def b_service(self) -> tuple[tuple[str, str], ...]:
        """A service token minted for the intruder's tenant (what a service would send)."""
        return self.service_tokens.metadata(self.intruder.id)


async def not_found_like_unknown(
    call: Callable[[str], Awaitable[Any]], victim_id: str
) -> RpcFailure:
    """NOT_FOUND for the victim's id, with the same code and resource type as for a fresh id.

    The missing resource is the one asked about (the id in the call), never another object.
    """
    fresh_id = new_id()
    failure = await failure_of(call(victim_id))
    unknown = await failure_of(call(fresh_id))
    assert failure.code == grpc.StatusCode.NOT_FOUND, failure
    assert unknown.code == grpc.StatusCode.NOT_FOUND, unknown
    assert failure.reason == unknown.reason
    assert (failure.resource or ("", ""))[0] == (unknown.resource or ("", ""))[0]
    assert failure.resource is None or failure.resource[1] == victim_id, failure
    assert unknown.resource is None or unknown.resource[1] == fresh_id, unknown
    return failure


async def internal_refused(attack: Attack, call: Callable[[Any], Awaitable[Any]]) -> None:
    """A user's token is refused outright; a service token minted for B finds nothing of A's."""
    refused = await failure_of(call(attack.b))
    assert refused.code == grpc.StatusCode.PERMISSION_DENIED
    assert refused.reason == "INTERNAL_ONLY"
    hidden = await failure_of(call(attack.b_service()))
    assert hidden.code == grpc.StatusCode.NOT_FOUND, hidden


def mentions_victim(message: Message | str | bytes, victim: Victim) -> list[str]:
    """Identifiers of the victim that appear in an answer."""
    if isinstance(message, Message):
        text = json_format.MessageToJson(message)
    elif isinstance(message, bytes):
        text = message.decode(errors="replace")
    else:
        text = message
    secrets = {
        "tenant id": victim.tenant.id,
        "domain id": victim.domain.id,
        "domain name": victim.domain.name,
        "email id": victim.email_id,
        "api key id": victim.api_key_id,
        "relay host": victim.relay_host,
        "template id": victim.template.id,
        "suppressed address": victim.suppression.address,
        "event id": victim.event_id,
        "webhook id": victim.webhook.id,
        "webhook url": victim.webhook.url,
        "route id": victim.route.id,
        "inbound message id": victim.inbound.id,
    }
    return [label for label, value in secrets.items() if value in text]


# --- one case per rpc ----------------------------------------------------------------------

Case = Callable[[Attack], Awaitable[None]]
CASES: dict[str, Case] = {}


def case(*rpcs: str) -> Callable[[Case], Case]:
    """Register a case for the named rpcs (full names)."""

    def register(function: Case) -> Case:
        for rpc in rpcs:
            assert rpc not in CASES, rpc
            CASES[rpc] = function
        return function

    return register


D, H, K, M, S, W = (
    "azora.domain.v1.DomainService.",
    "azora.health.v1.SuiteHealthService.",
    "azora.iam.v1.ApiKeyService.",
    "azora.mail.v1.MailService.",
    "azora.smtp.v1.SmtpService.",
    "azora.mail.v1.WebhookService.",
)
EV, SU = "azora.mail.v1.EventService.", "azora.mail.v1.SuppressionService."
RO, IN = "azora.domain.v1.RouteService.", "azora.mail.v1.InboundService."


@case(D + "ListDomains")
async def _list_domains(a: Attack) -> None:
    listed = await a.stubs.domains.ListDomains(domain_pb2.ListDomainsRequest(), metadata=a.b)
    assert [d.id for d in listed.domains] == []
    assert listed.total_size == 0


@case(D + "CreateDomain")
async def _create_domain(a: Attack) -> None:
    # B may register the same name (ownership is proven by DNS, and VerifyDomain refuses a name
    # another tenant holds), but gets its own pending domain, never A's.
    created = await a.stubs.domains.CreateDomain(
        domain_pb2.CreateDomainRequest(name=a.victim.domain.name), metadata=a.b
    )
    assert created.id != a.victim.domain.id
    assert created.status == domain_pb2.DOMAIN_STATUS_PENDING
    assert created.verification_token != a.victim.domain.verification_token


@case(D + "GetDomain", D + "UpdateDnsRecords", D + "VerifyDomain", D + "DeleteDomain")
async def _domain_object(a: Attack) -> None:
    stub, b = a.stubs.domains, a.b
    record = domain_pb2.DnsRecord(type="A", name="x", value="192.0.2.1")
    calls: list[Callable[[str], Awaitable[Any]]] = [
        lambda i: stub.GetDomain(domain_pb2.GetDomainRequest(id=i), metadata=b),
        lambda i: stub.UpdateDnsRecords(
            domain_pb2.UpdateDnsRecordsRequest(id=i, records=[record]), metadata=b
        ),
        lambda i: stub.VerifyDomain(domain_pb2.VerifyDomainRequest(id=i), metadata=b),
        lambda i: stub.DeleteDomain(domain_pb2.DeleteDomainRequest(id=i), metadata=b),
    ]
    for call in calls:
        await not_found_like_unknown(call, a.victim.domain.id)


@case(D + "ExportZoneFile")
async def _export_zone(a: Attack) -> None:
    await not_found_like_unknown(
        lambda i: a.stubs.domains.ExportZoneFile(
            domain_pb2.ExportZoneFileRequest(id=i), metadata=a.b
        ),
        a.victim.domain.id,
    )


@case(H + "GetHealth", H + "GetReadiness", H + "GetHealthMetrics", H + "Ping", H + "GetMetrics")
async def _health(a: Attack) -> None:
    # Anonymous probes and metrics: nothing in them identifies a tenant or its objects.
    answers: list[Message] = [
        await a.health.GetHealth(health_pb2.GetHealthRequest()),
        await a.health.GetReadiness(health_pb2.GetReadinessRequest()),
        await a.health.GetHealthMetrics(health_pb2.GetHealthMetricsRequest()),
        await a.health.Ping(health_pb2.PingRequest()),
    ]
    metrics = await a.health.GetMetrics(health_pb2.GetMetricsRequest())
    for answer in answers:
        assert mentions_victim(answer, a.victim) == [], type(answer).__name__
    assert mentions_victim(metrics.data, a.victim) == []


@case(K + "CreateApiKey")
async def _create_api_key(a: Attack) -> None:
    # A key B creates acts as B: it finds none of A's objects.
    created = await a.stubs.api_keys.CreateApiKey(
        api_keys_pb2.CreateApiKeyRequest(name="intruder", scopes=["domains:read"]), metadata=a.b
    )
    with_key = (("authorization", f"Bearer {created.secret}"),)
    await not_found_like_unknown(
        lambda i: a.stubs.domains.GetDomain(domain_pb2.GetDomainRequest(id=i), metadata=with_key),
        a.victim.domain.id,
    )


@case(K + "ListApiKeys")
async def _list_api_keys(a: Attack) -> None:
    listed = await a.stubs.api_keys.ListApiKeys(api_keys_pb2.ListApiKeysRequest(), metadata=a.b)
    assert a.victim.api_key_id not in [k.id for k in listed.api_keys]


@case(K + "RevokeApiKey")
async def _revoke_api_key(a: Attack) -> None:
    await not_found_like_unknown(
        lambda i: a.stubs.api_keys.RevokeApiKey(
            api_keys_pb2.RevokeApiKeyRequest(id=i), metadata=a.b
        ),
        a.victim.api_key_id,
    )


@case(K + "ResolveApiKey")
async def _resolve_api_key(a: Attack) -> None:
    # Internal (the other services call it with a service token): neither B's credentials nor
    # an anonymous caller learns which tenant a secret belongs to, even with the exact secret.
    near_miss = a.victim.api_key_secret[:-1] + ("A" if a.victim.api_key_secret[-1] != "A" else "B")
    for secret in (a.victim.api_key_secret, near_miss, ""):
        for metadata in (a.b, ()):
            failure = await failure_of(
                a.stubs.api_keys.ResolveApiKey(
                    api_keys_pb2.ResolveApiKeyRequest(secret=secret), metadata=metadata
                )
            )
            assert failure.code == grpc.StatusCode.PERMISSION_DENIED
            assert mentions_victim(failure.message, a.victim) == []


@case(M + "SendEmail")
async def _send_email(a: Attack) -> None:
    # B cannot send as A's verified domain.
    failure = await failure_of(
        a.stubs.mail.SendEmail(
            mail_pb2.SendEmailRequest(
                from_address=f"ceo@{a.victim.domain.name}", to=["x@example.org"], text="hi"
            ),
            metadata=a.b,
        )
    )
    # The same answer as for a domain nobody registered: not an active domain of B's.
    assert failure.code == grpc.StatusCode.FAILED_PRECONDITION
    assert failure.reason == "SENDER_DOMAIN_NOT_ACTIVE"
    assert a.victim.tenant.id not in failure.message
    listed = await a.stubs.mail.ListEmails(mail_pb2.ListEmailsRequest(), metadata=a.b)
    assert list(listed.emails) == []


@case(M + "SubmitMessage")
async def _submit_message(a: Attack) -> None:
    # The SMTP hand-over: B cannot send as A's domain, neither in From nor as envelope sender.
    own = f"b@{unique_domain()}"
    for header_from, envelope_from in (
        (f"ceo@{a.victim.domain.name}", own),
        (own, f"ceo@{a.victim.domain.name}"),
        (f"ceo@{a.victim.domain.name}", f"ceo@{a.victim.domain.name}"),
    ):
        failure = await failure_of(
            a.stubs.mail.SubmitMessage(
                mail_pb2.SubmitMessageRequest(
                    raw_message=f"From: {header_from}\r\nSubject: x\r\n\r\nhi\r\n".encode(),
                    envelope_from=envelope_from,
                    envelope_to=["x@example.org"],
                ),
                metadata=a.b,
            )
        )
        assert failure.code == grpc.StatusCode.FAILED_PRECONDITION, failure
        assert a.victim.tenant.id not in failure.message
        assert a.victim.domain.id not in repr(failure)
    listed = await a.stubs.mail.ListEmails(mail_pb2.ListEmailsRequest(), metadata=a.b)
    assert list(listed.emails) == []


@case(M + "ListEmails")
async def _list_emails(a: Attack) -> None:
    for request in (
        mail_pb2.ListEmailsRequest(),
        mail_pb2.ListEmailsRequest(domain_id=a.victim.domain.id),
        # Test emails: B's test partition holds none of A's.
        mail_pb2.ListEmailsRequest(test=True),
        mail_pb2.ListEmailsRequest(test=True, recipient="delivered@simulator.azora.test"),
    ):
        # A filter is a filter: A's domain id matches none of B's emails (no NOT_FOUND that
        # would tell B the id exists).
        listed = await a.stubs.mail.ListEmails(request, metadata=a.b)
        assert list(listed.emails) == []


@case(M + "GetEmailStats")
async def _email_stats(a: Attack) -> None:
    for request in (
        mail_pb2.GetEmailStatsRequest(),
        mail_pb2.GetEmailStatsRequest(domain_id=a.victim.domain.id),
        mail_pb2.GetEmailStatsRequest(test=True),
    ):
        stats = await a.stubs.mail.GetEmailStats(request, metadata=a.b)
        assert sum(c.count for c in stats.counts) == 0
        assert list(stats.domains) == []
        assert mentions_victim(stats, a.victim) == []


@case(M + "GetEmail", M + "ResendEmail", M + "DeleteEmail", M + "RescheduleEmail")
async def _email_object(a: Attack) -> None:
    stub, b = a.stubs.mail, a.b
    calls: list[Callable[[str], Awaitable[Any]]] = [
        lambda i: stub.GetEmail(mail_pb2.GetEmailRequest(id=i), metadata=b),
        lambda i: stub.ResendEmail(mail_pb2.ResendEmailRequest(id=i), metadata=b),
        lambda i: stub.DeleteEmail(mail_pb2.DeleteEmailRequest(id=i), metadata=b),
    ]
    if hasattr(mail_pb2, "RescheduleEmailRequest"):  # newer than some of these tests' peers
        later = timestamp_pb2.Timestamp()
        later.FromDatetime(datetime.now(UTC) + timedelta(days=1))
        calls.append(
            lambda i: stub.RescheduleEmail(  # type: ignore[attr-defined,unused-ignore]
                mail_pb2.RescheduleEmailRequest(id=i, send_at=later),  # type: ignore[attr-defined,unused-ignore]
                metadata=b,
            )
        )
    for call in calls:
        await not_found_like_unknown(call, a.victim.email_id)
        await not_found_like_unknown(call, a.victim.test_email_id)


@case(M + "SendEmailBatch")
async def _send_email_batch(a: Attack) -> None:
    # Neither A's domain nor A's template can be borrowed from a batch: each message gets the
    # answer of something that does not exist for B.
    answer = await a.stubs.mail.SendEmailBatch(
        mail_pb2.SendEmailBatchRequest(
            messages=[
                mail_pb2.SendEmailRequest(
                    from_address=f"ceo@{a.victim.domain.name}", to=["x@example.org"], text="hi"
                ),
                mail_pb2.SendEmailRequest(
                    from_address=f"ceo@{a.victim.domain.name}",
                    to=["x@example.org"],
                    template=a.victim.template.id,
                ),
                mail_pb2.SendEmailRequest(
                    from_address=f"ceo@{a.victim.domain.name}",
                    to=["x@example.org"],
                    template=a.victim.template.name,
                ),
            ]
        ),
        metadata=a.b,
    )
    assert answer.accepted_count == 0
    assert [r.error.reason for r in answer.results] == [
        "SENDER_DOMAIN_NOT_ACTIVE",
        "TEMPLATE_NOT_FOUND",
        "TEMPLATE_NOT_FOUND",
    ]
    for result in answer.results:
        assert a.victim.tenant.id not in result.error.message
    listed = await a.stubs.mail.ListEmails(mail_pb2.ListEmailsRequest(), metadata=a.b)
    assert list(listed.emails) == []


@case(M + "CreateTemplate", M + "ListTemplates")
async def _template_create_list(a: Attack) -> None:
    # Names are per tenant: B may use A's template name, which creates B's own template and
    # leaves A's alone (checked by `intact`); B's list never shows A's.
    listed = await a.stubs.mail.ListTemplates(mail_pb2.ListTemplatesRequest(), metadata=a.b)
    assert list(listed.templates) == []
    mine = await a.stubs.mail.CreateTemplate(
        mail_pb2.CreateTemplateRequest(name=a.victim.template.name, subject="s", text="t"),
        metadata=a.b,
    )
    assert mine.id != a.victim.template.id
    listed = await a.stubs.mail.ListTemplates(mail_pb2.ListTemplatesRequest(), metadata=a.b)
    assert [t.id for t in listed.templates] == [mine.id]
    assert mentions_victim(listed, a.victim) == []


@case(
    M + "GetTemplate",
    M + "UpdateTemplate",
    M + "DeleteTemplate",
    M + "PublishTemplate",
    M + "ListTemplateVersions",
    M + "RenderTemplate",
)
async def _template_object(a: Attack) -> None:
    stub, b = a.stubs.mail, a.b
    calls: list[Callable[[str], Awaitable[Any]]] = [
        lambda i: stub.GetTemplate(mail_pb2.GetTemplateRequest(id=i), metadata=b),
        lambda i: stub.UpdateTemplate(
            mail_pb2.UpdateTemplateRequest(id=i, name="taken-over", subject="s", text="t"),
            metadata=b,
        ),
        lambda i: stub.DeleteTemplate(mail_pb2.DeleteTemplateRequest(id=i), metadata=b),
        lambda i: stub.PublishTemplate(mail_pb2.PublishTemplateRequest(id=i), metadata=b),
        lambda i: stub.ListTemplateVersions(mail_pb2.ListTemplateVersionsRequest(id=i), metadata=b),
        lambda i: stub.RenderTemplate(mail_pb2.RenderTemplateRequest(id=i, version=1), metadata=b),
    ]
    for call in calls:
        await not_found_like_unknown(call, a.victim.template.id)
        # By name, too: A's name means nothing in B's tenant.
        by_name = await failure_of(call(a.victim.template.name))
        assert by_name.code == grpc.StatusCode.NOT_FOUND
        assert by_name.reason == "TEMPLATE_NOT_FOUND"


@case(M + "GetDeliveryHealth")
async def _delivery_health(a: Attack) -> None:
    # Internal and cross-tenant by design (the suite health report asks it): no user token,
    # whatever its scopes, reaches it. (The anonymous health case checks what it surfaces.)
    refused = await failure_of(
        a.stubs.mail.GetDeliveryHealth(  # type: ignore[attr-defined,unused-ignore]
            mail_pb2.GetDeliveryHealthRequest(),  # type: ignore[attr-defined,unused-ignore]
            metadata=a.b,
        )
    )
    assert refused.code == grpc.StatusCode.PERMISSION_DENIED
    assert refused.reason == "INTERNAL_ONLY"


@case(M + "CancelDomainEmails")
async def _cancel_domain_emails(a: Attack) -> None:
    # Internal (the domain service's deletion cascade): a user token is refused; a service
    # token minted for B cancels nothing of A's, even naming A's domain (checked by `intact`).
    stub, domain_id = a.stubs.mail, a.victim.domain.id
    refused = await failure_of(
        stub.CancelDomainEmails(
            mail_pb2.CancelDomainEmailsRequest(domain_id=domain_id), metadata=a.b
        )
    )
    assert refused.code == grpc.StatusCode.PERMISSION_DENIED
    assert refused.reason == "INTERNAL_ONLY"
    answer = await stub.CancelDomainEmails(
        mail_pb2.CancelDomainEmailsRequest(domain_id=domain_id), metadata=a.b_service()
    )
    assert (answer.cancelled_count, answer.in_delivery_count) == (0, 0)


@case(
    S + "GetSmtpConfig",
    S + "UpdateSmtpConfig",
    S + "TestSmtpConnection",
    S + "GenerateDkimKey",
    S + "ListDkimKeys",
    S + "ActivateDkimKey",
    S + "GenerateSpfRecord",
    S + "GenerateDmarcRecord",
    S + "CheckDnsRecords",
)
async def _smtp_domain_object(a: Attack) -> None:
    stub, b, selector = a.stubs.smtp, a.b, a.victim.selector
    calls: list[Callable[[str], Awaitable[Any]]] = [
        lambda d: stub.GetSmtpConfig(smtp_pb2.GetSmtpConfigRequest(domain_id=d), metadata=b),
        lambda d: stub.UpdateSmtpConfig(
            smtp_pb2.UpdateSmtpConfigRequest(domain_id=d, host="smtp.example.com", port=587),
            metadata=b,
        ),
        lambda d: stub.TestSmtpConnection(
            smtp_pb2.TestSmtpConnectionRequest(domain_id=d), metadata=b
        ),
        # An ad-hoc config does not make another tenant's domain usable either.
        lambda d: stub.TestSmtpConnection(
            smtp_pb2.TestSmtpConnectionRequest(
                domain_id=d,
                config=smtp_pb2.UpdateSmtpConfigRequest(host="smtp.example.com", port=587),
            ),
            metadata=b,
        ),
        lambda d: stub.GenerateDkimKey(smtp_pb2.GenerateDkimKeyRequest(domain_id=d), metadata=b),
        lambda d: stub.ListDkimKeys(smtp_pb2.ListDkimKeysRequest(domain_id=d), metadata=b),
        lambda d: stub.ActivateDkimKey(
            smtp_pb2.ActivateDkimKeyRequest(domain_id=d, selector=selector), metadata=b
        ),
        lambda d: stub.GenerateSpfRecord(
            smtp_pb2.GenerateSpfRecordRequest(domain_id=d), metadata=b
        ),
        lambda d: stub.GenerateDmarcRecord(
            smtp_pb2.GenerateDmarcRecordRequest(domain_id=d, policy="none"),
            metadata=b,
        ),
        lambda d: stub.CheckDnsRecords(smtp_pb2.CheckDnsRecordsRequest(domain_id=d), metadata=b),
    ]
    for call in calls:
        await not_found_like_unknown(call, a.victim.domain.id)


@case(S + "GetRelayCredentials", S + "GetSigningKey", S + "DeleteDomainData")
async def _smtp_internal(a: Attack) -> None:
    stub, domain_id = a.stubs.smtp, a.victim.domain.id
    await internal_refused(
        a,
        lambda m: stub.GetRelayCredentials(
            smtp_pb2.GetRelayCredentialsRequest(domain_id=domain_id), metadata=m
        ),
    )
    # Naming A's tenant in the request does not widen a service token minted for B.
    hidden = await failure_of(
        stub.GetRelayCredentials(
            smtp_pb2.GetRelayCredentialsRequest(domain_id=domain_id, tenant_id=a.victim.tenant.id),
            metadata=a.b_service(),
        )
    )
    assert hidden.code == grpc.StatusCode.NOT_FOUND
    await internal_refused(
        a,
        lambda m: stub.GetSigningKey(
            smtp_pb2.GetSigningKeyRequest(domain_id=domain_id), metadata=m
        ),
    )
    # DeleteDomainData for a domain B does not own deletes nothing (checked by `intact`): it is
    # idempotent, so it succeeds as a no-op, exactly as for a domain with nothing stored.
    refused = await failure_of(
        stub.DeleteDomainData(smtp_pb2.DeleteDomainDataRequest(domain_id=domain_id), metadata=a.b)
    )
    assert refused.code == grpc.StatusCode.PERMISSION_DENIED
    await stub.DeleteDomainData(
        smtp_pb2.DeleteDomainDataRequest(domain_id=domain_id), metadata=a.b_service()
    )


@case(EV + "ListEvents")
async def _list_events(a: Attack) -> None:
    # No filter, not even A's email id or A's recipient, shows A's event to B.
    stub, v = a.stubs.events, a.victim
    for request in (
        events_pb2.ListEventsRequest(),
        events_pb2.ListEventsRequest(email_id=v.email_id),
        events_pb2.ListEventsRequest(recipient="someone@example.org"),
        events_pb2.ListEventsRequest(domain=v.domain.name, type="accepted"),
    ):
        listed = await stub.ListEvents(request, metadata=a.b)
        assert list(listed.events) == []


@case(SU + "GetSuppression", SU + "DeleteSuppression")
async def _suppression_object(a: Attack) -> None:
    # A's suppressed address is NOT_FOUND for B, exactly like an address nobody suppressed.
    stub, b = a.stubs.suppressions, a.b
    fresh = f"{new_id()}@example.org"
    for call in (
        lambda addr: stub.GetSuppression(
            suppressions_pb2.GetSuppressionRequest(address=addr), metadata=b
        ),
        lambda addr: stub.DeleteSuppression(
            suppressions_pb2.DeleteSuppressionRequest(address=addr), metadata=b
        ),
    ):
        failure = await failure_of(call(a.victim.suppression.address))
        unknown = await failure_of(call(fresh))
        assert failure.code == unknown.code == grpc.StatusCode.NOT_FOUND, failure
        assert failure.reason == unknown.reason == "SUPPRESSION_NOT_FOUND"
        assert failure.resource == ("Suppression", a.victim.suppression.address)


@case(SU + "ListSuppressions", SU + "AddSuppressions")
async def _suppression_list(a: Attack) -> None:
    # B's list never shows A's entries; B adding the same address makes B's own entry and
    # leaves A's as it was (checked by `intact`).
    stub, b, address = a.stubs.suppressions, a.b, a.victim.suppression.address
    for request in (
        suppressions_pb2.ListSuppressionsRequest(),
        suppressions_pb2.ListSuppressionsRequest(domain="example.org", reason="manual"),
        suppressions_pb2.ListSuppressionsRequest(address_prefix=address[:8]),
    ):
        listed = await stub.ListSuppressions(request, metadata=b)
        assert list(listed.suppressions) == []
    added = await stub.AddSuppressions(
        suppressions_pb2.AddSuppressionsRequest(addresses=[address]), metadata=b
    )
    assert added.added_count == 1
    listed = await stub.ListSuppressions(suppressions_pb2.ListSuppressionsRequest(), metadata=b)
    assert [s.address for s in listed.suppressions] == [address]
    assert listed.suppressions[0].create_time != a.victim.suppression.create_time


@case(W + "CreateWebhook", W + "ListWebhooks")
async def _webhook_create_list(a: Attack) -> None:
    # B's list never shows A's endpoint; an endpoint B creates (even with A's URL) is B's own.
    stub = a.stubs.webhooks
    listed = await stub.ListWebhooks(webhooks_pb2.ListWebhooksRequest(), metadata=a.b)
    assert list(listed.webhooks) == []
    mine = await stub.CreateWebhook(
        webhooks_pb2.CreateWebhookRequest(url=a.victim.webhook.url), metadata=a.b
    )
    assert mine.id != a.victim.webhook.id
    listed = await stub.ListWebhooks(webhooks_pb2.ListWebhooksRequest(), metadata=a.b)
    assert [w.id for w in listed.webhooks] == [mine.id]
    assert mentions_victim(listed, a.victim) == ["webhook url"]


@case(
    W + "GetWebhook",
    W + "UpdateWebhook",
    W + "DeleteWebhook",
    W + "TestWebhook",
    W + "RotateWebhookSecret",
    W + "ListWebhookDeliveries",
)
async def _webhook_object(a: Attack) -> None:
    stub, b = a.stubs.webhooks, a.b
    calls: list[Callable[[str], Awaitable[Any]]] = [
        lambda i: stub.GetWebhook(webhooks_pb2.GetWebhookRequest(id=i), metadata=b),
        lambda i: stub.UpdateWebhook(
            webhooks_pb2.UpdateWebhookRequest(id=i, url="https://intruder.example/"),
            metadata=b,
        ),
        lambda i: stub.DeleteWebhook(webhooks_pb2.DeleteWebhookRequest(id=i), metadata=b),
        lambda i: stub.TestWebhook(webhooks_pb2.TestWebhookRequest(id=i), metadata=b),
        lambda i: stub.RotateWebhookSecret(
            webhooks_pb2.RotateWebhookSecretRequest(id=i), metadata=b
        ),
        lambda i: stub.ListWebhookDeliveries(
            webhooks_pb2.ListWebhookDeliveriesRequest(id=i), metadata=b
        ),
    ]
    for call in calls:
        await not_found_like_unknown(call, a.victim.webhook.id)


@case(W + "ReplayWebhookDelivery")
async def _webhook_replay(a: Attack) -> None:
    # Neither through A's endpoint nor through an endpoint of B's own.
    stub, b, delivery = a.stubs.webhooks, a.b, a.victim.webhook_delivery_id
    await not_found_like_unknown(
        lambda i: stub.ReplayWebhookDelivery(
            webhooks_pb2.ReplayWebhookDeliveryRequest(id=i, delivery_id=delivery), metadata=b
        ),
        a.victim.webhook.id,
    )
    mine = await stub.CreateWebhook(
        webhooks_pb2.CreateWebhookRequest(url="https://intruder.example/"), metadata=b
    )
    failure = await failure_of(
        stub.ReplayWebhookDelivery(
            webhooks_pb2.ReplayWebhookDeliveryRequest(id=mine.id, delivery_id=delivery),
            metadata=b,
        )
    )
    assert failure.code == grpc.StatusCode.NOT_FOUND
    assert failure.reason == "WEBHOOK_DELIVERY_NOT_FOUND"


@case(
    RO + "ListRoutes", RO + "CreateRoute", RO + "GetRoute", RO + "UpdateRoute", RO + "DeleteRoute"
)
async def _routes(a: Attack) -> None:
    # A's domain is NOT_FOUND for B's route rpcs, exactly like a domain that does not exist.
    stub, b, v = a.stubs.routes, a.b, a.victim
    calls: list[Callable[[str], Awaitable[Any]]] = [
        lambda d: stub.ListRoutes(routes_pb2.ListRoutesRequest(domain_id=d), metadata=b),
        lambda d: stub.CreateRoute(
            routes_pb2.CreateRouteRequest(domain_id=d, match="*", action="store"), metadata=b
        ),
        lambda d: stub.GetRoute(routes_pb2.GetRouteRequest(domain_id=d, id=v.route.id), metadata=b),
        lambda d: stub.UpdateRoute(
            routes_pb2.UpdateRouteRequest(domain_id=d, id=v.route.id, match="*", action="store"),
            metadata=b,
        ),
        lambda d: stub.DeleteRoute(
            routes_pb2.DeleteRouteRequest(domain_id=d, id=v.route.id), metadata=b
        ),
    ]
    for call in calls:
        failure = await not_found_like_unknown(call, v.domain.id)
        assert failure.reason == "DOMAIN_NOT_FOUND"
    # Nor can B's own domain route mail to A's webhook endpoint: it is not one of B's.
    own = await a.stubs.domains.CreateDomain(
        domain_pb2.CreateDomainRequest(name=f"b-{new_id()}.example"), metadata=b
    )
    for webhook_id in (v.webhook.id, new_id()):
        failure = await failure_of(
            stub.CreateRoute(
                routes_pb2.CreateRouteRequest(
                    domain_id=own.id, match="*", action="webhook", webhook_id=webhook_id
                ),
                metadata=b,
            )
        )
        assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "webhookId" in failure.field_violations
    await a.stubs.domains.DeleteDomain(domain_pb2.DeleteDomainRequest(id=own.id), metadata=b)


@case(RO + "ResolveInboundRecipient")
async def _resolve_inbound_recipient(a: Attack) -> None:
    # Only services may resolve recipients; it reads across tenants by design (the inbound
    # server does not know whose mail it is before the answer), so a user token is refused.
    stub = a.stubs.routes
    request = routes_pb2.ResolveInboundRecipientRequest(address=f"x@{a.victim.domain.name}")
    refused = await failure_of(stub.ResolveInboundRecipient(request, metadata=a.b))
    assert (refused.code, refused.reason) == (grpc.StatusCode.PERMISSION_DENIED, "INTERNAL_ONLY")


@case(IN + "ListInboundMessages")
async def _list_inbound(a: Attack) -> None:
    # B's list never shows A's received message.
    listed = await a.stubs.inbound.ListInboundMessages(
        inbound_pb2.ListInboundMessagesRequest(), metadata=a.b
    )
    assert list(listed.messages) == []


@case(IN + "GetInboundMessage", IN + "GetInboundMessageRaw")
async def _inbound_object(a: Attack) -> None:
    # A's received message is NOT_FOUND for B, exactly like an id nobody has.
    stub, b = a.stubs.inbound, a.b
    for call in (
        lambda i: stub.GetInboundMessage(inbound_pb2.GetInboundMessageRequest(id=i), metadata=b),
        lambda i: stub.GetInboundMessageRaw(
            inbound_pb2.GetInboundMessageRawRequest(id=i), metadata=b
        ),
    ):
        failure = await not_found_like_unknown(call, a.victim.inbound.id)
        assert failure.reason == "INBOUND_MESSAGE_NOT_FOUND"


@case(IN + "StoreInboundMessage")
async def _store_inbound(a: Attack) -> None:
    # A user token is refused; a service token minted for B stores B's own record, never A's.
    v = a.victim

    def store(metadata: Any) -> Awaitable[inbound_pb2.InboundMessage]:
        return a.stubs.inbound.StoreInboundMessage(
            inbound_pb2.StoreInboundMessageRequest(
                raw_message=b"Subject: x\r\n\r\nx\r\n",
                recipient=f"x@{v.domain.name}",
                domain_id=v.domain.id,
                route_id=v.route.id,
                action="store",
            ),
            metadata=metadata,
        )

    refused = await failure_of(store(a.b))
    assert (refused.code, refused.reason) == (grpc.StatusCode.PERMISSION_DENIED, "INTERNAL_ONLY")
    stored = await store(a.b_service())
    listed = await a.stubs.inbound.ListInboundMessages(
        inbound_pb2.ListInboundMessagesRequest(), metadata=a.b
    )
    assert [m.id for m in listed.messages] == [stored.id]
    assert stored.id != v.inbound.id
    # A webhook action naming A's endpoint under B's token sends nothing to A's endpoint.
    borrowed = await a.stubs.inbound.StoreInboundMessage(
        inbound_pb2.StoreInboundMessageRequest(
            raw_message=b"Subject: borrow\r\n\r\nx\r\n",
            recipient=f"x@{v.domain.name}",
            domain_id=v.domain.id,
            route_id=v.route.id,
            action="webhook",
            webhook_id=v.webhook.id,
        ),
        metadata=a.b_service(),
    )
    assert (borrowed.outcome, borrowed.webhook_delivery_id) == ("failed", "")
    log = await a.stubs.webhooks.ListWebhookDeliveries(
        webhooks_pb2.ListWebhookDeliveriesRequest(id=v.webhook.id), metadata=v.tenant.metadata
    )
    assert [d.event_type for d in log.deliveries if d.event_type == "inbound.received"] == []


@case(IN + "ReceiveBounceMessage")
async def _receive_bounce(a: Attack) -> None:
    # A user token is refused; whoever the service token was minted for, the tenant of a report
    # comes from an authentic return path only: a forged one is kept under no tenant, listed
    # for nobody, and changes nobody's email.
    v = a.victim

    def receive(metadata: Any) -> Awaitable[inbound_pb2.InboundMessage]:
        return a.stubs.inbound.ReceiveBounceMessage(
            inbound_pb2.ReceiveBounceMessageRequest(
                raw_message=b"Subject: x\r\n\r\nx\r\n",
                recipient=f"bounce-{'a' * 52}@bounces.{v.domain.name}",
            ),
            metadata=metadata,
        )

    refused = await failure_of(receive(a.b))
    assert (refused.code, refused.reason) == (grpc.StatusCode.PERMISSION_DENIED, "INTERNAL_ONLY")
    kept = await receive(a.b_service())
    assert kept.outcome.startswith("ignored: not an authentic return path")
    for tenant in (a.b, v.tenant.metadata):
        listed = await a.stubs.inbound.ListInboundMessages(
            inbound_pb2.ListInboundMessagesRequest(), metadata=tenant
        )
        assert kept.id not in [m.id for m in listed.messages]


# --- fixtures and the test -------------------------------------------------------------------


@pytest.fixture(scope="module")
async def victim(
    settings: Settings, stack_stubs: GrpcStubs, knot_server: KnotServer
) -> AsyncIterator[Victim]:
    """Tenant A's domain (verified, relay, DKIM, SPF, DMARC), email, API key, template."""
    owner = new_tenant(settings)
    stubs, m = stack_stubs, owner.metadata
    name = unique_domain("isolation.test")
    domain = await stubs.domains.CreateDomain(domain_pb2.CreateDomainRequest(name=name), metadata=m)
    knot_server.set_zone(name, [("@", "TXT", f'"azora-verify={domain.verification_token}"')])
    verified = await stubs.domains.VerifyDomain(
        domain_pb2.VerifyDomainRequest(id=domain.id), metadata=m
    )
    assert verified.domain.status == domain_pb2.DOMAIN_STATUS_ACTIVE
    relay_host = f"relay-{new_id()}.example.net"
    await stubs.smtp.UpdateSmtpConfig(
        smtp_pb2.UpdateSmtpConfigRequest(
            domain_id=domain.id, host=relay_host, port=587, username="a", password="pw-of-a"
        ),
        metadata=m,
    )
    key = await stubs.smtp.GenerateDkimKey(
        smtp_pb2.GenerateDkimKeyRequest(domain_id=domain.id, algorithm="ed25519"),
        metadata=m,
    )
    await stubs.smtp.GenerateSpfRecord(
        smtp_pb2.GenerateSpfRecordRequest(domain_id=domain.id), metadata=m
    )
    await stubs.smtp.GenerateDmarcRecord(
        smtp_pb2.GenerateDmarcRecordRequest(domain_id=domain.id, policy="none"),
        metadata=m,
    )
    email = await stubs.mail.SendEmail(
        mail_pb2.SendEmailRequest(
            from_address=f"app@{name}", to=["someone@example.org"], subject="s", text="t"
        ),
        metadata=m,
    )
    api_key = await stubs.api_keys.CreateApiKey(
        api_keys_pb2.CreateApiKeyRequest(name="owner", scopes=["domains:read"]), metadata=m
    )
    test_key = await stubs.api_keys.CreateApiKey(
        api_keys_pb2.CreateApiKeyRequest(name="owner-ci", scopes=["emails:send"], test=True),
        metadata=m,
    )
    test_email = await stubs.mail.SendEmail(
        mail_pb2.SendEmailRequest(
            from_address=f"app@{name}",
            to=["delivered@simulator.azora.test"],
            subject="s",
            text="t",
        ),
        metadata=(("authorization", f"Bearer {test_key.secret}"),),
    )
    assert test_email.test
    template = await stubs.mail.CreateTemplate(
        mail_pb2.CreateTemplateRequest(
            name=f"owner-{new_id()}", subject="Hi {{ name }}", text="Hello {{ name }}"
        ),
        metadata=m,
    )
    await stubs.mail.PublishTemplate(mail_pb2.PublishTemplateRequest(id=template.id), metadata=m)
    template = await stubs.mail.GetTemplate(mail_pb2.GetTemplateRequest(id=template.id), metadata=m)
    added = await stubs.suppressions.AddSuppressions(
        suppressions_pb2.AddSuppressionsRequest(addresses=[f"victim-{new_id()}@example.org"]),
        metadata=m,
    )
    # A's email's accepted event (recorded with the email), published now rather than by
    # the service's next publisher run.
    client: AsyncMongoClient[Document] = AsyncMongoClient(settings.mongodb_uri, tz_aware=True)
    db = client[settings.mongodb_database]
    doc = await db["emails"].find_one({"_id": email.id}, {OUTBOX_FIELD: 1})
    assert doc is not None
    await EventPublisher(db, clock=SystemClock()).copy_outbox([doc])
    (accepted,) = [e for e in doc[OUTBOX_FIELD] if e["type"] == "accepted"]
    await client.close()
    # An endpoint on a closed loopback port: its test attempt fails, but is logged.
    webhook = await stubs.webhooks.CreateWebhook(
        webhooks_pb2.CreateWebhookRequest(url=f"http://127.0.0.1:9/{new_id()}"), metadata=m
    )
    attempt = await stubs.webhooks.TestWebhook(
        webhooks_pb2.TestWebhookRequest(id=webhook.id), metadata=m
    )
    webhook = await stubs.webhooks.GetWebhook(
        webhooks_pb2.GetWebhookRequest(id=webhook.id), metadata=m
    )
    route = await stubs.routes.CreateRoute(
        routes_pb2.CreateRouteRequest(domain_id=domain.id, match="*", action="store"),
        metadata=m,
    )
    # A received message, stored as the inbound server stores one (a service token for A).
    inbound_tokens = ServiceTokens.from_settings(
        settings, subject="service:inbound", scopes=["emails:write"]
    )
    received = await stubs.inbound.StoreInboundMessage(
        inbound_pb2.StoreInboundMessageRequest(
            raw_message=b"Subject: for A\r\n\r\nhello\r\n",
            recipient=f"someone@{name}",
            domain_id=domain.id,
            route_id=route.id,
            action="store",
        ),
        metadata=inbound_tokens.metadata(owner.id),
    )
    yield Victim(
        tenant=owner,
        domain=verified.domain,
        selector=key.selector,
        email_id=email.id,
        test_email_id=test_email.id,
        api_key_id=api_key.api_key.id,
        api_key_secret=api_key.secret,
        relay_host=relay_host,
        template=template,
        suppression=added.suppressions[0],
        event_id=accepted["_id"],
        webhook=webhook,
        webhook_delivery_id=attempt.delivery_id,
        route=route,
        inbound=received,
    )
    knot_server.remove_zone(name)


async def intact(stubs: GrpcStubs, victim: Victim) -> None:
    """A's objects are all still there, unchanged."""
    m = victim.tenant.metadata
    domain = await stubs.domains.GetDomain(
        domain_pb2.GetDomainRequest(id=victim.domain.id), metadata=m
    )
    assert domain.status == domain_pb2.DOMAIN_STATUS_ACTIVE
    assert list(domain.dns_records) == list(victim.domain.dns_records)
    config = await stubs.smtp.GetSmtpConfig(
        smtp_pb2.GetSmtpConfigRequest(domain_id=victim.domain.id), metadata=m
    )
    assert config.host == victim.relay_host
    assert config.password_set
    keys = await stubs.smtp.ListDkimKeys(
        smtp_pb2.ListDkimKeysRequest(domain_id=victim.domain.id), metadata=m
    )
    assert [k.selector for k in keys.keys] == [victim.selector]
    email = await stubs.mail.GetEmail(mail_pb2.GetEmailRequest(id=victim.email_id), metadata=m)
    assert email.resent_from_id == ""
    assert not email.HasField("send_at")
    resends = await stubs.mail.ListEmails(mail_pb2.ListEmailsRequest(), metadata=m)
    assert [e.id for e in resends.emails] == [victim.email_id]
    tests = await stubs.mail.ListEmails(mail_pb2.ListEmailsRequest(test=True), metadata=m)
    assert [e.id for e in tests.emails] == [victim.test_email_id]
    listed = await stubs.api_keys.ListApiKeys(api_keys_pb2.ListApiKeysRequest(), metadata=m)
    (key,) = [k for k in listed.api_keys if k.id == victim.api_key_id]
    assert not key.HasField("revoke_time")
    template = await stubs.mail.GetTemplate(
        mail_pb2.GetTemplateRequest(id=victim.template.id), metadata=m
    )
    assert template == victim.template
    versions = await stubs.mail.ListTemplateVersions(
        mail_pb2.ListTemplateVersionsRequest(id=victim.template.id), metadata=m
    )
    assert [v.version for v in versions.versions] == [1]
    suppression = await stubs.suppressions.GetSuppression(
        suppressions_pb2.GetSuppressionRequest(address=victim.suppression.address), metadata=m
    )
    assert suppression == victim.suppression
    events = await stubs.events.ListEvents(events_pb2.ListEventsRequest(), metadata=m)
    # (Delivery attempts of the email may have added events of it meanwhile.)
    assert victim.event_id in [e.id for e in events.events]
    assert {e.email_id for e in events.events} <= {victim.email_id, victim.test_email_id}
    webhook = await stubs.webhooks.GetWebhook(
        webhooks_pb2.GetWebhookRequest(id=victim.webhook.id), metadata=m
    )
    assert webhook == victim.webhook
    deliveries = await stubs.webhooks.ListWebhookDeliveries(
        webhooks_pb2.ListWebhookDeliveriesRequest(id=victim.webhook.id), metadata=m
    )
    assert [d.id for d in deliveries.deliveries] == [victim.webhook_delivery_id]
    assert len(deliveries.deliveries[0].attempts) == 1
    routes = await stubs.routes.ListRoutes(
        routes_pb2.ListRoutesRequest(domain_id=victim.domain.id), metadata=m
    )
    assert list(routes.routes) == [victim.route]
    received = await stubs.inbound.ListInboundMessages(
        inbound_pb2.ListInboundMessagesRequest(), metadata=m
    )
    assert list(received.messages) == [victim.inbound]


def test_every_rpc_has_a_case() -> None:
    # A new rpc must come with its isolation case.
    assert set(api_rpcs()) - set(CASES) == set()


@pytest.mark.parametrize("rpc", api_rpcs())
async def test_tenant_b_cannot_reach_tenant_a_objects(
    rpc: str,
    victim: Victim,
    stack_stubs: GrpcStubs,
    rest_stack: RestStack,
    settings: Settings,
) -> None:
    # Each rpc aimed at another tenant's objects finds nothing and changes nothing.
    assert rpc in CASES, f"no object-level authorization case for {rpc}"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{rest_stack.domain.running.port}") as channel:
        attack = Attack(
            stubs=stack_stubs,
            health=health_pb2_grpc.SuiteHealthServiceStub(channel),
            victim=victim,
            intruder=new_tenant(settings),
            service_tokens=ServiceTokens.from_settings(
                settings,
                subject="service:mail",
                scopes=["smtp:read", "smtp:write", "emails:write"],
            ),
            settings=settings,
        )
        await CASES[rpc](attack)
    await intact(stack_stubs, victim)
