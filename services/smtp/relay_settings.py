"""Validation of relay settings: host, port, security mode, credentials, EHLO name, timeout.

Every problem is reported at once, one field violation per field, so a form can mark all bad
fields in one round trip. Host names are normalised like domain names (IDNA 2008 A-labels,
lowercase); IP literals are kept in canonical form and, when the SSRF policy forbids
non-public relays, refused right away if they are non-public.
"""

from __future__ import annotations

import ipaddress
from datetime import timedelta

from services.core.dns_names import normalize_domain_name
from services.core.errors import FieldViolation, InvalidArgument
from services.core.netguard import AddressPolicy
from services.smtp.models import RelaySettings, RelaySettingsInput, SecurityMode

MAX_TIMEOUT = timedelta(minutes=5)
MAX_USERNAME_CHARS = 256
MAX_PASSWORD_CHARS = 1024


def parse_ip_literal(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address if `text` is an IP literal (IPv6 optionally in brackets), else None."""
    candidate = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        address = ipaddress.ip_address(candidate)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        return None  # fe80::1%eth0 only means something on one host
    return address


def normalize_host(raw: str, *, field: str, policy: AddressPolicy) -> str:
    """A relay host: an IP literal (canonical) or a fully-qualified host name (A-label).

    Raises:
        InvalidArgument: on `field`, for empty, malformed or (by policy) non-public hosts.
    """
    text = raw.strip()
    if not text:
        raise InvalidArgument.single(field, "a relay host is required")
    if "://" in text or "/" in text:
        raise InvalidArgument.single(field, "must be a host name or address, not a URL")
    address = parse_ip_literal(text)
    if address is not None:
        refusal = policy.refusal(address)
        if refusal is not None:
            raise InvalidArgument.single(field, refusal)
        return str(address)
    if ":" in text:
        raise InvalidArgument.single(
            field, "must be a host name or address without a port (set `port` separately)"
        )
    a_label, _ = normalize_domain_name(text, field=field)
    return a_label


def _client_hostname(raw: str) -> str:
    """EHLO argument: a host name, or an address literal written ``[192.0.2.1]``."""
    text = raw.strip()
    if not text:
        return ""
    if text.startswith("["):
        address = parse_ip_literal(text)
        if address is None:
            raise InvalidArgument.single(
                "client_hostname", "must be a host name or an address literal like [192.0.2.1]"
            )
        return f"[{address}]" if address.version == 4 else f"[IPv6:{address}]"
    if parse_ip_literal(text) is not None:
        raise InvalidArgument.single(
            "client_hostname", "an address must be written as a literal in brackets: [192.0.2.1]"
        )
    return normalize_domain_name(text, field="client_hostname")[0]


def _text_problem(value: str, *, what: str, limit: int) -> str:
    if len(value) > limit:
        return f"{what} is longer than {limit} characters"
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        # CR/LF would inject SMTP commands; NUL breaks AUTH PLAIN's framing.
        return f"{what} must not contain control characters"
    return ""


def normalize_relay(
    settings: RelaySettingsInput, *, default_timeout: timedelta, policy: AddressPolicy
) -> RelaySettings:
    """Validate relay settings as sent by a caller.

    Args:
        settings: the raw settings.
        default_timeout: SMTP_TIMEOUT, used when no timeout was given.
        policy: the SSRF policy applied to IP literals.

    Raises:
        InvalidArgument: one violation per bad field (host, port, secure, username, password,
            client_hostname, timeout).
    """
    violations: list[FieldViolation] = []
    host = ""
    try:
        host = normalize_host(settings.host, field="host", policy=policy)
    except InvalidArgument as exc:
        violations.extend(exc.violations)
    if not 1 <= settings.port <= 65535:
        violations.append(FieldViolation("port", f"must be 1-65535; got {settings.port}"))
    security = settings.security
    if security is None:
        security = SecurityMode.IMPLICIT_TLS if settings.secure else SecurityMode.STARTTLS_REQUIRED
    elif settings.secure and security is not SecurityMode.IMPLICIT_TLS:
        # `secure: true` is the spec's way to say implicit TLS; keeping one of two contradicting
        # choices would silently drop the other.
        violations.append(
            FieldViolation("secure", f"true means security tls, which contradicts {security}")
        )
    problem = _text_problem(settings.username, what="the user name", limit=MAX_USERNAME_CHARS)
    if problem:
        violations.append(FieldViolation("username", problem))
    if settings.password:
        problem = _text_problem(settings.password, what="the password", limit=MAX_PASSWORD_CHARS)
        if problem:
            violations.append(FieldViolation("password", problem))
        if not settings.username.strip():
            violations.append(FieldViolation("username", "a password needs a user name"))
    client_hostname = ""
    try:
        client_hostname = _client_hostname(settings.client_hostname)
    except InvalidArgument as exc:
        violations.extend(exc.violations)
    timeout = settings.timeout if settings.timeout is not None else default_timeout
    if timeout <= timedelta(0) or timeout > MAX_TIMEOUT:
        violations.append(
            FieldViolation(
                "timeout",
                f"must be more than 0 and at most {int(MAX_TIMEOUT.total_seconds())} seconds",
            )
        )
    if violations:
        raise InvalidArgument(violations)
    return RelaySettings(
        host=host,
        port=settings.port,
        security=security,
        username=settings.username.strip(),
        client_hostname=client_hostname,
        timeout=timeout,
        tls_skip_verify=settings.tls_skip_verify,
    )


__all__ = ["MAX_TIMEOUT", "normalize_host", "normalize_relay", "parse_ip_literal"]
