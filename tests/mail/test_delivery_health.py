"""The mail service's part of GET /health: queue age and the relays' last outcomes.

Workers record what happened at each relay (throttled); the suite health report asks the mail
service for it (`MailService.GetDeliveryHealth`, internal) through `MailDeliveryProbe`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta

import grpc
from azora.health.v1 import health_pb2 as suite_pb2
from azora.mail.v1 import mail_pb2

from services.health.mail_client import MailDeliveryProbe
from tests.conftest import Tenant
from tests.mail.conftest import LocalMail, Script, ScriptedRelay
from tests.support.grpc_errors import failure_of
from tests.support.ports import closed_port

Start = Callable[[Script], "asyncio.Future[ScriptedRelay]"]
UP = suite_pb2.COMPONENT_STATUS_UP
DOWN = suite_pb2.COMPONENT_STATUS_DOWN


async def probe(mail: LocalMail, **overrides: object) -> dict[str, suite_pb2.Component]:
    settings = mail.settings.with_overrides(**overrides) if overrides else mail.settings
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{mail.app.running.port}")
    try:
        components = await MailDeliveryProbe(channel, settings=settings).components(deadline=5)
    finally:
        await channel.close()
    return {c.name: c for c in components}


async def send(mail: LocalMail, tenant: Tenant, name: str) -> None:
    await mail.send(tenant, from_address=f"s@{name}", to=["a@example.org"], text="t")


async def test_relays_that_answer_are_up_and_only_unreachable_ones_are_down(
    local_mail: LocalMail, tenant: Tenant, scripted_relay: Start
) -> None:
    # Nothing recorded: up. One relay that never answers: down (degraded suite). One more that
    # answers: up again, the detail counting both.
    before = await probe(local_mail)
    assert before["smtp-relays"].status == UP
    assert before["smtp-relays"].detail == "no delivery attempts recorded yet"
    assert not before["smtp-relays"].required

    _, dead = local_mail.add_domain(tenant, port=closed_port())
    await send(local_mail, tenant, dead)
    assert await local_mail.worker().run_once() == 1
    down = await probe(local_mail)
    assert down["smtp-relays"].status == DOWN
    assert "unreachable: 1" in down["smtp-relays"].detail

    relay = await scripted_relay(Script())
    _, alive = local_mail.add_domain(tenant, port=relay.port)
    await send(local_mail, tenant, alive)
    assert await local_mail.worker().run_once() == 1
    mixed = await probe(local_mail)
    assert mixed["smtp-relays"].status == UP
    assert mixed["smtp-relays"].detail.startswith("2 relays")
    assert "unreachable: 1" in mixed["smtp-relays"].detail
    # Relay names stay out of the (unauthenticated) report.
    assert str(relay.port) not in mixed["smtp-relays"].detail


async def test_a_queue_waiting_too_long_is_down(local_mail: LocalMail, tenant: Tenant) -> None:
    # An email due but not delivered (no worker ran) for longer than the allowed age.
    _, name = local_mail.add_domain(tenant, port=closed_port())
    await send(local_mail, tenant, name)
    fresh = await probe(local_mail, health_queue_max_age=600.0)
    assert fresh["queue"].status == UP
    assert fresh["queue"].detail.startswith("depth 1,")
    local_mail.clock.advance(timedelta(minutes=11))
    late = await probe(local_mail, health_queue_max_age=600.0)
    assert late["queue"].status == DOWN
    assert "over 600 s" in late["queue"].detail


async def test_delivery_health_is_for_services_only(local_mail: LocalMail, tenant: Tenant) -> None:
    # A tenant's credentials do not open the internal rpc.
    failure = await failure_of(
        local_mail.stub.GetDeliveryHealth(
            mail_pb2.GetDeliveryHealthRequest(), metadata=tenant.metadata
        )
    )
    assert failure.code == grpc.StatusCode.PERMISSION_DENIED
