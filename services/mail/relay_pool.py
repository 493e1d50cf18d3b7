"""Connections to SMTP relays: reused between emails, bounded per relay, one transaction each.

`RelayPool.send` runs one mail transaction (MAIL FROM, RCPT TO per recipient, DATA) on a
connection of the relay's pool and returns the reply that decides each recipient. Transport
failures never raise: every recipient without a final verdict gets a code-0 reply describing
the failure (the outcome rules, `services.mail.outcomes`, defer those). A timeout while waiting
for the final reply to DATA may hide a delivery; the reply says so, and the email is retried
anyway (never lose mail; a duplicate is the lesser harm).

Connections are reused per relay (an idle pool per relay settings) and bounded per relay by a
semaphore, so one slow relay cannot take every connection of the worker. The only module of
the mail service that speaks SMTP (aiosmtplib).
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
from collections.abc import Sequence

import aiosmtplib

from services.core.cancellation import raise_if_cancelling
from services.core.netguard import (
    AddressPolicy,
    HostResolver,
    IPAddress,
    ResolveError,
    SystemHostResolver,
    addresses_of,
    connect_checked,
)
from services.mail.compose import needs_smtputf8
from services.mail.models import SmtpReply
from services.mail.relay_lookup import RelayEndpoint

_ENHANCED_RE = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\s*")


def _reply(code: int, text: str) -> SmtpReply:
    text = " ".join(text.split())[:500]
    match = _ENHANCED_RE.match(text)
    return SmtpReply(code, match.group(1) if match else "", text)


def _needs_smtputf8(envelope_from: str, recipients: Sequence[str], message: bytes) -> bool:
    """Whether an address or the header section (UTF-8 addresses, RFC 6532) is not ASCII."""
    headers = message.split(b"\r\n\r\n", 1)[0]
    return needs_smtputf8([envelope_from, *recipients]) or not headers.isascii()


def _failure_reply(exc: BaseException) -> SmtpReply:
    if isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code >= 200:
        return _reply(exc.code, exc.message)
    if isinstance(exc, aiosmtplib.SMTPTimeoutError | asyncio.TimeoutError | TimeoutError):
        return SmtpReply(0, "", f"timeout: {exc}"[:500])
    if isinstance(exc, ssl.SSLError):
        return SmtpReply(0, "", f"TLS failure: {exc}"[:500])
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected):
        return SmtpReply(0, "", f"connection lost: {exc}"[:500])
    return SmtpReply(0, "", f"{type(exc).__name__}: {exc}"[:500])


class RelayPool:
    """SMTP connections per relay: reused between emails, bounded per relay.

    Every new connection goes through the SSRF guard (`services.core.netguard`): the relay
    name is resolved here, refused whole if any address is not allowed (production: private,
    loopback, link-local, metadata, ...), and the socket is connected to exactly the checked
    address. Saving a relay checked its name once; DNS may answer differently later.
    """

    def __init__(
        self,
        *,
        max_per_relay: int,
        ca_file: str = "",
        max_idle: int | None = None,
        policy: AddressPolicy | None = None,
        resolver: HostResolver | None = None,
    ) -> None:
        self._max = max_per_relay
        self._ca_file = ca_file
        # Idle connections kept per relay; by default as many as may be open, so that a
        # connection finishing its transaction is kept for the next one rather than closed and
        # opened again (with fewer, a busy worker churned connections: a connect and an EHLO
        # every few messages).
        self._max_idle = max_per_relay if max_idle is None else max_idle
        self._policy = policy or AddressPolicy(allow_private=True)
        self._resolver = resolver or SystemHostResolver()
        self._idle: dict[tuple[object, ...], list[aiosmtplib.SMTP]] = {}
        self._limits: dict[tuple[object, ...], asyncio.Semaphore] = {}

    def _tls_context(self, endpoint: RelayEndpoint) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if self._ca_file:
            context.load_verify_locations(self._ca_file)
        if endpoint.tls_skip_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    async def _connect(self, endpoint: RelayEndpoint) -> aiosmtplib.SMTP:
        implicit = endpoint.security == "implicit_tls"
        start_tls: bool | None = {
            "starttls_required": True,
            "starttls_opportunistic": None,  # aiosmtplib: use it when offered
            "none": False,
            "implicit_tls": False,
        }.get(endpoint.security, True)
        try:
            addresses = await addresses_of(
                endpoint.host, resolver=self._resolver, policy=self._policy
            )
        except ResolveError as exc:
            raise ConnectionError(str(exc)) from None  # temporary: DNS may recover
        sock = await self._open(addresses, endpoint)
        smtp = aiosmtplib.SMTP(
            hostname=endpoint.host,  # for SNI and certificate checks only: `sock` is connected
            sock=sock,
            use_tls=implicit,
            start_tls=start_tls,
            tls_context=self._tls_context(endpoint) if implicit or start_tls is not False else None,
            timeout=endpoint.timeout,
            local_hostname=endpoint.client_hostname or None,
            username=endpoint.username or None,
            password=endpoint.password or None,
        )
        await smtp.connect()
        return smtp

    async def _open(self, addresses: list[IPAddress], endpoint: RelayEndpoint) -> socket.socket:
        """A TCP connection to the first of `addresses` that answers."""
        last: OSError | None = None
        for address in addresses:
            try:
                return await connect_checked(
                    address, endpoint.port, policy=self._policy, seconds=endpoint.timeout
                )
            except OSError as exc:
                last = exc
        raise last or ConnectionError(f"{endpoint.host} has no addresses")

    async def send(
        self,
        endpoint: RelayEndpoint,
        *,
        envelope_from: str,
        recipients: Sequence[str],
        message: bytes,
    ) -> dict[str, SmtpReply]:
        """Run one mail transaction; the reply that decides each recipient.

        Transport failures (connection refused or lost, timeouts, TLS errors) never raise:
        every recipient without a final verdict gets a code-0 reply describing the failure.
        """
        key = endpoint.pool_key
        limit = self._limits.setdefault(key, asyncio.Semaphore(self._max))
        async with limit:
            idle = self._idle.setdefault(key, [])
            smtp: aiosmtplib.SMTP | None = None
            while idle and smtp is None:
                candidate = idle.pop()
                if candidate.is_connected:
                    smtp = candidate
            reused = smtp is not None
            replies: dict[str, SmtpReply] = {}
            stage = "connect"
            try:
                if smtp is None:
                    smtp = await self._connect(endpoint)
                # Internationalised addresses (RFC 6531) travel only in an SMTPUTF8
                # transaction, with the addresses and headers as UTF-8.
                utf8 = _needs_smtputf8(envelope_from, recipients, message)
                options = ["SMTPUTF8"] if utf8 else []
                encoding = "utf-8" if utf8 else "ascii"
                if utf8 and smtp.is_ehlo_or_helo_needed:
                    stage = "EHLO"
                    await smtp.ehlo()  # the extensions are known only after EHLO
                if utf8 and not smtp.supports_extension("smtputf8"):
                    # RFC 6531 3.2: never downgraded or sent anyway. Retrying cannot help
                    # until the relay changes, and it is not the recipient's fault: failed
                    # now, with the reason (0 = our verdict, not a reply; 5.6.7 per RFC 6531).
                    verdict = SmtpReply(
                        0,
                        "5.6.7",
                        f"not sent: the relay {endpoint.host}:{endpoint.port} does not offer "
                        "SMTPUTF8, which internationalised addresses need (RFC 6531)",
                    )
                    if len(idle) < self._max_idle:
                        idle.append(smtp)  # no transaction was started: still usable
                    else:
                        smtp.close()
                    return dict.fromkeys(recipients, verdict)
                stage = "MAIL FROM"
                try:
                    await smtp.mail(envelope_from, options=options, encoding=encoding)
                except aiosmtplib.SMTPServerDisconnected:
                    if not reused:
                        raise
                    # The relay closed the idle connection meanwhile: one fresh try.
                    smtp.close()
                    smtp = await self._connect(endpoint)
                    await smtp.mail(envelope_from, options=options, encoding=encoding)
                accepted: list[str] = []
                stage = "RCPT TO"
                for rcpt in recipients:
                    try:
                        response = await smtp.rcpt(rcpt, encoding=encoding)
                    except aiosmtplib.SMTPRecipientRefused as exc:
                        replies[rcpt] = _reply(exc.code, exc.message)
                        continue
                    accepted.append(rcpt)
                    replies[rcpt] = _reply(response.code, response.message)
                if not accepted:
                    await smtp.rset()
                else:
                    stage = "DATA"
                    try:
                        response = await smtp.data(message)
                        final = _reply(response.code, response.message)
                    except aiosmtplib.SMTPDataError as exc:
                        final = _reply(exc.code, exc.message)
                    for rcpt in accepted:
                        replies[rcpt] = final
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                if smtp is not None:
                    smtp.close()
                # A cancellation the client library turned into one of these (Python 3.11's
                # wait_for returns a waiter's error when both meet) is no reply of the relay:
                # the caller is stopping and must not record an outcome.
                raise_if_cancelling()
                failure = _failure_reply(exc)
                if failure.code == 0:
                    note = f"during {stage}: {failure.text}"
                    if stage == "DATA":
                        # RFC 5321 4.5.3.2: no final reply may hide a delivery. We retry
                        # (never lose mail) and say that a duplicate is possible.
                        note += " (the relay may have accepted it; a retry may duplicate it)"
                    failure = SmtpReply(0, "", note[:500])
                # MAIL FROM refused or the session broke: every undecided recipient shares it;
                # recipients already refused permanently at RCPT keep their 5xx.
                for rcpt in recipients:
                    if rcpt not in replies or replies[rcpt].code // 100 == 2:
                        replies[rcpt] = failure
                return replies
            if len(idle) < self._max_idle and smtp.is_connected:
                idle.append(smtp)
            else:
                smtp.close()
            return replies

    async def close(self) -> None:
        """Say QUIT on every idle connection."""
        for idle in self._idle.values():
            for smtp in idle:
                try:
                    await asyncio.wait_for(smtp.quit(), timeout=2)
                except (aiosmtplib.SMTPException, OSError, TimeoutError):
                    smtp.close()
            idle.clear()


__all__ = ["RelayPool"]
