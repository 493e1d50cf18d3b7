"""Delivery through real relays on loopback: outcomes per SMTP reply, retries, reuse, limits.

The relays are `ScriptedRelay` servers answering what each test scripts; the clock is manual,
so retry times are asserted exactly (jitter 0 unless a test turns it on).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import aiosmtplib
import pytest
from azora.mail.v1 import mail_pb2
from prometheus_client import REGISTRY

from services.mail.app import build_app
from services.mail.relay_directory import RelaySecurity
from services.mail.repository import EMAILS
from services.mail.return_paths import ReturnPaths
from tests.conftest import Tenant
from tests.mail.conftest import LocalMail, Script, ScriptedRelay

Start = Callable[[Script], "asyncio.Future[ScriptedRelay]"]
E = mail_pb2
SENT, DEFERRED, BOUNCED = E.EMAIL_STATUS_SENT, E.EMAIL_STATUS_DEFERRED, E.EMAIL_STATUS_BOUNCED


async def send_one(mail: LocalMail, tenant: Tenant, name: str, **fields: object) -> str:
    request: dict[str, object] = {
        "from_address": f"Sender <s@{name}>",
        "to": ["a@example.org"],
        "subject": "hello",
        "text": "body",
        **fields,
    }
    return (await mail.send(tenant, **request)).id


async def reach_status(
    mail: LocalMail, tenant: Tenant, email_id: str, status: int, *, within: float = 5.0
) -> None:
    """Poll the email until it has `status`; fail, showing the last one, after `within` s."""
    deadline = asyncio.get_running_loop().time() + within
    while (current := (await mail.get(tenant, email_id)).status) != status:
        assert asyncio.get_running_loop().time() < deadline, E.EmailStatus.Name(current)
        await asyncio.sleep(0.02)


def sample(name: str, **labels: str) -> float:
    """The sum of the process registry's samples of `name` carrying `labels` (0 before use)."""
    return sum(
        s.value
        for family in REGISTRY.collect()
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    )


def types(email: mail_pb2.Email) -> list[str]:
    return [E.EventType.Name(e.type).removeprefix("EVENT_TYPE_") for e in email.events]


async def test_accepted_by_the_relay_is_sent(
    local_mail: LocalMail, tenant: Tenant, scripted_relay: Start
) -> None:
    # 250 for everything: SENT per recipient with the reply, Bcc only in the envelope.
    relay = await scripted_relay(Script())
    _, name = local_mail.add_domain(tenant, port=relay.port)
    sent_before = sample("azora_email_deliveries_total", outcome="sent")
    signed_before = sample("azora_dkim_signatures_total", outcome="signed")
    email_id = await send_one(
        local_mail, tenant, name, cc=["c@example.org"], bcc=["hidden@example.org"]
    )
    assert await local_mail.worker().run_once() == 1
    # Counted once in the delivery metric; no key, so nothing signed.
    assert sample("azora_email_deliveries_total", outcome="sent") == sent_before + 1
    assert sample("azora_email_deliveries_total", outcome="sent", domain=name) == 1
    assert sample("azora_dkim_signatures_total", outcome="signed") == signed_before
    email = await local_mail.get(tenant, email_id)
    assert email.status == SENT
    assert email.attempts == 1
    assert not email.HasField("next_attempt_time")
    assert {
        (r.address, r.status, r.last_reply.code, r.last_reply.enhanced_code)
        for r in email.recipients
    } == {
        (a, E.RECIPIENT_STATUS_SENT, 250, "2.0.0")
        for a in ("a@example.org", "c@example.org", "hidden@example.org")
    }
    assert types(email) == ["ACCEPTED", "CLAIMED", "SENT", "SENT", "SENT"]
    # One transaction per recipient, each with its own return path (VERP) on the bounce domain.
    paths = ReturnPaths.from_settings(local_mail.settings)
    assert sorted(r.rcpt_to[0] for r in relay.received) == [
        "a@example.org",
        "c@example.org",
        "hidden@example.org",
    ]
    for received in relay.received:
        [rcpt] = received.rcpt_to
        assert received.message_id == f"<{email.message_id}>"
        assert received.mail_from.endswith(f"@bounces.{name}")
        token = paths.parse(received.mail_from)
        assert token is not None
        assert (token.email_id, token.names(rcpt)) == (email_id, True)
        assert b"hidden@example.org" not in received.data
    # Nothing is left to do.
    assert await local_mail.worker().run_once() == 0


@pytest.mark.parametrize(
    ("script", "code"),
    [
        (Script(greeting="421 4.3.2 try later"), 421),
        (Script(mail="451 4.3.0 local problem"), 451),
        (Script(rcpt={"a@example.org": "450 4.2.0 mailbox busy"}), 450),
        (Script(rcpt={"a@example.org": "452 4.2.2 over quota"}), 452),
        (Script(final="451 4.3.0 try again"), 451),
        (Script(final="421 4.4.2 closing"), 421),
        (Script(final="DROP"), 0),  # connection lost mid-DATA
        (Script(final="HANG"), 0),  # no reply to the final dot: timeout
        (Script(greeting="HANG"), 0),  # silent server
    ],
)
async def test_temporary_failures_defer_then_retry(
    local_mail: LocalMail, tenant: Tenant, scripted_relay: Start, script: Script, code: int
) -> None:
    # 4xx, drops and timeouts: DEFERRED for min backoff (60 s) with the reply recorded; the
    # retry after that time succeeds once the relay recovers.
    relay = await scripted_relay(script)
    _, name = local_mail.add_domain(tenant, port=relay.port, timeout=0.5)
    email_id = await send_one(local_mail, tenant, name)
    now = local_mail.clock.now()
    await local_mail.worker().run_once()
    email = await local_mail.get(tenant, email_id)
    assert email.status == DEFERRED
    [rcpt] = email.recipients
    assert rcpt.status == E.RECIPIENT_STATUS_DEFERRED
    assert rcpt.last_reply.code == code
    assert rcpt.last_reply.text
    assert email.next_attempt_time.ToDatetime(now.tzinfo) == now + timedelta(seconds=60)
    assert types(email)[-1] == "DEFERRED"
    assert email.events[-1].reply.code == code
    assert relay.received == []
    # Not due yet: nothing happens.
    local_mail.clock.advance(timedelta(seconds=59))
    assert await local_mail.worker().run_once() == 0
    relay.script = Script()
    local_mail.clock.advance(timedelta(seconds=1))
    assert await local_mail.worker().run_once() == 1
    email = await local_mail.get(tenant, email_id)
    assert email.status == SENT
    assert email.attempts == 2
    assert email.recipients[0].attempts == 2
    assert len(relay.received) == 1


@pytest.mark.parametrize("script", [Script(greeting="DROP"), Script(mail="DROP")])
async def test_an_unreachable_relay_is_tried_once_per_attempt_not_once_per_recipient(
    local_mail: LocalMail, tenant: Tenant, scripted_relay: Start, script: Script
) -> None:
    # Each recipient has its own transaction (its own return path), but a relay that gives no
    # reply is not tried again for the other recipients: all of them are deferred with it.
    relay = await scripted_relay(script)
    _, name = local_mail.add_domain(tenant, port=relay.port, timeout=0.5)
    email_id = await send_one(local_mail, tenant, name, cc=["c@example.org", "d@example.org"])
    await local_mail.worker().run_once()
    assert relay.connections == 1
    email = await local_mail.get(tenant, email_id)
    assert email.status == DEFERRED
    assert {(r.status, r.last_reply.code) for r in email.recipients} == {
        (E.RECIPIENT_STATUS_DEFERRED, 0)
    }
    assert len({r.last_reply.text for r in email.recipients}) == 1


async def test_no_final_reply_to_data_is_retried_and_flagged_as_possibly_delivered(
    local_mail: LocalMail, tenant: Tenant, scripted_relay: Start
) -> None:
    # A timeout after the message was sent may hide a delivery (RFC 5321 4.5.3.2): deferred,
    # and the reply says a duplicate is possible; a drop before DATA does not say so.
    relay = await scripted_relay(Script(final="HANG"))
    _, name = local_mail.add_domain(tenant, port=relay.port, timeout=0.5)
    after_data = await send_one(local_mail, tenant, name)
    await local_mail.worker().run_once()
    reply = (await local_mail.get(tenant, after_data)).recipients[0].last_reply
    assert reply.text.startswith("during DATA: timeout")
    assert "may have accepted it" in reply.text
    relay.script = Script(mail="DROP")
    before_data = await send_one(local_mail, tenant, name)
    await local_mail.worker().run_once()
    reply = (await local_mail.get(tenant, before_data)).recipients[0].last_reply
    assert reply.text.startswith("during MAIL FROM: connection lost")
    assert "may have accepted it" not in reply.text


@pytest.mark.parametrize(
    ("script", "code"),
    [
        (Script(rcpt={"a@example.org": "550 5.1.1 no such user"}), 550),
        (Script(final="552 5.3.4 message too big"), 552),
        (Script(final="554 5.7.1 rejected as spam"), 554),
        (Script(mail="550 5.7.1 sender refused"), 550),
    ],
)
async def test_permanent_failures_bounce_without_retry(
    local_mail: LocalMail, tenant: Tenant, scripted_relay: Start, script: Script, code: int
) -> None:
    # 5xx: BOUNCED with the reply and reason; never tried again.
    relay = await scripted_relay(script)
    _, name = local_mail.add_domain(tenant, port=relay.port)
    email_id = await send_one(local_mail, tenant, name)
    await local_mail.worker().run_once()
    email = await local_mail.get(tenant, email_id)
    assert email.status == BOUNCED
    assert email.recipients[0].status == E.RECIPIENT_STATUS_BOUNCED
    assert email.recipients[0].last_reply.code == code
    assert email.events[-1].type == E.EVENT_TYPE_BOUNCED
    assert email.events[-1].detail.startswith(f"smtp; {code} 5.")
    assert not email.HasField("next_attempt_time")
    local_mail.clock.advance(timedelta(days=1))
    assert await local_mail.worker().run_once() == 0


async def test_partial_rejection_is_handled_per_recipient(
    local_mail: LocalMail, tenant: Tenant, scripted_relay: Start
) -> None:
    # One of three recipients refused permanently, one temporarily: the accepted one is
    # delivered once, the 4xx one later, the 5xx one never.
    relay = await scripted_relay(
        Script(rcpt={"b@example.org": "550 5.1.1 unknown", "c@example.org": "451 4.7.1 grey"})
    )
    _, name = local_mail.add_domain(tenant, port=relay.port)
    email_id = await send_one(
        local_mail, tenant, name, to=["a@example.org", "b@example.org", "c@example.org"]
    )
    await local_mail.worker().run_once()
    email = await local_mail.get(tenant, email_id)
    assert email.status == DEFERRED
    assert [r.status for r in email.recipients] == [
        E.RECIPIENT_STATUS_SENT,
        E.RECIPIENT_STATUS_BOUNCED,
        E.RECIPIENT_STATUS_DEFERRED,
    ]
    assert [r.rcpt_to for r in relay.received] == [["a@example.org"]]
    relay.script = Script()
    local_mail.clock.advance(timedelta(seconds=60))
    await local_mail.worker().run_once()
    email = await local_mail.get(tenant, email_id)
    assert email.status == E.EMAIL_STATUS_PARTIALLY_SENT
    assert [r.status for r in email.recipients] == [
        E.RECIPIENT_STATUS_SENT,
        E.RECIPIENT_STATUS_BOUNCED,
        E.RECIPIENT_STATUS_SENT,
    ]
    assert [r.rcpt_to for r in relay.received] == [["a@example.org"], ["c@example.org"]]


async def test_backoff_doubles_to_the_cap_then_gives_up(
    local_mail: LocalMail, tenant: Tenant, scripted_relay: Start
) -> None:
    # Always 451: waits 60, 120, 240, 480, 600, 600... and FAILED at the one-hour lifetime.
    relay = await scripted_relay(Script(final="451 4.3.0 later"))
    _, name = local_mail.add_domain(tenant, port=relay.port)
    email_id = await send_one(local_mail, tenant, name)
    accepted = local_mail.clock.now()
    waits = []
    for _ in range(20):
        await local_mail.worker().run_once()
        email = await local_mail.get(tenant, email_id)
        if email.status != DEFERRED:
            break
        due = email.next_attempt_time.ToDatetime(accepted.tzinfo)
        waits.append((due - local_mail.clock.now()).total_seconds())
        local_mail.clock.advance(due - local_mail.clock.now())
    assert waits[:6] == [60, 120, 240, 480, 600, 600]
    # The last wait is cut so the final attempt happens exactly at the give-up time.
    assert local_mail.clock.now() == accepted + timedelta(hours=1)
    assert email.status == E.EMAIL_STATUS_FAILED
    assert email.recipients[0].status == E.RECIPIENT_STATUS_FAILED
    assert email.events[-1].type == E.EVENT_TYPE_FAILED
    assert "451" in email.events[-1].detail


async def test_jitter_shortens_waits_within_its_fraction(
    local_mail: LocalMail, tenant: Tenant, scripted_relay: Start
) -> None:
    # With 50 % jitter the first retry lands between 30 and 60 seconds, not always at 60.
    relay = await scripted_relay(Script(final="451 4.3.0 later"))
    _, name = local_mail.add_domain(tenant, port=relay.port)
    ids = [await send_one(local_mail, tenant, name) for _ in range(8)]
    await local_mail.worker(AZORA_MAIL_RETRY_JITTER="0.5").run_once()
    now = local_mail.clock.now()
    waits = set()
    for email_id in ids:
        email = await local_mail.get(tenant, email_id)
        waits.add((email.next_attempt_time.ToDatetime(now.tzinfo) - now).total_seconds())
    assert all(30 <= w <= 60 for w in waits)
    assert len(waits) > 1


@pytest.mark.parametrize(("emails", "loops", "connections"), [(12, 8, 2), (40, 24, 12)])
async def test_connections_are_reused_and_bounded_per_relay(
    local_mail: LocalMail,
    tenant: Tenant,
    scripted_relay: Start,
    emails: int,
    loops: int,
    connections: int,
) -> None:
    # More emails than delivery loops, more loops than connections to the relay: every email
    # is delivered over those connections, never more at once, and none is opened twice (a
    # connection done with its transaction is kept for the next, also with many connections).
    # Two rounds: the second finds the first's connections idle and opens none.
    relay = await scripted_relay(Script(final_delay=0.05))
    _, name = local_mail.add_domain(tenant, port=relay.port)
    worker = local_mail.worker(
        AZORA_MAIL_WORKER_CONCURRENCY=str(loops), AZORA_MAIL_RELAY_CONNECTIONS=str(connections)
    )
    ids: list[str] = []
    for _ in range(2):
        ids += [await send_one(local_mail, tenant, name) for _ in range(emails)]
        assert await worker.run_once() == emails
    assert relay.max_active <= connections
    assert relay.connections <= connections
    assert len(relay.received) == 2 * emails
    for email_id in ids:
        assert (await local_mail.get(tenant, email_id)).status == SENT


async def test_every_message_is_dkim_signed_when_the_domain_has_a_key(
    local_mail: LocalMail, tenant: Tenant, scripted_relay: Start
) -> None:
    # An active key in the directory: the relay receives a DKIM-Signature for the domain's d=.
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from services.mail.relay_directory import SigningKey

    relay = await scripted_relay(Script())
    domain_id, name = local_mail.add_domain(tenant, port=relay.port)
    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    local_mail.relays.add_key(
        tenant_id=tenant.id,
        key=SigningKey(domain_id, name, "sel1", "rsa-sha256", pem),
    )
    await send_one(local_mail, tenant, name)
    await send_one(local_mail, tenant, name)
    await local_mail.worker().run_once()
    assert len(relay.received) == 2
    for received in relay.received:
        assert received.data.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;")
        assert f"d={name};".encode() in received.data.split(b"\r\n\r\n")[0].replace(b"\r\n ", b" ")


async def test_relay_without_required_starttls_is_a_temporary_failure(
    local_mail: LocalMail, tenant: Tenant, scripted_relay: Start
) -> None:
    # STARTTLS required but the relay offers none: a TLS failure is temporary (deferred).
    relay = await scripted_relay(Script())
    _, name = local_mail.add_domain(
        tenant, port=relay.port, security=RelaySecurity.STARTTLS_REQUIRED
    )
    email_id = await send_one(local_mail, tenant, name)
    await local_mail.worker().run_once()
    email = await local_mail.get(tenant, email_id)
    assert email.status == DEFERRED
    reply = email.recipients[0].last_reply
    assert reply.code == 0
    assert "starttls" in reply.text.lower(), reply.text
    assert relay.received == []


async def test_cancelled_worker_hands_back_what_it_holds(
    local_mail: LocalMail, tenant: Tenant, scripted_relay: Start
) -> None:
    # A worker stopped mid-delivery (relay silent after DATA) releases the lease: the email is
    # due again at once instead of after the lease.
    relay = await scripted_relay(Script(final="HANG"))
    _, name = local_mail.add_domain(tenant, port=relay.port, timeout=30)
    email_id = await send_one(local_mail, tenant, name)
    worker = local_mail.worker()
    task = asyncio.create_task(worker.run())
    await reach_status(local_mail, tenant, email_id, E.EMAIL_STATUS_SENDING)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    email = await local_mail.get(tenant, email_id)
    assert email.status == E.EMAIL_STATUS_QUEUED
    assert email.attempts == 0
    relay.script = Script()
    assert await local_mail.worker().run_once() == 1
    assert (await local_mail.get(tenant, email_id)).status == SENT


class HeldClaims:
    """A delivery queue whose claims, once won, wait for `gate` before the worker gets them."""

    def __init__(self, queue: Any) -> None:
        self.queue, self.won, self.gate = queue, asyncio.Event(), asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.queue, name)

    async def claim_batch(self, **kwargs: Any) -> Any:
        batch = await self.queue.claim_batch(**kwargs)
        self.won.set()
        await self.gate.wait()
        return batch


async def test_a_worker_cancelled_while_claiming_hands_back_what_the_claim_won(
    local_mail: LocalMail, tenant: Tenant, scripted_relay: Start
) -> None:
    # The claim's lease is in the database, but the worker has not got the email yet when it is
    # cancelled: the email must be due again at once, not leased (SENDING) until the lease ends.
    relay = await scripted_relay(Script())
    _, name = local_mail.add_domain(tenant, port=relay.port)
    email_id = await send_one(local_mail, tenant, name)
    worker = local_mail.worker()
    held = HeldClaims(worker._queue)
    worker._queue = held
    task = asyncio.create_task(worker.claim_batch(1))
    await held.won.wait()
    assert (await local_mail.get(tenant, email_id)).status == E.EMAIL_STATUS_SENDING
    task.cancel()
    await asyncio.sleep(0)
    held.gate.set()  # the claim in flight finishes; the cancelled worker releases it
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()
    assert (await local_mail.get(tenant, email_id)).status == E.EMAIL_STATUS_QUEUED
    assert await local_mail.worker().run_once() == 1
    assert (await local_mail.get(tenant, email_id)).status == SENT


async def test_a_worker_whose_delivery_swallowed_its_cancellation_still_stops(
    local_mail: LocalMail,
    tenant: Tenant,
    scripted_relay: Start,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Libraries sometimes turn a cancellation into an ordinary outcome (a timeout that met it,
    # a driver's "Lock is not acquired"). A delivery loop that got one back must still end when
    # its worker is cancelled, not wait for the next email forever.
    relay = await scripted_relay(Script())
    _, name = local_mail.add_domain(tenant, port=relay.port)
    await send_one(local_mail, tenant, name)
    worker = local_mail.worker()
    started = asyncio.Event()

    async def swallowing(claimed: object) -> None:
        started.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()

    monkeypatch.setattr(worker, "deliver", swallowing)
    task = asyncio.create_task(worker.run())
    await started.wait()
    task.cancel()
    # A bound so that the old behaviour (waiting forever) fails instead of hanging the suite.
    done, _ = await asyncio.wait({task}, timeout=30)
    assert task in done
    assert task.cancelled()


async def test_a_cancellation_the_smtp_client_disguised_records_no_outcome(
    local_mail: LocalMail,
    tenant: Tenant,
    scripted_relay: Start,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What Python 3.11's wait_for can do inside aiosmtplib: the delivery is cancelled while the
    # relay's reply is awaited and the client raises "disconnected" instead. That is no reply
    # of the relay: nothing is recorded (no deferral), and the email is handed back at once.
    relay = await scripted_relay(Script())
    _, name = local_mail.add_domain(tenant, port=relay.port)
    email_id = await send_one(local_mail, tenant, name)

    async def cancelled_in_disguise(self: aiosmtplib.SMTP, *args: Any, **kwargs: Any) -> Any:
        asyncio.current_task().cancel()  # type: ignore[union-attr]
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            raise aiosmtplib.SMTPServerDisconnected("connection lost") from None
        raise AssertionError("not cancelled")

    monkeypatch.setattr(aiosmtplib.SMTP, "data", cancelled_in_disguise)
    worker = local_mail.worker()
    claimed = await worker.claim()
    assert claimed is not None
    with pytest.raises(asyncio.CancelledError):
        await worker.deliver(claimed)
    email = await local_mail.get(tenant, email_id)
    assert email.status == E.EMAIL_STATUS_QUEUED
    assert email.attempts == 0
    assert "EVENT_TYPE_DEFERRED" not in types(email)


async def test_expired_lease_is_claimed_again(
    local_mail: LocalMail, tenant: Tenant, scripted_relay: Start
) -> None:
    # A claim whose worker vanished: after the lease (30 s) another worker delivers it, and the
    # vanished worker's late write is fenced out by the lease token.
    relay = await scripted_relay(Script())
    _, name = local_mail.add_domain(tenant, port=relay.port)
    email_id = await send_one(local_mail, tenant, name)
    ghost = local_mail.worker()
    claimed = await ghost.claim()
    assert claimed is not None
    assert await local_mail.worker().run_once() == 0  # leased: not claimable
    local_mail.clock.advance(timedelta(seconds=30))
    assert await local_mail.worker().run_once() == 1
    assert (await local_mail.get(tenant, email_id)).status == SENT
    assert await ghost.deliver(claimed) is None  # its record is refused
    email = await local_mail.get(tenant, email_id)
    assert email.status == SENT
    assert types(email).count("CLAIMED") == 2


async def test_service_process_runs_its_own_workers_and_releases_on_stop(
    local_mail: LocalMail, tenant: Tenant, scripted_relay: Start
) -> None:
    # build_app with workers: an accepted email is delivered without anyone calling a worker;
    # stopping the service while a delivery hangs hands that email back (QUEUED, due now).
    relay = await scripted_relay(Script())
    _, name = local_mail.add_domain(tenant, port=relay.port, timeout=30)
    app = await build_app(
        local_mail.settings,
        clock=local_mail.clock,
        bind="127.0.0.1:0",
        senders=local_mail.senders,
        relays=local_mail.lookup,
        run_workers=True,
    )
    try:
        email_id = await send_one(local_mail, tenant, name)
        await reach_status(local_mail, tenant, email_id, SENT, within=10)
        relay.script = Script(final="HANG")
        stuck = await send_one(local_mail, tenant, name)
        await reach_status(local_mail, tenant, stuck, E.EMAIL_STATUS_SENDING, within=10)
    finally:
        await app.running.stop(None)
    assert (await local_mail.get(tenant, stuck)).status == E.EMAIL_STATUS_QUEUED


async def test_delivery_refuses_relays_on_non_public_addresses_when_told_to(
    local_mail: LocalMail, tenant: Tenant, scripted_relay: Start
) -> None:
    # The SSRF guard at every connection (production's default): a relay on loopback is not
    # connected to; the attempt is a temporary failure saying why, so fixing the relay's DNS
    # lets the retry through before the email expires.
    relay = await scripted_relay(Script())
    _, name = local_mail.add_domain(tenant, port=relay.port)
    email_id = await send_one(local_mail, tenant, name)
    guarded = local_mail.worker(AZORA_SMTP_ALLOW_PRIVATE_HOSTS="false")
    assert await guarded.run_once() == 1
    email = await local_mail.get(tenant, email_id)
    assert email.status == DEFERRED
    reply = email.recipients[0].last_reply
    assert reply.code == 0
    assert "loopback" in reply.text, reply.text
    assert relay.received == []
    assert relay.connections == 0
    # Allowed (the default outside production): the retry goes through.
    local_mail.clock.advance(timedelta(hours=1))
    assert await local_mail.worker().run_once() == 1
    assert (await local_mail.get(tenant, email_id)).status == SENT


async def test_an_email_still_being_stored_is_not_held_for_a_whole_lease(
    local_mail: LocalMail, tenant: Tenant, scripted_relay: Start
) -> None:
    # Queue entries are written before their emails: a claim that lands in between gives its
    # lease back at once, so the email goes out on the next claim instead of after the lease.
    relay = await scripted_relay(Script())
    _, name = local_mail.add_domain(tenant, port=relay.port)
    email_id = await send_one(local_mail, tenant, name)
    db = local_mail.app.running.database.db
    stored = await db[EMAILS].find_one({"_id": email_id})
    assert stored is not None
    await db[EMAILS].delete_one({"_id": email_id})  # as if its insert had not happened yet
    assert await local_mail.worker().run_once() == 0
    await db[EMAILS].insert_one(stored)  # ... and now it has
    assert await local_mail.worker().run_once() == 1  # no clock advance: no lease to wait out
    email = await local_mail.get(tenant, email_id)
    assert email.status == SENT
    assert len(relay.received) == 1


async def test_an_idle_worker_delivers_new_mail_at_once_not_at_its_next_poll(
    local_mail: LocalMail, tenant: Tenant, scripted_relay: Start
) -> None:
    # A worker that found nothing due waits for its next poll (30 s here); mail stored by its
    # own process wakes it, so the email is at the relay long before that poll.
    relay = await scripted_relay(Script())
    _, name = local_mail.add_domain(tenant, port=relay.port)
    worker = local_mail.worker(AZORA_MAIL_POLL_INTERVAL="30")
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.sleep(0.3)  # its first claim found nothing: it is waiting for the poll
        email_id = await send_one(local_mail, tenant, name)
        # Within 5 s: far less than the 30 s poll it would otherwise wait for.
        await reach_status(local_mail, tenant, email_id, SENT)
        assert len(relay.received) == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
