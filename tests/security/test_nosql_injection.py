"""NoSQL operator injection (OWASP API8): `$`-operators and objects where strings belong.

Through REST JSON bodies, path ids and query filters, and through gRPC string fields: an
operator is either refused (400 / INVALID_ARGUMENT, or NOT_FOUND for an id) or taken as the
literal string it is, never as a query. The probe: tenant A has data, and no injected filter
may match it (an operator that reached MongoDB, such as {"$ne": ""}, would match everything).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import aiohttp
import grpc
import pytest
from azora.domain.v1 import domain_pb2
from azora.mail.v1 import mail_pb2
from pymongo.asynchronous.database import AsyncDatabase

from services.core.mongo import Document
from tests.conftest import Tenant, new_tenant
from tests.security.conftest import GrpcStubs, bearer, sending_domain
from tests.support.dns_server import KnotServer

OPERATORS = [
    '{"$ne": ""}',
    '{"$gt": ""}',
    '{"$regex": ".*"}',
    '{"$where": "true"}',
    "$ne",
    "[$ne]=1",
    ".*",
    "^",
    '"; return true; //',
]
OBJECTS: list[Any] = [
    {"$ne": ""},
    {"$gt": ""},
    {"$regex": ".*"},
    {"$in": ["a", "b"]},
    ["$ne", ""],
]


@pytest.fixture(scope="module")
async def owner(
    stack_stubs: GrpcStubs, knot_server: KnotServer, settings: Any
) -> tuple[Tenant, domain_pb2.Domain, str]:
    """Tenant A with a domain and a queued email (tagged "t1", recipient to@example.org)."""
    tenant = new_tenant(settings)
    domain = await sending_domain(stack_stubs, knot_server, tenant)
    email = await stack_stubs.mail.SendEmail(
        mail_pb2.SendEmailRequest(
            from_address=f"app@{domain.name}",
            to=["to@example.org"],
            subject="s",
            text="t",
            tags=["t1"],
            metadata={"k": "v"},
        ),
        metadata=tenant.metadata,
    )
    return tenant, domain, email.id


async def _status_and_json(response: aiohttp.ClientResponse) -> tuple[int, Any]:
    text = await response.text()
    try:
        return response.status, json.loads(text)
    except ValueError:
        return response.status, text


@pytest.mark.parametrize("value", OBJECTS, ids=json.dumps)
async def test_objects_where_strings_belong_are_400_in_json_bodies(
    http: aiohttp.ClientSession, rest_base_url: str, tenant_a: Tenant, value: Any
) -> None:
    # An object or array in a string field of a body is a type error at the gateway.
    tenant = tenant_a
    cases = [
        ("POST", "/api/v1/domains", {"name": value}),
        ("POST", "/api/v1/emails", {"from": value, "to": ["a@example.org"], "text": "x"}),
        ("POST", "/api/v1/emails", {"from": "a@example.org", "to": [value], "text": "x"}),
        ("POST", "/api/v1/api-keys", {"name": value, "scopes": ["domains:read"]}),
        ("POST", "/api/v1/smtp/test", {"config": {"host": value, "port": 25}}),
    ]
    for method, path, body in cases:
        async with http.request(
            method, rest_base_url + path, json=body, headers=bearer(tenant)
        ) as response:
            status, answer = await _status_and_json(response)
            assert status == 400, (path, body, answer)
            assert answer["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]


@pytest.mark.parametrize("value", OPERATORS)
async def test_operators_in_ids_and_filters_match_nothing(
    http: aiohttp.ClientSession,
    rest_base_url: str,
    owner: tuple[Tenant, domain_pb2.Domain, str],
    value: str,
) -> None:
    # Operator strings in path ids and query filters are literals: they match none of A's data.
    tenant, _domain, _email_id = owner
    encoded = quote(value, safe="")
    for path in (
        f"/api/v1/domains/{encoded}",
        f"/api/v1/emails/{encoded}",
        f"/api/v1/smtp/domains/{encoded}/config",
    ):
        async with http.get(rest_base_url + path, headers=bearer(tenant)) as response:
            status, answer = await _status_and_json(response)
            # Not an id at all, so INVALID_ARGUMENT (a well-formed unknown id is 404).
            assert status == 400, (path, answer)
    for parameter in ("recipient", "tag", "domainId", "pageToken"):
        url = f"{rest_base_url}/api/v1/emails?{parameter}={encoded}"
        async with http.get(url, headers=bearer(tenant)) as response:
            status, answer = await _status_and_json(response)
            if parameter in ("domainId", "pageToken"):
                # An id and an opaque token have a format: a string outside it is refused.
                assert status == 400, (parameter, answer)
            else:
                # Free-text filters take the string literally: it matches nothing of A's.
                assert status == 200, (parameter, answer)
                assert answer["emails"] == [], (parameter, value)
    url = f"{rest_base_url}/api/v1/domains?pageToken={encoded}"
    async with http.get(url, headers=bearer(tenant)) as response:
        status, answer = await _status_and_json(response)
        assert status == 400, answer


async def test_bracket_query_syntax_is_not_an_operator(
    http: aiohttp.ClientSession, rest_base_url: str, owner: tuple[Tenant, domain_pb2.Domain, str]
) -> None:
    # PHP/Express-style `recipient[$ne]=x` names no field: 400, not "every recipient but x".
    tenant, _, _ = owner
    for query in ("recipient[$ne]=x", "tag[$regex]=.*", "recipient.$ne=x"):
        async with http.get(
            f"{rest_base_url}/api/v1/emails?{query}", headers=bearer(tenant)
        ) as response:
            status, answer = await _status_and_json(response)
            assert status == 400, (query, answer)


async def test_the_literal_filters_do_match(
    http: aiohttp.ClientSession, rest_base_url: str, owner: tuple[Tenant, domain_pb2.Domain, str]
) -> None:
    # The control: the same filters with real values find A's email.
    tenant, domain, email_id = owner
    for query in ("recipient=to@example.org", "tag=t1", f"domainId={domain.id}"):
        async with http.get(
            f"{rest_base_url}/api/v1/emails?{query}", headers=bearer(tenant)
        ) as response:
            status, answer = await _status_and_json(response)
            assert status == 200, answer
            assert [e["id"] for e in answer["emails"]] == [email_id], query


@pytest.mark.parametrize("value", OPERATORS)
async def test_operators_in_grpc_strings_match_nothing(
    stack_stubs: GrpcStubs, owner: tuple[Tenant, domain_pb2.Domain, str], value: str
) -> None:
    # Over gRPC too: ids are NOT_FOUND or INVALID_ARGUMENT, filters match nothing.
    tenant, _, _ = owner
    m = tenant.metadata
    for call in (
        stack_stubs.domains.GetDomain(domain_pb2.GetDomainRequest(id=value), metadata=m),
        stack_stubs.mail.GetEmail(mail_pb2.GetEmailRequest(id=value), metadata=m),
        stack_stubs.mail.DeleteEmail(mail_pb2.DeleteEmailRequest(id=value), metadata=m),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call
        assert raised.value.code() in (
            grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.INVALID_ARGUMENT,
        )
    for request in (
        mail_pb2.ListEmailsRequest(recipient=value),
        mail_pb2.ListEmailsRequest(tag=value),
        mail_pb2.ListEmailsRequest(domain_id=value),
    ):
        try:
            listed = await stack_stubs.mail.ListEmails(request, metadata=m)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT  # noqa: PT017
        else:
            assert list(listed.emails) == []


async def test_operator_keys_in_metadata_are_stored_literally(
    stack_stubs: GrpcStubs,
    owner: tuple[Tenant, domain_pb2.Domain, str],
    database: AsyncDatabase[Document],
) -> None:
    # `$`- and dotted keys in metadata are refused or kept as plain data, never as operators.
    tenant, domain, _ = owner
    metadata = {"$where": "true", "$set": "x", "a.b": "c", "ok": "$ne"}
    try:
        email = await stack_stubs.mail.SendEmail(
            mail_pb2.SendEmailRequest(
                from_address=f"app@{domain.name}",
                to=["meta@example.org"],
                text="t",
                metadata=metadata,
            ),
            metadata=tenant.metadata,
        )
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT  # noqa: PT017
        return
    fetched = await stack_stubs.mail.GetEmail(
        mail_pb2.GetEmailRequest(id=email.id), metadata=tenant.metadata
    )
    assert dict(fetched.metadata) == metadata
    stored = await database["emails"].find_one({"_id": email.id})
    assert stored is not None
    assert not any(str(key).startswith("$") for key in stored)
