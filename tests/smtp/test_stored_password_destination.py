"""A stored relay password only ever goes to the host and port it was stored for.

A trap relay (aiosmtpd with AUTH, started by each test) records every credential it receives.
A caller with ``smtp:write`` points an ad-hoc connection test, or an edited relay config without
a password, at the trap: the stored password must never arrive there, and the request is refused
naming the password field, so the caller knows to send the password for the new relay.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
from azora.smtp.v1 import smtp_pb2
from google.protobuf import duration_pb2

from tests.smtp.conftest import PASSWORD, USERNAME, StartServer, authenticator, register
from tests.support.grpc_errors import RpcFailure, decode

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from azora.domain.v1 import domain_pb2_grpc
    from azora.smtp.v1 import smtp_pb2_grpc

    from tests.conftest import Tenant

    DomainStub = domain_pb2_grpc.DomainServiceAsyncStub
    Stub = smtp_pb2_grpc.SmtpServiceAsyncStub

NONE = "none"  # UpdateSmtpConfigRequest.security is a string (the product spec's words)


@dataclass
class Trap:
    """An authenticator that accepts anything and remembers what it was given."""

    received: list[tuple[str, str]] = field(default_factory=list)

    def __call__(
        self, server: SMTP, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        assert isinstance(data, LoginPassword)
        self.received.append((data.login.decode(), data.password.decode()))
        return AuthResult(success=True)

    def passwords(self) -> list[str]:
        """Every password the trap was sent."""
        return [password for _, password in self.received]


def relay(port: int, **fields: object) -> smtp_pb2.UpdateSmtpConfigRequest:
    """A plain-text relay on loopback (AUTH without TLS, so the trap sees the password)."""
    values: dict[str, object] = {
        "host": "127.0.0.1",
        "port": port,
        "security": NONE,
        "timeout": duration_pb2.Duration(seconds=5),
        **fields,
    }
    return smtp_pb2.UpdateSmtpConfigRequest(**values)  # type: ignore[arg-type]


async def outcome_of(call: Awaitable[Any]) -> RpcFailure | None:
    """The decoded error of a call, or None when it succeeded (the trap is checked first)."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return decode(error)
    return None


async def configured_domain(
    smtp_stub: Stub, domains_stub: DomainStub, tenant: Tenant, port: int
) -> str:
    """A domain whose stored relay (loopback, `port`) has USERNAME/PASSWORD."""
    domain = await register(domains_stub, tenant)
    saved = relay(port, username=USERNAME, password=PASSWORD)
    saved.domain_id = domain.id
    await smtp_stub.UpdateSmtpConfig(saved, metadata=tenant.metadata)
    return domain.id


async def test_an_ad_hoc_test_never_carries_the_stored_password_elsewhere(
    smtp_stub: Stub, domains_stub: DomainStub, tenant: Tenant, start_smtpd: StartServer
) -> None:
    # domainId + a config naming another relay and no password: refused, the trap gets nothing.
    real = await start_smtpd(auth=authenticator(), auth_require_tls=False)
    trap = Trap()
    hostile = await start_smtpd(auth=trap, auth_require_tls=False)
    domain_id = await configured_domain(smtp_stub, domains_stub, tenant, real.port)
    failure = await outcome_of(
        smtp_stub.TestSmtpConnection(
            smtp_pb2.TestSmtpConnectionRequest(
                domain_id=domain_id, config=relay(hostile.port, username="attacker")
            ),
            metadata=tenant.metadata,
        )
    )
    assert PASSWORD not in trap.passwords()
    assert trap.received == []
    assert failure is not None
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "config.password" in failure.field_violations
    # Sending a password tests the other relay with that password, and only that one.
    report = await smtp_stub.TestSmtpConnection(
        smtp_pb2.TestSmtpConnectionRequest(
            domain_id=domain_id,
            config=relay(hostile.port, username="attacker", password="attacker's own"),
        ),
        metadata=tenant.metadata,
    )
    assert report.ok, report
    assert trap.received == [("attacker", "attacker's own")]


async def test_the_stored_relay_keeps_its_password_for_edits_to_the_same_host_and_port(
    smtp_stub: Stub, domains_stub: DomainStub, tenant: Tenant, start_smtpd: StartServer
) -> None:
    # A form testing edits (same host and port, other timeout) still uses the stored password.
    real = await start_smtpd(auth=authenticator(), auth_require_tls=False)
    domain_id = await configured_domain(smtp_stub, domains_stub, tenant, real.port)
    edited = relay(real.port, username=USERNAME, timeout=duration_pb2.Duration(seconds=7))
    report = await smtp_stub.TestSmtpConnection(
        smtp_pb2.TestSmtpConnectionRequest(domain_id=domain_id, config=edited),
        metadata=tenant.metadata,
    )
    assert report.ok, report
    assert next(s for s in report.steps if s.name == "auth").reply_code == 235


async def test_moving_a_relay_without_its_password_is_refused(
    smtp_stub: Stub, domains_stub: DomainStub, tenant: Tenant, start_smtpd: StartServer
) -> None:
    # PUT .../config to another port without a password: refused, nothing changes, and the
    # stored relay (tested or used for delivery) still goes to where the password belongs.
    real = await start_smtpd(auth=authenticator(), auth_require_tls=False)
    trap = Trap()
    hostile = await start_smtpd(auth=trap, auth_require_tls=False)
    domain_id = await configured_domain(smtp_stub, domains_stub, tenant, real.port)
    moved = relay(hostile.port, username=USERNAME)
    moved.domain_id = domain_id
    failure = await outcome_of(smtp_stub.UpdateSmtpConfig(moved, metadata=tenant.metadata))
    report = await smtp_stub.TestSmtpConnection(
        smtp_pb2.TestSmtpConnectionRequest(domain_id=domain_id), metadata=tenant.metadata
    )
    assert PASSWORD not in trap.passwords()
    assert trap.received == []
    assert failure is not None
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "password" in failure.field_violations
    assert report.ok, report
    stored = await smtp_stub.GetSmtpConfig(
        smtp_pb2.GetSmtpConfigRequest(domain_id=domain_id), metadata=tenant.metadata
    )
    assert (stored.port, stored.password_set) == (real.port, True)


async def test_moving_a_relay_with_a_new_password_or_none_is_accepted(
    smtp_stub: Stub, domains_stub: DomainStub, tenant: Tenant, start_smtpd: StartServer
) -> None:
    # The new relay gets the password sent with the move; "" moves it without any password.
    real = await start_smtpd(auth=authenticator(), auth_require_tls=False)
    trap = Trap()
    other = await start_smtpd(auth=trap, auth_require_tls=False)
    domain_id = await configured_domain(smtp_stub, domains_stub, tenant, real.port)
    moved = relay(other.port, username="new-user", password="new-password")
    moved.domain_id = domain_id
    assert (await smtp_stub.UpdateSmtpConfig(moved, metadata=tenant.metadata)).password_set
    report = await smtp_stub.TestSmtpConnection(
        smtp_pb2.TestSmtpConnectionRequest(domain_id=domain_id), metadata=tenant.metadata
    )
    assert report.ok, report
    assert trap.received == [("new-user", "new-password")]
    back = relay(real.port, username=USERNAME, password="")
    back.domain_id = domain_id
    assert not (await smtp_stub.UpdateSmtpConfig(back, metadata=tenant.metadata)).password_set
