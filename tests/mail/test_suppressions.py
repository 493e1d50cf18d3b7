"""The suppression list over gRPC (mail service, real FerretDB) and the send path's lookup."""

from __future__ import annotations

from datetime import timedelta

import grpc
import pytest
from azora.mail.v1 import suppressions_pb2, suppressions_pb2_grpc
from google.protobuf import timestamp_pb2

from services.mail.feedback.event_wiring import suppression_list_from
from services.mail.feedback.suppression_rules import Reason
from services.mail.feedback.suppression_store import SUPPRESSIONS, SuppressionList
from tests.conftest import Tenant, new_tenant
from tests.mail.conftest import LocalMail
from tests.support.grpc_errors import failure_of

S = suppressions_pb2


@pytest.fixture
async def stub(local_mail: LocalMail) -> suppressions_pb2_grpc.SuppressionServiceAsyncStub:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{local_mail.app.running.port}")
    local_mail.app.running.channels.append(channel)
    return suppressions_pb2_grpc.SuppressionServiceStub(channel)


def lookup(local_mail: LocalMail) -> SuppressionList:
    return suppression_list_from(
        local_mail.settings, local_mail.app.running.database.db, local_mail.clock
    )


async def test_add_get_list_delete(
    local_mail: LocalMail,
    tenant: Tenant,
    stub: suppressions_pb2_grpc.SuppressionServiceAsyncStub,
) -> None:
    # Added addresses are stored in their compared spelling, found whatever the domain's case,
    # listed in address order, and gone after a delete; adding again keeps the entry.
    m = tenant.metadata
    added = await stub.AddSuppressions(
        S.AddSuppressionsRequest(addresses=["Bob@Example.COM", "ann@example.com"]), metadata=m
    )
    assert [s.address for s in added.suppressions] == ["Bob@example.com", "ann@example.com"]
    assert added.added_count == 2
    bob = added.suppressions[0]
    assert (bob.reason, bob.domain, bob.event_id) == ("manual", "example.com", "")
    assert bob.create_time.ToDatetime() == local_mail.clock.now().replace(tzinfo=None)
    assert not bob.HasField("expire_time")
    again = await stub.AddSuppressions(
        S.AddSuppressionsRequest(addresses=["bob@example.com", "Bob@example.com"]), metadata=m
    )
    assert [s.address for s in again.suppressions] == ["bob@example.com", "Bob@example.com"]
    assert again.added_count == 1  # "bob" is another mailbox than "Bob"; "Bob" was there
    got = await stub.GetSuppression(S.GetSuppressionRequest(address="Bob@EXAMPLE.com"), metadata=m)
    assert got == bob
    listed = await stub.ListSuppressions(S.ListSuppressionsRequest(), metadata=m)
    assert [s.address for s in listed.suppressions] == [
        "Bob@example.com",
        "ann@example.com",
        "bob@example.com",
    ]
    await stub.DeleteSuppression(S.DeleteSuppressionRequest(address="Bob@example.com"), metadata=m)
    for call in (
        stub.GetSuppression(S.GetSuppressionRequest(address="Bob@example.com"), metadata=m),
        stub.DeleteSuppression(S.DeleteSuppressionRequest(address="Bob@example.com"), metadata=m),
    ):
        failure = await failure_of(call)
        assert failure.code == grpc.StatusCode.NOT_FOUND
        assert failure.reason == "SUPPRESSION_NOT_FOUND"
    still = await stub.GetSuppression(
        S.GetSuppressionRequest(address="bob@example.com"), metadata=m
    )
    assert still.address == "bob@example.com"
    other = new_tenant(local_mail.settings)
    assert (
        await stub.ListSuppressions(S.ListSuppressionsRequest(), metadata=other.metadata)
    ).suppressions == []


async def test_list_filters_and_pages(
    local_mail: LocalMail,
    tenant: Tenant,
    stub: suppressions_pb2_grpc.SuppressionServiceAsyncStub,
) -> None:
    # Reason, domain and address-prefix filters; pages follow each other in address order.
    m = tenant.metadata
    addresses = [f"user{n:02}@a.example" for n in range(7)] + ["x@b.example", "user99@B.example"]
    await stub.AddSuppressions(S.AddSuppressionsRequest(addresses=addresses), metadata=m)
    await lookup(local_mail).add_automatic(
        tenant_id=tenant.id,
        address="gone@b.example",
        reason=Reason.HARD_BOUNCE,
        event_id="evt_1",
        detail="550 5.1.1 unknown",
    )

    async def listed(**fields: object) -> list[str]:
        out, token = [], ""
        while True:
            page = await stub.ListSuppressions(
                S.ListSuppressionsRequest(page_size=3, page_token=token, **fields),  # type: ignore[arg-type]
                metadata=m,
            )
            out += [s.address for s in page.suppressions]
            token = page.next_page_token
            if not token:
                return out

    everything = sorted([*(a.replace("B.", "b.") for a in addresses), "gone@b.example"])
    assert await listed() == everything
    assert await listed(domain="B.EXAMPLE") == ["gone@b.example", "user99@b.example", "x@b.example"]
    assert await listed(reason="hard_bounce") == ["gone@b.example"]
    assert await listed(reason="manual", domain="b.example") == ["user99@b.example", "x@b.example"]
    assert await listed(address_prefix="user0") == [f"user{n:02}@a.example" for n in range(7)]
    assert await listed(address_prefix="user99@B") == ["user99@b.example"]
    assert await listed(address_prefix="User") == []
    gone = await stub.GetSuppression(S.GetSuppressionRequest(address="gone@b.example"), metadata=m)
    assert (gone.reason, gone.event_id, gone.detail) == (
        "hard_bounce",
        "evt_1",
        "550 5.1.1 unknown",
    )


async def test_add_limits_and_validation_name_the_field(
    local_mail: LocalMail,
    tenant: Tenant,
    stub: suppressions_pb2_grpc.SuppressionServiceAsyncStub,
) -> None:
    # 1,000 at once is fine; 1,001, none, a malformed address or a past expiry is refused
    # with INVALID_ARGUMENT naming the field, and nothing of a refused request is stored.
    m = tenant.metadata
    thousand = [f"u{n}@bulk.example" for n in range(1000)]
    answer = await stub.AddSuppressions(S.AddSuppressionsRequest(addresses=thousand), metadata=m)
    assert answer.added_count == 1000
    past = timestamp_pb2.Timestamp()
    past.FromDatetime(local_mail.clock.now() - timedelta(seconds=1))
    cases = [
        (S.AddSuppressionsRequest(addresses=[*thousand, "one@more.example"]), {"addresses"}),
        (S.AddSuppressionsRequest(), {"addresses"}),
        (
            S.AddSuppressionsRequest(addresses=["ok@new.example", "not an address", "a@b"]),
            {"addresses[1]", "addresses[2]"},
        ),
        (S.AddSuppressionsRequest(addresses=["Ann <ann@new.example>"]), {"addresses[0]"}),
        (S.AddSuppressionsRequest(addresses=["ok@new.example"], expire_time=past), {"expireTime"}),
    ]
    for request, fields in cases:
        failure = await failure_of(stub.AddSuppressions(request, metadata=m))
        assert failure.code == grpc.StatusCode.INVALID_ARGUMENT, request
        assert set(failure.field_violations) == fields
    db = local_mail.app.running.database.db
    assert await db[SUPPRESSIONS].count_documents({"domain": "new.example"}) == 0
    assert await db[SUPPRESSIONS].count_documents({"domain": "more.example"}) == 0
    for request_fields, field in (
        ({"reason": "bounced"}, "reason"),
        ({"domain": "not a domain"}, "domain"),
        ({"page_token": "garbage"}, "pageToken"),
    ):
        failure = await failure_of(
            stub.ListSuppressions(S.ListSuppressionsRequest(**request_fields), metadata=m)  # type: ignore[arg-type]
        )
        assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
        assert set(failure.field_violations) == {field}
    for call in (
        stub.GetSuppression(S.GetSuppressionRequest(address="nope"), metadata=m),
        stub.DeleteSuppression(S.DeleteSuppressionRequest(address="nope"), metadata=m),
    ):
        failure = await failure_of(call)
        assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
        assert set(failure.field_violations) == {"address"}


async def test_send_path_lookup_bounces_and_expiry(
    local_mail: LocalMail,
    tenant: Tenant,
    stub: suppressions_pb2_grpc.SuppressionServiceAsyncStub,
) -> None:
    # `suppressed` answers for the addresses as the caller holds them; a hard bounce suppresses,
    # a mailbox-full one does not; an expired entry stops applying and is swept.
    suppressions = lookup(local_mail)
    later = timestamp_pb2.Timestamp()
    later.FromDatetime(local_mail.clock.now() + timedelta(hours=1))
    await stub.AddSuppressions(
        S.AddSuppressionsRequest(addresses=["temp@example.org"], expire_time=later),
        metadata=tenant.metadata,
    )
    bounced = await suppressions.record_bounce(
        tenant_id=tenant.id,
        address="Dead@Example.org",
        enhanced_code="5.1.1",
        event_id="evt_b",
        detail="550 5.1.1 no such user",
    )
    assert bounced is not None
    assert bounced.address == "Dead@example.org"
    full = await suppressions.record_bounce(
        tenant_id=tenant.id,
        address="full@example.org",
        enhanced_code="5.2.2",
        event_id="evt_f",
        detail="552 5.2.2 mailbox full",
    )
    assert full is None
    # A complaint later does not replace the entry in force (its first cause is kept).
    kept = await suppressions.add_automatic(
        tenant_id=tenant.id, address="Dead@example.org", reason=Reason.COMPLAINT, event_id="evt_c"
    )
    assert (kept.reason, kept.event_id) == (Reason.HARD_BOUNCE, "evt_b")
    asked = ["Dead@EXAMPLE.org", "dead@example.org", "full@example.org", "temp@example.org"]
    found = await suppressions.suppressed(tenant.id, asked)
    assert set(found) == {"Dead@EXAMPLE.org", "temp@example.org"}
    assert found["Dead@EXAMPLE.org"].reason is Reason.HARD_BOUNCE
    assert await suppressions.suppressed(new_tenant(local_mail.settings).id, asked) == {}
    local_mail.clock.advance(timedelta(hours=1))
    assert set(await suppressions.suppressed(tenant.id, asked)) == {"Dead@EXAMPLE.org"}
    failure = await failure_of(
        stub.GetSuppression(
            S.GetSuppressionRequest(address="temp@example.org"), metadata=tenant.metadata
        )
    )
    assert failure.code == grpc.StatusCode.NOT_FOUND
    assert await suppressions.sweep() == 1
    db = local_mail.app.running.database.db
    assert await db[SUPPRESSIONS].count_documents({"address": "temp@example.org"}) == 0
    # Added again after expiry: a fresh entry.
    again = await stub.AddSuppressions(
        S.AddSuppressionsRequest(addresses=["temp@example.org"]), metadata=tenant.metadata
    )
    assert again.added_count == 1
