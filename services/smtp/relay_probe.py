"""Live test of a relay: every step of an SMTP session, timed, with what the server said.

Steps, in order: ``resolve`` (addresses, checked by the SSRF policy), ``connect`` (TCP to the
checked address), ``tls`` (implicit TLS only: the handshake, which also waits for the greeting),
``banner`` (the 220 greeting), ``ehlo`` (extensions and AUTH mechanisms offered), ``starttls``
(protocol, cipher, certificate subject/issuer/validity), ``ehlo`` again after STARTTLS,
``auth`` (mechanism and result) and ``quit``. The first failing step ends the test and is
named in the report, with the server's reply code and text when there is one.

aiosmtplib gets the already-connected socket, so it never resolves the host itself: the
address connected to is the one the guard checked. The host name is still used for TLS (SNI
and certificate verification). The password never appears in the report: every text the
server sends back is scrubbed of the password and of the base64 forms AUTH sends.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import ssl
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import aiosmtplib
from cryptography import x509

from services.core.netguard import (
    AddressPolicy,
    HostResolver,
    IPAddress,
    ResolveError,
    connect_checked,
)
from services.smtp.models import (
    ConnectionReport,
    ConnectionStep,
    RelaySettings,
    SecurityMode,
    TlsInfo,
)
from services.smtp.relay_settings import parse_ip_literal

# Mechanisms aiosmtplib implements, in our order of preference (PLAIN and LOGIN are equally
# exposed without TLS; CRAM-MD5 is last because servers rarely offer it any more).
_MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")
_MAX_DETAIL = 500
_REDACTED = "[redacted]"


class _StepFailed(Exception):
    """Ends the session: the failed step is already in the transcript."""


@dataclass
class _Transcript:
    """Collects steps while the session runs."""

    secrets: tuple[str, ...]
    steps: list[ConnectionStep] = field(default_factory=list)

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, _REDACTED)
        return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."

    def add(self, step: ConnectionStep) -> ConnectionStep:
        step = replace(
            step,
            detail=self.scrub(step.detail),
            extensions=tuple(self.scrub(e) for e in step.extensions),
        )
        self.steps.append(step)
        return step

    def fail(self, name: str, started: float, detail: str, *, code: int = 0) -> _StepFailed:
        self.add(
            ConnectionStep(
                name, False, time.perf_counter() - started, reply_code=code, detail=detail
            )
        )
        return _StepFailed(name)


class RelayTester:
    """Runs connection tests."""

    def __init__(
        self,
        *,
        resolver: HostResolver,
        policy: AddressPolicy,
        ca_file: str = "",
        local_hostname: str | None = None,
    ) -> None:
        """Create a tester.

        Args:
            resolver: how host names become addresses.
            policy: which addresses may be connected to.
            ca_file: extra trusted CA certificates (PEM), e.g. a private relay's CA.
            local_hostname: EHLO name when a config sets none (default: this host's FQDN).
        """
        self._resolver = resolver
        self._policy = policy
        self._ca_file = ca_file
        if ca_file:  # a bad file must stop start-up, not fail every test later
            ssl.create_default_context().load_verify_locations(cafile=ca_file)
        self._local_hostname = local_hostname

    def tls_context(self, relay: RelaySettings) -> ssl.SSLContext:
        """The client TLS context for a relay (system trust store plus the extra CA file)."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if self._ca_file:
            context.load_verify_locations(cafile=self._ca_file)
        if relay.tls_skip_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    async def test(self, relay: RelaySettings, *, password: str | None) -> ConnectionReport:
        """Run a session against `relay` and report every step (never raises for failures)."""
        started = time.perf_counter()
        transcript = _Transcript(_secret_forms(relay.username, password))
        with contextlib.suppress(_StepFailed):  # the failure is already in the transcript
            await self._session(relay, password, transcript)
        failed = next((s for s in transcript.steps if not s.ok), None)
        total = time.perf_counter() - started
        if failed is None:
            message = f"{relay.host}:{relay.port} accepted the session"
            if relay.username:
                message += f" and authenticated {relay.username!r}"
            return ConnectionReport(True, tuple(transcript.steps), "", total, 0, message)
        return ConnectionReport(
            False,
            tuple(transcript.steps),
            failed.name,
            total,
            failed.reply_code,
            f"{failed.name} failed: {failed.detail}",
        )

    async def _session(
        self, relay: RelaySettings, password: str | None, transcript: _Transcript
    ) -> None:
        timeout = relay.timeout.total_seconds()
        addresses = await self._resolve(relay, transcript)
        sock = await self._connect(relay, addresses, transcript)
        try:
            context = await asyncio.to_thread(self.tls_context, relay)
            implicit = relay.security is SecurityMode.IMPLICIT_TLS
            client = aiosmtplib.SMTP(
                hostname=relay.host,  # for SNI and certificate checks only: `sock` is connected
                sock=sock,
                use_tls=implicit,
                start_tls=False,
                tls_context=context,
                local_hostname=relay.client_hostname or self._local_hostname,
                timeout=timeout,
            )
        except BaseException:
            sock.close()
            raise
        # From client.connect() on, asyncio's transport owns the socket and closes it, possibly
        # after this call returns (TLS shutdown): closing it here could free its descriptor
        # while the transport still polls it.
        try:
            await self._greet(client, relay, transcript, implicit=implicit)
            extensions = await self._ehlo(client, transcript)
            wants_starttls = relay.security in (
                SecurityMode.STARTTLS_REQUIRED,
                SecurityMode.STARTTLS_OPPORTUNISTIC,
            )
            if wants_starttls and await self._starttls(
                client, relay, context, transcript, extensions
            ):
                await self._ehlo(client, transcript)  # RFC 3207: forget what was said before
            if relay.username:
                await self._auth(client, relay.username, password or "", transcript)
            t0 = time.perf_counter()
            try:
                reply = await client.quit()
            except aiosmtplib.SMTPResponseException as exc:
                raise transcript.fail("quit", t0, exc.message, code=exc.code) from None
            except aiosmtplib.SMTPException as exc:
                raise transcript.fail("quit", t0, str(exc)) from None
            transcript.add(
                ConnectionStep("quit", True, time.perf_counter() - t0, reply.code, reply.message)
            )
        finally:
            client.close()

    async def _resolve(self, relay: RelaySettings, transcript: _Transcript) -> list[IPAddress]:
        t0 = time.perf_counter()
        literal = parse_ip_literal(relay.host)
        if literal is not None:
            addresses = [literal]
            detail = "the host is an address; nothing to resolve"
        else:
            try:
                addresses = await self._resolver.resolve(relay.host)
            except ResolveError as exc:
                raise transcript.fail("resolve", t0, str(exc)) from None
            detail = f"{relay.host} has {len(addresses)} address(es)"
        refusals = [r for r in (self._policy.refusal(a) for a in addresses) if r]
        shown = tuple(str(a) for a in addresses)
        if refusals:
            # One bad address refuses the host: mixing a public and a private answer is
            # exactly what a rebinding attack looks like.
            transcript.add(
                ConnectionStep(
                    "resolve",
                    False,
                    time.perf_counter() - t0,
                    detail=f"refused: {refusals[0]}",
                    addresses=shown,
                )
            )
            raise _StepFailed("resolve")
        transcript.add(
            ConnectionStep(
                "resolve", True, time.perf_counter() - t0, detail=detail, addresses=shown
            )
        )
        return addresses

    async def _connect(
        self,
        relay: RelaySettings,
        addresses: list[IPAddress],
        transcript: _Transcript,
    ) -> socket.socket:
        timeout = relay.timeout.total_seconds()
        errors: list[str] = []
        t0 = time.perf_counter()
        for address in addresses:
            try:
                sock = await connect_checked(
                    address, relay.port, policy=self._policy, seconds=timeout
                )
            except TimeoutError:
                errors.append(f"{address}: no answer within {timeout:g}s")
                continue
            except OSError as exc:  # includes PermissionError from the guard
                errors.append(f"{address}: {exc.strerror or exc}")
                continue
            transcript.add(
                ConnectionStep(
                    "connect",
                    True,
                    time.perf_counter() - t0,
                    detail=f"connected to {_hostport(address, relay.port)}",
                    addresses=(str(address),),
                )
            )
            return sock
        raise transcript.fail(
            "connect", t0, f"could not connect to port {relay.port}: " + "; ".join(errors)
        )

    async def _greet(
        self,
        client: aiosmtplib.SMTP,
        relay: RelaySettings,
        transcript: _Transcript,
        *,
        implicit: bool,
    ) -> None:
        t0 = time.perf_counter()
        try:
            banner = await client.connect()
        except aiosmtplib.SMTPConnectResponseError as exc:
            raise transcript.fail("banner", t0, exc.message, code=exc.code) from None
        except aiosmtplib.SMTPConnectTimeoutError as exc:
            # aiosmtplib chains the handshake's TimeoutError, but the greeting's own
            # SMTPTimeoutError: that tells a silent TLS port from a silent server.
            waiting_for_banner = isinstance(exc.__cause__, aiosmtplib.SMTPTimeoutError)
            step = "tls" if implicit and not waiting_for_banner else "banner"
            raise transcript.fail(
                step,
                t0,
                f"no answer within {relay.timeout.total_seconds():g}s"
                + (" (the server sent no greeting)" if step == "banner" else ""),
            ) from None
        except aiosmtplib.SMTPConnectError as exc:
            cause = exc.__cause__
            step = "tls" if implicit and isinstance(cause, ssl.SSLError) else "banner"
            raise transcript.fail(step, t0, _describe(cause or exc)) from None
        elapsed = time.perf_counter() - t0
        if implicit:
            transcript.add(
                ConnectionStep(
                    "tls",
                    True,
                    elapsed,
                    detail="TLS handshake (the time includes waiting for the greeting)",
                    tls=_tls_info(client, relay),
                )
            )
            elapsed = 0.0
        transcript.add(ConnectionStep("banner", True, elapsed, banner.code, banner.message))

    async def _ehlo(self, client: aiosmtplib.SMTP, transcript: _Transcript) -> dict[str, str]:
        t0 = time.perf_counter()
        try:
            reply = await client.ehlo()
        except aiosmtplib.SMTPResponseException as exc:
            raise transcript.fail("ehlo", t0, exc.message, code=exc.code) from None
        except aiosmtplib.SMTPException as exc:
            raise transcript.fail("ehlo", t0, str(exc)) from None
        extensions = dict(client.esmtp_extensions)
        transcript.add(
            ConnectionStep(
                "ehlo",
                True,
                time.perf_counter() - t0,
                reply.code,
                reply.message.splitlines()[0] if reply.message else "",
                extensions=tuple(
                    f"{name.upper()} {params}".strip() for name, params in extensions.items()
                ),
                auth_mechanisms=tuple(m.upper() for m in client.server_auth_methods),
            )
        )
        return extensions

    async def _starttls(
        self,
        client: aiosmtplib.SMTP,
        relay: RelaySettings,
        context: ssl.SSLContext,
        transcript: _Transcript,
        extensions: dict[str, str],
    ) -> bool:
        t0 = time.perf_counter()
        if "starttls" not in extensions:
            if relay.security is SecurityMode.STARTTLS_REQUIRED:
                raise transcript.fail(
                    "starttls", t0, "the server does not offer STARTTLS, which is required"
                )
            transcript.add(
                ConnectionStep(
                    "starttls",
                    True,
                    time.perf_counter() - t0,
                    detail="not offered by the server; the session continues unencrypted",
                )
            )
            return False
        try:
            reply = await client.starttls(server_hostname=relay.host, tls_context=context)
        except aiosmtplib.SMTPResponseException as exc:
            raise transcript.fail("starttls", t0, exc.message, code=exc.code) from None
        except aiosmtplib.SMTPTimeoutError:
            raise transcript.fail(
                "starttls", t0, f"no answer within {relay.timeout.total_seconds():g}s"
            ) from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise transcript.fail("starttls", t0, _describe(exc.__cause__ or exc)) from None
        transcript.add(
            ConnectionStep(
                "starttls",
                True,
                time.perf_counter() - t0,
                reply.code,
                reply.message,
                tls=_tls_info(client, relay),
            )
        )
        return True

    async def _auth(
        self, client: aiosmtplib.SMTP, username: str, password: str, transcript: _Transcript
    ) -> None:
        t0 = time.perf_counter()
        offered = tuple(m.upper() for m in client.server_auth_methods)
        if not offered:
            raise transcript.fail(
                "auth",
                t0,
                "the server offers no AUTH mechanism"
                + ("" if client.get_transport_info("ssl_object") else " (over plain text)"),
            )
        mechanism = next((m for m in _MECHANISMS if m in offered), None)
        if mechanism is None:
            raise transcript.fail(
                "auth", t0, f"no supported mechanism offered ({', '.join(offered)})"
            )
        try:
            if mechanism == "PLAIN":
                reply = await client.auth_plain(username, password)
            elif mechanism == "LOGIN":
                reply = await client.auth_login(username, password)
            else:
                reply = await client.auth_crammd5(username, password)
        except aiosmtplib.SMTPResponseException as exc:
            transcript.add(
                ConnectionStep(
                    "auth",
                    False,
                    time.perf_counter() - t0,
                    exc.code,
                    exc.message,
                    auth_mechanisms=offered,
                    auth_mechanism=mechanism,
                )
            )
            raise _StepFailed("auth") from None
        except aiosmtplib.SMTPException as exc:
            raise transcript.fail("auth", t0, str(exc)) from None
        transcript.add(
            ConnectionStep(
                "auth",
                True,
                time.perf_counter() - t0,
                reply.code,
                reply.message,
                auth_mechanisms=offered,
                auth_mechanism=mechanism,
            )
        )


def _secret_forms(username: str, password: str | None) -> tuple[str, ...]:
    """The password and every encoding of it that AUTH puts on the wire."""
    if not password:
        return ()
    forms = {
        password,
        base64.b64encode(password.encode()).decode(),
        base64.b64encode(f"\0{username}\0{password}".encode()).decode(),
        base64.b64encode(f"{username}\0{username}\0{password}".encode()).decode(),
    }
    # Longest first, so a secret inside a longer one is not half-replaced.
    return tuple(sorted(forms, key=len, reverse=True))


def _hostport(address: IPAddress, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate rejected: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _name(name: x509.Name) -> str:
    return name.rfc4514_string()


def _tls_info(client: aiosmtplib.SMTP, relay: RelaySettings) -> TlsInfo | None:
    ssl_object = client.get_transport_info("ssl_object")
    if not isinstance(ssl_object, ssl.SSLObject):
        return None
    cipher = ssl_object.cipher()
    der = ssl_object.getpeercert(binary_form=True)
    subject = issuer = ""
    not_before: datetime | None = None
    not_after: datetime | None = None
    names: list[str] = []
    if der:
        cert = x509.load_der_x509_certificate(der)
        subject, issuer = _name(cert.subject), _name(cert.issuer)
        not_before = cert.not_valid_before_utc.astimezone(UTC)
        not_after = cert.not_valid_after_utc.astimezone(UTC)
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            san = None
        if san is not None:
            names.extend(san.get_values_for_type(x509.DNSName))
            names.extend(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    return TlsInfo(
        protocol=ssl_object.version() or "",
        cipher=cipher[0] if cipher else "",
        peer_subject=subject,
        peer_issuer=issuer,
        not_before=not_before,
        not_after=not_after,
        verified=not relay.tls_skip_verify,
        subject_alt_names=tuple(names),
    )


__all__ = ["RelayTester"]
