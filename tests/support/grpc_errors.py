"""Reading rich gRPC errors (google.rpc.Status details) back in tests."""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


@dataclass
class RpcFailure:
    """A failed call's code, message and decoded details."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    domain: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    field_violations: dict[str, str] = field(default_factory=dict)
    resource: tuple[str, str] | None = None
    precondition_types: list[str] = field(default_factory=list)


def decode(error: grpc.aio.AioRpcError) -> RpcFailure:
    """Decode the google.rpc.Status carried in an error's trailing metadata."""
    failure = RpcFailure(error.code(), error.details() or "")
    status: status_pb2.Status | None = rpc_status.from_call(error)  # type: ignore[arg-type]
    if status is None:
        return failure
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            failure.reason, failure.domain = info.reason, info.domain
            failure.metadata = dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            failure.field_violations = {v.field: v.description for v in bad.field_violations}
        elif detail.Is(error_details_pb2.ResourceInfo.DESCRIPTOR):
            resource = error_details_pb2.ResourceInfo()
            detail.Unpack(resource)
            failure.resource = (resource.resource_type, resource.resource_name)
        elif detail.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
            pre = error_details_pb2.PreconditionFailure()
            detail.Unpack(pre)
            failure.precondition_types = [v.type for v in pre.violations]
    return failure


async def failure_of(call: Awaitable[Any]) -> RpcFailure:
    """Await a call that must fail and return its decoded error."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return decode(error)
    raise AssertionError("the call succeeded but was expected to fail")
