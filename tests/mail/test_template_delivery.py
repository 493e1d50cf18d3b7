"""Sending with a template through every real part, over gRPC, REST and a batch.

The `e2e` setup of test_end_to_end.py (domain verified in Knot, aiosmtpd relay with STARTTLS and
AUTH, active DKIM key) plus the local REST gateway in front of the mail service. Each message
the relay receives carries exactly what RenderTemplate previews for the same variables, a
variable's markup arrives escaped, and the DKIM signature verifies with dkimpy.
"""

from __future__ import annotations

import email
from collections.abc import AsyncIterator
from email import policy
from email.message import EmailMessage
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from azora.mail.v1 import mail_pb2
from google.protobuf import struct_pb2

from gateway.app import create_app
from gateway.config import GatewayConfig
from services.mail.app import MAIL_SERVICE, make_worker
from services.mail.relay_lookup import smtp_service_relays
from tests.mail.test_end_to_end import EndToEnd, e2e
from tests.smtp.conftest import (  # noqa: F401 - fixtures used by this module
    ca_file,
    server_tls,
    smtp_app,
    smtp_channel,
    smtp_clock,
    smtp_settings,
    smtp_stub,
    tls_ca,
)
from tests.smtp.verifiers import dkimpy_verifies
from tests.support.dns_server import KnotServer

__all__ = ["e2e"]
E = mail_pb2
HTML = (
    "<style>.total { font-weight: bold }</style>"
    "<p>Hello {{ name }},</p>"
    "{% if items %}<ul>{% for item in items %}<li>{{ item.name }}: {{ item.qty }}</li>"
    "{% endfor %}</ul>{% endif %}"
    '<p class="total">Total: {{ "%.2f" | format(total) }}</p>'
)


@pytest.fixture
async def gateway_url(e2e: EndToEnd) -> AsyncIterator[str]:
    """The local REST gateway in front of this test's mail service."""
    app = await create_app(
        e2e.settings.with_overrides(service_name="gateway"),
        config=GatewayConfig(upstreams={MAIL_SERVICE: f"127.0.0.1:{e2e.app.running.port}"}),
    )
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    address: Any = runner.addresses[0]
    yield f"http://127.0.0.1:{address[1]}"
    await runner.cleanup()


def variables(name: str) -> dict[str, Any]:
    return {"name": name, "items": [{"name": "pen", "qty": 2}], "total": 7}


def struct(values: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(values)
    return out


async def deliver(e2e: EndToEnd, count: int) -> None:
    worker = make_worker(
        e2e.settings,
        emails=e2e.app.emails,
        relays=smtp_service_relays(e2e.settings)[0],
        clock=e2e.clock,
    )
    assert await worker.run_once() == count


def parts(raw: bytes) -> tuple[EmailMessage, str, str]:
    msg = email.message_from_bytes(raw, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    html = msg.get_body(("html",))
    text = msg.get_body(("plain",))
    assert html is not None
    assert text is not None
    return (
        msg,
        html.get_content().replace("\r\n", "\n").strip(),
        text.get_content().replace("\r\n", "\n").strip(),
    )


async def test_template_sends_over_grpc_rest_and_batch_signed_and_verified(
    e2e: EndToEnd, gateway_url: str, knot_server: KnotServer
) -> None:
    # One template, three ways in; each received message matches the preview and verifies.
    m = e2e.tenant.metadata
    template = await e2e.stub.CreateTemplate(
        E.CreateTemplateRequest(name="receipt", subject="Receipt for {{ name }}", html=HTML),
        metadata=m,
    )
    await e2e.stub.PublishTemplate(E.PublishTemplateRequest(id=template.id), metadata=m)
    names = ["<i>Grpc</i>", "Rest & Co", "Batch"]
    sent_grpc = await e2e.send(
        to=["grpc@example.org"], text="", template="receipt", variables=struct(variables(names[0]))
    )
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{gateway_url}/api/v1/emails",
            json={
                "from": f"App <app@{e2e.domain}>",
                "to": ["rest@example.org"],
                "template": template.id,
                "templateVersion": 1,
                "variables": variables(names[1]),
            },
            headers={"authorization": f"Bearer {e2e.tenant.token}"},
        ) as response,
    ):
        body = await response.json()
        assert response.status == 200, body
    assert (body["templateId"], body["templateVersion"]) == (template.id, 1)
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{gateway_url}/api/v1/emails/batch",
            json={
                "messages": [
                    {
                        "from": f"App <app@{e2e.domain}>",
                        "to": ["batch@example.org"],
                        "template": "receipt",
                        "variables": variables(names[2]),
                    },
                    {"from": f"App <app@{e2e.domain}>", "to": ["bad"], "text": "x"},
                ],
                "idempotencyKey": "receipts-1",
            },
            headers={"authorization": f"Bearer {e2e.tenant.token}"},
        ) as response,
    ):
        batch = await response.json()
        assert response.status == 200, batch
    assert batch["acceptedCount"] == 1
    assert batch["results"][0]["status"] == "EMAIL_STATUS_QUEUED"
    assert batch["results"][1]["error"]["fieldViolations"][0]["field"] == "messages[1].to[0]"
    got = await e2e.stub.GetEmail(E.GetEmailRequest(id=sent_grpc.id), metadata=m)
    assert (got.template_id, got.template_version) == (template.id, 1)
    await deliver(e2e, 3)
    received = {
        email.message_from_bytes(raw, policy=policy.default)["To"]: raw for raw in e2e.received
    }
    for name, to in zip(names, ["grpc", "rest", "batch"], strict=True):
        raw = received[f"{to}@example.org"]
        preview = await e2e.stub.RenderTemplate(
            E.RenderTemplateRequest(id=template.id, version=1, variables=struct(variables(name))),
            metadata=m,
        )
        msg, html, text = parts(raw)
        assert msg["Subject"] == preview.subject == f"Receipt for {name}"
        assert html == preview.html.strip()
        assert text == preview.text.strip()
        assert '<p class="total" style="font-weight: bold;">Total: 7.00</p>' in html
        assert "<li>pen: 2</li>" in html
        signed = raw.replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n")
        assert dkimpy_verifies(knot_server, signed)
    _, grpc_html, _ = parts(received["grpc@example.org"])
    assert "Hello &lt;i&gt;Grpc&lt;/i&gt;," in grpc_html
    _, rest_html, _ = parts(received["rest@example.org"])
    assert "Hello Rest &amp; Co," in rest_html


async def test_template_rest_routes(e2e: EndToEnd, gateway_url: str) -> None:
    # Every template route through the gateway, with the REST spellings of the fields.
    auth = {"authorization": f"Bearer {e2e.tenant.token}"}
    async with aiohttp.ClientSession(gateway_url, headers=auth) as http:

        async def call(method: str, path: str, body: Any = None) -> tuple[int, Any]:
            async with http.request(method, path, json=body) as response:
                return response.status, await response.json()

        status, created = await call(
            "POST",
            "/api/v1/templates",
            {"name": "digest", "subject": "{{ n }} new", "text": "Hi {{ who }}",
             "defaultVariables": {"who": "there"}},
        )  # fmt: skip
        assert status == 200, created
        tid = created["id"]
        status, published = await call("POST", f"/api/v1/templates/{tid}/publish", {})
        assert (status, published["version"]) == (200, 1), published
        status, updated = await call(
            "PUT", "/api/v1/templates/digest", {"name": "digest", "subject": "{{ n }} news",
                                                "text": "Hello {{ who }}",
                                                "defaultVariables": {"who": "there"}},
        )  # fmt: skip
        assert (status, updated["publishedVersion"]) == (200, 1), updated
        status, rendered = await call(
            "POST", f"/api/v1/templates/{tid}/render", {"variables": {"n": 3}}
        )
        assert status == 200, rendered
        assert (rendered["subject"], rendered["text"]) == ("3 news", "Hello there")
        status, old = await call(
            "POST", f"/api/v1/templates/{tid}/render", {"version": 1, "variables": {"n": 3}}
        )
        assert (status, old["subject"]) == (200, "3 new"), old
        status, missing = await call("POST", f"/api/v1/templates/{tid}/render", {})
        assert status == 400, missing
        assert "variables.n" in str(missing)
        status, versions = await call("GET", f"/api/v1/templates/{tid}/versions")
        assert [v["version"] for v in versions["versions"]] == [1]
        status, listed = await call("GET", "/api/v1/templates?pageSize=10")
        assert [t["id"] for t in listed["templates"]] == [tid]
        status, _ = await call("DELETE", f"/api/v1/templates/{tid}")
        assert status == 200
        status, gone = await call("GET", f"/api/v1/templates/{tid}")
        assert status == 404, gone
