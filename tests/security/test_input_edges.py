"""Inputs that used to reach INTERNAL or a misleading status, over gRPC and REST (the gateway).

Unicode line breaks in anything that becomes a header, errors that echo large input (past
gRPC's 16 KB trailer limit), metadata without a total bound, unbounded Reply-To lists, bytes
that are not base64, and a failed request burning its idempotency key. Each is a clear 400 /
INVALID_ARGUMENT naming the field, and nothing is stored.
"""

from __future__ import annotations

import base64
import secrets
from typing import Any

import aiohttp
import grpc
import pytest
from azora.domain.v1 import domain_pb2
from azora.mail.v1 import mail_pb2
from google.protobuf import json_format
from pymongo.asynchronous.database import AsyncDatabase

from services.core.mongo import Document
from services.core.settings import Settings
from services.core.status import MAX_VIOLATIONS
from services.mail.compose import MAX_ADDRESS, MAX_FILENAME, MAX_METADATA_BYTES
from tests.conftest import Tenant, new_tenant
from tests.gateway.rest import BAD_REQUEST, Reply, call
from tests.security.conftest import GrpcStubs, bearer, sending_domain, verified_domain
from tests.support.dns_server import KnotServer
from tests.support.grpc_errors import RpcFailure, failure_of
from tests.support.ratelimit_fixtures import LimitedServices, limited

__all__ = ["limited"]

LINE_BREAKS = {
    "VT": "\v",
    "FF": "\f",
    "FS": "\x1c",
    "GS": "\x1d",
    "RS": "\x1e",
    "NEL": "\x85",
    "LS": "\u2028",
    "PS": "\u2029",
}


@pytest.fixture(scope="module")
async def mailer(
    stack_stubs: GrpcStubs, knot_server: KnotServer, settings: Settings
) -> tuple[Tenant, str]:
    """A tenant and the name of its sending domain."""
    tenant = new_tenant(settings)
    domain = await sending_domain(stack_stubs, knot_server, tenant)
    return tenant, domain.name


async def _stored(db: AsyncDatabase[Document], tenant: Tenant) -> int:
    return await db["emails"].count_documents({"tenant_id": tenant.id})


def _base(domain: str, **fields: Any) -> dict[str, Any]:
    return {"from_address": f"app@{domain}", "to": ["a@example.org"], "text": "x", **fields}


async def _send(
    transport: str,
    stubs: GrpcStubs,
    http: aiohttp.ClientSession,
    base_url: str,
    tenant: Tenant,
    request: mail_pb2.SendEmailRequest,
) -> tuple[int, dict[str, str], str]:
    """SendEmail over `transport`: (HTTP status or gRPC code value, violations, email id)."""
    if transport == "grpc":
        try:
            email = await stubs.mail.SendEmail(request, metadata=tenant.metadata)
        except grpc.aio.AioRpcError as error:
            failure = await failure_of(_raise(error))
            return _http_of(failure), failure.field_violations, ""
        return 200, {}, email.id
    body = json_format.MessageToDict(request)
    reply = await call(http, "POST", f"{base_url}/api/v1/emails", json=body, headers=bearer(tenant))
    return reply.status, _violations(reply), _id_of(reply)


def _violations(reply: Reply) -> dict[str, str]:
    details = reply.json.get("details", []) if reply.status >= 400 and reply.json else []
    return reply.violations if any(d.get("@type") == BAD_REQUEST for d in details) else {}


async def _raise(error: Exception) -> None:
    raise error


def _id_of(reply: Reply) -> str:
    return str(reply.json.get("id", "")) if reply.status == 200 else ""


def _http_of(failure: RpcFailure) -> int:
    return {
        grpc.StatusCode.INVALID_ARGUMENT: 400,
        grpc.StatusCode.ALREADY_EXISTS: 409,
        grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
        grpc.StatusCode.INTERNAL: 500,
    }.get(failure.code, 599)


def _named(violations: dict[str, str], *names: str) -> bool:
    """Whether a violation names one of `names` (proto or JSON spelling)."""
    return any(field in names for field in violations)


def _line_break_requests(domain: str, ch: str) -> dict[tuple[str, ...], mail_pb2.SendEmailRequest]:
    """One request per header-bound field, carrying `ch`; keyed by the field's spellings."""
    attachment = mail_pb2.Attachment(filename=f"a{ch}b.txt", content=b"x")
    return {
        ("subject",): mail_pb2.SendEmailRequest(**_base(domain, subject=f"Hi{ch}Bcc: x@evil.test")),
        ("headers[0].value",): mail_pb2.SendEmailRequest(
            **_base(domain, headers=[mail_pb2.Header(name="X-Tag", value=f"a{ch}b")])
        ),
        ("from",): mail_pb2.SendEmailRequest(
            **_base(domain, from_address=f"Ann{ch}Other <app@{domain}>")
        ),
        ("to[0]",): mail_pb2.SendEmailRequest(**_base(domain, to=[f"Bob{ch}X <b@example.org>"])),
        ("reply_to[0]", "replyTo[0]"): mail_pb2.SendEmailRequest(
            **_base(domain, reply_to=[f"Cy{ch}Z <c@example.org>"])
        ),
        ("attachments[0].filename",): mail_pb2.SendEmailRequest(
            **_base(domain, attachments=[attachment])
        ),
    }


@pytest.mark.parametrize("transport", ["grpc", "rest"])
@pytest.mark.parametrize("name", sorted(LINE_BREAKS))
async def test_unicode_line_breaks_are_invalid_argument(
    stack_stubs: GrpcStubs,
    http: aiohttp.ClientSession,
    rest_base_url: str,
    mailer: tuple[Tenant, str],
    database: AsyncDatabase[Document],
    transport: str,
    name: str,
) -> None:
    # Every line break Python's header folding refuses is refused up front, naming the field.
    tenant, domain = mailer
    before = await _stored(database, tenant)
    for fields, request in _line_break_requests(domain, LINE_BREAKS[name]).items():
        status, violations, _ = await _send(
            transport, stack_stubs, http, rest_base_url, tenant, request
        )
        assert status == 400, (fields, status)
        assert _named(violations, *fields), (fields, violations)
    assert await _stored(database, tenant) == before


@pytest.mark.parametrize("transport", ["grpc", "rest"])
async def test_a_refused_request_leaves_its_idempotency_key_free(
    stack_stubs: GrpcStubs,
    http: aiohttp.ClientSession,
    rest_base_url: str,
    mailer: tuple[Tenant, str],
    transport: str,
) -> None:
    # The corrected retry with the same key is accepted, and a replay of it answers its email.
    tenant, domain = mailer
    key = secrets.token_hex(8)
    bad = mail_pb2.SendEmailRequest(**_base(domain, subject="a\u2028b", idempotency_key=key))
    status, _, _ = await _send(transport, stack_stubs, http, rest_base_url, tenant, bad)
    assert status == 400
    good = mail_pb2.SendEmailRequest(**_base(domain, subject="a b", idempotency_key=key))
    status, _, first = await _send(transport, stack_stubs, http, rest_base_url, tenant, good)
    assert status == 200
    status, _, again = await _send(transport, stack_stubs, http, rest_base_url, tenant, good)
    assert (status, again) == (200, first)


@pytest.mark.parametrize("transport", ["grpc", "rest"])
async def test_a_request_failing_after_its_key_was_reserved_gives_the_key_back(
    limited: LimitedServices, settings: Settings, transport: str
) -> None:
    # A message that only turns out too large once built (non-ASCII text grows in base64)
    # fails after the key was reserved; the corrected retry with the key is still accepted.
    shared = limited.settings(AZORA_MAIL_MAX_MESSAGE_SIZE="100000")
    mail = await limited.mail(shared)
    base_url = await limited.gateway(shared, {"azora.mail.v1.MailService": mail.running.port})
    tenant = new_tenant(settings)
    domain = mail.add_domain(tenant)
    stubs = GrpcStubs(None, None, None, mail.stub, None, None, None, None, None)  # type: ignore[arg-type]
    key = secrets.token_hex(8)
    async with aiohttp.ClientSession() as http:
        big = mail_pb2.SendEmailRequest(**_base(domain, text="é" * 45_000, idempotency_key=key))
        status, violations, _ = await _send(transport, stubs, http, base_url, tenant, big)
        assert status == 400, violations
        small = mail_pb2.SendEmailRequest(**_base(domain, text="é" * 100, idempotency_key=key))
        status, violations, first = await _send(transport, stubs, http, base_url, tenant, small)
        assert status == 200, violations
        status, _, again = await _send(transport, stubs, http, base_url, tenant, small)
        assert (status, again) == (200, first)
        # A different request with the key that did store an email is still a conflict.
        other = mail_pb2.SendEmailRequest(**_base(domain, text="other", idempotency_key=key))
        status, _, _ = await _send(transport, stubs, http, base_url, tenant, other)
        assert status == 409


@pytest.mark.parametrize("transport", ["grpc", "rest"])
async def test_an_error_quoting_a_17_kb_address_still_arrives(
    stack_stubs: GrpcStubs,
    http: aiohttp.ClientSession,
    rest_base_url: str,
    mailer: tuple[Tenant, str],
    transport: str,
) -> None:
    # The answer is the service's 400 naming the field, not "Stream removed" (429).
    tenant, domain = mailer
    huge = "x" * 17_000 + "@"
    request = mail_pb2.SendEmailRequest(**_base(domain, to=[huge], cc=[huge] * 3))
    status, violations, _ = await _send(
        transport, stack_stubs, http, rest_base_url, tenant, request
    )
    assert status == 400
    assert "to[0]" in violations
    assert all(len(v.encode()) < 1024 for v in violations.values())


async def test_500_invalid_dns_records_still_get_their_400(
    stack_stubs: GrpcStubs,
    http: aiohttp.ClientSession,
    rest_base_url: str,
    knot_server: KnotServer,
    settings: Settings,
) -> None:
    # Many violations: the first ones are listed, the message says how many more there were.
    tenant = new_tenant(settings)
    domain = await verified_domain(stack_stubs, knot_server, tenant)
    records = [
        domain_pb2.DnsRecord(type="A", name=f"h{i}", value=f"not-an-address-{i:04d}" * 4)
        for i in range(500)
    ]
    failure = await failure_of(
        stack_stubs.domains.UpdateDnsRecords(
            domain_pb2.UpdateDnsRecordsRequest(id=domain.id, records=records),
            metadata=tenant.metadata,
        )
    )
    assert failure.code is grpc.StatusCode.INVALID_ARGUMENT, failure.message
    assert 0 < len(failure.field_violations) <= MAX_VIOLATIONS
    assert int(failure.metadata["omittedViolations"]) == 500 - len(failure.field_violations)
    assert "more invalid fields" in failure.message
    body = {
        "records": [json_format.MessageToDict(r) for r in records],
    }
    reply = await call(
        http,
        "PUT",
        f"{rest_base_url}/api/v1/domains/{domain.id}/dns",
        json=body,
        headers=bearer(tenant),
    )
    assert reply.status == 400
    assert 0 < len(reply.violations) <= MAX_VIOLATIONS


def _size_cases(domain: str, settings: Settings) -> dict[str, tuple[dict[str, Any], set[str]]]:
    half = MAX_METADATA_BYTES // 2 + 1
    return {
        "metadata over its total size": (
            _base(domain, metadata={"a": "v" * half, "b": "v" * half}),
            {"metadata"},
        ),
        "more Reply-To addresses than recipients allowed": (
            _base(
                domain,
                reply_to=[f"r{i}@example.org" for i in range(settings.mail_max_recipients + 1)],
            ),
            {"reply_to", "replyTo"},
        ),
        "a display name longer than an address may be": (
            _base(domain, to=[f"{'N' * MAX_ADDRESS} <n@example.org>"]),
            {"to[0]"},
        ),
        "an attachment file name longer than a file name may be": (
            _base(
                domain,
                attachments=[mail_pb2.Attachment(filename="f" * (MAX_FILENAME + 1), content=b"x")],
            ),
            {"attachments[0].filename"},
        ),
    }


@pytest.mark.parametrize("transport", ["grpc", "rest"])
@pytest.mark.parametrize(
    "case",
    [
        "metadata over its total size",
        "more Reply-To addresses than recipients allowed",
        "a display name longer than an address may be",
        "an attachment file name longer than a file name may be",
    ],
)
async def test_sizes_without_a_bound_are_bounded(
    stack_stubs: GrpcStubs,
    http: aiohttp.ClientSession,
    rest_base_url: str,
    mailer: tuple[Tenant, str],
    database: AsyncDatabase[Document],
    settings: Settings,
    transport: str,
    case: str,
) -> None:
    # Refused whole with the field named; nothing stored.
    tenant, domain = mailer
    fields, names = _size_cases(domain, settings)[case]
    before = await _stored(database, tenant)
    status, violations, _ = await _send(
        transport, stack_stubs, http, rest_base_url, tenant, mail_pb2.SendEmailRequest(**fields)
    )
    assert status == 400
    assert _named(violations, *names), violations
    assert await _stored(database, tenant) == before


@pytest.mark.parametrize(
    "content", ["####", "this is not base64 at all!", "aGVsbG8=\u00e9", "aGVsbG\n"]
)
async def test_attachment_content_must_be_base64(
    http: aiohttp.ClientSession,
    rest_base_url: str,
    mailer: tuple[Tenant, str],
    database: AsyncDatabase[Document],
    content: str,
) -> None:
    # Over REST bytes are base64: anything else is 400 naming the field, not 0 bytes stored.
    tenant, domain = mailer
    before = await _stored(database, tenant)
    body = {
        "from": f"app@{domain}",
        "to": ["a@example.org"],
        "text": "x",
        "attachments": [{"filename": "a.bin", "content": content}],
    }
    reply = await call(
        http, "POST", f"{rest_base_url}/api/v1/emails", json=body, headers=bearer(tenant)
    )
    assert reply.status == 400, reply.body[:300]
    assert "attachments[0].content" in reply.violations
    assert await _stored(database, tenant) == before
    # Valid base64 in either alphabet, padded or not, is accepted with its bytes.
    for good in (base64.b64encode(b"\xfb\xff").decode(), "-_8", "aGVsbG8"):
        body["attachments"] = [{"filename": "a.bin", "content": good}]
        reply = await call(
            http, "POST", f"{rest_base_url}/api/v1/emails", json=body, headers=bearer(tenant)
        )
        assert reply.status == 200, reply.body[:300]
        assert int(reply.json["attachments"][0]["sizeBytes"]) > 0


@pytest.mark.parametrize("transport", ["grpc", "rest"])
async def test_a_trailing_newline_does_not_slip_past_a_pattern(
    stack_stubs: GrpcStubs,
    http: aiohttp.ClientSession,
    rest_base_url: str,
    mailer: tuple[Tenant, str],
    database: AsyncDatabase[Document],
    transport: str,
) -> None:
    # A regular expression ending in "$" also matches before a final newline: names checked
    # by a pattern (header names, Content-IDs) must refuse one.
    tenant, domain = mailer
    before = await _stored(database, tenant)
    cases = {
        ("headers[0].name",): mail_pb2.SendEmailRequest(
            **_base(domain, headers=[mail_pb2.Header(name="X-Tag\n", value="v")])
        ),
        ("attachments[0].content_id", "attachments[0].contentId"): mail_pb2.SendEmailRequest(
            **_base(
                domain,
                html="<p>x</p>",
                attachments=[
                    mail_pb2.Attachment(
                        filename="a.png", content=b"x", content_id="logo\n", inline=True
                    )
                ],
            )
        ),
    }
    for fields, request in cases.items():
        status, violations, _ = await _send(
            transport, stack_stubs, http, rest_base_url, tenant, request
        )
        assert status == 400, (fields, status)
        assert _named(violations, *fields), (fields, violations)
    assert await _stored(database, tenant) == before
