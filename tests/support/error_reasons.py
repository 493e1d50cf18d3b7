"""Pytest plugin: a test during which our code sends an undeclared error reason fails.

The declared reasons are the values of `azora.errors.v1.ErrorReason`
(protos/azora/errors/v1/error_reason.proto). This plugin watches the two places where an
ErrorInfo reason leaves our code: the services' one mapping from domain errors to statuses
(`to_status` as `services.core.interceptors` calls it) and the gateway's own refusals
(`GatewayError.to_status`). tests/unit/test_error_reasons.py checks the same list statically
(every reason literal in services/ and gateway/), which also covers processes the tests start.
Registered for the whole suite by `pytest_plugins` in tests/conftest.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from azora.errors.v1 import error_reason_pb2
from google.rpc import error_details_pb2, status_pb2

from gateway.errors import GatewayError
from services.core.status import to_status

DECLARED_REASONS = frozenset(error_reason_pb2.ErrorReason.keys()) - {"ERROR_REASON_UNSPECIFIED"}


def reasons_of(status: status_pb2.Status) -> list[str]:
    """The ErrorInfo reasons in a google.rpc.Status's details."""
    reasons: list[str] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reasons.append(info.reason)
    return reasons


class ReasonWatch:
    """Collects the undeclared reasons sent since the last `take`."""

    def __init__(self) -> None:
        self._undeclared: list[str] = []

    def saw(self, status: status_pb2.Status) -> None:
        """Note the reasons of a status about to be sent."""
        self._undeclared.extend(r for r in reasons_of(status) if r not in DECLARED_REASONS)

    def take(self) -> list[str]:
        """The undeclared reasons seen so far, forgetting them."""
        taken, self._undeclared = self._undeclared, []
        return taken


@pytest.fixture(scope="session")
def error_reason_watch() -> Iterator[ReasonWatch]:
    """Install the watch on both error paths for the whole session."""
    watch = ReasonWatch()
    service_mapping = to_status
    gateway_mapping = GatewayError.to_status

    def watched_service_mapping(
        *args: Any, **kwargs: Any
    ) -> tuple[grpc.StatusCode, status_pb2.Status]:
        code, status = service_mapping(*args, **kwargs)
        watch.saw(status)
        return code, status

    def watched_gateway_mapping(self: GatewayError) -> status_pb2.Status:
        status = gateway_mapping(self)
        watch.saw(status)
        return status

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("services.core.interceptors.to_status", watched_service_mapping)
        patch.setattr(GatewayError, "to_status", watched_gateway_mapping)
        yield watch


@pytest.fixture(autouse=True)
def _only_declared_error_reasons(error_reason_watch: ReasonWatch) -> Iterator[None]:
    """Fail the test (at teardown) if our code sent an undeclared reason during it."""
    error_reason_watch.take()  # anything left from a session fixture's set-up is not this test's
    yield
    undeclared = sorted(set(error_reason_watch.take()))
    assert not undeclared, (
        f"error reasons {undeclared} are not declared in "
        "protos/azora/errors/v1/error_reason.proto (ErrorReason)"
    )
