"""TestSmtpConnection against real SMTP servers on loopback; the transcript is asserted.

aiosmtpd plays plain, STARTTLS (certificate from a trustme CA), implicit-TLS and AUTH relays;
two bare asyncio servers play a relay that never answers and one that answers 421.
"""

from __future__ import annotations

import base64
import ssl
from typing import TYPE_CHECKING

import grpc
from azora.smtp.v1 import smtp_pb2
from google.protobuf import duration_pb2

from services.core.settings import Settings
from tests.conftest import Tenant, new_tenant
from tests.smtp.conftest import (
    PASSWORD,
    RELAY_HOSTNAME,
    USERNAME,
    StartServer,
    authenticator,
    register,
)
from tests.support.dns_server import KnotServer
from tests.support.grpc_errors import failure_of

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from azora.domain.v1 import domain_pb2_grpc
    from azora.smtp.v1 import smtp_pb2_grpc

    from tests.smtp.conftest import RunningServer

    DomainStub = domain_pb2_grpc.DomainServiceAsyncStub
    Stub = smtp_pb2_grpc.SmtpServiceAsyncStub

NONE = "none"
STARTTLS = "starttls"
OPPORTUNISTIC = "starttls_opportunistic"
IMPLICIT = "tls"


def relay(port: int, security: str, **fields: object) -> smtp_pb2.UpdateSmtpConfigRequest:
    values: dict[str, object] = {
        "host": "127.0.0.1",
        "port": port,
        "security": security,
        "timeout": duration_pb2.Duration(seconds=5),
        **fields,
    }
    return smtp_pb2.UpdateSmtpConfigRequest(**values)  # type: ignore[arg-type]


async def run(
    stub: Stub, tenant: Tenant, config: smtp_pb2.UpdateSmtpConfigRequest, domain_id: str = ""
) -> smtp_pb2.TestSmtpConnectionResponse:
    return await stub.TestSmtpConnection(
        smtp_pb2.TestSmtpConnectionRequest(domain_id=domain_id, config=config),
        metadata=tenant.metadata,
    )


def names(report: smtp_pb2.TestSmtpConnectionResponse) -> list[str]:
    return [step.name for step in report.steps]


def step(report: smtp_pb2.TestSmtpConnectionResponse, name: str) -> smtp_pb2.TestStep:
    return next(s for s in report.steps if s.name == name)


def assert_no_password(report: smtp_pb2.TestSmtpConnectionResponse) -> None:
    text = str(report)
    for secret in (
        PASSWORD,
        base64.b64encode(PASSWORD.encode()).decode(),
        base64.b64encode(f"\0{USERNAME}\0{PASSWORD}".encode()).decode(),
    ):
        assert secret not in text


async def test_plain_relay_reports_every_step(
    smtp_stub: Stub, tenant: Tenant, start_smtpd: StartServer
) -> None:
    # A plain-text relay: resolve, connect, banner, EHLO with its extensions, quit; all timed.
    server = await start_smtpd()
    report = await run(smtp_stub, tenant, relay(server.port, NONE))
    assert report.ok, report
    assert names(report) == ["resolve", "connect", "banner", "ehlo", "quit"]
    assert step(report, "connect").addresses == ["127.0.0.1"]
    banner = step(report, "banner")
    assert banner.reply_code == 220
    assert RELAY_HOSTNAME in banner.detail
    ehlo = step(report, "ehlo")
    assert ehlo.reply_code == 250
    assert any(e.startswith("SIZE") for e in ehlo.extensions)
    assert "8BITMIME" in ehlo.extensions
    assert step(report, "quit").reply_code == 221
    assert all(s.HasField("duration") for s in report.steps)
    assert report.failed_step == ""
    assert report.HasField("duration")


async def test_starttls_reports_protocol_cipher_and_certificate(
    smtp_stub: Stub, tenant: Tenant, start_smtpd: StartServer, server_tls: ssl.SSLContext
) -> None:
    # STARTTLS with a certificate from the test CA: TLS facts, then a second EHLO.
    server = await start_smtpd(starttls=server_tls, require_starttls=True)
    report = await run(smtp_stub, tenant, relay(server.port, STARTTLS))
    assert report.ok, report
    assert names(report) == ["resolve", "connect", "banner", "ehlo", "starttls", "ehlo", "quit"]
    assert "STARTTLS" in report.steps[3].extensions
    tls = step(report, "starttls").tls
    assert tls.protocol.startswith("TLSv1.")
    assert tls.cipher
    assert tls.verified
    assert "trustme" in tls.peer_issuer
    assert "127.0.0.1" in tls.subject_alt_names
    assert RELAY_HOSTNAME in tls.subject_alt_names
    assert tls.not_before.ToSeconds() < tls.not_after.ToSeconds()
    assert step(report, "starttls").reply_code == 220


async def test_certificate_for_another_name_is_rejected(
    smtp_stub: Stub, tenant: Tenant, start_smtpd: StartServer, tls_ca: object
) -> None:
    # A certificate that does not name the host fails STARTTLS with the reason.
    import trustme

    assert isinstance(tls_ca, trustme.CA)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("other.example.org").configure_cert(context)
    server = await start_smtpd(starttls=context)
    report = await run(smtp_stub, tenant, relay(server.port, STARTTLS))
    assert not report.ok
    assert report.failed_step == "starttls"
    assert "certificate rejected" in step(report, "starttls").detail


async def test_skip_verify_accepts_the_same_certificate(
    smtp_stub: Stub, tenant: Tenant, start_smtpd: StartServer, tls_ca: object
) -> None:
    # tls_skip_verify accepts a mismatching certificate and says it was not verified.
    import trustme

    assert isinstance(tls_ca, trustme.CA)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("other.example.org").configure_cert(context)
    server = await start_smtpd(starttls=context)
    report = await run(smtp_stub, tenant, relay(server.port, STARTTLS, tls_skip_verify=True))
    assert report.ok, report
    assert not step(report, "starttls").tls.verified


async def test_required_starttls_not_offered_fails(
    smtp_stub: Stub, tenant: Tenant, start_smtpd: StartServer
) -> None:
    # STARTTLS required but the server has no TLS: the starttls step fails and says why.
    server = await start_smtpd()
    report = await run(smtp_stub, tenant, relay(server.port, STARTTLS))
    assert not report.ok
    assert report.failed_step == "starttls"
    assert names(report) == ["resolve", "connect", "banner", "ehlo", "starttls"]
    assert "does not offer STARTTLS" in report.message


async def test_opportunistic_starttls_continues_without_tls(
    smtp_stub: Stub, tenant: Tenant, start_smtpd: StartServer
) -> None:
    # Opportunistic mode on a server without TLS: noted, and the session goes on.
    server = await start_smtpd()
    report = await run(smtp_stub, tenant, relay(server.port, OPPORTUNISTIC))
    assert report.ok, report
    assert "not offered" in step(report, "starttls").detail
    assert not step(report, "starttls").HasField("tls")


async def test_implicit_tls_relay(
    smtp_stub: Stub, tenant: Tenant, start_smtpd: StartServer, server_tls: ssl.SSLContext
) -> None:
    # Implicit TLS (port 465 style): a tls step with the session facts before the banner.
    server = await start_smtpd(implicit_tls=server_tls)
    report = await run(smtp_stub, tenant, relay(server.port, IMPLICIT))
    assert report.ok, report
    assert names(report) == ["resolve", "connect", "tls", "banner", "ehlo", "quit"]
    assert step(report, "tls").tls.protocol.startswith("TLSv1.")
    assert step(report, "banner").reply_code == 220


async def test_implicit_tls_against_a_plain_server_fails_in_tls(
    smtp_stub: Stub, tenant: Tenant, start_smtpd: StartServer
) -> None:
    # Speaking TLS to a plain-text port fails at the tls step, not later.
    server = await start_smtpd()
    report = await run(smtp_stub, tenant, relay(server.port, IMPLICIT))
    assert not report.ok
    assert report.failed_step == "tls"


async def test_auth_success_reports_mechanism(
    smtp_stub: Stub, tenant: Tenant, start_smtpd: StartServer, server_tls: ssl.SSLContext
) -> None:
    # AUTH after STARTTLS: mechanisms offered, the one used, 235, and no password anywhere.
    server = await start_smtpd(starttls=server_tls, auth=authenticator())
    report = await run(
        smtp_stub,
        tenant,
        relay(server.port, STARTTLS, username=USERNAME, password=PASSWORD),
    )
    assert report.ok, report
    assert names(report)[-2:] == ["auth", "quit"]
    auth = step(report, "auth")
    assert auth.reply_code == 235
    assert auth.auth_mechanism == "PLAIN"
    assert {"PLAIN", "LOGIN"} <= set(auth.auth_mechanisms)
    # AUTH is only offered after STARTTLS: the first EHLO must not list it.
    assert list(report.steps[3].auth_mechanisms) == []
    assert USERNAME in report.message
    assert_no_password(report)


async def test_auth_failure_reports_code_and_never_the_password(
    smtp_stub: Stub, tenant: Tenant, start_smtpd: StartServer, server_tls: ssl.SSLContext
) -> None:
    # Wrong credentials: auth fails with 535; even a server echoing them leaks nothing.
    server = await start_smtpd(starttls=server_tls, auth=authenticator(echo_credentials=True))
    wrong = PASSWORD + "-wrong"
    report = await run(
        smtp_stub, tenant, relay(server.port, STARTTLS, username=USERNAME, password=wrong)
    )
    assert not report.ok
    assert report.failed_step == "auth"
    assert report.reply_code == 535
    auth = step(report, "auth")
    assert auth.reply_code == 535
    assert "[redacted]" in auth.detail
    assert wrong not in str(report)
    assert PASSWORD not in str(report)


async def test_auth_over_plain_text_when_the_server_allows_it(
    smtp_stub: Stub, tenant: Tenant, start_smtpd: StartServer
) -> None:
    # Security NONE against a server that offers AUTH without TLS still authenticates.
    server = await start_smtpd(auth=authenticator(), auth_require_tls=False)
    report = await run(
        smtp_stub, tenant, relay(server.port, NONE, username=USERNAME, password=PASSWORD)
    )
    assert report.ok, report
    assert step(report, "auth").reply_code == 235


async def test_auth_not_offered_fails(
    smtp_stub: Stub, tenant: Tenant, start_smtpd: StartServer
) -> None:
    # A user name for a server without AUTH: the auth step fails and says so.
    server = await start_smtpd()
    report = await run(
        smtp_stub, tenant, relay(server.port, NONE, username=USERNAME, password=PASSWORD)
    )
    assert report.failed_step == "auth"
    assert "offers no AUTH" in step(report, "auth").detail


async def test_silent_server_times_out_at_the_banner(
    smtp_stub: Stub,
    tenant: Tenant,
    raw_server: Callable[[bytes | None], Awaitable[RunningServer]],
) -> None:
    # A server that accepts but never speaks: connect succeeds, the banner step times out.
    server = await raw_server(None)
    config = relay(server.port, NONE, timeout=duration_pb2.Duration(nanos=500_000_000))
    report = await run(smtp_stub, tenant, config)
    assert not report.ok
    assert names(report) == ["resolve", "connect", "banner"]
    assert report.failed_step == "banner"
    assert "no answer within 0.5s" in report.message


async def test_421_at_the_banner_is_reported_with_its_text(
    smtp_stub: Stub,
    tenant: Tenant,
    raw_server: Callable[[bytes | None], Awaitable[RunningServer]],
) -> None:
    # A relay refusing service at the greeting: the banner step fails with 421 and its text.
    server = await raw_server(b"421 4.3.2 too busy, try later\r\n")
    report = await run(smtp_stub, tenant, relay(server.port, NONE))
    assert report.failed_step == "banner"
    assert report.reply_code == 421
    banner = step(report, "banner")
    assert banner.reply_code == 421
    assert "too busy" in banner.detail


async def test_closed_port_fails_at_connect(
    smtp_stub: Stub,
    tenant: Tenant,
    raw_server: Callable[[bytes | None], Awaitable[RunningServer]],
) -> None:
    # Nothing listens: the connect step fails, naming the address tried.
    server = await raw_server(None)
    port = server.port
    server.server.close()
    await server.server.wait_closed()
    report = await run(smtp_stub, tenant, relay(port, NONE))
    assert report.failed_step == "connect"
    assert "127.0.0.1" in step(report, "connect").detail


async def test_stored_config_is_tested_with_its_stored_password(
    smtp_stub: Stub,
    domains_stub: DomainStub,
    tenant: Tenant,
    start_smtpd: StartServer,
    server_tls: ssl.SSLContext,
) -> None:
    # Testing by domain uses the saved relay, decrypting the stored password for AUTH.
    server = await start_smtpd(starttls=server_tls, auth=authenticator())
    domain = await register(domains_stub, tenant)
    saved = relay(server.port, STARTTLS, username=USERNAME, password=PASSWORD)
    saved.domain_id = domain.id
    await smtp_stub.UpdateSmtpConfig(saved, metadata=tenant.metadata)
    report = await smtp_stub.TestSmtpConnection(
        smtp_pb2.TestSmtpConnectionRequest(domain_id=domain.id), metadata=tenant.metadata
    )
    assert report.ok, report
    assert step(report, "auth").reply_code == 235
    # An edited config without a password is tested with the stored password too.
    edited = relay(server.port, STARTTLS, username=USERNAME)
    assert (await run(smtp_stub, tenant, edited, domain.id)).ok


async def test_domain_without_config_or_config_is_an_error(
    smtp_stub: Stub, domains_stub: DomainStub, tenant: Tenant, settings: Settings
) -> None:
    # Nothing to test: INVALID_ARGUMENT; an unconfigured or foreign domain: NOT_FOUND.
    failure = await failure_of(
        smtp_stub.TestSmtpConnection(smtp_pb2.TestSmtpConnectionRequest(), metadata=tenant.metadata)
    )
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    domain = await register(domains_stub, tenant)
    failure = await failure_of(
        smtp_stub.TestSmtpConnection(
            smtp_pb2.TestSmtpConnectionRequest(domain_id=domain.id), metadata=tenant.metadata
        )
    )
    assert failure.resource == ("SmtpConfig", domain.id)
    other = new_tenant(settings)
    failure = await failure_of(
        smtp_stub.TestSmtpConnection(
            smtp_pb2.TestSmtpConnectionRequest(domain_id=domain.id), metadata=other.metadata
        )
    )
    assert failure.resource == ("Domain", domain.id)


async def test_host_name_resolves_through_dns_and_tls_checks_the_name(
    smtp_stub: Stub,
    tenant: Tenant,
    start_smtpd: StartServer,
    server_tls: ssl.SSLContext,
    knot_server: KnotServer,
) -> None:
    # A relay name resolved via DNS: we connect to the address found, and TLS verifies the name.
    knot_server.set_zone("azora-test.example", [("relay", "A", "127.0.0.1")])
    server = await start_smtpd(starttls=server_tls)
    report = await run(smtp_stub, tenant, relay(server.port, STARTTLS, host=RELAY_HOSTNAME))
    assert report.ok, report
    assert step(report, "resolve").addresses == ["127.0.0.1"]
    assert step(report, "connect").addresses == ["127.0.0.1"]
    assert step(report, "starttls").tls.verified


async def test_unknown_host_fails_at_resolve(
    smtp_stub: Stub, tenant: Tenant, knot_server: KnotServer
) -> None:
    # A name that does not exist: the resolve step fails and nothing is connected to.
    knot_server.set_zone("azora-test.example", [("relay", "A", "127.0.0.1")])
    report = await run(smtp_stub, tenant, relay(25, NONE, host="nope.azora-test.example"))
    assert names(report) == ["resolve"]
    assert "does not exist" in report.message
