"""The SMTP submission protocol: aiosmtpd's SMTP with our authentication, limits and replies.

A front door, not an owner: AUTH resolves the password as an API key through the domain
service (cached like every service's key cache), and DATA hands the message and its envelope to
the mail service (`MailService.SubmitMessage`, called with the client's own API key so its scope,
rate limits and quotas apply exactly as for `SendEmail`). The final reply to DATA is 250 only
once the mail service has answered, i.e. the email is stored; any failure to get that answer is
451 4.3.0, so the client keeps the message and retries.

The session machinery (connection limits, timeouts, bad commands, shutdown) is the shared
`services.core.smtp_server.GuardedSMTP`; what is submission's own is AUTH and its limits.
Abuse limits are per client address (`ClientLimits`): concurrent connections, wrong credentials
(counted by the suite's rate limiter: slowed down, then refused until the window ends),
commands before AUTH, bad commands, idle and total session time. Every refusal is logged with
the client address, never with credentials.
"""

from __future__ import annotations

import asyncio
import logging
import time
from base64 import b64decode
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, Session

from services.core.auth import API_KEY_PREFIX, ApiKeyResolver
from services.core.context import Principal
from services.core.errors import Unavailable
from services.core.ratelimit import RateLimiter, RateLimitExceeded
from services.core.smtp_server import (
    ConnectionLimits,
    GuardedSMTP,
    SessionLimits,
)
from services.submission import replies
from services.submission.settings import SubmissionSettings

log = logging.getLogger(__name__)

SEND_SCOPE = "emails:send"
_MAX_AUTH_DELAY = 10.0


@dataclass(frozen=True, slots=True)
class Identity:
    """Who authenticated on a session: the key's principal, and the key to act with."""

    principal: Principal
    api_key: str

    def __repr__(self) -> str:  # the key never reaches a log line
        return f"Identity(tenant={self.principal.tenant_id!r}, subject={self.principal.subject!r})"


class MailSubmitter(Protocol):
    """Hands one transaction to the mail service."""

    async def submit(
        self,
        *,
        identity: Identity,
        raw: bytes,
        envelope_from: str,
        envelope_to: list[str],
        client_address: str,
    ) -> str:
        """Store the message; return the email id.

        Raises:
            grpc.aio.AioRpcError: the mail service refused it or could not be reached.
        """
        ...


class ClientLimits(ConnectionLimits):
    """Per-client-address bookkeeping shared by every session of the process.

    Connections per address and draining are the shared `ConnectionLimits`. Wrong credentials
    are counted by the suite's rate limiter (`services.core.ratelimit`, the same
    failed-authentication budget the gRPC services apply), here with the submission server's
    own limits: from the `auth_failures_before_delay`-th failure within a window on, answers
    are held back; at `auth_failures_before_block` the address is refused until the window
    ends.
    """

    def __init__(self, settings: SubmissionSettings, *, failed_auth: RateLimiter) -> None:
        super().__init__(max_connections_per_ip=settings.max_connections_per_ip)
        self._settings = settings
        self.failed_auth = failed_auth

    @classmethod
    def from_settings(
        cls, settings: SubmissionSettings, *, clock: Callable[[], float] = time.time
    ) -> ClientLimits:
        """Limits with a failed-authentication budget of this process, from `settings`."""
        limiter = RateLimiter.for_failed_authentications(
            limit=settings.auth_failures_before_block,
            window_ms=max(1, round(settings.auth_failure_window * 1000)),
            clock=clock,
        )
        return cls(settings, failed_auth=limiter)

    def blocked(self, address: str) -> bool:
        """Whether the address is refused for failing authentication too often."""
        try:
            self.failed_auth.check_failed_authentications(address)
        except RateLimitExceeded:
            return True
        return False

    def auth_failed(self, address: str) -> float:
        """Record a wrong credential; return how long to hold the answer back (seconds)."""
        count = self.failed_auth.record_failed_authentication(address)
        past = count - self._settings.auth_failures_before_delay + 1
        return min(max(past, 0) * self._settings.auth_failure_delay, _MAX_AUTH_DELAY)


class SubmissionHandler:
    """aiosmtpd handler hooks: envelope checks and the hand-over of DATA."""

    def __init__(self, *, mail: MailSubmitter, max_recipients: int) -> None:
        self._mail = mail
        self._max_recipients = max_recipients

    async def handle_EHLO(  # noqa: N802 - aiosmtpd's hook name
        self,
        server: SubmissionSMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        """Advertise PIPELINING and ENHANCEDSTATUSCODES; AUTH only where it is allowed."""
        session.host_name = hostname
        lines = responses[:-1]  # aiosmtpd's, without the final "250 HELP"
        if server.auth_needs_tls and not server.secure:
            lines = [r for r in lines if not r.startswith("250-AUTH")]
        lines += ["250-PIPELINING", "250-ENHANCEDSTATUSCODES", "250 HELP"]
        return lines

    async def handle_MAIL(  # noqa: N802 - aiosmtpd's hook name
        self,
        server: SubmissionSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        """Start a transaction."""
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return replies.SENDER_OK

    async def handle_RCPT(  # noqa: N802 - aiosmtpd's hook name
        self,
        server: SubmissionSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        """Add a recipient, up to the mail service's limit per email."""
        if len(envelope.rcpt_tos) >= self._max_recipients:
            server.refused("too many recipients", limit=self._max_recipients)
            return replies.TOO_MANY_RECIPIENTS.format(limit=self._max_recipients)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return replies.RECIPIENT_OK

    async def handle_DATA(  # noqa: N802 - aiosmtpd's hook name
        self, server: SubmissionSMTP, session: Session, envelope: Envelope
    ) -> str:
        """Store the message through the mail service; 250 only once it answered."""
        identity: object = session.auth_data
        if not isinstance(identity, Identity):
            return replies.AUTH_REQUIRED  # unreachable: aiosmtpd requires AUTH before MAIL
        raw = envelope.original_content or b""
        server.submitting = True
        try:
            email_id = await self._mail.submit(
                identity=identity,
                raw=raw,
                envelope_from=envelope.mail_from or "",
                envelope_to=list(envelope.rcpt_tos),
                client_address=server.client_address,
            )
        except grpc.aio.AioRpcError as exc:
            failure = replies.decode(exc)
            reply = replies.for_failure(failure)
            server.refused(
                "message refused",
                reply=reply,
                grpc_code=failure.code.name,
                reason=failure.reason,
                tenant=identity.principal.tenant_id,
            )
            return reply
        except Exception:
            log.exception("submission failed", extra={"fields": {"client": server.client_address}})
            return replies.TEMPORARY_FAILURE
        finally:
            server.submitting = False
        log.info(
            "message queued",
            extra={
                "fields": {
                    "client": server.client_address,
                    "tenant": identity.principal.tenant_id,
                    "email_id": email_id,
                    "recipients": len(envelope.rcpt_tos),
                    "size": len(raw),
                }
            },
        )
        return replies.QUEUED.format(id=email_id)


class SubmissionSMTP(GuardedSMTP):
    """One client connection (STARTTLS or implicit TLS), with the shared limits of `GuardedSMTP`."""

    def __init__(
        self,
        handler: SubmissionHandler,
        *,
        settings: SubmissionSettings,
        limits: ClientLimits,
        api_keys: ApiKeyResolver,
        message_size_limit: int,
        implicit_tls: bool,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            handler,
            limits=limits,
            session_limits=SessionLimits(
                idle_timeout=settings.idle_timeout,
                session_timeout=settings.session_timeout,
                max_bad_commands=settings.max_bad_commands,
            ),
            data_size_limit=message_size_limit,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=settings.hostname,
            ident="Azora submission",
            auth_required=True,
            **kwargs,
        )
        # TLS for AUTH is enforced in `smtp_AUTH` with the reply production wants (530 5.7.0),
        # also for implicit TLS, which aiosmtpd's own check does not recognise.
        self._auth_require_tls = False
        self._settings = settings
        self._client_limits = limits
        self._api_keys = api_keys
        self.implicit_tls = implicit_tls
        self.auth_needs_tls = settings.require_tls_for_auth
        self._commands_before_auth = 0
        # aiosmtpd keeps these limits in one dict shared by every connection (a class
        # attribute), and holds AUTH to the 512 octets of other commands: an AUTH PLAIN line
        # carrying a token of a few hundred characters was "500 Command line too long" instead
        # of being checked. RFC 4954 allows AUTH lines up to 12288 octets; lines are read with
        # `line_length_limit` (1001) at most, so that is the limit AUTH gets here.
        self.command_size_limits = defaultdict(
            lambda: SMTP.command_size_limit, {"AUTH": self.line_length_limit}
        )

    @property
    def secure(self) -> bool:
        """Whether the connection is encrypted (implicit TLS, or after STARTTLS)."""
        return self.implicit_tls or self._tls_protocol is not None

    async def admit(self) -> str | None:
        """Refuse addresses blocked for failing authentication too often."""
        if self._client_limits.blocked(self.client_address):
            self.refused("connection refused: address blocked after failed authentications")
            return replies.AUTH_BLOCKED
        return None

    async def before_command(self, name: str) -> bool:
        """Count commands before AUTH; too many closes the connection."""
        assert self.session is not None
        if not self.session.authenticated and name != "QUIT":
            self._commands_before_auth += 1
            if self._commands_before_auth > self._settings.max_commands_before_auth:
                self.refused("too many commands before authentication")
                await self.close_with(replies.TOO_MANY_COMMANDS)
                return False
        return True

    async def smtp_AUTH(self, arg: str) -> None:  # noqa: N802 - aiosmtpd's command name
        """AUTH, refused before TLS where TLS is required, and from blocked addresses."""
        if self.auth_needs_tls and not self.secure:
            self.refused("AUTH before TLS")
            await self.push(replies.TLS_REQUIRED)
            return
        if self._client_limits.blocked(self.client_address):
            self.refused("AUTH refused: address blocked after failed authentications")
            await self.close_with(replies.AUTH_BLOCKED)
            return
        await super().smtp_AUTH(arg)

    # AUTH mechanisms: the password is an API key; the user name is free text.

    async def auth_PLAIN(self, _: SMTP, args: list[str]) -> AuthResult:  # noqa: N802
        """RFC 4616: authzid NUL authcid NUL password."""
        if len(args) == 1:
            blob = await self.challenge_auth("")
            if blob is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            try:
                blob = b64decode(args[1].encode(), validate=True)
            except ValueError:
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        assert isinstance(blob, bytes)
        parts = blob.split(b"\0")
        if len(parts) != 3:
            await self.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False, handled=True)
        return await self._check_key(parts[2])

    async def auth_LOGIN(self, _: SMTP, args: list[str]) -> AuthResult:  # noqa: N802
        """The LOGIN mechanism (user name, then password, each base64)."""
        if len(args) == 1:
            login = await self.challenge_auth(self.AuthLoginUsernameChallenge)
            if login is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            try:
                b64decode(args[1].encode(), validate=True)
            except ValueError:
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        password = await self.challenge_auth(self.AuthLoginPasswordChallenge)
        if password is MISSING:
            return AuthResult(success=False, handled=True)
        assert isinstance(password, bytes)
        return await self._check_key(password)

    async def _check_key(self, password: bytes) -> AuthResult:
        secret = password.decode("utf-8", "replace").strip()
        principal: Principal | None = None
        reason = "not an API key"  # JWTs and anything else: only API keys open a session
        if secret.startswith(API_KEY_PREFIX):
            try:
                principal = await self._api_keys.resolve(secret=secret)
            except Unavailable:
                self.refused("AUTH failed: the API key service is unreachable")
                return AuthResult(success=False, handled=False, message=replies.AUTH_TEMPORARY)
            reason = "unknown, revoked or expired API key"
            if principal is not None and not principal.has_scope(SEND_SCOPE):
                reason, principal = f"API key without the {SEND_SCOPE} scope", None
        if principal is None:
            delay = self._client_limits.auth_failed(self.client_address)
            self.refused("AUTH failed", reason=reason, delay_seconds=delay)
            if delay:
                await asyncio.sleep(delay)
            if self._client_limits.blocked(self.client_address):
                self.refused("address blocked after failed authentications")
                await self.close_with(replies.AUTH_BLOCKED)
                return AuthResult(success=False, handled=True)
            return AuthResult(success=False, handled=False, message=replies.AUTH_INVALID)
        log.info(
            "authenticated",
            extra={
                "fields": {
                    "client": self.client_address,
                    "tenant": principal.tenant_id,
                    "subject": principal.subject,
                }
            },
        )
        return AuthResult(success=True, auth_data=Identity(principal, secret))


__all__ = [
    "ClientLimits",
    "Identity",
    "MailSubmitter",
    "SubmissionHandler",
    "SubmissionSMTP",
]
