"""Load generators: ghz for gRPC, bounded async clients (aiohttp for REST, grpc.aio for gRPC).

Every generated email has a 2 KB text body, a unique recipient and the run's tag in ``tags``,
so that a phase can find its own emails in the database afterwards. The async clients keep at
most `concurrency` requests in flight and record every latency and every error code.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import ssl
import subprocess
import textwrap
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import grpc
from azora.mail.v1 import mail_pb2, mail_pb2_grpc
from google.protobuf import struct_pb2

from bench.harness import percentile
from bench.suite import DOMAIN, REPO

BODY = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod. " * 28)[:2048]
SEND = "azora.mail.v1.MailService/SendEmail"


def send_json(
    tag: str, number: str | int, *, domain: str = DOMAIN, rcpt: str = "user"
) -> dict[str, Any]:
    """The REST/JSON (and ghz) body of one SendEmail."""
    return {
        "from": f"Bench <bench@{domain}>",
        "to": [f"{rcpt}-{tag}-{number}@sink.example"],
        "subject": f"bench {tag} {number}",
        "text": BODY,
        "tags": [tag],
    }


@dataclass
class LoadResult:
    """What a client saw."""

    requests: int
    ok: int
    elapsed_s: float
    latencies_s: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    ids: list[str] = field(default_factory=list)
    # (wall-clock time, code, request number) of every failed request (a batch: its first
    # message's number).
    failed: list[tuple[float, str, int]] = field(default_factory=list)
    # (wall-clock end time, latency in seconds) of every successful request.
    samples: list[tuple[float, float]] = field(default_factory=list)

    @property
    def per_s(self) -> float:
        """Successful requests per second."""
        return self.ok / self.elapsed_s if self.elapsed_s else 0.0

    def p(self, pct: float) -> float:
        """Latency percentile in milliseconds."""
        return percentile(self.latencies_s, pct) * 1000.0


def ghz_binary() -> str:
    """bin/ghz (scripts/build_bench_tools.sh) or ghz on PATH."""
    local = REPO / "bin" / "ghz"
    found = str(local) if local.exists() else shutil.which("ghz")
    if not found:
        raise FileNotFoundError("ghz not installed: run scripts/build_bench_tools.sh")
    return found


def run_ghz(
    port: int, *, total: int, concurrency: int, tag: str, connections: int = 4
) -> LoadResult:
    """SendEmail `total` times with ghz."""
    data = send_json(tag, "{{.RequestNumber}}")
    started = time.perf_counter()
    out = subprocess.run(  # noqa: S603
        [
            # ghz's reflection client does not resolve our services; the descriptor set does.
            ghz_binary(), "--insecure", "--protoset", str(REPO / "gen" / "azora.binpb"),
            "--call", SEND, "-d", json.dumps(data),
            "-n", str(total), "-c", str(concurrency), "--connections", str(connections),
            "--timeout", "60s", "-O", "json", f"127.0.0.1:{port}",
        ],
        check=False, capture_output=True, text=True,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    if not out.stdout.strip():
        raise RuntimeError(f"ghz failed: {out.stderr[-2000:]}")
    report = json.loads(out.stdout)
    details = report.get("details") or []
    result = LoadResult(requests=total, ok=0, elapsed_s=report["total"] / 1e9 or elapsed)
    for d in details:
        if d.get("status") == "OK":
            result.ok += 1
            result.latencies_s.append(d["latency"] / 1e9)
        else:
            result.errors[d.get("status") or d.get("error", "error")] += 1
    return result


async def bounded(
    total: int,
    concurrency: int,
    call: Callable[[int], Awaitable[str]],
    *,
    rate: float = 0.0,
    until: float = 0.0,
) -> LoadResult:
    """Run `call(i)` for i < total with at most `concurrency` in flight (optionally paced).

    `call` returns an id or raises; an exception's name (or gRPC code, HTTP status) is counted.
    With `rate` > 0 requests start at that many per second (open loop, bounded in flight);
    with `until` (a time.time() value) no request starts after it.
    """
    result = LoadResult(requests=total, ok=0, elapsed_s=0.0)
    counter = iter(range(total))
    started = time.perf_counter()

    async def lane() -> None:
        for i in counter:
            if until and time.time() >= until:
                return
            if rate:
                delay = started + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            t0 = time.perf_counter()
            try:
                ident = await call(i)
            except grpc.aio.AioRpcError as err:
                code = err.code().name
                result.errors[code] += 1
                result.failed.append((time.time(), code, i))
                continue
            except (aiohttp.ClientError, OSError, TimeoutError, HttpError) as err:
                name = str(err) if isinstance(err, HttpError) else type(err).__name__
                result.errors[name] += 1
                result.failed.append((time.time(), name, i))
                continue
            latency = time.perf_counter() - t0
            result.latencies_s.append(latency)
            result.samples.append((time.time(), latency))
            result.ok += 1
            result.ids.append(ident)

    await asyncio.gather(*(lane() for _ in range(concurrency)))
    result.elapsed_s = time.perf_counter() - started
    result.requests = result.ok + sum(result.errors.values())
    return result


class HttpError(Exception):
    """A non-2xx REST answer (the message is "HTTP <status> <grpc code>")."""


async def grpc_send(
    port: int,
    total: int,
    concurrency: int,
    tag: str,
    *,
    rate: float = 0.0,
    rcpt: str = "user",
    rpc_timeout: float = 30.0,
    until: float = 0.0,
    start: int = 0,
    idempotent: bool = False,
    only: Sequence[int] = (),
) -> LoadResult:
    """SendEmail over gRPC from this process; ids are the returned email ids.

    With `idempotent`, request i carries the idempotency key ``<tag>-<start + i>``; with
    `only`, just those request numbers are sent again (same messages, same keys).
    """
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = mail_pb2_grpc.MailServiceStub(channel)

        async def call(i: int) -> str:
            number = only[i] if only else start + i
            body = send_json(tag, number, rcpt=rcpt)
            request = mail_pb2.SendEmailRequest(
                from_address=body["from"], to=body["to"], subject=body["subject"],
                text=body["text"], tags=body["tags"],
                idempotency_key=f"{tag}-{number}" if idempotent else "",
            )  # fmt: skip
            reply = await stub.SendEmail(request, timeout=rpc_timeout)
            return str(reply.id)

        count = len(only) if only else total
        return await bounded(count, concurrency, call, rate=rate, until=until)


# The template of the batch-with-template row: a receipt with a loop, a filter and a style
# rule to inline (what a real transactional template does), about 2 KB rendered.
RECEIPT_HTML = (
    "<style>td { padding: 2px 8px } .total { font-weight: bold }</style>"
    "<p>Hello {{ name }},</p><table>{% for item in items %}"
    "<tr><td>{{ item.name | title }}</td><td>{{ item.qty }}</td>"
    '<td>{{ "%.2f" | format(item.price) }}</td></tr>{% endfor %}</table>'
    '<p class="total">Total: {{ "%.2f" | format(total) }}</p><p>{{ note }}</p>'
)


def receipt_variables(number: int) -> dict[str, Any]:
    """Variables of one receipt (20 lines)."""
    items = [{"name": f"item {k}", "qty": k % 3 + 1, "price": 1.25 * k} for k in range(20)]
    return {"name": f"customer {number}", "items": items, "total": 99.5, "note": BODY[:600]}


async def grpc_batch(
    port: int, total: int, batch: int, concurrency: int, tag: str, *, template: str = ""
) -> LoadResult:
    """SendEmailBatch over gRPC, `batch` emails per call; ok and latencies count emails.

    With `template` (a published template's name) each message renders it with its own
    variables instead of carrying subject and text.
    """
    result = LoadResult(requests=total, ok=0, elapsed_s=0.0)
    starts = iter(range(0, total, batch))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = mail_pb2_grpc.MailServiceStub(channel)

        def message(i: int) -> mail_pb2.SendEmailRequest:
            body = send_json(tag, i)
            if not template:
                return mail_pb2.SendEmailRequest(
                    from_address=body["from"], to=body["to"], subject=body["subject"],
                    text=body["text"], tags=body["tags"],
                )  # fmt: skip
            variables = struct_pb2.Struct()
            variables.update(receipt_variables(i))
            return mail_pb2.SendEmailRequest(
                from_address=body["from"], to=body["to"], tags=body["tags"],
                template=template, variables=variables,
            )  # fmt: skip

        async def lane() -> None:
            for first in starts:
                request = mail_pb2.SendEmailBatchRequest(
                    messages=[message(i) for i in range(first, min(first + batch, total))]
                )
                t0 = time.perf_counter()
                try:
                    reply = await stub.SendEmailBatch(request, timeout=120)
                except grpc.aio.AioRpcError as err:
                    result.errors[err.code().name] += len(request.messages)
                    result.failed.append((time.time(), err.code().name, first))
                    continue
                latency = time.perf_counter() - t0
                result.latencies_s.append(latency)
                result.samples.append((time.time(), latency))
                for r in reply.results:
                    if r.id:
                        result.ok += 1
                        result.ids.append(r.id)
                    else:
                        result.errors[r.error.reason or "error"] += 1

        started = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(concurrency)))
        result.elapsed_s = time.perf_counter() - started
    return result


async def grpc_get(port: int, total: int, concurrency: int, ids: list[str]) -> LoadResult:
    """GetEmail over gRPC of random ids from `ids`."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = mail_pb2_grpc.MailServiceStub(channel)

        async def call(i: int) -> str:
            reply = await stub.GetEmail(
                mail_pb2.GetEmailRequest(id=random.choice(ids)),  # noqa: S311
                timeout=30,
            )
            return str(reply.id)

        return await bounded(total, concurrency, call)


async def rest_send(port: int, total: int, concurrency: int, tag: str) -> LoadResult:
    """POST /api/v1/emails through the local gateway."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(
        f"http://127.0.0.1:{port}", connector=connector, timeout=aiohttp.ClientTimeout(60)
    ) as session:

        async def call(i: int) -> str:
            async with session.post("/api/v1/emails", json=send_json(tag, i)) as resp:
                body = await resp.json(content_type=None)
                if resp.status != 200:
                    raise HttpError(f"HTTP {resp.status} {body.get('code', '')}")
                return str(body["id"])

        return await bounded(total, concurrency, call)


async def rest_get(port: int, total: int, concurrency: int, ids: list[str]) -> LoadResult:
    """GET /api/v1/emails/{id} through the local gateway."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(
        f"http://127.0.0.1:{port}", connector=connector, timeout=aiohttp.ClientTimeout(60)
    ) as session:

        async def call(i: int) -> str:
            email_id = random.choice(ids)  # noqa: S311
            async with session.get(f"/api/v1/emails/{email_id}") as resp:
                body = await resp.json(content_type=None)
                if resp.status != 200:
                    raise HttpError(f"HTTP {resp.status} {body.get('code', '')}")
                return str(body["id"])

        return await bounded(total, concurrency, call)


def smtp_source(port: int, *, total: int, sessions: int, size: int = 2048) -> float:
    """Postfix's smtp-source: `total` messages of `size` bytes; returns seconds taken."""
    started = time.perf_counter()
    subprocess.run(  # noqa: S603
        [
            "/usr/sbin/smtp-source", "-s", str(sessions), "-l", str(size), "-m", str(total),
            "-f", f"bench@{DOMAIN}", "-t", "user@sink.example", f"127.0.0.1:{port}",
        ],
        check=True, capture_output=True,
    )  # fmt: skip
    return time.perf_counter() - started


def write_lines(path: Path, lines: list[str]) -> None:
    """Helper for debugging output files."""
    path.write_text("\n".join(lines) + "\n")


async def smtp_send(
    port: int, *, cafile: Path, api_key: str, total: int, sessions: int, tag: str
) -> LoadResult:
    """SMTP submission of `total` messages over `sessions` connections.

    Each connection does STARTTLS and AUTH PLAIN with an API key once, then sends messages
    (2 KB body, unique recipient, the run's tag in X-Azora-Tag) until `total` are sent. The
    latency is one transaction (MAIL, RCPT, DATA up to the 250). Postfix's smtp-source would be
    the like-for-like client, but it has no STARTTLS or AUTH.
    """
    context = ssl.create_default_context(cafile=str(cafile))
    lines = "\r\n".join(textwrap.wrap(BODY, 76))
    result = LoadResult(requests=total, ok=0, elapsed_s=0.0)
    counter = iter(range(total))
    started = time.perf_counter()

    async def session() -> None:
        client = aiosmtplib.SMTP(
            hostname="localhost", port=port, start_tls=True, tls_context=context, timeout=60
        )
        await client.connect()
        await client.login("apikey", api_key)
        for i in counter:
            rcpt = f"user-{tag}-{i}@sink.example"
            raw = (
                f"From: Bench <bench@{DOMAIN}>\r\nTo: {rcpt}\r\nSubject: bench {tag} {i}\r\n"
                f"X-Azora-Tag: {tag}\r\n\r\n{lines}\r\n"
            ).encode()
            t0 = time.perf_counter()
            try:
                _, reply = await client.sendmail(f"bench@{DOMAIN}", [rcpt], raw)
            except aiosmtplib.SMTPResponseException as err:
                result.errors[f"SMTP {err.code}"] += 1
                result.failed.append((time.time(), f"SMTP {err.code}", i))
                continue
            latency = time.perf_counter() - t0
            result.latencies_s.append(latency)
            result.samples.append((time.time(), latency))
            result.ok += 1
            result.ids.append(reply.rsplit(" ", 1)[-1])
        await client.quit()

    await asyncio.gather(*(session() for _ in range(sessions)))
    result.elapsed_s = time.perf_counter() - started
    result.requests = result.ok + sum(result.errors.values())
    return result
