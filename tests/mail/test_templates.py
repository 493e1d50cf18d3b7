"""Templates and batch sending through the mail service's gRPC API (`local_mail`).

Templates: create, read, list, edit the draft, publish numbered versions, render previews, send
with a template (the relay, aiosmtpd on loopback, gets exactly the render). Batch: per-message
results with field paths, all-or-nothing, the 500 cap, one idempotency key for the whole batch,
and storage in a few insert commands.
"""

from __future__ import annotations

import asyncio
import email
import math
from email import policy
from typing import Any

import grpc
import pytest
from azora.mail.v1 import mail_pb2
from google.protobuf import struct_pb2
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.core.mongo import MAX_WRITE_BATCH
from services.mail.templates import TEMPLATE_NAMES, TEMPLATE_VERSIONS
from tests.conftest import Tenant
from tests.mail.conftest import LocalMail
from tests.support.grpc_errors import failure_of
from tests.support.smtp_relay import StartRelay

E = mail_pb2


def struct(**values: Any) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(values)
    return out


async def create(mail: LocalMail, tenant: Tenant, **fields: Any) -> mail_pb2.Template:
    request = {
        "name": "welcome",
        "subject": "Welcome, {{ name }}",
        "html": "<style>h1 { color: #123456 }</style><h1>Hello {{ name }}</h1>"
        "{% for item in items %}<p>{{ item }}</p>{% endfor %}",
        **fields,
    }
    return await mail.stub.CreateTemplate(
        E.CreateTemplateRequest(**request), metadata=tenant.metadata
    )


async def publish(mail: LocalMail, tenant: Tenant, ref: str) -> mail_pb2.TemplateVersion:
    return await mail.stub.PublishTemplate(
        E.PublishTemplateRequest(id=ref), metadata=tenant.metadata
    )


async def test_template_crud_and_versions(local_mail: LocalMail, tenant: Tenant) -> None:
    # Edits change the draft; publish freezes numbered versions; older ones stay renderable.
    m = tenant.metadata
    created = await create(local_mail, tenant, default_variables=struct(items=["a"]))
    assert created.published_version == 0
    assert dict(created.default_variables) == {"items": ["a"]}
    by_name = await local_mail.stub.GetTemplate(E.GetTemplateRequest(id="WELCOME"), metadata=m)
    assert by_name.id == created.id
    v1 = await publish(local_mail, tenant, created.id)
    assert v1.version == 1
    updated = await local_mail.stub.UpdateTemplate(
        E.UpdateTemplateRequest(
            id=created.id, name="welcome-v2", subject="Hi {{ name }}", text="Hi {{ name }}!"
        ),
        metadata=m,
    )
    assert (updated.name, updated.html, updated.published_version) == ("welcome-v2", "", 1)
    v2 = await publish(local_mail, tenant, "welcome-v2")
    assert v2.version == 2
    # The old name is free again, the new one is taken.
    failure = await failure_of(
        local_mail.stub.GetTemplate(E.GetTemplateRequest(id="welcome"), metadata=m)
    )
    assert failure.reason == "TEMPLATE_NOT_FOUND"
    versions = await local_mail.stub.ListTemplateVersions(
        E.ListTemplateVersionsRequest(id=created.id, page_size=1), metadata=m
    )
    assert [v.version for v in versions.versions] == [2]
    rest = await local_mail.stub.ListTemplateVersions(
        E.ListTemplateVersionsRequest(
            id=created.id, page_size=1, page_token=versions.next_page_token
        ),
        metadata=m,
    )
    assert [v.version for v in rest.versions] == [1]
    assert rest.next_page_token == ""
    old = await local_mail.stub.RenderTemplate(
        E.RenderTemplateRequest(id=created.id, version=1, variables=struct(name="Ann")),
        metadata=m,
    )
    assert old.subject == "Welcome, Ann"
    assert '<h1 style="color: #123456;">Hello Ann</h1><p>a</p>' in old.html
    assert old.text.split() == ["Hello", "Ann", "a"]
    new = await local_mail.stub.RenderTemplate(
        E.RenderTemplateRequest(id=created.id, version=2, variables=struct(name="Ann")),
        metadata=m,
    )
    assert (new.subject, new.html, new.text) == ("Hi Ann", "", "Hi Ann!")
    listed = await local_mail.stub.ListTemplates(E.ListTemplatesRequest(), metadata=m)
    assert [(t.id, t.published_version) for t in listed.templates] == [(created.id, 2)]
    await local_mail.stub.DeleteTemplate(E.DeleteTemplateRequest(id=created.id), metadata=m)
    failure = await failure_of(
        local_mail.stub.RenderTemplate(E.RenderTemplateRequest(id=created.id), metadata=m)
    )
    assert failure.code == grpc.StatusCode.NOT_FOUND
    assert failure.reason == "TEMPLATE_NOT_FOUND"
    db = local_mail.app.running.database.db
    assert await db[TEMPLATE_VERSIONS].count_documents({"template_id": created.id}) == 0
    again = await create(local_mail, tenant, name="welcome-v2")
    assert again.id != created.id


async def test_template_validation(local_mail: LocalMail, tenant: Tenant) -> None:
    # Bad names, missing parts and syntax errors are refused naming the field (and line).
    failure = await failure_of(
        create(local_mail, tenant, name="bad name!", subject="", html="<p>{% if x %}</p>")
    )
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(failure.field_violations) == {"name", "subject", "html"}
    assert failure.field_violations["html"].startswith("line 1:")
    await create(local_mail, tenant)
    taken = await failure_of(create(local_mail, tenant, name="Welcome"))
    assert taken.code == grpc.StatusCode.ALREADY_EXISTS
    assert taken.reason == "TEMPLATE_ALREADY_EXISTS"


async def test_concurrent_publishes_get_distinct_numbers(
    local_mail: LocalMail, tenant: Tenant
) -> None:
    # Ten publishes at once: ten versions numbered 1..10, none given twice.
    created = await create(local_mail, tenant)
    versions = await asyncio.gather(*(publish(local_mail, tenant, created.id) for _ in range(10)))
    assert sorted(v.version for v in versions) == list(range(1, 11))
    got = await local_mail.stub.GetTemplate(
        E.GetTemplateRequest(id=created.id), metadata=tenant.metadata
    )
    assert got.published_version == 10


async def test_render_preview_errors(local_mail: LocalMail, tenant: Tenant) -> None:
    created = await create(local_mail, tenant, html="<p>{{ name }} {{ ''.__class__ }}</p>")
    missing = await failure_of(
        local_mail.stub.RenderTemplate(
            E.RenderTemplateRequest(id=created.id), metadata=tenant.metadata
        )
    )
    assert missing.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(missing.field_violations) == {"variables.name"}
    unsafe = await failure_of(
        local_mail.stub.RenderTemplate(
            E.RenderTemplateRequest(id=created.id, variables=struct(name="x", items=[])),
            metadata=tenant.metadata,
        )
    )
    assert unsafe.reason == "TEMPLATE_RENDER_FAILED"
    no_version = await failure_of(
        local_mail.stub.RenderTemplate(
            E.RenderTemplateRequest(id=created.id, version=3), metadata=tenant.metadata
        )
    )
    assert no_version.reason == "TEMPLATE_VERSION_NOT_FOUND"


async def test_send_with_template_delivers_the_render(
    local_mail: LocalMail, tenant: Tenant, start_smtp_relay: StartRelay
) -> None:
    # The relay receives exactly what RenderTemplate previews; GetEmail names template+version.
    relay = await start_smtp_relay()
    _, domain = local_mail.add_domain(tenant, port=relay.port)
    created = await create(local_mail, tenant)
    unpublished = await failure_of(
        local_mail.send(
            tenant, from_address=f"app@{domain}", to=["a@example.org"], template="welcome"
        )
    )
    assert unpublished.reason == "TEMPLATE_NOT_PUBLISHED"
    await publish(local_mail, tenant, created.id)
    variables = struct(name="<b>Ann</b>", items=["one", "two"])
    sent = await local_mail.send(
        tenant,
        from_address=f"app@{domain}",
        to=["a@example.org"],
        template="welcome",
        variables=variables,
    )
    assert (sent.template_id, sent.template_version) == (created.id, 1)
    assert sent.subject == "Welcome, <b>Ann</b>"
    got = await local_mail.get(tenant, sent.id)
    assert (got.template_id, got.template_version) == (created.id, 1)
    preview = await local_mail.stub.RenderTemplate(
        E.RenderTemplateRequest(id=created.id, version=1, variables=variables),
        metadata=tenant.metadata,
    )
    assert await local_mail.worker().run_once() == 1
    [raw] = relay.messages
    msg = email.message_from_bytes(raw, policy=policy.default)
    assert msg["Subject"] == preview.subject
    html = msg.get_body(("html",))
    text = msg.get_body(("plain",))
    assert html is not None
    assert text is not None
    # (Line breaks travel as CRLF.)
    assert html.get_content().replace("\r\n", "\n").strip() == preview.html.strip()
    assert text.get_content().replace("\r\n", "\n").strip() == preview.text.strip()
    assert "&lt;b&gt;Ann&lt;/b&gt;" in preview.html


async def test_send_refuses_template_with_content_or_stray_fields(
    local_mail: LocalMail, tenant: Tenant
) -> None:
    _, domain = local_mail.add_domain(tenant, port=None)
    both = await failure_of(
        local_mail.send(
            tenant,
            from_address=f"app@{domain}",
            to=["a@example.org"],
            template="welcome",
            subject="s",
            html="<p>x</p>",
        )
    )
    assert both.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(both.field_violations) == {"subject", "html"}
    stray = await failure_of(
        local_mail.send(
            tenant,
            from_address=f"app@{domain}",
            to=["a@example.org"],
            text="t",
            template_version=2,
            variables=struct(a=1),
        )
    )
    assert set(stray.field_violations) == {"templateVersion", "variables"}
    unknown = await failure_of(
        local_mail.send(tenant, from_address=f"app@{domain}", to=["a@example.org"], template="nope")
    )
    assert unknown.code == grpc.StatusCode.NOT_FOUND
    assert unknown.reason == "TEMPLATE_NOT_FOUND"


async def test_missing_variable_on_send_is_named(
    local_mail: LocalMail, tenant: Tenant, start_smtp_relay: StartRelay
) -> None:
    relay = await start_smtp_relay()
    _, domain = local_mail.add_domain(tenant, port=relay.port)
    created = await create(local_mail, tenant, default_variables=struct(items=[]))
    await publish(local_mail, tenant, created.id)
    failure = await failure_of(
        local_mail.send(
            tenant, from_address=f"app@{domain}", to=["a@example.org"], template=created.id
        )
    )
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(failure.field_violations) == {"variables.name"}


# --- batch -------------------------------------------------------------------------------


def message(domain: str, **fields: Any) -> mail_pb2.SendEmailRequest:
    return E.SendEmailRequest(
        **{"from_address": f"app@{domain}", "to": ["a@example.org"], "text": "t", **fields}
    )


async def test_batch_mixed_valid_and_invalid(
    local_mail: LocalMail, tenant: Tenant, start_smtp_relay: StartRelay
) -> None:
    # Valid messages are accepted, each invalid one answers with field paths in the batch.
    relay = await start_smtp_relay()
    _, domain = local_mail.add_domain(tenant, port=relay.port)
    created = await create(local_mail, tenant)
    await publish(local_mail, tenant, created.id)
    answer = await local_mail.stub.SendEmailBatch(
        E.SendEmailBatchRequest(
            messages=[
                message(domain, to=["x@example.org"]),
                message(domain, to=["not an address"]),
                message(domain, text="", template="welcome", variables=struct(name="B", items=[])),
                message("unknown.example"),
                message(domain, text="", template="welcome"),
            ]
        ),
        metadata=tenant.metadata,
    )
    results = list(answer.results)
    assert [r.index for r in results] == [0, 1, 2, 3, 4]
    assert answer.accepted_count == 2
    assert results[0].status == E.EMAIL_STATUS_QUEUED
    assert results[0].id
    assert results[2].status == E.EMAIL_STATUS_QUEUED
    assert results[2].id
    assert [v.field for v in results[1].error.field_violations] == ["messages[1].to[0]"]
    assert results[1].error.code == "INVALID_ARGUMENT"
    assert not results[1].id
    assert results[3].error.reason == "SENDER_DOMAIN_NOT_ACTIVE"
    assert [v.field for v in results[3].error.field_violations] == ["messages[3].from"]
    assert [v.field for v in results[4].error.field_violations] == ["messages[4].variables.name"]
    templated = await local_mail.get(tenant, results[2].id)
    assert (templated.template_id, templated.subject) == (created.id, "Welcome, B")
    assert await local_mail.worker().run_once() == 2
    assert len(relay.messages) == 2


async def test_batch_all_or_nothing(local_mail: LocalMail, tenant: Tenant) -> None:
    # One bad message refuses the batch, naming every bad field; nothing is stored.
    _, domain = local_mail.add_domain(tenant, port=None)
    _, with_relay = local_mail.add_domain(tenant, port=2525)
    failure = await failure_of(
        local_mail.stub.SendEmailBatch(
            E.SendEmailBatchRequest(
                messages=[message(with_relay), message(with_relay, to=["bad"], cc=["worse"])],
                all_or_nothing=True,
            ),
            metadata=tenant.metadata,
        )
    )
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(failure.field_violations) == {"messages[1].to[0]", "messages[1].cc[0]"}
    listed = await local_mail.stub.ListEmails(E.ListEmailsRequest(), metadata=tenant.metadata)
    assert list(listed.emails) == []
    ok = await local_mail.stub.SendEmailBatch(
        E.SendEmailBatchRequest(messages=[message(with_relay)] * 2, all_or_nothing=True),
        metadata=tenant.metadata,
    )
    assert ok.accepted_count == 2
    no_relay = await failure_of(
        local_mail.stub.SendEmailBatch(
            E.SendEmailBatchRequest(messages=[message(domain)], all_or_nothing=True),
            metadata=tenant.metadata,
        )
    )
    assert set(no_relay.field_violations) == {"messages[0].from"}


async def test_batch_size_limits(local_mail: LocalMail, tenant: Tenant) -> None:
    _, domain = local_mail.add_domain(tenant, port=2525)
    too_many = await failure_of(
        local_mail.stub.SendEmailBatch(
            E.SendEmailBatchRequest(messages=[message(domain)] * 501), metadata=tenant.metadata
        )
    )
    assert too_many.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(too_many.field_violations) == {"messages"}
    assert "at most 500" in too_many.field_violations["messages"]
    empty = await failure_of(
        local_mail.stub.SendEmailBatch(E.SendEmailBatchRequest(), metadata=tenant.metadata)
    )
    assert set(empty.field_violations) == {"messages"}
    own_key = await local_mail.stub.SendEmailBatch(
        E.SendEmailBatchRequest(messages=[message(domain, idempotency_key="k")]),
        metadata=tenant.metadata,
    )
    assert [v.field for v in own_key.results[0].error.field_violations] == [
        "messages[0].idempotencyKey"
    ]


async def test_missing_name_is_required_on_create_and_replace(
    local_mail: LocalMail, tenant: Tenant
) -> None:
    # A draft without a name (PUT replaces the whole draft) is told the name is required,
    # not that an empty name breaks the naming rule.
    created = await create(local_mail, tenant)
    for call in (
        local_mail.stub.CreateTemplate(
            E.CreateTemplateRequest(subject="s", text="t"), metadata=tenant.metadata
        ),
        local_mail.stub.UpdateTemplate(
            E.UpdateTemplateRequest(id=created.id, subject="s", text="t"),
            metadata=tenant.metadata,
        ),
    ):
        failure = await failure_of(call)
        assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
        assert failure.field_violations["name"].startswith("required")


async def test_batch_errors_name_fields_in_json_spelling(
    local_mail: LocalMail, tenant: Tenant
) -> None:
    # A message's errors name its fields as REST clients write them (and as SendEmail's errors
    # do), in the violations and in the message, also when all_or_nothing refuses the batch.
    _, domain = local_mail.add_domain(tenant, port=2525)
    bad = [
        message(domain, reply_to=["bad"]),
        message(
            domain,
            attachments=[E.Attachment(filename="a.txt", content=b"hi", content_type="bad type")],
        ),
    ]
    answer = await local_mail.stub.SendEmailBatch(
        E.SendEmailBatchRequest(messages=bad), metadata=tenant.metadata
    )
    assert [[v.field for v in r.error.field_violations] for r in answer.results] == [
        ["messages[0].replyTo[0]"],
        ["messages[1].attachments[0].contentType"],
    ]
    assert answer.results[0].error.message.startswith("replyTo[0]: ")
    assert answer.results[1].error.message.startswith("attachments[0].contentType: ")
    refused = await failure_of(
        local_mail.stub.SendEmailBatch(
            E.SendEmailBatchRequest(messages=bad, all_or_nothing=True), metadata=tenant.metadata
        )
    )
    assert set(refused.field_violations) == {
        "messages[0].replyTo[0]",
        "messages[1].attachments[0].contentType",
    }
    assert "messages[1]: attachments[0].contentType: " in refused.message


def _inserts_of(spans: InMemorySpanExporter, method: str, database: str) -> int:
    """Insert commands on `database` issued while serving `method` (its traces' db spans).

    Counted from spans rather than the process-wide command counter: the mail service's
    background loops (the event publisher copying the batch's events, sweeps) insert at the
    same time, outside any trace, and would be counted with the batch on a slow machine.
    """
    finished = list(spans.get_finished_spans())
    traces = {
        s.context.trace_id
        for s in finished
        if s.context is not None and (s.attributes or {}).get("rpc.method") == method
    }
    return sum(
        1
        for s in finished
        if s.context is not None
        and s.context.trace_id in traces
        and (s.attributes or {}).get("db.operation.name") == "insert"
        and (s.attributes or {}).get("db.namespace") == database
    )


async def test_batch_of_500_idempotent_in_few_commands(
    local_mail: LocalMail, tenant: Tenant, spans: InMemorySpanExporter
) -> None:
    # 500 messages stored with a handful of insert commands; the same batch with the same key
    # answers the same ids and stores nothing more; a different batch with that key is refused.
    _, domain = local_mail.add_domain(tenant, port=2525)
    messages = [message(domain, to=[f"r{i}@example.org"]) for i in range(500)]
    first = await local_mail.stub.SendEmailBatch(
        E.SendEmailBatchRequest(messages=messages, idempotency_key="batch-1"),
        metadata=tenant.metadata,
    )
    inserts = _inserts_of(spans, "SendEmailBatch", local_mail.settings.mongodb_database)
    assert first.accepted_count == 500
    # Lookup keys, event hints, queue entries, messages and emails, each in chunks of the
    # write-batch cap, plus the idempotency record and the stats counts: a few dozen, not 500+.
    chunks = math.ceil(500 / MAX_WRITE_BATCH)
    assert chunks <= inserts <= 5 * chunks + 4, inserts
    again = await local_mail.stub.SendEmailBatch(
        E.SendEmailBatchRequest(messages=messages, idempotency_key="batch-1"),
        metadata=tenant.metadata,
    )
    assert [r.id for r in again.results] == [r.id for r in first.results]
    assert len({r.id for r in first.results}) == 500
    db = local_mail.app.running.database.db
    assert await db["emails"].count_documents({"tenant_id": tenant.id}) == 500
    conflict = await failure_of(
        local_mail.stub.SendEmailBatch(
            E.SendEmailBatchRequest(messages=messages[:10], idempotency_key="batch-1"),
            metadata=tenant.metadata,
        )
    )
    assert conflict.code == grpc.StatusCode.ALREADY_EXISTS
    assert conflict.reason == "IDEMPOTENCY_KEY_ALREADY_EXISTS"


async def test_batch_retry_after_partial_store_keeps_ids(
    local_mail: LocalMail, tenant: Tenant
) -> None:
    # A first attempt that reserved the key and stored only some emails (a crash) is completed
    # by the retry under the same ids, each email stored once.
    _, domain = local_mail.add_domain(tenant, port=2525)
    messages = [message(domain, to=[f"r{i}@example.org"]) for i in range(5)]
    first = await local_mail.stub.SendEmailBatch(
        E.SendEmailBatchRequest(messages=messages, idempotency_key="k2"),
        metadata=tenant.metadata,
    )
    db = local_mail.app.running.database.db
    # Simulate the crash: forget the stored answer and two of the emails.
    await db["email_batches"].update_one({"_id": f"{tenant.id}\x1fk2"}, {"$set": {"results": None}})
    lost = [r.id for r in first.results[:2]]
    await db["emails"].delete_many({"_id": {"$in": lost}})
    again = await local_mail.stub.SendEmailBatch(
        E.SendEmailBatchRequest(messages=messages, idempotency_key="k2"),
        metadata=tenant.metadata,
    )
    assert [r.id for r in again.results] == [r.id for r in first.results]
    assert await db["emails"].count_documents({"tenant_id": tenant.id}) == 5


@pytest.mark.parametrize("size", [1, 49])
async def test_batch_isolated_per_tenant(
    local_mail: LocalMail, tenant: Tenant, other_tenant: Tenant, size: int
) -> None:
    # Another tenant's template is not found from a batch; the batch's key is per tenant.
    created = await create(local_mail, tenant)
    await publish(local_mail, tenant, created.id)
    _, domain = local_mail.add_domain(other_tenant, port=2525)
    answer = await local_mail.stub.SendEmailBatch(
        E.SendEmailBatchRequest(
            messages=[message(domain, text="", template=created.id)] * size,
            idempotency_key="shared",
        ),
        metadata=other_tenant.metadata,
    )
    assert {r.error.reason for r in answer.results} == {"TEMPLATE_NOT_FOUND"}
    assert {v.field for r in answer.results for v in r.error.field_violations} == {
        f"messages[{i}].template" for i in range(size)
    }


async def test_names_stay_unique_through_renames_and_crashed_deletes(
    local_mail: LocalMail, tenant: Tenant
) -> None:
    # A rename to a taken name is refused; a name claim left by a delete that crashed before
    # releasing it (its template is gone) does not block the name for ever.
    first = await create(local_mail, tenant, name="first")
    await create(local_mail, tenant, name="second")
    taken = await failure_of(
        local_mail.stub.UpdateTemplate(
            E.UpdateTemplateRequest(id=first.id, name="SECOND", subject="s", text="t"),
            metadata=tenant.metadata,
        )
    )
    assert taken.reason == "TEMPLATE_ALREADY_EXISTS"
    still = await local_mail.stub.GetTemplate(
        E.GetTemplateRequest(id="first"), metadata=tenant.metadata
    )
    assert still.id == first.id
    db = local_mail.app.running.database.db
    await db[TEMPLATE_NAMES].insert_one(
        {"_id": f"{tenant.id}\x1forphan", "tenant_id": tenant.id, "template_id": "0" * 24}
    )
    orphan = await create(local_mail, tenant, name="orphan")
    claim = await db[TEMPLATE_NAMES].find_one({"_id": f"{tenant.id}\x1forphan"})
    assert claim is not None
    assert claim["template_id"] == orphan.id


async def test_batch_message_with_stray_template_fields(
    local_mail: LocalMail, tenant: Tenant
) -> None:
    # A message that cannot even be read as a send is that message's error, with its path.
    _, domain = local_mail.add_domain(tenant, port=2525)
    answer = await local_mail.stub.SendEmailBatch(
        E.SendEmailBatchRequest(messages=[message(domain), message(domain, template_version=3)]),
        metadata=tenant.metadata,
    )
    assert answer.accepted_count == 1
    assert [v.field for v in answer.results[1].error.field_violations] == [
        "messages[1].templateVersion"
    ]
    negative = await failure_of(
        local_mail.stub.RenderTemplate(
            E.RenderTemplateRequest(id="anything", version=-1), metadata=tenant.metadata
        )
    )
    assert set(negative.field_violations) == {"version"}
