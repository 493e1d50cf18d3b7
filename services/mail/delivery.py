"""Delivery workers: claim due emails, DKIM-sign, hand them to the domain's relay, record replies.

A worker runs one claimer and `concurrency` delivery loops. The claimer takes due emails in
batches, as many as there are idle delivery loops (each under a lease: see
`MongoEmailRepository.claim_batch`), and hands them over; a delivery loop delivers one and
records the outcome with a write fenced by the lease. A worker that dies holds nothing for
longer than the lease: the email becomes due again when the lease expires and another worker
retries it. The only duplicate this allows is a resend after a crash between the relay's 250
and our record of it (RFC 5321's window).

An outcome the relay gave is never dropped because the database is away: recording it waits,
retrying, until the database answers (`MongoEmailRepository.finish_attempt`). The delivery loop
holding it stays busy meanwhile, so the claimer takes no new work for it: what is kept in memory
is bounded by the worker's concurrency. On shutdown (`stop`, then `wait_quiet` for the grace
period) deliveries in progress finish and record; one still unrecorded when the grace period
ends is cancelled without releasing its lease, so nobody attempts it again before the lease
expires (the window above, no wider).

Replies are classified per recipient: 2xx sent, 5xx bounced (no retry), 4xx and transport
failures (timeouts, dropped connections, TLS failures) deferred with exponential backoff and
jitter until the email's maximum lifetime, then failed. A timeout while waiting for the final
reply to DATA may hide a delivery; we retry it anyway (never lose mail; a duplicate is the
lesser harm) and the timeline says so.

Connections are reused per relay (an idle pool per relay settings) and bounded per relay by a
semaphore, so one slow relay cannot take every connection of the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import socket
import ssl
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Protocol

import aiosmtplib

from services.core.clock import Clock
from services.core.errors import AzoraError
from services.core.metrics import (
    DELIVERY_ATTEMPT_DURATION,
    DKIM_SIGNATURES,
    EMAIL_DELIVERIES,
)
from services.core.netguard import (
    AddressPolicy,
    HostResolver,
    IPAddress,
    ResolveError,
    SystemHostResolver,
    addresses_of,
    connect_checked,
)
from services.core.tracing import delivery_span
from services.mail.compose import needs_smtputf8
from services.mail.models import (
    OPEN_RECIPIENTS,
    Claimed,
    EmailStatus,
    Event,
    EventType,
    Recipient,
    RecipientStatus,
    SmtpReply,
)
from services.mail.relay_health import RelayHealthStore, RelayOutcome
from services.mail.repository import EmailRepository

log = logging.getLogger(__name__)

# Email status after an attempt -> the outcome label of the delivery metrics.
_METRIC_OUTCOME = {
    EmailStatus.SENT: "sent",
    EmailStatus.PARTIALLY_SENT: "sent",
    EmailStatus.DEFERRED: "deferred",
    EmailStatus.BOUNCED: "bounced",
    EmailStatus.FAILED: "failed",
}
_ENHANCED_RE = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\s*")


@dataclass(frozen=True, slots=True)
class RelayEndpoint:
    """Where and how to hand a domain's mail over (password in clear: never log this)."""

    host: str
    port: int
    # implicit_tls, starttls_required, starttls_opportunistic or none.
    security: str = "starttls_required"
    username: str = ""
    password: str = field(default="", repr=False)
    client_hostname: str = ""
    timeout: float = 30.0
    tls_skip_verify: bool = False

    @property
    def pool_key(self) -> tuple[object, ...]:
        """Connections may be shared by emails whose relay settings are identical."""
        return (
            self.host,
            self.port,
            self.security,
            self.username,
            self.password,
            self.client_hostname,
            self.tls_skip_verify,
        )


class MessageSigner(Protocol):
    """Produces the DKIM-Signature header line for a message."""

    def sign(self, message: bytes) -> bytes:
        """The ``DKIM-Signature: ...`` header line (ending in CRLF) to prepend to `message`."""
        ...


class RelayLookup(Protocol):
    """A domain's relay and active signing key."""

    async def endpoint(self, *, tenant_id: str, domain_id: str) -> RelayEndpoint:
        """The domain's relay.

        Raises:
            NotFound: the domain has no relay configured.
            Unavailable: the owner of relay settings cannot answer now.
        """
        ...

    async def signer(self, *, tenant_id: str, domain_id: str) -> MessageSigner | None:
        """A signer with the domain's active DKIM key, or None when it has none.

        Raises:
            Unavailable: the owner of the keys cannot answer now.
        """
        ...


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When to try again after a temporary failure."""

    min_backoff: timedelta = timedelta(minutes=5)
    max_backoff: timedelta = timedelta(seconds=4000)
    jitter: float = 0.2  # the delay is shortened by up to this fraction, at random
    max_lifetime: timedelta = timedelta(days=5)

    def delay(self, attempt: int, rng: random.Random) -> timedelta:
        """Wait after failed attempt number `attempt` (1-based): doubling, capped, jittered."""
        base = self.min_backoff * (2 ** max(0, min(attempt - 1, 30)))
        capped = min(base, self.max_backoff)
        factor: float = 1.0 - self.jitter * rng.random()
        return timedelta(seconds=capped.total_seconds() * factor)


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
        max_idle: int = 8,
        policy: AddressPolicy | None = None,
        resolver: HostResolver | None = None,
    ) -> None:
        self._max = max_per_relay
        self._ca_file = ca_file
        self._max_idle = max_idle
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


@dataclass(frozen=True, slots=True)
class Outcome:
    """What an attempt changed."""

    recipients: list[Recipient]
    status: EmailStatus
    next_attempt_at: datetime | None
    events: list[Event]


def decide(
    claimed: Claimed,
    replies: dict[str, SmtpReply],
    *,
    now: datetime,
    policy: RetryPolicy,
    rng: random.Random,
) -> Outcome:
    """Turn the replies of one attempt into recipient states, overall status and events."""
    email = claimed.email
    recipients = [replace(r) for r in email.recipients]
    events: list[Event] = []
    expired = now >= email.expires_at
    for r in recipients:
        if r.status not in OPEN_RECIPIENTS:
            continue
        reply = replies.get(r.address) or SmtpReply(0, "", "not attempted")
        # RFC 3464 Diagnostic-Code style when the relay answered; our own words otherwise.
        diagnostic = f"smtp; {reply.code} {reply.text}" if reply.code else reply.text
        r.attempts += 1
        r.last_reply = reply
        r.updated_at = now
        klass = reply.code // 100
        if klass == 2:
            r.status = RecipientStatus.SENT
            events.append(Event(EventType.SENT, now, r.address, reply))
        elif klass == 5:
            r.status = RecipientStatus.BOUNCED
            events.append(Event(EventType.BOUNCED, now, r.address, reply, diagnostic))
        elif reply.enhanced_code.startswith("5."):
            # Our own permanent verdict, without a relay reply (e.g. no SMTPUTF8): failed
            # at once with the reason, neither retried nor counted as the address's bounce.
            r.status = RecipientStatus.FAILED
            events.append(Event(EventType.FAILED, now, r.address, reply, diagnostic))
        elif expired:
            r.status = RecipientStatus.FAILED
            events.append(
                Event(
                    EventType.FAILED,
                    now,
                    r.address,
                    reply,
                    f"gave up after the maximum lifetime; last: {diagnostic}",
                )
            )
        else:
            r.status = RecipientStatus.DEFERRED
            events.append(Event(EventType.DEFERRED, now, r.address, reply, diagnostic))
    statuses = {r.status for r in recipients}
    next_at: datetime | None = None
    if RecipientStatus.DEFERRED in statuses or RecipientStatus.PENDING in statuses:
        status = EmailStatus.DEFERRED
        # Never past the give-up time, so the last attempt happens at the deadline.
        next_at = min(now + policy.delay(email.attempts, rng), email.expires_at)
    elif statuses == {RecipientStatus.SENT}:
        status = EmailStatus.SENT
    elif RecipientStatus.SENT in statuses:
        status = EmailStatus.PARTIALLY_SENT
    elif RecipientStatus.FAILED in statuses:
        status = EmailStatus.FAILED
    elif RecipientStatus.BOUNCED in statuses:
        status = EmailStatus.BOUNCED
    else:
        status = EmailStatus.CANCELLED
    return Outcome(recipients, status, next_at, events)


class DeliveryWorker:
    """Claims and delivers emails until stopped."""

    def __init__(
        self,
        *,
        emails: EmailRepository,
        relays: RelayLookup,
        pool: RelayPool,
        clock: Clock,
        policy: RetryPolicy,
        lease: timedelta,
        concurrency: int,
        poll_interval: float,
        worker_id: str | None = None,
        rng: random.Random | None = None,
        relay_health: RelayHealthStore | None = None,
    ) -> None:
        self._emails = emails
        self._relay_health = relay_health
        self._relays = relays
        self._pool = pool
        self._clock = clock
        self._policy = policy
        self._lease = lease
        self._concurrency = concurrency
        self._poll = poll_interval
        self.worker_id = worker_id or f"w-{uuid.uuid4().hex[:12]}"
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self._stopping = asyncio.Event()
        self._busy = 0  # deliveries in progress (attempt and record)
        self._quiet = asyncio.Event()
        self._quiet.set()

    async def claim(self) -> Claimed | None:
        """Take one due email."""
        batch = await self.claim_batch(1)
        return batch[0] if batch else None

    async def claim_batch(self, limit: int) -> list[Claimed]:
        """Take up to `limit` due emails."""
        return await self._emails.claim_batch(
            now=self._clock.now(), lease=self._lease, worker_id=self.worker_id, limit=limit
        )

    async def run_once(self) -> int:
        """Deliver every email due now (concurrently); how many attempts were made."""
        done = 0

        async def loop() -> None:
            nonlocal done
            while not self._stopping.is_set():
                claimed = await self.claim()
                if claimed is None:
                    return
                await self.deliver(claimed)
                done += 1

        await asyncio.gather(*(loop() for _ in range(self._concurrency)))
        return done

    async def run(self) -> None:
        """Deliver until `stop` (or cancellation, which releases held emails)."""
        handed: asyncio.Queue[Claimed | None] = asyncio.Queue()
        idle = asyncio.Semaphore(self._concurrency)
        loops = [
            asyncio.create_task(self._deliver_loop(handed, idle), name=f"{self.worker_id}-{i}")
            for i in range(self._concurrency)
        ]
        try:
            await self._claim_loop(handed, idle)
            for _ in loops:
                handed.put_nowait(None)  # each loop finishes what it holds, then returns
            await asyncio.gather(*loops)
        finally:
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            await self._release_all(handed)
            await self._pool.close()

    def stop(self) -> None:
        """Stop claiming; loops finish the delivery they are in and return."""
        self._stopping.set()

    async def wait_stopping(self) -> None:
        """Return once `stop` was called."""
        await self._stopping.wait()

    async def wait_quiet(self, within: float) -> bool:
        """Wait up to `within` s until no delivery is in progress; whether none is.

        After `stop` this is the graceful shutdown: every delivery started has been recorded
        (or given back) once it returns True.
        """
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._quiet.wait(), timeout=within)
        return self._quiet.is_set()

    async def _claim_loop(
        self, handed: asyncio.Queue[Claimed | None], idle: asyncio.Semaphore
    ) -> None:
        while not self._stopping.is_set():
            # At least one delivery loop is idle; claim for every idle one (a claim never
            # waits for a loop: its lease runs from the moment it is taken).
            await idle.acquire()
            free = 1
            while not idle.locked():
                await idle.acquire()
                free += 1
            try:
                batch = await self.claim_batch(free)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("claim failed")
                batch = []
            for claimed in batch:
                handed.put_nowait(claimed)
            for _ in range(free - len(batch)):
                idle.release()
            if not batch:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=self._poll)
        # Stopping: what was claimed but not started yet goes back at once.
        await self._release_all(handed)

    async def _deliver_loop(
        self, handed: asyncio.Queue[Claimed | None], idle: asyncio.Semaphore
    ) -> None:
        while True:
            claimed = await handed.get()
            if claimed is None:
                return
            self._busy += 1
            self._quiet.clear()
            try:
                await self.deliver(claimed)
            except asyncio.CancelledError:
                raise
            except Exception:
                # Not recorded: the lease expires and another attempt is made.
                log.exception("delivery failed", extra={"fields": {"email": claimed.email.id}})
            finally:
                self._busy -= 1
                if not self._busy:
                    self._quiet.set()
                idle.release()

    async def _release_all(self, handed: asyncio.Queue[Claimed | None]) -> None:
        now = self._clock.now()
        while not handed.empty():
            claimed = handed.get_nowait()
            if claimed is not None:
                await self._emails.release(claimed=claimed, now=now)

    async def deliver(self, claimed: Claimed) -> Outcome | None:
        """One delivery attempt of a claimed email, recorded (None if the lease was lost)."""
        email = claimed.email
        started = time.perf_counter()
        with delivery_span(
            email_id=email.id,
            domain=email.domain_name,
            attempt=email.attempts + 1,
            carrier=email.trace_context,
        ) as span:
            outcome = await self._deliver_in_span(claimed, started)
            if outcome is not None:
                span.set_attribute("azora.delivery.outcome", outcome.status.value)
            return outcome

    async def _deliver_in_span(self, claimed: Claimed, started: float) -> Outcome | None:
        email = claimed.email
        try:
            open_rcpts = [r.address for r in email.recipients if r.status in OPEN_RECIPIENTS]
            replies, endpoint = await self._attempt(claimed, open_rcpts)
        except asyncio.CancelledError:
            # Shutdown mid-delivery: hand the email back so another worker takes it at once.
            # The release must complete even if the shutdown cancels us again meanwhile.
            release = asyncio.ensure_future(
                self._emails.release(claimed=claimed, now=self._clock.now())
            )
            while not release.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(release)
            raise
        now = self._clock.now()
        outcome = decide(claimed, replies, now=now, policy=self._policy, rng=self._rng)
        # Waits while the database is away (the outcome is kept, not dropped). Cancelled here
        # (shutdown after the grace period) the lease is deliberately not released.
        recorded = await self._emails.finish_attempt(
            claimed=claimed,
            recipients=outcome.recipients,
            status=outcome.status,
            next_attempt_at=outcome.next_attempt_at,
            events=outcome.events,
            now=now,
        )
        if not recorded:
            log.warning("lease lost before recording", extra={"fields": {"email": email.id}})
            return None
        label = _METRIC_OUTCOME.get(outcome.status, "failed")
        EMAIL_DELIVERIES.labels(outcome=label, domain=email.domain_name).inc()
        DELIVERY_ATTEMPT_DURATION.labels(outcome=label).observe(time.perf_counter() - started)
        if endpoint is not None and self._relay_health is not None and replies:
            first = next(iter(replies.values()))
            await self._relay_health.note(
                RelayOutcome(
                    f"{endpoint.host}:{endpoint.port}",
                    label,
                    first.code,
                    any(r.code > 0 for r in replies.values()),
                    now,
                )
            )
        return outcome

    async def _attempt(
        self, claimed: Claimed, recipients: list[str]
    ) -> tuple[dict[str, SmtpReply], RelayEndpoint | None]:
        """The replies per recipient, and the relay they came from (None: none was tried)."""
        email = claimed.email
        if not recipients:
            return {}, None
        try:
            content = await self._emails.content(email=email)
            endpoint = await self._relays.endpoint(
                tenant_id=email.tenant_id, domain_id=email.domain_id
            )
            signer = await self._relays.signer(tenant_id=email.tenant_id, domain_id=email.domain_id)
        except AzoraError as exc:
            # No relay (removed meanwhile) or its owner unreachable: temporary on our side;
            # the lifetime limit turns it into a failure eventually.
            reply = SmtpReply(0, "", f"relay not available: {exc.message}"[:500])
            return dict.fromkeys(recipients, reply), None
        if signer is not None:
            message = signer.sign(content) + content
            DKIM_SIGNATURES.labels(outcome="signed").inc()
        else:
            message = content
        replies = await self._pool.send(
            endpoint, envelope_from=email.envelope_from, recipients=recipients, message=message
        )
        return replies, endpoint


__all__ = [
    "DeliveryWorker",
    "MessageSigner",
    "Outcome",
    "RelayEndpoint",
    "RelayLookup",
    "RelayPool",
    "RetryPolicy",
    "decide",
]
