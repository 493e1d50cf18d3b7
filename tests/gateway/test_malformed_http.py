"""Requests the HTTP parser refuses, sent over raw sockets to a real `python -m gateway` process.

Over-long request lines and headers, too many headers, bad methods, versions and header lines
never reach the application; the gateway still answers them with its google.rpc.Status JSON,
its security headers and ``Server: azora``, quotes nothing of the request, and logs no
error-level line or traceback.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.security import SECURITY_HEADERS
from tests.conftest import REPO_ROOT
from tests.support.ports import closed_port

SECRET = "Bearer azk_SeCrEtSeCrEtSeCrEt"

MALFORMED: dict[str, bytes] = {
    "an over-long header": (
        b"GET /api/v1/domains HTTP/1.1\r\nHost: x\r\nAuthorization: "
        + SECRET.encode()
        + b"A" * 10_000
        + b"\r\n\r\n"
    ),
    "an over-long URL": b"GET /api/v1/domains/"
    + b"a" * 10_000
    + b"?k="
    + SECRET.encode()
    + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "too many headers": b"GET / HTTP/1.1\r\nHost: x\r\n"
    + b"".join(b"X-H%d: %s\r\n" % (i, SECRET.encode()) for i in range(200))
    + b"\r\n",
    "a bad method": b"G(E)T /api/v1/domains HTTP/1.1\r\nHost: x\r\n\r\n",
    "a bad method after a good request": (
        b"GET /api-docs/openapi.json HTTP/1.1\r\nHost: x\r\n\r\n"
        b"G(E)T /api/v1/domains HTTP/1.1\r\nHost: x\r\n\r\n"
    ),
    "a bad version": b"GET /api/v1/domains HTTP/7.3\r\nHost: x\r\n\r\n",
    "not HTTP at all": b"GET /api/v1/domains FTP/1.1\r\nHost: x\r\n\r\n",
    "a header line without a colon": (
        b"GET /api/v1/domains HTTP/1.1\r\nHost: x\r\nAuthorization " + SECRET.encode() + b"\r\n\r\n"
    ),
    "a header name with a space": (
        b"GET /api/v1/domains HTTP/1.1\r\nHost: x\r\nAuthori zation: "
        + SECRET.encode()
        + b"\r\n\r\n"
    ),
    "a control character in a header": (
        b"GET /api/v1/domains HTTP/1.1\r\nHost: x\r\nAuthorization: "
        + SECRET.encode()
        + b"\x01\r\n\r\n"
    ),
}


@dataclass
class GatewayProcess:
    """A gateway process and the file its log goes to."""

    port: int
    log: Path


@pytest.fixture(scope="module")
def gateway_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """`python -m gateway` on a free port (no upstream is ever called by these requests)."""
    port = closed_port()
    log = tmp_path_factory.mktemp("gateway") / "gateway.log"
    environment = {
        **os.environ,
        "AZORA_ENV": "test",
        "PORT": str(port),
        "LOG_LEVEL": "debug",
        "AZORA_METRICS_PORT_GATEWAY": "0",
    }
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway"],
            cwd=REPO_ROOT,
            env=environment,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        asyncio.run(_wait_listening(port, process))
        yield GatewayProcess(port, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def _wait_listening(port: int, process: subprocess.Popen[bytes]) -> None:
    async with asyncio.timeout(60):
        while True:
            assert process.poll() is None, "the gateway exited; see its log"
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            writer.close()
            await writer.wait_closed()
            return


async def _exchange(port: int, raw: bytes) -> bytes:
    """Send `raw`, read until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(30):
            return await reader.read()
    finally:
        writer.close()


def _last_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of the last response in `raw`."""
    start = max(raw.rfind(b"HTTP/1.1 "), raw.rfind(b"HTTP/1.0 "))
    head, _, body = raw[start:].partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


@pytest.mark.parametrize("kind", sorted(MALFORMED))
async def test_malformed_requests_get_the_gateway_error(
    gateway_process: GatewayProcess, kind: str
) -> None:
    # A 4xx google.rpc.Status with the security headers; nothing of the request comes back.
    raw = await _exchange(gateway_process.port, MALFORMED[kind])
    assert SECRET.encode() not in raw
    assert b"SeCrEt" not in raw
    assert b"aiohttp" not in raw.lower()
    assert b"python" not in raw.lower()
    status, headers, body = _last_response(raw)
    assert 400 <= status < 500, raw[:500]
    assert headers["content-type"].startswith("application/json")
    assert headers["server"] == "azora"
    for name, value in SECURITY_HEADERS.items():
        assert headers[name.lower()] == value
    assert "default-src 'none'" in headers["content-security-policy"]
    error = json.loads(body)
    assert error["code"] == 3
    assert error["message"]
    assert error["details"][0]["reason"] == "MALFORMED_HTTP_REQUEST"
    assert error["details"][0]["domain"] == "gateway.azora.dev"


async def test_no_response_announces_the_server_software(
    gateway_process: GatewayProcess,
) -> None:
    # Good requests and refused ones alike carry "Server: azora" only.
    for raw_request in (
        b"GET /api-docs/openapi.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /no/such/route HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"BREW /api/v1/domains HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ):
        raw = await _exchange(gateway_process.port, raw_request)
        _, headers, _ = _last_response(raw)
        assert headers["server"] == "azora", raw[:300]


async def test_malformed_requests_log_no_error_or_traceback(
    gateway_process: GatewayProcess,
) -> None:
    # One warning per refused request, never an error line, a traceback or the request's text.
    for raw_request in MALFORMED.values():
        await _exchange(gateway_process.port, raw_request)
    # The last request's log line is written before its answer is sent, so it is complete.
    lines = [json.loads(line) for line in gateway_process.log.read_text().splitlines() if line]
    assert not [line for line in lines if line.get("level") in ("error", "critical")]
    text = gateway_process.log.read_text()
    assert "Traceback" not in text
    assert "SeCrEt" not in text
    refused = [line for line in lines if line.get("msg") == "malformed HTTP request"]
    assert len(refused) >= len(MALFORMED)
