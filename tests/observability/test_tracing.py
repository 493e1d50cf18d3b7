"""Tracing: one REST request is one trace from the gateway through the service to MongoDB."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import aiohttp
import pytest
from azora.domain.v1 import domain_pb2, domain_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, format_trace_id

from services.core.dns import LookupOutcome
from services.core.logs import JsonFormatter
from services.core.tracing import delivery_span, trace_carrier, traced_channel, tracer
from tests.conftest import Tenant, unique_domain
from tests.gateway.conftest import RestStack
from tests.gateway.rest import call
from tests.support.dns_server import KnotServer

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"


@pytest.fixture
def access_lines() -> Iterator[io.StringIO]:
    """The services' access-log lines as the process would write them (JSON)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("test"))
    logger = logging.getLogger("azora.access")
    previous = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(previous)


def children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    parent_id = parent.context.span_id
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent_id]


# POST /api/v1/domains yields gateway span -> DomainService server span -> MongoDB command
# spans, all in one trace, with rpc, route and db command attributes; the service's access
# log line carries that trace id.
async def test_rest_request_is_one_trace_down_to_the_database(
    http: aiohttp.ClientSession,
    rest_base_url: str,
    tenant: Tenant,
    spans: InMemorySpanExporter,
    access_lines: io.StringIO,
) -> None:
    reply = await call(
        http,
        "POST",
        f"{rest_base_url}/api/v1/domains",
        json={"name": unique_domain()},
        headers={"Authorization": f"Bearer {tenant.token}"},
    )
    assert reply.status == 200, reply.json
    finished = list(spans.get_finished_spans())
    (gateway,) = [s for s in finished if s.name == "POST /api/v1/domains"]
    assert gateway.kind == SpanKind.SERVER
    assert gateway.attributes is not None
    assert gateway.attributes["http.route"] == "/api/v1/domains"
    assert gateway.attributes["http.response.status_code"] == 200
    (service,) = children(finished, gateway)
    assert service.name == "azora.domain.v1.DomainService/CreateDomain"
    assert service.kind == SpanKind.SERVER
    assert service.attributes is not None
    assert service.attributes["rpc.grpc.status_code"] == 0
    database = [s for s in children(finished, service) if s.name.startswith("mongodb ")]
    assert "mongodb insert" in {s.name for s in database}
    insert = next(s for s in database if s.name == "mongodb insert")
    assert insert.attributes is not None
    assert insert.attributes["db.operation.name"] == "insert"
    trace_ids = {s.context.trace_id for s in (gateway, service, *database)}
    assert trace_ids == {gateway.context.trace_id}
    lines = [json.loads(line) for line in access_lines.getvalue().splitlines()]
    rpc_line = next(line for line in lines if line.get("method", "").endswith("/CreateDomain"))
    assert rpc_line["trace_id"] == format_trace_id(gateway.context.trace_id)


# A client's traceparent is honoured: the gateway's span continues the client's trace, and a
# DNS lookup of a verification is a span with its name and outcome.
async def test_client_trace_context_and_dns_spans(
    http: aiohttp.ClientSession, rest_base_url: str, tenant: Tenant, spans: InMemorySpanExporter
) -> None:
    auth = {"Authorization": f"Bearer {tenant.token}"}
    name = unique_domain()
    created = await call(
        http, "POST", f"{rest_base_url}/api/v1/domains", json={"name": name}, headers=auth
    )
    assert created.status == 200, created.json
    spans.clear()
    traceparent = f"00-{CLIENT_TRACE}-b7ad6b7169203331-01"
    await call(
        http,
        "POST",
        f"{rest_base_url}/api/v1/domains/{created.json['id']}/verify",
        headers={**auth, "traceparent": traceparent},
    )
    finished = list(spans.get_finished_spans())
    (gateway,) = [s for s in finished if s.name == "POST /api/v1/domains/{id}/verify"]
    assert format_trace_id(gateway.context.trace_id) == CLIENT_TRACE
    assert gateway.parent is not None
    assert gateway.parent.span_id == int("b7ad6b7169203331", 16)
    lookups = [s for s in finished if s.name.startswith("dns ")]
    assert lookups
    for lookup in lookups:
        assert format_trace_id(lookup.context.trace_id) == CLIENT_TRACE
        assert lookup.attributes is not None
        assert lookup.attributes["dns.outcome"] in {o.value for o in LookupOutcome}
        assert str(lookup.attributes["dns.question.name"]).endswith(name)


# A channel with the tracing client interceptor (what service -> service calls use) makes a
# CLIENT span and sends its context: the called service's server span is its child.
async def test_client_interceptor_propagates_to_the_called_service(
    rest_stack: RestStack, tenant: Tenant, spans: InMemorySpanExporter
) -> None:
    target = f"127.0.0.1:{rest_stack.domain.running.port}"
    async with traced_channel(target) as channel:
        stub = domain_pb2_grpc.DomainServiceStub(channel)
        with tracer().start_as_current_span("caller"):
            await stub.ListDomains(domain_pb2.ListDomainsRequest(), metadata=tenant.metadata)
    finished = list(spans.get_finished_spans())
    (caller,) = [s for s in finished if s.name == "caller"]
    (client,) = children(finished, caller)
    assert client.kind == SpanKind.CLIENT
    assert client.name == "azora.domain.v1.DomainService/ListDomains"
    (server,) = children(finished, client)
    assert server.kind == SpanKind.SERVER
    assert server.context.trace_id == caller.context.trace_id


# Work stored with trace_carrier() and delivered later (another task, no span active) joins
# the original trace through delivery_span, with the email id and domain as attributes.
async def test_delivery_span_continues_the_stored_trace(spans: InMemorySpanExporter) -> None:
    with tracer().start_as_current_span("send") as send:
        carrier = trace_carrier()

    async def worker() -> None:
        with delivery_span(email_id="e1", domain="example.org", attempt=1, carrier=carrier):
            pass

    await asyncio.create_task(worker())
    (attempt,) = [s for s in spans.get_finished_spans() if s.name == "smtp deliver"]
    assert attempt.context.trace_id == send.get_span_context().trace_id
    assert attempt.parent is not None
    assert attempt.parent.span_id == send.get_span_context().span_id
    assert attempt.attributes is not None
    assert attempt.attributes["azora.email.id"] == "e1"
    assert attempt.attributes["azora.email.domain"] == "example.org"


# POST /api/v1/emails and the later SMTP delivery attempt by a worker are one trace: the
# worker's "smtp deliver" span continues the context stored with the email at acceptance.
async def test_send_request_and_smtp_delivery_are_one_trace(
    http: aiohttp.ClientSession,
    rest_base_url: str,
    tenant: Tenant,
    spans: InMemorySpanExporter,
    knot_server: KnotServer,
) -> None:
    auth = {"Authorization": f"Bearer {tenant.token}"}
    name = unique_domain()
    created = await call(
        http, "POST", f"{rest_base_url}/api/v1/domains", json={"name": name}, headers=auth
    )
    domain_id = created.json["id"]
    knot_server.set_zone(
        name, [("@", "TXT", f'"azora-verify={created.json["verificationToken"]}"')]
    )
    await call(http, "POST", f"{rest_base_url}/api/v1/domains/{domain_id}/verify", headers=auth)
    relay = {"host": "127.0.0.1", "port": 9, "secure": False}  # nothing listens: deferred
    configured = await call(
        http, "PUT", f"{rest_base_url}/api/v1/domains/{domain_id}/smtp", json=relay, headers=auth
    )
    assert configured.status == 200, configured.json
    sent = await call(
        http,
        "POST",
        f"{rest_base_url}/api/v1/emails",
        json={"from": f"noreply@{name}", "to": ["user@example.com"], "subject": "t", "text": "t"},
        headers=auth,
    )
    assert sent.status == 200, sent.json
    deliveries: list[ReadableSpan] = []
    for _ in range(100):  # the service's own workers poll every second
        deliveries = [
            s
            for s in spans.get_finished_spans()
            if s.name == "smtp deliver"
            and s.attributes is not None
            and s.attributes.get("azora.email.id") == sent.json["id"]
        ]
        if deliveries:
            break
        await asyncio.sleep(0.1)
    assert deliveries, "no delivery attempt was traced"
    finished = list(spans.get_finished_spans())
    (gateway,) = [s for s in finished if s.name == "POST /api/v1/emails"]
    (service,) = children(finished, gateway)
    assert service.name == "azora.mail.v1.MailService/SendEmail"
    assert deliveries[0].context.trace_id == gateway.context.trace_id
    assert deliveries[0].kind == SpanKind.CLIENT
    assert deliveries[0].attributes is not None
    assert deliveries[0].attributes["azora.email.domain"] == name
