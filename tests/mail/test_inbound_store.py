"""Received messages on FerretDB: idempotent store, pages, field-named errors, retention."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from services.core.clock import ManualClock
from services.core.errors import InvalidArgument, NotFound
from services.core.ids import new_id
from services.mail.inbound.store import (
    PENDING_GRACE,
    ActionResult,
    InboundRecord,
    InboundStore,
    MongoInboundRepository,
    Outcome,
    Received,
)
from tests.mail.conftest import LocalMail, local_mail  # noqa: F401 - fixture


def received(recipient: str = "a@example.com", body: bytes = b"hello") -> Received:
    """A received message for `recipient`."""
    return Received(
        raw=b"Subject: hi\r\n\r\n" + body + b"\r\n",
        added_headers=b"Received: from x\r\n",
        envelope_from="sender@example.net",
        recipient=recipient,
        domain_id=new_id(),
        route_id="r1",
        action="store",
        client_address="192.0.2.1",
        helo="mx.example.net",
    )


@pytest.fixture
def store_and_clock(local_mail: LocalMail) -> tuple[InboundStore, ManualClock]:  # noqa: F811
    """A store on the test's database with its own manual clock and pages of 2."""
    clock = ManualClock(datetime(2026, 12, 1, tzinfo=UTC))
    store = InboundStore(
        repository=MongoInboundRepository(local_mail.app.running.database.db),
        clock=clock,
        retention=timedelta(days=30),
        max_message_size=1000,
        default_page_size=2,
        max_page_size=2,
    )
    return store, clock


async def test_store_is_idempotent_and_lists_newest_first(
    store_and_clock: tuple[InboundStore, ManualClock],
) -> None:
    # The same message for the same recipient and route is one record; pages go newest first.
    store, clock = store_and_clock
    tenant = "t-" + new_id()
    first = await store.store(tenant_id=tenant, received=received(body=b"1"))
    again = await store.store(tenant_id=tenant, received=received(body=b"1"))
    assert again.id == first.id
    assert again.received_at == first.received_at
    ids = [first.id]
    for n in (2, 3):
        clock.advance(timedelta(seconds=1))
        ids.append((await store.store(tenant_id=tenant, received=received(body=b"%d" % n))).id)
    page = await store.list(tenant_id=tenant, size=0, page_token="")
    assert [r.id for r in page.records] == ids[::-1][:2]
    rest = await store.list(tenant_id=tenant, size=0, page_token=page.next_page_token)
    assert [r.id for r in rest.records] == [ids[0]]
    assert rest.next_page_token == ""
    got = await store.get(tenant_id=tenant, record_id=ids[0])
    assert got.content == b"Received: from x\r\nSubject: hi\r\n\r\n1\r\n"
    with pytest.raises(NotFound):
        await store.get(tenant_id="t-other", record_id=ids[0])


async def test_bad_input_is_refused_naming_the_field(
    store_and_clock: tuple[InboundStore, ManualClock],
) -> None:
    # Nothing half-written: every bad field is named.
    store, _ = store_and_clock
    bad = Received(
        raw=b"x" * 2000,
        added_headers=b"",
        envelope_from="",
        recipient="",
        domain_id="",
        route_id="",
        action="bounce",
        client_address="",
        helo="",
    )
    with pytest.raises(InvalidArgument) as refused:
        await store.store(tenant_id="t", received=bad)
    fields = {v.field for v in refused.value.violations}
    assert fields == {"raw_message", "recipient", "domain_id", "route_id", "action"}
    for action, target in (("forward", "forward_to"), ("webhook", "webhook_id")):
        with pytest.raises(InvalidArgument) as refused:
            await store.store(tenant_id="t", received=replace(received(), action=action))
        assert {v.field for v in refused.value.violations} == {target, "action"}
    with pytest.raises(InvalidArgument):
        await store.get(tenant_id="t", record_id="../etc")
    with pytest.raises(InvalidArgument):
        await store.list(tenant_id="t", size=0, page_token="garbage")


async def test_retention_removes_expired_messages(
    store_and_clock: tuple[InboundStore, ManualClock],
) -> None:
    # Past the retention the sweeper deletes a message; a younger one stays.
    store, clock = store_and_clock
    tenant = "t-" + new_id()
    old = await store.store(tenant_id=tenant, received=received(body=b"old"))
    clock.advance(timedelta(days=20))
    young = await store.store(tenant_id=tenant, received=received(body=b"young"))
    clock.advance(timedelta(days=11))
    await store.sweep()
    with pytest.raises(NotFound):
        await store.get(tenant_id=tenant, record_id=old.id)
    assert (await store.get(tenant_id=tenant, record_id=young.id)).id == young.id


class CrashingOnce:
    """An action runner whose first call fails as a process dying mid-store would."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def carry_out(self, record: InboundRecord) -> ActionResult:
        self.calls.append(record.id)
        if len(self.calls) == 1:
            raise ConnectionError("gone before the action was set up")
        return ActionResult("done", webhook_delivery_id=f"evt_x:{record.id}")

    async def outcomes(self, records: Sequence[InboundRecord]) -> dict[str, Outcome]:
        return {
            r.id: Outcome("webhook_pending" if r.action_state == "done" else r.action_state)
            for r in records
        }


async def test_an_action_left_pending_is_carried_out_later(
    local_mail: LocalMail,  # noqa: F811
) -> None:
    # The record landed but its action did not (no 250 was given): the client's retry, or else
    # the pending run after the grace period, carries it out once.
    clock = ManualClock(datetime(2026, 12, 1, tzinfo=UTC))
    runner = CrashingOnce()
    store = InboundStore(
        repository=MongoInboundRepository(local_mail.app.running.database.db),
        clock=clock,
        retention=timedelta(days=30),
        max_message_size=1000,
        default_page_size=10,
        max_page_size=10,
        actions=runner,
    )
    tenant = "t-" + new_id()
    message = replace(received(), action="webhook", webhook_id=new_id())
    with pytest.raises(ConnectionError):
        await store.store(tenant_id=tenant, received=message)
    [left] = (await store.list(tenant_id=tenant, size=0, page_token="")).records
    assert left.action_state == "pending"
    await store.finish_pending()  # within the grace period: the client may still retry
    assert len(runner.calls) == 1
    clock.advance(PENDING_GRACE + timedelta(seconds=1))
    await store.finish_pending()
    assert runner.calls == [left.id, left.id]
    page = await store.list(tenant_id=tenant, size=0, page_token="")
    [done] = page.records
    assert (done.action_state, done.webhook_delivery_id) == ("done", f"evt_x:{left.id}")
    assert page.outcomes[done.id] == Outcome("webhook_pending")
    await store.finish_pending()
    again = await store.store(tenant_id=tenant, received=message)  # a late retry
    assert again.id == left.id
    assert len(runner.calls) == 2
