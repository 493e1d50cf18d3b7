"""gRPC calls to the services: one long-lived channel per target, generic unary calls.

The gateway has no generated stubs: it calls ``channel.unary_unary("/pkg.Service/Method")`` with
the dynamic message classes of the descriptor set. Failures come back as a google.rpc.Status,
read from the ``grpc-status-details-bin`` trailer when the service sent one, otherwise built
from the code and message (what Envoy's ``convert_grpc_status`` does). When the gRPC library
itself failed (nothing reachable, deadline) the message is replaced by one that does not leak
internal addresses; the original goes to the log.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from gateway.descriptors import DescriptorSet, HttpBinding
from gateway.errors import GATEWAY_ERROR_DOMAIN, pack_any

log = logging.getLogger("azora.gateway.upstream")

# The services accept up to 64 MiB (services.core.server); answers may be as large.
_CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
)
# Codes the gRPC library produces itself when the service never answered.
_TRANSPORT_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}

Metadata = Sequence[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class UpstreamResult:
    """A finished call: the response on success, else the status; plus initial metadata."""

    response: Message | None
    status: status_pb2.Status | None
    initial_metadata: Mapping[str, str]


def _metadata_dict(metadata: object) -> dict[str, str]:
    found: dict[str, str] = {}
    for key, value in metadata or ():  # type: ignore[attr-defined]
        if isinstance(value, str):
            found[str(key).lower()] = value
    return found


class Upstreams:
    """Channels to the services and the calls made over them."""

    def __init__(
        self,
        descriptors: DescriptorSet,
        targets: Mapping[str, str],
        *,
        deadline_seconds: float,
    ) -> None:
        """Open one channel per distinct target (channels connect lazily).

        Args:
            descriptors: message classes for (de)serialising.
            targets: gRPC service full name -> "host:port".
            deadline_seconds: deadline of each call.
        """
        self._descriptors = descriptors
        self._targets = dict(targets)
        self._deadline = deadline_seconds
        self._channels: dict[str, grpc.aio.Channel] = {}
        for target in sorted(set(self._targets.values())):
            self._channels[target] = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
        self._callables: dict[str, grpc.aio.UnaryUnaryMultiCallable[Any, Any]] = {}

    def _callable(self, binding: HttpBinding) -> grpc.aio.UnaryUnaryMultiCallable[Any, Any] | None:
        cached = self._callables.get(binding.grpc_path)
        if cached is not None:
            return cached
        target = self._targets.get(binding.service)
        if target is None:
            return None
        response_class = self._descriptors.message_class(binding.method.output_type)
        created: grpc.aio.UnaryUnaryMultiCallable[Any, Any] = self._channels[target].unary_unary(
            binding.grpc_path,
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=response_class.FromString,
        )
        self._callables[binding.grpc_path] = created
        return created

    async def call(
        self, binding: HttpBinding, request: Message, metadata: Metadata
    ) -> UpstreamResult:
        """Make the unary call of `binding`; never raises for gRPC failures."""
        if binding.method.client_streaming or binding.method.server_streaming:
            return UpstreamResult(None, _unimplemented_streaming(binding), {})
        multicallable = self._callable(binding)
        if multicallable is None:
            log.error("no upstream configured", extra={"fields": {"service": binding.service}})
            return UpstreamResult(
                None,
                status_pb2.Status(
                    code=code_pb2.UNIMPLEMENTED,
                    message=f"the gateway has no upstream for {binding.service}",
                    details=[
                        pack_any(
                            error_details_pb2.ErrorInfo(
                                reason="NO_UPSTREAM",
                                domain=GATEWAY_ERROR_DOMAIN,
                                metadata={"service": binding.service},
                            )
                        )
                    ],
                ),
                {},
            )
        call = multicallable(request, metadata=tuple(metadata), timeout=self._deadline)
        try:
            response = await call
        except grpc.aio.AioRpcError as error:
            return UpstreamResult(
                None, self._status_of(binding, error), _metadata_dict(error.initial_metadata())
            )
        initial = _metadata_dict(await call.initial_metadata())
        return UpstreamResult(response, None, initial)

    @staticmethod
    def _status_of(binding: HttpBinding, error: grpc.aio.AioRpcError) -> status_pb2.Status:
        try:
            rich: status_pb2.Status | None = rpc_status.from_call(error)  # type: ignore[arg-type]
        except ValueError:
            rich = None  # details inconsistent with the code: fall back to code + message
        if rich is not None:
            return rich
        code = error.code()
        if code in _TRANSPORT_CODES:
            log.warning(
                "upstream call failed",
                extra={
                    "fields": {
                        "rpc": binding.rpc,
                        "code": code.name,
                        "error": (error.details() or "")[:300],
                    }
                },
            )
            unavailable = code is grpc.StatusCode.UNAVAILABLE
            message = (
                f"{binding.service} is unavailable"
                if unavailable
                else f"{binding.service} did not answer before the deadline"
            )
            details = [
                pack_any(
                    error_details_pb2.ErrorInfo(
                        reason="UPSTREAM_UNAVAILABLE" if unavailable else "UPSTREAM_TIMEOUT",
                        domain=GATEWAY_ERROR_DOMAIN,
                        metadata={"service": binding.service},
                    )
                )
            ]
            if unavailable:
                details.append(
                    pack_any(
                        error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=1))
                    )
                )
            return status_pb2.Status(code=code.value[0], message=message, details=details)
        return status_pb2.Status(code=code.value[0], message=error.details() or "")

    async def close(self) -> None:
        """Close every channel (on application clean-up)."""
        for channel in self._channels.values():
            await channel.close()


def _unimplemented_streaming(binding: HttpBinding) -> status_pb2.Status:
    return status_pb2.Status(
        code=code_pb2.UNIMPLEMENTED,
        message=f"{binding.rpc} streams; the local gateway transcodes unary rpcs only",
        details=[
            pack_any(
                error_details_pb2.ErrorInfo(
                    reason="STREAMING_NOT_SUPPORTED",
                    domain=GATEWAY_ERROR_DOMAIN,
                    metadata={"rpc": binding.rpc},
                )
            )
        ],
    )
