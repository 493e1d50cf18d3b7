"""TLS of the SMTP listeners (submission, inbound): certificate and key from files, or a dev pair.

Production names its files in settings (checked at start-up). Outside production, when none are
named, a self-signed certificate for the server's hostname and ``localhost`` is generated once
under ``var/<listener>/`` and reused on later starts, so clients that pin it keep working.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from services.core.settings import SettingsError

DEV_CERT_NAME = "cert.pem"
DEV_KEY_NAME = "key.pem"
DEV_CERT_DAYS = 825


def development_pair(directory: Path, hostname: str) -> tuple[Path, Path]:
    """The development certificate and key under `directory`, generated on first use."""
    cert_path, key_path = directory / DEV_CERT_NAME, directory / DEV_KEY_NAME
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = [x509.DNSName(hostname), x509.DNSName("localhost")]
    names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=DEV_CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    # Written beside each other and renamed, so a crash never leaves a half-written pair.
    tmp_key, tmp_cert = key_path.with_suffix(".tmp"), cert_path.with_suffix(".tmp")
    fd = os.open(tmp_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    tmp_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    tmp_key.replace(key_path)
    tmp_cert.replace(cert_path)
    return cert_path, key_path


def server_context(cert_file: str | Path, key_file: str | Path) -> ssl.SSLContext:
    """A server context (TLS 1.2 or newer) with the certificate chain and key loaded.

    Raises:
        OSError, ssl.SSLError: the files are missing or do not hold a matching pair.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert_file), str(key_file))
    return context


def listener_context(
    cert_file: str, key_file: str, *, hostname: str, development_dir: Path
) -> ssl.SSLContext:
    """An SMTP listener's context: the configured certificate, or the development pair.

    Without configured files (only outside production: the listeners' settings refuse that in
    production) a self-signed pair for `hostname` is generated once under `development_dir`.
    """
    if cert_file:
        return server_context(cert_file, key_file)
    cert, key = development_pair(development_dir, hostname)
    return server_context(cert, key)


def check_certificate_settings(
    cert_file: str, key_file: str, *, prefix: str, server: str, production: bool
) -> None:
    """The rules an SMTP listener's certificate settings (`<prefix>_CERT_FILE`/`_KEY_FILE`) obey.

    Both or neither; production needs them (development generates a pair instead).

    Raises:
        SettingsError: one is set without the other, or production lacks them.
    """
    if bool(cert_file) != bool(key_file):
        raise SettingsError(f"{prefix}_CERT_FILE and {prefix}_KEY_FILE go together")
    if production and not cert_file:
        raise SettingsError(
            f"production mode refuses to start: {prefix}_CERT_FILE and "
            f"{prefix}_KEY_FILE must name the {server}'s certificate and key"
        )


__all__ = [
    "check_certificate_settings",
    "development_pair",
    "listener_context",
    "server_context",
]
