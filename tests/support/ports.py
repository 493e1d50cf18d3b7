"""Loopback ports for tests: one helper instead of a socket dance in every file."""

from __future__ import annotations

import socket


def closed_port() -> int:
    """A loopback port nothing listens on right now (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
