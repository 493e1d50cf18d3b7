"""The gRPC client of azora.iam.v1.ApiKeyService that every process but the key owner uses.

The keys live with the domain service; the other processes (smtp, mail, submission) resolve a
caller's API key by asking it, with a short-lived cache in front so a busy client does not turn
each request into an extra round trip.
"""

from __future__ import annotations

import grpc
from azora.iam.v1 import api_keys_pb2, api_keys_pb2_grpc

from services.core.auth import CachingApiKeyResolver, ServiceTokens
from services.core.context import Principal
from services.core.errors import Unavailable
from services.core.settings import Settings
from services.core.tracing import traced_channel


class GrpcApiKeyResolver:
    """`ApiKeyResolver` for services other than the key owner: asks it over gRPC."""

    # The token's tenant: resolving a key happens before any tenant is known.
    _LOOKUP_TENANT = "system"

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        timeout: float = 3.0,
        tokens: ServiceTokens | None = None,
    ) -> None:
        self._stub = api_keys_pb2_grpc.ApiKeyServiceStub(channel)
        self._timeout = timeout
        self._tokens = tokens

    async def resolve(self, *, secret: str) -> Principal | None:
        """See `services.core.auth.ApiKeyResolver`."""
        # The rpc is internal (only service principals); the service identity also keeps
        # every user's key lookups off this service's own rate-limit budget.
        metadata = self._tokens.metadata(self._LOOKUP_TENANT) if self._tokens else ()
        try:
            reply = await self._stub.ResolveApiKey(
                api_keys_pb2.ResolveApiKeyRequest(secret=secret),
                timeout=self._timeout,
                metadata=metadata,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT):
                return None
            raise Unavailable("the API key service is unreachable") from None
        return Principal(
            reply.tenant_id, f"apikey:{reply.key_id}", frozenset(reply.scopes), test=reply.test
        )


def remote_api_key_resolver(settings: Settings) -> tuple[CachingApiKeyResolver, grpc.aio.Channel]:
    """The resolver a service other than the key owner uses, with the channel to close later."""
    channel = traced_channel(settings.domain_service_target)
    tokens = ServiceTokens.from_settings(
        settings, subject=f"service:{settings.service_name}", scopes=()
    )
    return CachingApiKeyResolver(
        GrpcApiKeyResolver(channel, tokens=tokens), ttl=settings.api_key_cache_ttl
    ), channel
