"""Secrets at rest: a dump of every SMTP collection holds no password and no private key.

Also the sealing scheme itself (services/core/secrets_box.py): authenticated, bound to its
record, and rotatable.
"""

from __future__ import annotations

import base64
import os
from typing import TYPE_CHECKING

import pytest
from azora.smtp.v1 import smtp_pb2
from bson import json_util
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from pymongo import AsyncMongoClient

from services.core.secrets_box import SecretsBox, SecretsError, key_id
from services.core.settings import Settings
from services.smtp.app import SmtpApp
from services.smtp.repository import AUTH_RECORDS, CONFIGS, KEYRINGS
from tests.conftest import Tenant
from tests.smtp.conftest import PASSWORD, USERNAME, register
from tests.smtp.verifiers import quoted
from tests.support.dns_server import KnotServer

if TYPE_CHECKING:
    from azora.domain.v1 import domain_pb2_grpc
    from azora.smtp.v1 import smtp_pb2_grpc

    DomainStub = domain_pb2_grpc.DomainServiceAsyncStub
    Stub = smtp_pb2_grpc.SmtpServiceAsyncStub


def forms_of(pem: bytes) -> list[str]:
    """Every way a private key could show up in a dump: PEM, its body, DER, raw seed."""
    key = serialization.load_pem_private_key(pem, password=None)
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    forms = [
        "PRIVATE KEY",
        base64.b64encode(der).decode(),
        der.hex(),
        *(line.decode() for line in pem.splitlines()[1:-1]),
    ]
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        forms += [base64.b64encode(raw).decode(), raw.hex()]
    return forms


async def test_database_dump_contains_no_password_or_private_key(
    smtp_stub: Stub,
    domains_stub: DomainStub,
    smtp_app: SmtpApp,
    smtp_settings: Settings,
    tenant: Tenant,
    knot_server: KnotServer,
) -> None:
    # Configure a relay, generate both key types, then read every document with pymongo.
    domain = await register(domains_stub, tenant)
    await smtp_stub.UpdateSmtpConfig(
        smtp_pb2.UpdateSmtpConfigRequest(
            domain_id=domain.id,
            host="smtp.example.com",
            port=587,
            username=USERNAME,
            password=PASSWORD,
        ),
        metadata=tenant.metadata,
    )
    pems: list[bytes] = []
    for algorithm in ("rsa", "ed25519"):
        key = await smtp_stub.GenerateDkimKey(
            smtp_pb2.GenerateDkimKeyRequest(domain_id=domain.id, algorithm=algorithm),
            metadata=tenant.metadata,
        )
        knot_server.set_zone(
            domain.name, [(f"{key.selector}._domainkey", "TXT", quoted(key.record_strings))]
        )
        await smtp_stub.ActivateDkimKey(
            smtp_pb2.ActivateDkimKeyRequest(domain_id=domain.id, selector=key.selector),
            metadata=tenant.metadata,
        )
        signing = await smtp_app.dkim.signing_key(tenant_id=tenant.id, domain_id=domain.id)
        assert signing is not None
        pems.append(signing.private_key_pem)

    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(smtp_settings.mongodb_uri)
    try:
        db = client[smtp_settings.mongodb_database]
        dump = ""
        for name in (CONFIGS, KEYRINGS, AUTH_RECORDS):
            async for doc in db[name].find({}):
                dump += json_util.dumps(doc) + "\n"
    finally:
        await client.close()

    assert domain.id in dump  # the dump really holds this test's documents
    for secret in (
        PASSWORD,
        base64.b64encode(PASSWORD.encode()).decode(),
        PASSWORD.encode().hex(),
    ):
        assert secret not in dump
    for pem in pems:
        for form in forms_of(pem):
            assert form not in dump, form[:40]


def test_sealed_secrets_open_only_with_the_same_key_and_context() -> None:
    # AES-GCM with the record bound as associated data: no swapping, no tampering.
    box = SecretsBox(os.urandom(32))
    sealed = box.seal(b"hunter2", context=b"smtp-password:a")
    assert sealed.startswith(f"v1.{box.primary_key_id}.")
    assert b"hunter2" not in sealed.encode()
    assert box.open(sealed, context=b"smtp-password:a") == b"hunter2"
    assert box.seal(b"hunter2", context=b"x") != box.seal(b"hunter2", context=b"x")
    with pytest.raises(SecretsError):
        box.open(sealed, context=b"smtp-password:b")
    version, kid, body = sealed.split(".")
    flipped = body[:-2] + ("A" if body[-2] != "A" else "B") + body[-1]
    with pytest.raises(SecretsError):
        box.open(f"{version}.{kid}.{flipped}", context=b"smtp-password:a")
    with pytest.raises(SecretsError):
        SecretsBox(os.urandom(32)).open(sealed, context=b"smtp-password:a")
    with pytest.raises(SecretsError):
        box.open("not-sealed", context=b"smtp-password:a")


def test_master_key_rotation_keeps_old_secrets_readable() -> None:
    # A new primary key seals; the previous one still opens what it sealed; a secret written
    # again is sealed with the new key alone.
    old, new = os.urandom(32), os.urandom(32)
    sealed_old = SecretsBox(old).seal(b"secret", context=b"c")
    rotated = SecretsBox(new, previous=[old])
    assert rotated.primary_key_id == key_id(new)
    assert rotated.open(sealed_old, context=b"c") == b"secret"
    rewritten = rotated.seal(rotated.open(sealed_old, context=b"c"), context=b"c")
    assert rewritten.split(".")[1] == key_id(new)
    assert SecretsBox(new).open(rewritten, context=b"c") == b"secret"
    with pytest.raises(ValueError, match="32 bytes"):
        SecretsBox(b"short")


def test_previous_keys_come_from_settings() -> None:
    # AZORA_SECRETS_PREVIOUS_KEYS feeds the box; malformed entries stop start-up.
    from services.core.settings import SettingsError

    old = base64.b64encode(os.urandom(32)).decode()
    settings = Settings.from_env({"AZORA_SECRETS_PREVIOUS_KEYS": old})
    sealed = SecretsBox(base64.b64decode(old)).seal(b"x", context=b"c")
    assert SecretsBox.from_settings(settings).open(sealed, context=b"c") == b"x"
    with pytest.raises(SettingsError, match="AZORA_SECRETS_PREVIOUS_KEYS"):
        Settings.from_env({"AZORA_SECRETS_PREVIOUS_KEYS": "not-base64!"})
