"""The API's limits through SMTP, with mail services and submission servers of their own.

The send rate limit and the tenant's sending quota of the mail service count SMTP submissions
like SendEmail calls (451 4.7.1 with the retry delay once used up), and a revoked API key stops
opening sessions once the submission server's key cache (AZORA_API_KEY_CACHE_TTL) has expired.
"""

from __future__ import annotations

import asyncio
import secrets

from azora.iam.v1 import api_keys_pb2, api_keys_pb2_grpc

from services.domain.app import DomainApp
from tests.conftest import Tenant, make_settings
from tests.submission.conftest import (
    RawClient,
    Submission,
    mail_app_like,
    submission_in_front_of,
)
from tests.submission.test_refusals import message


async def send_one(port: int, submission: Submission, subject: str) -> str:
    """One message over implicit TLS; the final reply."""
    client = await RawClient.connect(port, submission.client_context())
    sender = f"app@{submission.domain}"
    try:
        assert (await client.login(submission.api_key)).startswith("235")
        assert (await client.command(f"MAIL FROM:<{sender}>")).startswith("250")
        assert (await client.command("RCPT TO:<jane@example.org>")).startswith("250")
        assert (await client.command("DATA")).startswith("354")
        await client.send(message(sender, subject) + b".\r\n")
        return await client.reply()
    finally:
        await client.close()


async def test_send_rate_limit_is_451_4_7_1_with_the_retry_delay(
    submission: Submission, ferretdb: str, domain_app: DomainApp
) -> None:
    # A send budget of 2 per window: the third message is refused temporarily; the budget is
    # the mail service's own (AZORA_SEND_RATE_LIMIT_MAX), shared with SendEmail.
    settings = make_settings(
        ferretdb,
        f"azora_limits_{secrets.token_hex(4)}",
        AZORA_DOMAIN_SERVICE_TARGET=f"127.0.0.1:{domain_app.running.port}",
        AZORA_SEND_RATE_LIMIT_MAX="2",
        AZORA_SEND_RATE_LIMIT_WINDOW="3600000",
    )
    mail = await mail_app_like(submission, settings)
    app = await submission_in_front_of(submission, mail, settings)
    try:
        port = app.ports["tls"]
        assert (await send_one(port, submission, "one")).startswith("250 2.0.0 Ok: queued as ")
        assert (await send_one(port, submission, "two")).startswith("250 2.0.0 Ok: queued as ")
        third = await send_one(port, submission, "three")
        assert third.startswith("451 4.7.1 "), third
        assert "retry in " in third
    finally:
        await app.stop(0)
        await mail.running.database.client.drop_database(settings.mongodb_database)
        await mail.running.stop(None)


async def test_sending_quota_is_451_4_7_1_naming_it(
    submission: Submission, ferretdb: str, domain_app: DomainApp
) -> None:
    # The tenant's hourly quota (AZORA_QUOTA_EMAILS_PER_HOUR) counts SMTP submissions like
    # SendEmail's: one email, then a temporary refusal that says which limit and when to retry.
    settings = make_settings(
        ferretdb,
        f"azora_quota_{secrets.token_hex(4)}",
        AZORA_DOMAIN_SERVICE_TARGET=f"127.0.0.1:{domain_app.running.port}",
        AZORA_QUOTA_EMAILS_PER_HOUR="1",
    )
    mail = await mail_app_like(submission, settings)
    app = await submission_in_front_of(submission, mail, settings)
    try:
        port = app.ports["tls"]
        assert (await send_one(port, submission, "one")).startswith("250 2.0.0 Ok: queued as ")
        second = await send_one(port, submission, "two")
        assert second.startswith("451 4.7.1 "), second
        assert "1 emails per hour" in second, second
        assert "retry in " in second, second
    finally:
        await app.stop(0)
        await mail.running.database.client.drop_database(settings.mongodb_database)
        await mail.running.stop(None)


async def test_revoked_key_stops_opening_sessions_after_the_cache_ttl(
    submission: Submission,
    tenant: Tenant,
    api_keys_stub: api_keys_pb2_grpc.ApiKeyServiceAsyncStub,
) -> None:
    # With a 0.2 s key cache, a revoked key is refused at AUTH once the cached answer expired.
    settings = submission.settings.with_overrides(api_key_cache_ttl=0.2)
    app = await submission_in_front_of(submission, submission.mail.app, settings)
    try:
        client = await RawClient.connect(app.ports["tls"], submission.client_context())
        assert (await client.login(submission.api_key)).startswith("235 2.7.0")
        await client.close()
        keys = await api_keys_stub.ListApiKeys(
            api_keys_pb2.ListApiKeysRequest(), metadata=tenant.metadata
        )
        for key in keys.api_keys:
            await api_keys_stub.RevokeApiKey(
                api_keys_pb2.RevokeApiKeyRequest(id=key.id), metadata=tenant.metadata
            )
        await asyncio.sleep(0.5)  # past the cache TTL: the next AUTH asks the key owner again
        client = await RawClient.connect(app.ports["tls"], submission.client_context())
        assert (
            await client.login(submission.api_key) == "535 5.7.8 Authentication credentials invalid"
        )
        await client.close()
    finally:
        await app.stop(0)
