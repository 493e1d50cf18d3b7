"""Mass assignment (OWASP API3): a client cannot set what the server owns.

Over REST, create and update bodies are stuffed with every output-only field of the resource
(ids, tenant, status, verification state, secrets, timestamps, counters); over gRPC, the few
output-only fields that request messages carry (found in the descriptors, so a new one needs a
case here) are set. Each is ignored or refused, and what is stored (read back from the database,
not only from the answer) is the server's value.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import grpc
import pytest
from azora.domain.v1 import domain_pb2
from azora.mail.v1 import mail_pb2
from google.api import field_behavior_pb2
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor
from pymongo.asynchronous.database import AsyncDatabase

from services.core.ids import new_id
from services.core.mongo import Document
from tests.conftest import Tenant, unique_domain
from tests.security.conftest import GrpcStubs, bearer, sending_domain
from tests.support.dns_server import KnotServer
from tests.support.grpc_errors import decode

LONG_AGO = "2001-01-01T00:00:00Z"
FORGED_ID = new_id()
SERVICES = (
    "azora.domain.v1.DomainService",
    "azora.smtp.v1.SmtpService",
    "azora.mail.v1.MailService",
    "azora.iam.v1.ApiKeyService",
)


def _output_only_fields(message: Descriptor, prefix: str = "") -> Iterator[str]:
    for field in message.fields:
        behaviours = field.GetOptions().Extensions[field_behavior_pb2.field_behavior]
        if field_behavior_pb2.OUTPUT_ONLY in behaviours:
            yield prefix + field.name
        nested = field.message_type
        if nested is not None and nested.full_name.startswith("azora.") and nested != message:
            yield from _output_only_fields(nested, f"{prefix}{field.name}.")


def output_only_request_fields() -> set[str]:
    """Names ("Rpc:field.path") of every OUTPUT_ONLY field reachable from a request message."""
    pool = descriptor_pool.Default()
    return {
        f"{method.name}:{path}"
        for service in SERVICES
        for method in pool.FindServiceByName(service).methods
        for path in _output_only_fields(method.input_type)
    }


def test_every_output_only_request_field_has_a_case() -> None:
    # The gRPC cases below cover exactly the output-only fields request messages can carry.
    assert output_only_request_fields() == {
        "UpdateDnsRecords:records.txt_strings",
        "SendEmail:attachments.size_bytes",
        "SendEmailBatch:messages.attachments.size_bytes",
    }


async def test_txt_strings_are_computed_from_the_value(
    stack_stubs: GrpcStubs, tenant_a: Tenant, database: AsyncDatabase[Document]
) -> None:
    # records.txt_strings sent by a client is ignored: the split of the value is stored.
    domain = await stack_stubs.domains.CreateDomain(
        domain_pb2.CreateDomainRequest(name=unique_domain()), metadata=tenant_a.metadata
    )
    record = domain_pb2.DnsRecord(
        type="TXT",
        name="@",
        value="v=spf1 -all",
        txt_strings=["forged", "strings"],
    )
    try:
        updated = await stack_stubs.domains.UpdateDnsRecords(
            domain_pb2.UpdateDnsRecordsRequest(id=domain.id, records=[record]),
            metadata=tenant_a.metadata,
        )
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT  # noqa: PT017 (refusing is fine)
        assert "txt_strings" in str(decode(error).field_violations)  # noqa: PT017
    else:
        assert [list(r.txt_strings) for r in updated.dns_records] == [["v=spf1 -all"]]
    stored = await database["domains"].find_one({"_id": domain.id})
    assert stored is not None
    assert "forged" not in str(stored)


async def test_attachment_size_is_measured_not_taken(
    stack_stubs: GrpcStubs,
    knot_server: KnotServer,
    tenant_a: Tenant,
    database: AsyncDatabase[Document],
) -> None:
    # attachments.size_bytes sent by a client is ignored (or refused): the real size is stored.
    domain = await sending_domain(stack_stubs, knot_server, tenant_a)
    request = mail_pb2.SendEmailRequest(
        from_address=f"app@{domain.name}",
        to=["someone@example.org"],
        text="see attached",
        attachments=[
            mail_pb2.Attachment(
                filename="a.txt", content_type="text/plain", content=b"x" * 1000, size_bytes=1
            )
        ],
    )
    try:
        sent = await stack_stubs.mail.SendEmail(request, metadata=tenant_a.metadata)
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT  # noqa: PT017 (refusing is fine)
        return
    assert [a.size_bytes for a in sent.attachments] == [1000]
    stored = await database["emails"].find_one({"_id": sent.id})
    assert stored is not None
    assert [a.get("size") for a in stored["attachments"]] in ([1000], [None])
    # The same through a batch: the message's forged size is not taken either.
    batch = await stack_stubs.mail.SendEmailBatch(
        mail_pb2.SendEmailBatchRequest(messages=[request]), metadata=tenant_a.metadata
    )
    [result] = batch.results
    if result.error.code:
        assert result.error.code == "INVALID_ARGUMENT"
        return
    stored = await database["emails"].find_one({"_id": result.id})
    assert stored is not None
    assert [a.get("size") for a in stored["attachments"]] == [1000]


# --- REST bodies stuffed with output-only fields ---------------------------------------------


def _stored_time_after(value: object, limit: datetime) -> bool:
    assert isinstance(value, datetime), value
    return value.replace(tzinfo=value.tzinfo or UTC) > limit


async def _post(
    http: aiohttp.ClientSession,
    url: str,
    tenant: Tenant,
    body: dict[str, Any],
    method: str = "POST",
) -> dict[str, Any]:
    """Send the stuffed body; the answer once the fields the request does not have are gone.

    A field the request message does not have is refused by the gateway (400 UNKNOWN_FIELD,
    one at a time, nothing done); it is removed and the rest sent again, so the fields the
    request does have are still shown to be ignored.
    """
    body = dict(body)
    while True:
        async with http.request(method, url, json=body, headers=bearer(tenant)) as response:
            text = await response.text()
            if response.status == 400 and '"UNKNOWN_FIELD"' in text:
                (violation,) = decode_json_violations(text)
                assert violation in body, text  # the stuffed fields are all top-level
                del body[violation]
                continue
            assert response.status == 200, text
            answer: dict[str, Any] = await response.json()
            return answer


def decode_json_violations(text: str) -> list[str]:
    """The BadRequest field names of a Status JSON answer."""
    status = json.loads(text)
    return [
        violation["field"]
        for detail in status["details"]
        if detail["@type"].endswith("google.rpc.BadRequest")
        for violation in detail["fieldViolations"]
    ]


async def test_rest_create_domain_ignores_server_fields(
    http: aiohttp.ClientSession,
    rest_base_url: str,
    tenant_a: Tenant,
    tenant_b: Tenant,
    database: AsyncDatabase[Document],
) -> None:
    # id, status, tenant, verification token and times in a create body are not stored.
    name = unique_domain()
    body = {
        "name": name,
        "id": FORGED_ID,
        "status": "DOMAIN_STATUS_ACTIVE",
        "tenantId": tenant_b.id,
        "tenant_id": tenant_b.id,
        "verificationToken": "chosen-token",
        "verifyTime": LONG_AGO,
        "createTime": LONG_AGO,
        "verificationExpireTime": "2999-01-01T00:00:00Z",
        "requiredRecords": [{"type": "TXT", "name": "@", "value": "x"}],
    }
    created = await _post(http, f"{rest_base_url}/api/v1/domains", tenant_a, body)
    assert created["id"] != FORGED_ID
    assert created["status"] == "DOMAIN_STATUS_PENDING"
    assert created["verificationToken"] != "chosen-token"
    stored = await database["domains"].find_one({"name": name})
    assert stored is not None
    assert stored["_id"] == created["id"]
    assert stored["tenant_id"] == tenant_a.id
    assert stored["status"] == "pending"
    assert await database["domains"].find_one({"_id": FORGED_ID}) is None
    assert await database["domain_claims"].find_one({"_id": name}) is None
    assert _stored_time_after(stored["created_at"], datetime(2020, 1, 1, tzinfo=UTC))


async def test_rest_smtp_config_ignores_server_fields(
    http: aiohttp.ClientSession,
    rest_base_url: str,
    tenant_a: Tenant,
    tenant_b: Tenant,
    database: AsyncDatabase[Document],
) -> None:
    # passwordSet, times and tenant in an update body are not stored.
    domain = await _post(
        http, f"{rest_base_url}/api/v1/domains", tenant_a, {"name": unique_domain()}
    )
    url = f"{rest_base_url}/api/v1/smtp/domains/{domain['id']}/config"
    body = {
        "host": "smtp.example.com",
        "port": 587,
        "passwordSet": True,
        "createTime": LONG_AGO,
        "updateTime": LONG_AGO,
        "tenantId": tenant_b.id,
    }
    config = await _post(http, url, tenant_a, body, method="PUT")
    assert config["passwordSet"] is False
    assert config["updateTime"] != LONG_AGO
    stored = await database["smtp_configs"].find_one({"_id": domain["id"]})
    assert stored is not None
    assert stored["tenant_id"] == tenant_a.id
    assert not stored.get("password")
    assert _stored_time_after(stored["updated_at"], datetime(2020, 1, 1, tzinfo=UTC))


async def test_rest_api_key_ignores_server_fields(
    http: aiohttp.ClientSession,
    rest_base_url: str,
    tenant_a: Tenant,
    database: AsyncDatabase[Document],
) -> None:
    # A client cannot choose the key's secret, id, prefix, or pre-revoke/backdate it.
    chosen_secret = "azk_" + "C" * 43
    body = {
        "name": "k",
        "scopes": ["domains:read"],
        "id": FORGED_ID,
        "secret": chosen_secret,
        "prefix": "azk_CCCC",
        "createTime": LONG_AGO,
        "revokeTime": LONG_AGO,
        "lastUsedTime": LONG_AGO,
        "apiKey": {"id": FORGED_ID, "createTime": LONG_AGO},
    }
    created = await _post(http, f"{rest_base_url}/api/v1/api-keys", tenant_a, body)
    assert created["secret"] != chosen_secret
    assert created["apiKey"]["id"] != FORGED_ID
    stored = await database["api_keys"].find_one({"_id": created["apiKey"]["id"]})
    assert stored is not None
    assert stored["tenant_id"] == tenant_a.id
    assert stored["revoked_at"] is None
    assert stored["last_used_at"] is None
    assert _stored_time_after(stored["created_at"], datetime(2020, 1, 1, tzinfo=UTC))
    assert await database["api_keys"].find_one({"_id": FORGED_ID}) is None


@pytest.mark.parametrize("status", ["EMAIL_STATUS_SENT", "EMAIL_STATUS_CANCELLED"])
async def test_rest_send_email_ignores_server_fields(
    http: aiohttp.ClientSession,
    rest_base_url: str,
    stack_stubs: GrpcStubs,
    knot_server: KnotServer,
    tenant_a: Tenant,
    tenant_b: Tenant,
    database: AsyncDatabase[Document],
    status: str,
) -> None:
    # Status, id, recipients' state, events, attempts, message id and tenant are the server's.
    domain = await sending_domain(stack_stubs, knot_server, tenant_a)
    body = {
        "from": f"app@{domain.name}",
        "to": ["someone@example.org"],
        "text": "hello",
        "id": FORGED_ID,
        "status": status,
        "tenantId": tenant_b.id,
        "domainId": FORGED_ID,
        "messageId": "<forged@example.org>",
        "attempts": 7,
        "events": [{"type": "EMAIL_EVENT_TYPE_SENT"}],
        "recipients": [{"address": "someone@example.org", "status": "RECIPIENT_STATUS_SENT"}],
        "createTime": LONG_AGO,
        "sizeBytes": "1",
        "resentFromId": FORGED_ID,
    }
    sent = await _post(http, f"{rest_base_url}/api/v1/emails", tenant_a, body)
    assert sent["id"] != FORGED_ID
    assert sent["status"] in ("EMAIL_STATUS_QUEUED", "EMAIL_STATUS_SENDING")
    assert sent["domainId"] == domain.id
    assert sent["resentFromId"] == ""
    assert sent["messageId"] != "<forged@example.org>"
    stored = await database["emails"].find_one({"_id": sent["id"]})
    assert stored is not None
    assert stored["tenant_id"] == tenant_a.id
    assert stored["domain_id"] == domain.id
    assert stored["status"] not in ("sent", "cancelled")
    assert stored["attempts"] == 0 or stored["status"] != "queued"
    assert stored.get("resent_from_id") in ("", None)
    assert "forged@example.org" not in str(stored["message_id"])
    assert await database["emails"].find_one({"_id": FORGED_ID}) is None
