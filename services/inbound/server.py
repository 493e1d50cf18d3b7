"""The inbound SMTP protocol: the shared `GuardedSMTP` with the MX policy of hosted domains.

* No AUTH; STARTTLS is offered and optional (opportunistic, as between MTAs).
* RCPT: a recipient is accepted only if the domain service knows a route for it (its domain
  is ACTIVE here and a route matches), or it is a return path of our outgoing mail (the
  resolver says so: services/inbound/clients.py); anything else is ``550 5.7.1`` relay access
  denied, so the server is never an open relay. A route with the ``reject`` action answers
  ``550 5.7.1`` with its text. A domain service that cannot be asked gives ``451 4.4.3`` (try
  later).
* DATA: the message is checked (SPF, DKIM, DMARC), a Received and an Authentication-Results
  header are put on top, and it is stored through the mail service for every accepted
  recipient. ``250`` only once every recipient's copy is stored; otherwise ``451 4.3.0`` and the
  sender retries (copies stored already are recognised then: storing is idempotent).
* A message with `MAX_HOPS` or more Received headers is refused (``554 5.4.6``): forward
  routes between two domains could otherwise pass it back and forth for ever.
* Per client address: concurrent connections (`ConnectionLimits`) and messages per window
  (`WindowCounter`, ``451 4.7.1`` at MAIL FROM); timeouts and bad commands as every listener.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, Protocol

from aiosmtpd.smtp import Envelope, Session

from services.core import smtp_replies
from services.core.ids import new_id
from services.core.smtp_server import ConnectionLimits, GuardedSMTP, SessionLimits, WindowCounter
from services.inbound import replies
from services.inbound.authentication import AuthenticationResults
from services.inbound.clients import LookupFailed, Recipient
from services.inbound.settings import InboundSettings

log = logging.getLogger(__name__)
# Received headers a message may carry (Postfix's hopcount_limit).
MAX_HOPS = 50
_RECEIVED = re.compile(rb"^received:", re.IGNORECASE | re.MULTILINE)


class RecipientResolver(Protocol):
    """Finds the route of a recipient."""

    async def resolve(self, address: str) -> Recipient | None:
        """The route, or None when the address is not ours to accept.

        Raises:
            LookupFailed: the owner of routes could not be asked.
        """
        ...


class Authenticator(Protocol):
    """Checks SPF, DKIM and DMARC of a message."""

    async def check(
        self, *, raw: bytes, client_address: str, helo: str, envelope_from: str
    ) -> AuthenticationResults:
        """The results (never raises for a bad message)."""
        ...


class InboundStorer(Protocol):
    """Stores a received message for one recipient."""

    async def store(
        self,
        *,
        recipient: Recipient,
        raw: bytes,
        added_headers: bytes,
        envelope_from: str,
        client_address: str,
        helo: str,
        authentication: AuthenticationResults,
    ) -> str:
        """Store it durably; return its id (raises when it could not)."""
        ...


class InboundHandler:
    """aiosmtpd handler hooks of the inbound server."""

    def __init__(
        self,
        *,
        settings: InboundSettings,
        resolver: RecipientResolver,
        authenticator: Authenticator,
        storer: InboundStorer,
        messages: WindowCounter,
    ) -> None:
        self._settings = settings
        self._resolver = resolver
        self._authenticator = authenticator
        self._storer = storer
        self._messages = messages

    async def handle_EHLO(  # noqa: N802 - aiosmtpd's hook name
        self,
        server: InboundSMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        """Advertise PIPELINING and ENHANCEDSTATUSCODES besides aiosmtpd's (STARTTLS, ...)."""
        session.host_name = hostname
        # No AUTH here (aiosmtpd would offer it after STARTTLS): nobody logs in to an MX.
        lines = [r for r in responses[:-1] if not r[4:].startswith("AUTH")]
        return [*lines, "250-PIPELINING", "250-ENHANCEDSTATUSCODES", "250 HELP"]

    async def handle_MAIL(  # noqa: N802 - aiosmtpd's hook name
        self,
        server: InboundSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        """Start a transaction, within the client address's message budget."""
        if not self._messages.take(server.client_address):
            server.refused("too many messages from the address")
            return replies.TOO_MANY_MESSAGES
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        server.recipients = []
        return smtp_replies.SENDER_OK

    async def handle_RCPT(  # noqa: N802 - aiosmtpd's hook name
        self,
        server: InboundSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        """Accept a recipient only if one of our domains routes it (see the module docstring)."""
        if len(envelope.rcpt_tos) >= self._settings.max_recipients:
            server.refused("too many recipients", limit=self._settings.max_recipients)
            return replies.TOO_MANY_RECIPIENTS.format(limit=self._settings.max_recipients)
        shown = smtp_replies.one_line(address)
        if "@" not in address:
            return replies.BAD_RECIPIENT
        try:
            recipient = await self._resolver.resolve(address)
        except LookupFailed as exc:
            server.refused("recipient lookup failed", reason=str(exc))
            return replies.LOOKUP_FAILED
        except Exception:
            # Never aiosmtpd's "500 Error: (...)" with our exception in it: try again later.
            log.exception(
                "recipient lookup failed", extra={"fields": {"client": server.client_address}}
            )
            return replies.LOOKUP_FAILED
        if recipient is None:
            server.refused("recipient refused: not a routed address of ours", recipient=shown)
            return replies.RELAY_DENIED.format(address=shown)
        if recipient.action == "reject":
            server.refused("recipient rejected by its route", route=recipient.route_id)
            return replies.ROUTE_REJECTED.format(address=shown, text=recipient.reject_text)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        server.recipients.append(recipient)
        return smtp_replies.RECIPIENT_OK

    async def handle_DATA(  # noqa: N802 - aiosmtpd's hook name
        self, server: InboundSMTP, session: Session, envelope: Envelope
    ) -> str:
        """Check, stamp and store the message for every recipient; 250 once all are stored."""
        raw = envelope.original_content or b""
        envelope_from = envelope.mail_from or ""
        if envelope_from == "<>":
            envelope_from = ""
        helo = str(session.host_name or "")
        hops = len(_RECEIVED.findall(raw.partition(b"\r\n\r\n")[0]))
        if hops >= MAX_HOPS:
            server.refused("mail loop", hops=hops)
            return replies.TOO_MANY_HOPS.format(hops=hops)
        server.submitting = True
        try:
            auth = await self._authenticator.check(
                raw=raw,
                client_address=server.client_address,
                helo=helo,
                envelope_from=envelope_from,
            )
            ids = []
            for recipient in server.recipients:
                added = self._trace_headers(server, helo, recipient.address, auth)
                ids.append(
                    await self._storer.store(
                        recipient=recipient,
                        raw=raw,
                        added_headers=added,
                        envelope_from=envelope_from,
                        client_address=server.client_address,
                        helo=helo,
                        authentication=auth,
                    )
                )
        except Exception as exc:
            # Whatever went wrong, the sender keeps the message and retries (storing again is
            # idempotent for the copies that did land).
            log.warning(
                "inbound message not stored",
                extra={"fields": {"client": server.client_address, "error": type(exc).__name__}},
            )
            return smtp_replies.TEMPORARY_FAILURE
        finally:
            server.submitting = False
        log.info(
            "inbound message stored",
            extra={
                "fields": {
                    "client": server.client_address,
                    "ids": ids,
                    "size": len(raw),
                    "spf": auth.spf,
                    "dkim": auth.dkim,
                    "dmarc": auth.dmarc,
                }
            },
        )
        return replies.STORED.format(id=",".join(ids))

    def _trace_headers(
        self, server: InboundSMTP, helo: str, recipient: str, auth: AuthenticationResults
    ) -> bytes:
        protocol = "ESMTPS" if server.tls_active else "ESMTP"
        received = (
            f"Received: from {helo or 'unknown'} ([{server.client_address}])\r\n"
            f"\tby {self._settings.hostname} (Azora inbound) with {protocol} id {new_id()}\r\n"
            f"\tfor <{recipient}>; {format_datetime(datetime.now(UTC))}\r\n"
        )
        results = f"Authentication-Results: {auth.header}\r\n"
        text = results + received
        return text.encode("utf-8", "replace")


class InboundSMTP(GuardedSMTP):
    """One client connection of the inbound listener."""

    def __init__(
        self,
        handler: InboundHandler,
        *,
        settings: InboundSettings,
        limits: ConnectionLimits,
        message_size_limit: int,
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
            ident="Azora inbound",
            require_starttls=False,
            auth_required=False,
            **kwargs,
        )
        # The routes of this transaction's accepted recipients, in RCPT order.
        self.recipients: list[Recipient] = []

    async def smtp_AUTH(self, arg: str) -> None:  # noqa: N802 - aiosmtpd's command name
        """No AUTH on an MX."""
        await self.push("502 5.5.1 AUTH not available on this server")

    @property
    def tls_active(self) -> bool:
        """Whether STARTTLS was negotiated."""
        return self._tls_protocol is not None


__all__ = ["Authenticator", "InboundHandler", "InboundSMTP", "InboundStorer", "RecipientResolver"]
