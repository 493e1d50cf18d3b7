"""Secrets never appear in logs, error responses or metrics (OWASP API8, security misconfiguration).

The whole suite runs as real processes in production mode (`python -m services.domain`,
`services.smtp`, `services.mail`, `gateway`, the webhook dispatcher) with known secrets and
LOG_LEVEL=debug, every process's output captured. A scenario goes through the gateway: a
verified domain, a relay with a password (an aiosmtpd relay that requires AUTH, plus one that
echoes the credentials back in its refusal), a connection test, a DKIM key, an API key used on
every service and then revoked, emails sent and delivered, a webhook endpoint (created, its
secret rotated, a test event and a real one delivered to a receiver), and a series of failing
requests. Then every log line, every error body, GET /metrics and the webhook requests are
searched for each secret (JWT secret, a JWT, the API key secret, the relay password, the DKIM
private key, the secrets-at-rest key, the webhook secrets) and its base64 forms.
The same production suite also shows that a request without credentials is refused.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from azora.smtp.v1 import smtp_pb2, smtp_pb2_grpc
from pymongo import AsyncMongoClient

from services.core.auth import ServiceTokens, issue_jwt
from services.core.ids import new_ulid
from services.core.settings import Settings
from tests.conftest import REPO_ROOT, unique_domain
from tests.smtp.verifiers import quoted
from tests.support.dns_server import KnotServer
from tests.support.smtp_relay import authenticator, start_relay
from tests.support.webhook_receiver import Receiver

RELAY_USER = "relay-user"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Suite:
    """The running processes, their log files and the known secrets."""

    base_url: str
    smtp_port: int
    logs: dict[str, Path]
    secrets: dict[str, str]
    settings: Settings
    processes: list[asyncio.subprocess.Process] = field(default_factory=list)


@pytest.fixture(scope="module")
async def suite(
    ferretdb: str, knot_server: KnotServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Suite]:
    """The four processes in production mode with fresh, known secrets."""
    directory = tmp_path_factory.mktemp("secrets-logs")
    known = {
        "JWT_SECRET": "jwt-" + secrets.token_urlsafe(40),
        "AZORA_SERVICE_TOKEN_SECRET": "svc-" + secrets.token_urlsafe(40),
        "AZORA_SECRETS_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
        "relay password": "relay-" + secrets.token_urlsafe(24),
    }
    ports = {name: _free_port() for name in ("domain", "smtp", "mail", "gateway", "webhooks")}
    env = {
        **os.environ,
        "AZORA_ENV": "production",
        "JWT_SECRET": known["JWT_SECRET"],
        "AZORA_SERVICE_TOKEN_SECRET": known["AZORA_SERVICE_TOKEN_SECRET"],
        "AZORA_SECRETS_KEY": known["AZORA_SECRETS_KEY"],
        "MONGODB_URI": ferretdb,
        "AZORA_MONGODB_DATABASE": f"azora_secrets_{secrets.token_hex(4)}",
        "AZORA_DOMAIN_GRPC_PORT": str(ports["domain"]),
        "AZORA_SMTP_GRPC_PORT": str(ports["smtp"]),
        "AZORA_MAIL_GRPC_PORT": str(ports["mail"]),
        "PORT": str(ports["gateway"]),
        "AZORA_DNS_NAMESERVERS": knot_server.host,
        "AZORA_DNS_PORT": str(knot_server.port),
        "AZORA_DNS_TIMEOUT": "2",
        # The test relays listen on loopback, which production refuses by default.
        "AZORA_SMTP_ALLOW_PRIVATE_HOSTS": "true",
        "AZORA_MAIL_POLL_INTERVAL": "0.1",
        # The webhook receiver listens on loopback over plain http, which production refuses.
        "AZORA_WEBHOOK_ALLOW_PRIVATE_HOSTS": "true",
        "AZORA_WEBHOOK_ALLOW_HTTP": "true",
        "AZORA_WEBHOOK_POLL_INTERVAL": "0.1",
        "AZORA_WEBHOOK_DISPATCHER_HEALTH_PORT": str(ports["webhooks"]),
        "AZORA_WEBHOOK_DISPATCHER_METRICS_PORT": "0",
        "LOG_LEVEL": "debug",
    }
    settings = Settings.from_env(env, service_name="test")
    logs = {name: directory / f"{name}.log" for name in ports}
    suite = Suite(f"http://127.0.0.1:{ports['gateway']}", ports["smtp"], logs, known, settings)
    files = [logs[name].open("wb") for name in ports]
    try:
        for (_name, module), file in zip(
            (
                ("domain", "services.domain"),
                ("smtp", "services.smtp"),
                ("mail", "services.mail"),
                ("gateway", "gateway"),
                ("webhooks", "services.mail.feedback.webhook_dispatcher"),
            ),
            files,
            strict=True,
        ):
            suite.processes.append(
                await asyncio.create_subprocess_exec(
                    sys.executable, "-m", module, cwd=REPO_ROOT, env=env, stdout=file, stderr=file
                )
            )
        await _wait_ready(suite)
        yield suite
    finally:
        for process in suite.processes:
            if process.returncode is None:
                process.terminate()
        for process in suite.processes:
            try:
                await asyncio.wait_for(process.wait(), timeout=30)
            except TimeoutError:
                process.kill()
                await process.wait()
        for file in files:
            file.close()


async def _wait_ready(suite: Suite) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(600):  # a bound for a process that never starts, not a speed requirement
            for process, name in zip(suite.processes, suite.logs, strict=True):
                if process.returncode is not None:
                    pytest.fail(f"{name} exited: {suite.logs[name].read_text()[-2000:]}")
            try:
                # /health, not /health/ready: readiness is the answering (domain) process's
                # alone, and a loaded machine let the tests call the smtp and mail services
                # before they served (503 from the gateway). /health is 200 only once every
                # required component is up.
                async with http.get(f"{suite.base_url}/health") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    pytest.fail("the suite never became ready")


def forms(secret: str | bytes) -> set[str]:
    """A secret and its base64 forms (standard, URL-safe, padded or not)."""
    raw = secret.encode() if isinstance(secret, str) else secret
    found = {raw.decode(errors="replace")} if isinstance(secret, str) else set()
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        text = encode(raw).decode()
        found |= {text, text.rstrip("=")}
    return {f for f in found if len(f) >= 12}


async def test_no_secret_appears_in_logs_errors_or_metrics(
    suite: Suite, knot_server: KnotServer
) -> None:
    # The scenario uses every secret; none of them, in any encoding, is ever printed or sent.
    known = dict(suite.secrets)
    key = base64.b64decode(known["AZORA_SECRETS_KEY"])
    token = issue_jwt(
        secret=known["JWT_SECRET"], tenant_id="t-secrets", subject="alice", scopes=["*"]
    )
    known["a JWT"] = token
    auth = {"Authorization": f"Bearer {token}"}
    errors: list[str] = []
    answers: list[str] = []
    # Two relays (tests/support/smtp_relay.py) taking AUTH without TLS: one accepts the
    # configured password; the other refuses everything and echoes the credentials it got.
    good_relay = await start_relay(
        auth=authenticator(RELAY_USER, known["relay password"]), auth_require_tls=False
    )
    echo_relay = await start_relay(
        auth=authenticator(RELAY_USER, secrets.token_urlsafe(24), echo_refused=True),
        auth_require_tls=False,
    )
    servers = [good_relay, echo_relay]

    async with aiohttp.ClientSession() as http:

        async def call(method: str, path: str, **kwargs: Any) -> dict[str, Any]:
            headers = {**auth, **kwargs.pop("headers", {})}
            async with http.request(
                method, suite.base_url + path, headers=headers, **kwargs
            ) as response:
                text = await response.text()
                # Every answer but those that hand out a new secret (API key, webhook).
                shows_secret = path.endswith("/api-keys") or (
                    method == "POST" and path.endswith(("/webhooks", "/rotate-secret"))
                )
                if not shows_secret:
                    answers.append(text)
                    answers.append(str(response.headers))
                if response.status >= 400:
                    errors.append(text)
                try:
                    answer: dict[str, Any] = json.loads(text)
                except ValueError:
                    return {"text": text, "status": response.status}
                answer.setdefault("_status", response.status)
                return answer

        name = unique_domain("secrets.test")
        domain = await call("POST", "/api/v1/domains", json={"name": name})
        assert domain["_status"] == 200, domain
        knot_server.set_zone(name, [("@", "TXT", f'"azora-verify={domain["verificationToken"]}"')])
        verified = await call("POST", f"/api/v1/domains/{domain['id']}/verify", json={})
        assert verified["domain"]["status"] == "DOMAIN_STATUS_ACTIVE", verified
        relay = {
            "host": "127.0.0.1",
            "port": good_relay.port,
            "security": "SECURITY_MODE_NONE",
            "username": RELAY_USER,
            "password": known["relay password"],
        }
        smtp_path = f"/api/v1/smtp/domains/{domain['id']}/config"
        stored = await call("PUT", smtp_path, json=relay)
        assert stored["_status"] == 200, stored
        await call("POST", "/api/v1/smtp/test", json={"domainId": domain["id"]})
        # A relay that echoes the credentials in its refusal: the report must not pass them on.
        await call(
            "POST",
            "/api/v1/smtp/test",
            json={"config": {**relay, "port": echo_relay.port}},
        )
        dkim = await call("POST", f"/api/v1/smtp/domains/{domain['id']}/dkim", json={})
        assert dkim["_status"] == 200, dkim
        knot_server.set_zone(
            name,
            [
                ("@", "TXT", f'"azora-verify={domain["verificationToken"]}"'),
                (f"{dkim['selector']}._domainkey", "TXT", quoted(dkim["recordStrings"])),
            ],
        )
        activated = await call(
            "POST",
            f"/api/v1/smtp/domains/{domain['id']}/dkim/{dkim['selector']}/activate",
            json={},
        )
        assert activated["_status"] == 200, activated
        created = await call(
            "POST",
            "/api/v1/api-keys",
            json={
                "name": "k",
                "scopes": ["domains:read", "emails:send", "emails:read", "smtp:read"],
            },
        )
        known["API key secret"] = created["secret"]
        with_key = {"Authorization": f"Bearer {created['secret']}"}
        for path in ("/api/v1/domains", smtp_path, "/api/v1/emails"):
            await call("GET", path, headers=with_key)
            await call("GET", path, headers={"x-api-key": created["secret"]})
        sent = await call(
            "POST",
            "/api/v1/emails",
            headers=with_key,
            json={
                "from": f"app@{name}",
                "to": ["someone@example.org"],
                "subject": "s",
                "text": "t",
            },
        )
        assert sent["_status"] == 200, sent
        await call("POST", f"/api/v1/api-keys/{created['apiKey']['id']}/revoke", json={})
        # Failures: revoked key, bad token, wrong scope, forged token, bad bodies.
        await call("GET", "/api/v1/domains", headers={"x-api-key": created["secret"]})
        await call("GET", "/api/v1/domains", headers={"Authorization": f"Bearer {token}x"})
        await call(
            "GET", "/api/v1/domains", headers={"Authorization": f"Bearer {known['JWT_SECRET']}"}
        )
        await call("PUT", smtp_path, json={**relay, "port": 0})
        await call("POST", "/api/v1/emails", json={"from": "not an address", "to": ["x"]})
        for _ in range(100):  # wait for the delivery (bounded; not a speed requirement)
            email = await call("GET", f"/api/v1/emails/{sent['id']}")
            if email.get("status") in ("EMAIL_STATUS_SENT", "EMAIL_STATUS_FAILED"):
                break
            await asyncio.sleep(0.1)
        # Webhooks: secrets shown at creation and rotation, then a test event and a real event
        # delivered by the dispatcher process to a receiver on loopback.
        receiver = await Receiver().start()
        hook = await call("POST", "/api/v1/webhooks", json={"url": receiver.url})
        assert hook["_status"] == 200, hook
        known["webhook secret"] = hook["secret"]
        rotated = await call("POST", f"/api/v1/webhooks/{hook['id']}/rotate-secret", json={})
        known["rotated webhook secret"] = rotated["secret"]
        await call("GET", f"/api/v1/webhooks/{hook['id']}")
        await call("GET", "/api/v1/webhooks")
        tested = await call("POST", f"/api/v1/webhooks/{hook['id']}/test", json={})
        assert tested["success"] is True, tested
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(suite.settings.mongodb_uri)
        try:
            occurred = datetime.now(UTC)
            await client[suite.settings.mongodb_database]["events"].insert_one(
                {
                    "_id": f"evt_{new_ulid(occurred)}",
                    "tenantId": "t-secrets",
                    "type": "sent",
                    "occurredAt": occurred,
                    "domain": name,
                    "tags": [],
                    "metadata": {},
                }
            )
        finally:
            await client.close()
        await receiver.wait_for(2, within=60)
        await call("GET", f"/api/v1/webhooks/{hook['id']}/deliveries")
        await receiver.close()
        async with http.get(suite.base_url + "/metrics") as response:
            metrics = await response.text()
        async with http.get(suite.base_url + "/health/metrics") as response:
            metrics += await response.text()

    # The DKIM private key, as the mail service gets it (internal rpc, service token).
    async with grpc.aio.insecure_channel(f"127.0.0.1:{suite.smtp_port}") as channel:
        tokens = ServiceTokens.from_settings(
            suite.settings, subject="service:mail", scopes=["smtp:read"]
        )
        signing = await smtp_pb2_grpc.SmtpServiceStub(channel).GetSigningKey(
            smtp_pb2.GetSigningKeyRequest(domain_id=domain["id"]),
            metadata=tokens.metadata("t-secrets"),
        )
    pem = (
        signing.private_key_pem.decode()
        if isinstance(signing.private_key_pem, bytes)
        else str(signing.private_key_pem)
    )
    body = "".join(line for line in pem.splitlines() if "-----" not in line)
    assert body, "the scenario has a DKIM private key"
    for relay_server in servers:
        await relay_server.close()

    needles: dict[str, set[str]] = {label: forms(value) for label, value in known.items()}
    needles["AZORA_SECRETS_KEY"] |= forms(key)
    needles["DKIM private key"] = {
        body,
        *[line for line in pem.splitlines() if len(line) >= 40 and "-----" not in line],
    }
    logs = {name: path.read_text(errors="replace") for name, path in suite.logs.items()}
    for name, text in logs.items():
        assert text.strip(), f"{name} logged nothing (is the capture working?)"
        for line in text.splitlines():
            if line.startswith("{"):
                json.loads(line)  # every log line is a JSON object
    assert good_relay.messages, "the email went through the relay, using its password"
    haystacks = {
        **{f"{name} log": text for name, text in logs.items()},
        "responses": "\n".join(answers),
        "metrics": metrics,
        "webhook requests": "\n".join(f"{r.headers}{r.body!r}" for r in receiver.requests),
    }
    assert errors, "the scenario produced error responses to search"
    leaks = [
        f"{label} in {where}"
        for label, values in needles.items()
        for where, text in haystacks.items()
        if any(value in text for value in values)
    ]
    assert leaks == []


@pytest.mark.parametrize(
    "path", ["/api/v1/domains", "/api/v1/api-keys", "/api/v1/emails", "/api/v1/emails/stats"]
)
async def test_production_refuses_requests_without_credentials(suite: Suite, path: str) -> None:
    # In production no request acts as the development tenant: no credentials is 401.
    async with aiohttp.ClientSession() as http, http.get(suite.base_url + path) as response:
        assert response.status == 401, await response.text()
        answer = await response.json()
        assert answer["code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
