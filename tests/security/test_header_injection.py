r"""Header injection and SMTP smuggling (OWASP API8, injection) in every field of an email.

Each field of SendEmail gets payloads with CR/LF, bare LF, bare CR, NUL, and SMTP smuggling
sequences ("\\r\\n.\\r\\n", "\\n.\\n") followed by a forged header or SMTP command. A payload
is either refused with INVALID_ARGUMENT naming the field, or accepted and then neutralised:
the message a real relay (aiosmtpd on loopback, reached by the suite's own delivery workers)
receives has no injected header, no bare CR or LF or NUL in its header section, and the relay
never sees a smuggled second transaction.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from azora.domain.v1 import domain_pb2
from azora.mail.v1 import mail_pb2

from tests.conftest import Tenant
from tests.security.conftest import GrpcStubs, sending_domain
from tests.support.dns_server import KnotServer
from tests.support.grpc_errors import decode
from tests.support.smtp_relay import RunningRelay, start_relay

MARK = "X-Injected"
SMUGGLED_SENDER = "smuggled@evil.test"
PAYLOADS = {
    "crlf": f"\r\n{MARK}: yes",
    "lf": f"\n{MARK}: yes",
    "cr": f"\r{MARK}: yes",
    "nul": f"\x00{MARK}: yes",
    "smuggle crlf": f"\r\n.\r\nMAIL FROM:<{SMUGGLED_SENDER}>\r\nRCPT TO:<x@evil.test>\r\n",
    "smuggle lf": f"\n.\nMAIL FROM:<{SMUGGLED_SENDER}>\nRCPT TO:<x@evil.test>\n",
}


@pytest.fixture(scope="module")
async def relay() -> AsyncIterator[RunningRelay]:
    """A recording relay for this module's sends (tests/support/smtp_relay.py)."""
    running = await start_relay(hostname="relay.security.test")
    yield running
    await running.close()


@pytest.fixture(scope="module")
async def sender(
    stack_stubs: GrpcStubs, knot_server: KnotServer, relay: RunningRelay, settings: Any
) -> tuple[Tenant, domain_pb2.Domain]:
    """A tenant whose verified domain sends through `relay`."""
    from tests.conftest import new_tenant

    tenant = new_tenant(settings)
    return tenant, await sending_domain(stack_stubs, knot_server, tenant, relay_port=relay.port)


Build = Callable[[str, str], dict[str, Any]]


def _base(domain: str) -> dict[str, Any]:
    return {
        "from_address": f"App <app@{domain}>",
        "to": ["to@example.org"],
        "subject": "hello",
        "text": "body",
    }


# Field (as the service names it) -> request fields with the payload `p` placed in it.
FIELDS: dict[str, Build] = {
    "from": lambda d, p: {"from_address": f'"App{p}" <app@{d}>'},
    "to": lambda d, p: {"to": [f'"To{p}" <to@example.org>']},
    "cc": lambda d, p: {"cc": [f'"Cc{p}" <cc@example.org>']},
    "bcc": lambda d, p: {"bcc": [f"bcc{p}@example.org"]},
    "reply_to": lambda d, p: {"reply_to": [f'"Reply{p}" <reply@example.org>']},
    "subject": lambda d, p: {"subject": f"hello{p}"},
    "headers.name": lambda d, p: {"headers": [mail_pb2.Header(name=f"X-Custom{p}", value="v")]},
    "headers.value": lambda d, p: {"headers": [mail_pb2.Header(name="X-Custom", value=f"v{p}")]},
    "attachments.filename": lambda d, p: {
        "attachments": [
            mail_pb2.Attachment(filename=f"a{p}.txt", content_type="text/plain", content=b"x")
        ]
    },
    "attachments.content_type": lambda d, p: {
        "attachments": [
            mail_pb2.Attachment(filename="a.txt", content_type=f"text/plain{p}", content=b"x")
        ]
    },
    "tags": lambda d, p: {"tags": [f"tag{p}"]},
    "metadata.key": lambda d, p: {"metadata": {f"key{p}": "v"}},
    "metadata.value": lambda d, p: {"metadata": {"key": f"v{p}"}},
    "text": lambda d, p: {"text": f"line one{p}\r\nline two"},
    "html": lambda d, p: {"html": f"<p>one{p}</p>"},
}


def _header_section(message: bytes) -> bytes:
    head, _, _ = message.partition(b"\r\n\r\n")
    return head


def neutralised(message: bytes) -> list[str]:
    """What is wrong with a delivered message (empty: nothing injected)."""
    problems = []
    head = _header_section(message)
    for line in head.split(b"\r\n"):
        if line.lower().startswith(MARK.lower().encode()):
            problems.append(f"injected header line {line!r}")
    if b"\x00" in head:
        problems.append("NUL in the header section")
    if b"\n" in head.replace(b"\r\n", b"") or b"\r" in head.replace(b"\r\n", b""):
        problems.append("bare CR or LF in the header section")
    return problems


async def _wait_for_final(stubs: GrpcStubs, tenant: Tenant, ids: list[str]) -> dict[str, int]:
    """Poll until every email left the queue (delivered or failed); their statuses."""
    final: dict[str, int] = {}
    for _ in range(300):  # up to ~30 s: a bound for a hung worker, not a speed requirement
        for email_id in ids:
            if email_id in final:
                continue
            email = await stubs.mail.GetEmail(
                mail_pb2.GetEmailRequest(id=email_id), metadata=tenant.metadata
            )
            if email.status in (
                mail_pb2.EMAIL_STATUS_SENT,
                mail_pb2.EMAIL_STATUS_BOUNCED,
                mail_pb2.EMAIL_STATUS_FAILED,
                mail_pb2.EMAIL_STATUS_PARTIALLY_SENT,
            ):
                final[email_id] = email.status
        if len(final) == len(ids):
            return final
        await asyncio.sleep(0.1)
    raise AssertionError(f"emails never left the queue: {set(ids) - set(final)}")


XFAIL: dict[str, str] = {}


@pytest.mark.parametrize(
    "field_name",
    [
        pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=XFAIL[name]))
        if name in XFAIL
        else name
        for name in FIELDS
    ],
)
async def test_payloads_are_refused_or_neutralised(
    field_name: str,
    stack_stubs: GrpcStubs,
    sender: tuple[Tenant, domain_pb2.Domain],
    relay: RunningRelay,
) -> None:
    # Every payload in this field: INVALID_ARGUMENT naming it, or delivered harmlessly.
    tenant, domain = sender
    accepted: dict[str, str] = {}
    for kind, payload in PAYLOADS.items():
        fields = {**_base(domain.name), **FIELDS[field_name](domain.name, payload)}
        try:
            email = await stack_stubs.mail.SendEmail(
                mail_pb2.SendEmailRequest(**fields), metadata=tenant.metadata
            )
        except grpc.aio.AioRpcError as error:
            failure = decode(error)
            assert failure.code == grpc.StatusCode.INVALID_ARGUMENT, (kind, failure)
            root = field_name.split(".")[0]
            named = " ".join(failure.field_violations) + " " + failure.metadata.get("field", "")
            assert root in named or root.replace("_", "") in named.lower().replace("_", ""), (
                kind,
                failure,
            )
            continue
        accepted[email.id] = kind
    if not accepted:
        return
    statuses = await _wait_for_final(stack_stubs, tenant, list(accepted))
    smuggled = [e for e in relay.envelopes if SMUGGLED_SENDER in e.mail_from]
    assert smuggled == [], "a smuggled SMTP transaction reached the relay"
    delivered = {
        kind: e.content
        for e in relay.envelopes
        for email_id, kind in accepted.items()
        if f"<{email_id}@".encode() in e.content  # its Message-ID
    }
    sent = {accepted[i] for i, status in statuses.items() if status == mail_pb2.EMAIL_STATUS_SENT}
    assert set(delivered) == sent, "every email the service calls sent reached the relay"
    problems = {kind: neutralised(content) for kind, content in delivered.items()}
    assert {k: p for k, p in problems.items() if p} == {}
