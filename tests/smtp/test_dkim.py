"""DKIM keys: generation, the record to publish, activation, listing, and real verification.

Mail signed with each key type is verified by dkimpy and by OpenDKIM, both reading the
record the service told us to publish from the test Knot server.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from azora.smtp.v1 import smtp_pb2
from google.protobuf import duration_pb2

from services.core.clock import ManualClock
from services.smtp.app import SmtpApp
from tests.conftest import Tenant
from tests.smtp.conftest import register
from tests.smtp.verifiers import (
    dkimpy_verifies,
    message,
    opendkim_verdict,
    quoted,
    sign,
)
from tests.support.dns_server import KnotServer
from tests.support.grpc_errors import failure_of

if TYPE_CHECKING:
    from azora.domain.v1 import domain_pb2_grpc
    from azora.smtp.v1 import smtp_pb2_grpc

    DomainStub = domain_pb2_grpc.DomainServiceAsyncStub
    Stub = smtp_pb2_grpc.SmtpServiceAsyncStub

RSA, ED25519 = "rsa", "ed25519"  # requests name the key type as DKIM writes it (k=)
PENDING = smtp_pb2.DKIM_KEY_STATUS_PENDING
ACTIVE = smtp_pb2.DKIM_KEY_STATUS_ACTIVE


async def generate(
    stub: Stub, tenant: Tenant, domain_id: str, **fields: object
) -> smtp_pb2.DkimKey:
    request = smtp_pb2.GenerateDkimKeyRequest(domain_id=domain_id, **fields)  # type: ignore[arg-type]
    return await stub.GenerateDkimKey(request, metadata=tenant.metadata)


def publish(knot: KnotServer, domain: str, *keys: smtp_pb2.DkimKey) -> None:
    knot.set_zone(
        domain,
        [(f"{k.selector}._domainkey", "TXT", quoted(k.record_strings)) for k in keys]
        or [("www", "A", "192.0.2.1")],
    )


@pytest.mark.parametrize(
    ("algorithm", "bits", "expected_bits", "k"),
    [
        ("", 0, 2048, "rsa"),
        (RSA, 1024, 1024, "rsa"),
        (RSA, 3072, 3072, "rsa"),
        (RSA, 4096, 4096, "rsa"),
        (ED25519, 0, 0, "ed25519"),
    ],
)
async def test_generated_keys_sign_mail_that_dkimpy_and_opendkim_verify(
    smtp_stub: Stub,
    domains_stub: DomainStub,
    smtp_app: SmtpApp,
    tenant: Tenant,
    knot_server: KnotServer,
    tmp_path: Path,
    algorithm: str,
    bits: int,
    expected_bits: int,
    k: str,
) -> None:
    # Publish exactly what the service returns, activate, sign: two verifiers say pass.
    domain = await register(domains_stub, tenant)
    key = await generate(smtp_stub, tenant, domain.id, algorithm=algorithm, key_bits=bits)
    assert key.key_bits == expected_bits
    assert key.status == PENDING
    assert key.record_name == f"{key.selector}._domainkey.{domain.name}"
    assert key.record_value.startswith(f"v=DKIM1; k={k}; p=")
    assert "".join(key.record_strings) == key.record_value
    assert all(len(s.encode()) <= 255 for s in key.record_strings)
    assert len(key.record_strings) == -(-len(key.record_value) // 255)
    assert key.signing_algorithm == ("ed25519-sha256" if k == "ed25519" else "rsa-sha256")
    publish(knot_server, domain.name, key)
    active = await smtp_stub.ActivateDkimKey(
        smtp_pb2.ActivateDkimKeyRequest(domain_id=domain.id, selector=key.selector),
        metadata=tenant.metadata,
    )
    assert active.status == ACTIVE
    assert active.dns_check.status == smtp_pb2.RECORD_CHECK_STATUS_OK
    signing = await smtp_app.dkim.signing_key(tenant_id=tenant.id, domain_id=domain.id)
    assert signing is not None
    assert signing.selector == key.selector
    signed = sign(signing, message(domain.name))
    assert dkimpy_verifies(knot_server, signed)
    verdict = await asyncio.to_thread(opendkim_verdict, knot_server, signed, tmp_path / "ok")
    assert f"s={key.selector}" in verdict, verdict
    assert verdict.endswith("succeeded"), verdict
    # The same checkers reject a message altered after signing, so their "pass" means something.
    tampered = signed.replace(b"Hello from", b"Hullo from")
    assert not dkimpy_verifies(knot_server, tampered)
    verdict = await asyncio.to_thread(opendkim_verdict, knot_server, tampered, tmp_path / "bad")
    assert "succeeded" not in verdict, verdict


async def test_selector_defaults_to_the_date_and_stays_unique(
    smtp_stub: Stub, domains_stub: DomainStub, tenant: Tenant, smtp_clock: ManualClock
) -> None:
    # Without a selector the date is used; a second key the same day gets a suffix.
    domain = await register(domains_stub, tenant)
    first = await generate(smtp_stub, tenant, domain.id, algorithm=ED25519)
    second = await generate(smtp_stub, tenant, domain.id, algorithm=ED25519)
    day = f"az{smtp_clock.now():%Y%m%d}"
    assert first.selector == day
    assert second.selector == f"{day}-2"


async def test_explicit_selector_is_normalised_and_cannot_be_reused(
    smtp_stub: Stub, domains_stub: DomainStub, tenant: Tenant
) -> None:
    # Selectors are lowercased; reusing one for a new key is ALREADY_EXISTS.
    domain = await register(domains_stub, tenant)
    key = await generate(smtp_stub, tenant, domain.id, selector="Mail-2026", algorithm=ED25519)
    assert key.selector == "mail-2026"
    failure = await failure_of(
        generate(smtp_stub, tenant, domain.id, selector="mail-2026", algorithm=ED25519)
    )
    assert failure.code == grpc.StatusCode.ALREADY_EXISTS
    assert failure.resource == ("DkimKey", "mail-2026")


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"selector": "has_underscore"}, "selector"),
        ({"selector": "two.labels"}, "selector"),
        ({"selector": "-leading"}, "selector"),
        ({"selector": "trailing-"}, "selector"),
        ({"selector": "x" * 64}, "selector"),
        ({"selector": "sélecteur"}, "selector"),
        ({"selector": "with space"}, "selector"),
        ({"key_bits": 512}, "keyBits"),
        ({"key_bits": 2047}, "keyBits"),
        ({"key_bits": 8192}, "keyBits"),
        ({"algorithm": ED25519, "key_bits": 2048}, "keyBits"),
        ({"algorithm": "dsa"}, "algorithm"),
    ],
)
async def test_bad_key_requests_are_invalid_argument(
    smtp_stub: Stub,
    domains_stub: DomainStub,
    tenant: Tenant,
    fields: dict[str, object],
    field: str,
) -> None:
    # Every bad selector, size or algorithm is INVALID_ARGUMENT naming the field.
    domain = await register(domains_stub, tenant)
    failure = await failure_of(generate(smtp_stub, tenant, domain.id, **fields))
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in failure.field_violations, failure.field_violations


async def test_activation_needs_the_record_in_dns(
    smtp_stub: Stub, domains_stub: DomainStub, tenant: Tenant, knot_server: KnotServer
) -> None:
    # Unpublished or published with another key: FAILED_PRECONDITION, and the check is kept.
    domain = await register(domains_stub, tenant)
    key = await generate(smtp_stub, tenant, domain.id, algorithm=ED25519)
    other = await generate(smtp_stub, tenant, domain.id, algorithm=ED25519)
    request = smtp_pb2.ActivateDkimKeyRequest(domain_id=domain.id, selector=key.selector)
    publish(knot_server, domain.name)
    failure = await failure_of(smtp_stub.ActivateDkimKey(request, metadata=tenant.metadata))
    assert failure.code == grpc.StatusCode.FAILED_PRECONDITION
    assert failure.reason == "DKIM_RECORD_NOT_PUBLISHED"
    assert failure.precondition_types == ["DNS_RECORD"]
    # Publish the other key's value under this key's name: "different", still refused.
    knot_server.set_zone(
        domain.name, [(f"{key.selector}._domainkey", "TXT", quoted(other.record_strings))]
    )
    failure = await failure_of(smtp_stub.ActivateDkimKey(request, metadata=tenant.metadata))
    assert failure.code == grpc.StatusCode.FAILED_PRECONDITION
    listed = await smtp_stub.ListDkimKeys(
        smtp_pb2.ListDkimKeysRequest(domain_id=domain.id), metadata=tenant.metadata
    )
    check = next(k for k in listed.keys if k.selector == key.selector).dns_check
    assert check.status == smtp_pb2.RECORD_CHECK_STATUS_DIFFERENT
    assert list(check.found) == [other.record_value]
    unknown = smtp_pb2.ActivateDkimKeyRequest(domain_id=domain.id, selector="nosuchkey")
    failure = await failure_of(smtp_stub.ActivateDkimKey(unknown, metadata=tenant.metadata))
    assert failure.resource == ("DkimKey", "nosuchkey")
    bad_overlap = smtp_pb2.ActivateDkimKeyRequest(
        domain_id=domain.id, selector=key.selector, overlap=duration_pb2.Duration(seconds=-1)
    )
    failure = await failure_of(smtp_stub.ActivateDkimKey(bad_overlap, metadata=tenant.metadata))
    assert "overlap" in failure.field_violations


async def test_listing_shows_times_status_and_fresh_dns_checks(
    smtp_stub: Stub, domains_stub: DomainStub, tenant: Tenant, knot_server: KnotServer
) -> None:
    # Keys are listed newest first with algorithm, size, status, times and the DNS check.
    domain = await register(domains_stub, tenant)
    old = await generate(smtp_stub, tenant, domain.id, selector="old", key_bits=1024)
    new = await generate(smtp_stub, tenant, domain.id, selector="new", algorithm=ED25519)
    publish(knot_server, domain.name, old)
    await smtp_stub.ActivateDkimKey(
        smtp_pb2.ActivateDkimKeyRequest(domain_id=domain.id, selector="old"),
        metadata=tenant.metadata,
    )
    listed = await smtp_stub.ListDkimKeys(
        smtp_pb2.ListDkimKeysRequest(domain_id=domain.id, check_dns=True),
        metadata=tenant.metadata,
    )
    assert [k.selector for k in listed.keys] == ["new", "old"]
    newest, oldest = listed.keys
    assert (newest.algorithm, newest.key_bits, newest.status) == (
        smtp_pb2.DKIM_ALGORITHM_ED25519,
        0,
        PENDING,
    )
    assert (oldest.algorithm, oldest.key_bits, oldest.status) == (
        smtp_pb2.DKIM_ALGORITHM_RSA,
        1024,
        ACTIVE,
    )
    assert oldest.HasField("create_time")
    assert oldest.HasField("activate_time")
    assert not newest.HasField("activate_time")
    assert newest.dns_check.status == smtp_pb2.RECORD_CHECK_STATUS_MISSING
    assert oldest.dns_check.status == smtp_pb2.RECORD_CHECK_STATUS_OK
    assert newest.record_value == new.record_value
    assert all(not k.HasField("retire_time") for k in listed.keys)


async def test_pending_keys_never_sign(
    smtp_stub: Stub, domains_stub: DomainStub, smtp_app: SmtpApp, tenant: Tenant
) -> None:
    # Until a key is active there is nothing to sign with (never a key that may be unpublished).
    domain = await register(domains_stub, tenant)
    await generate(smtp_stub, tenant, domain.id, algorithm=ED25519)
    assert await smtp_app.dkim.signing_key(tenant_id=tenant.id, domain_id=domain.id) is None
