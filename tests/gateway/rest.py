"""Helpers of the REST tests: one HTTP call with its decoded answer, Status JSON checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"
RESOURCE_INFO = "type.googleapis.com/google.rpc.ResourceInfo"


@dataclass
class Reply:
    """An HTTP answer: status, headers, raw body and the JSON body when it is JSON."""

    status: int
    headers: dict[str, str]
    body: bytes
    json: Any

    @property
    def content_type(self) -> str:
        """The Content-Type header."""
        return self.headers.get("content-type", "")

    def detail(self, type_url: str) -> dict[str, Any]:
        """The first Status detail of a type (fails the test when there is none)."""
        for entry in self.json.get("details", []):
            if entry.get("@type") == type_url:
                return dict(entry)
        raise AssertionError(f"no {type_url} in {self.json}")

    @property
    def error_info(self) -> dict[str, Any]:
        """The ErrorInfo detail."""
        return self.detail(ERROR_INFO)

    @property
    def violations(self) -> dict[str, str]:
        """BadRequest field violations as {field: description}."""
        entry = self.detail(BAD_REQUEST)
        return {v["field"]: v["description"] for v in entry.get("fieldViolations", [])}


async def call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    json: Any = None,
    data: Any = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    """Make one request and read the whole answer."""
    async with http.request(method, url, json=json, data=data, headers=headers) as response:
        body = await response.read()
        parsed = None
        if response.headers.get("Content-Type", "").startswith("application/json") and body:
            parsed = await response.json(content_type=None)
        return Reply(
            response.status,
            {k.lower(): v for k, v in response.headers.items()},
            body,
            parsed,
        )


def access_line(caplog: pytest.LogCaptureFixture) -> dict[str, Any]:
    """The fields of the only gateway access-log line captured."""
    (line,) = [r for r in caplog.records if r.name == "azora.gateway.access"]
    return dict(line.fields)  # type: ignore[attr-defined]


def assert_status_json(reply: Reply, *, http_status: int, code: int) -> None:
    """The answer is a google.rpc.Status JSON with this HTTP status and gRPC code."""
    assert reply.status == http_status, (reply.status, reply.body[:500])
    assert reply.content_type.startswith("application/json")
    assert set(reply.json) == {"code", "message", "details"}, reply.json
    assert reply.json["code"] == code, reply.json
    assert isinstance(reply.json["message"], str)
    assert reply.json["message"]
    assert isinstance(reply.json["details"], list)


def assert_answered_by(reply: Reply, rpc: str, caplog: pytest.LogCaptureFixture) -> None:
    """The gateway routed the request to `rpc` and the service's implementation answered.

    Success, or a Status from the service's own error domain; never a 5xx (every rpc of the
    table is implemented, so a 501 would mean one went missing).
    """
    assert access_line(caplog)["rpc"] == rpc
    assert reply.content_type.startswith("application/json"), reply.body[:300]
    if reply.status < 400:
        assert reply.status == 200
        return
    assert_status_json(reply, http_status=reply.status, code=reply.json["code"])
    service = rpc.split(".")[1]  # "azora.smtp.v1.SmtpService/X" -> "smtp"
    assert reply.error_info["domain"] == f"{service}.azora.dev", reply.json
    assert reply.status < 500, reply.json
