"""Unrestricted resource consumption (OWASP API4): hostile JSON and oversized emails.

At the gateway: deeply nested arrays and objects, huge numbers, long strings, malformed and
non-UTF-8 JSON, duplicate keys; each is a clear 4xx google.rpc.Status, never a 5xx, and the
gateway keeps serving. In the mail service: too many recipients, an attachment over
MAX_ATTACHMENT_SIZE, a message over the total size limit, too many tags, a huge subject; each
is a clear error and nothing is stored (no email, no queue entry, no content chunk).
tests/gateway/test_rest_errors.py covers bodies over the gateway's byte limit (413).
"""

from __future__ import annotations

import io
import json
from typing import Any

import aiohttp
import grpc
import pytest
from azora.mail.v1 import mail_pb2
from pymongo.asynchronous.database import AsyncDatabase

from services.core.mongo import Document
from services.core.settings import Settings
from tests.conftest import Tenant
from tests.security.conftest import GrpcStubs, bearer, sending_domain
from tests.support.dns_server import KnotServer
from tests.support.grpc_errors import failure_of

DEPTH = 100_000
HOSTILE_BODIES: dict[str, bytes] = {
    "nested arrays in a known field": b'{"name": ' + b"[" * DEPTH + b"]" * DEPTH + b"}",
    "nested objects in an unknown field": b'{"x": '
    + b'{"a": ' * DEPTH
    + b"1"
    + b"}" * DEPTH
    + b"}",
    "nested arrays at the top": b"[" * DEPTH + b"]" * DEPTH,
    "nested objects, unclosed": b'{"a": ' * DEPTH,
    "a huge number": b'{"name": ' + b"9" * 100_000 + b"}",
    "a huge exponent": b'{"name": 1e999999999}',
    "NaN": b'{"name": NaN}',
    "not UTF-8": b'{"name": "\xff\xfe"}',
    "a lone surrogate": b'{"name": "\\ud800"}',
    "duplicate keys": b'{"name": "a.example", "name": {"$ne": 1}}',
    "truncated": b'{"name": "a',
    "a 4 MiB string": b'{"name": "' + b"a" * (4 * 1024 * 1024) + b'"}',
}


async def _alive(http: aiohttp.ClientSession, base_url: str) -> None:
    async with http.get(f"{base_url}/health/ping") as response:
        assert response.status == 200


@pytest.mark.parametrize("kind", sorted(HOSTILE_BODIES))
async def test_hostile_json_is_a_clear_4xx(
    http: aiohttp.ClientSession, rest_base_url: str, tenant_a: Tenant, kind: str
) -> None:
    # Each hostile body is refused with a google.rpc.Status JSON and a 4xx; the gateway lives.
    headers = {**bearer(tenant_a), "Content-Type": "application/json"}
    for path in ("/api/v1/domains", "/api/v1/emails"):
        async with http.post(
            rest_base_url + path, data=io.BytesIO(HOSTILE_BODIES[kind]), headers=headers
        ) as response:
            text = await response.text()
            assert 400 <= response.status < 500, (kind, path, response.status, text[:300])
            answer = json.loads(text)
            assert answer["code"] in (
                grpc.StatusCode.INVALID_ARGUMENT.value[0],
                grpc.StatusCode.FAILED_PRECONDITION.value[0],
            ), answer
            assert "Traceback" not in text
    await _alive(http, rest_base_url)


# --- oversized emails ------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def mailer(
    stack_stubs: GrpcStubs, knot_server: KnotServer, settings: Settings
) -> tuple[Tenant, str]:
    """A tenant and the name of its sending domain."""
    from tests.conftest import new_tenant

    tenant = new_tenant(settings)
    domain = await sending_domain(stack_stubs, knot_server, tenant)
    return tenant, domain.name


async def _stored(db: AsyncDatabase[Document], tenant: Tenant) -> dict[str, int]:
    emails = [e["_id"] async for e in db["emails"].find({"tenant_id": tenant.id}, {"_id": 1})]
    return {
        "emails": len(emails),
        "queue": await db["email_queue"].count_documents({"_id": {"$in": emails}}),
        "content files": await db["email_content.files"].count_documents({}),
    }


def _oversized(domain: str, settings: Settings) -> dict[str, dict[str, Any]]:
    limit = settings.max_attachment_size
    quarter = settings.mail_max_message_size // 4 + 1024
    base: dict[str, Any] = {"from_address": f"app@{domain}", "to": ["a@example.org"], "text": "x"}
    return {
        "too many recipients": {
            **base,
            "to": [f"r{i}@example.org" for i in range(settings.mail_max_recipients + 1)],
        },
        "too many recipients across to, cc and bcc": {
            **base,
            "cc": [f"c{i}@example.org" for i in range(settings.mail_max_recipients // 2)],
            "bcc": [f"b{i}@example.org" for i in range(settings.mail_max_recipients // 2 + 1)],
        },
        "an attachment over the limit": {
            **base,
            "attachments": [
                mail_pb2.Attachment(
                    filename="big.bin",
                    content_type="application/octet-stream",
                    content=b"\0" * (limit + 1),
                )
            ],
        },
        "attachments over the message size": {
            **base,
            "attachments": [
                mail_pb2.Attachment(
                    filename=f"part{i}.bin",
                    content_type="application/octet-stream",
                    content=b"\0" * min(quarter, limit),
                )
                for i in range(settings.mail_max_message_size // min(quarter, limit) + 1)
            ],
        },
        "a text body over the message size": {
            **base,
            "text": "a" * (settings.mail_max_message_size + 1),
        },
        "too many tags": {**base, "tags": [f"t{i}" for i in range(1000)]},
        "a huge subject": {**base, "subject": "s" * 100_000},
    }


CASES = [
    "too many recipients",
    "too many recipients across to, cc and bcc",
    "an attachment over the limit",
    "attachments over the message size",
    "a text body over the message size",
    "too many tags",
    "a huge subject",
]


@pytest.mark.parametrize("kind", CASES)
async def test_oversized_emails_are_refused_whole(
    stack_stubs: GrpcStubs,
    mailer: tuple[Tenant, str],
    settings: Settings,
    database: AsyncDatabase[Document],
    kind: str,
) -> None:
    # A clear INVALID_ARGUMENT (the request is wrong, not the server short of room) and nothing
    # half-written.
    tenant, domain = mailer
    fields = _oversized(domain, settings)[kind]
    before = await _stored(database, tenant)
    failure = await failure_of(
        stack_stubs.mail.SendEmail(mail_pb2.SendEmailRequest(**fields), metadata=tenant.metadata)
    )
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT, failure
    assert failure.message
    assert len(failure.message) < 2000, "the error does not echo the oversized input"
    assert await _stored(database, tenant) == before
