"""gRPC servicer of azora.iam.v1.ApiKeyService (its client is `services.core.api_key_client`)."""

from __future__ import annotations

from typing import Any

import grpc
from azora.iam.v1 import api_keys_pb2, api_keys_pb2_grpc

from services.core.context import current_principal
from services.core.errors import Unauthenticated
from services.core.protobuf import from_timestamp, to_timestamp
from services.iam.api_keys import ApiKey, ApiKeyManager

Context = grpc.aio.ServicerContext[Any, Any]


def key_to_proto(key: ApiKey) -> api_keys_pb2.ApiKey:
    """A key's description (never its secret or hash)."""
    return api_keys_pb2.ApiKey(
        id=key.id,
        name=key.name,
        scopes=sorted(key.scopes),
        prefix=key.prefix,
        create_time=to_timestamp(key.created_at),
        revoke_time=to_timestamp(key.revoked_at),
        expire_time=to_timestamp(key.expires_at),
        last_used_time=to_timestamp(key.last_used_at),
        test=key.test,
    )


class ApiKeyServicer(api_keys_pb2_grpc.ApiKeyServiceServicer):
    """ApiKeyService over an `ApiKeyManager`."""

    def __init__(self, manager: ApiKeyManager) -> None:
        self._manager = manager

    async def CreateApiKey(
        self, request: api_keys_pb2.CreateApiKeyRequest, context: Context
    ) -> api_keys_pb2.CreateApiKeyResponse:
        """See the proto."""
        key, secret = await self._manager.create(
            creator=current_principal(),
            name=request.name,
            scopes=request.scopes,
            expires_at=from_timestamp(request.expire_time)
            if request.HasField("expire_time")
            else None,
            test=request.test,
        )
        return api_keys_pb2.CreateApiKeyResponse(api_key=key_to_proto(key), secret=secret)

    async def ListApiKeys(
        self, request: api_keys_pb2.ListApiKeysRequest, context: Context
    ) -> api_keys_pb2.ListApiKeysResponse:
        """See the proto."""
        page = await self._manager.list(
            tenant_id=current_principal().tenant_id,
            size=request.page_size,
            page_token=request.page_token,
        )
        return api_keys_pb2.ListApiKeysResponse(
            api_keys=[key_to_proto(k) for k in page.keys], next_page_token=page.next_page_token
        )

    async def RevokeApiKey(
        self, request: api_keys_pb2.RevokeApiKeyRequest, context: Context
    ) -> api_keys_pb2.ApiKey:
        """See the proto."""
        key = await self._manager.revoke(tenant_id=current_principal().tenant_id, key_id=request.id)
        return key_to_proto(key)

    async def ResolveApiKey(
        self, request: api_keys_pb2.ResolveApiKeyRequest, context: Context
    ) -> api_keys_pb2.ResolveApiKeyResponse:
        """See the proto."""
        principal = await self._manager.resolve(secret=request.secret)
        if principal is None:
            raise Unauthenticated("API key unknown, revoked or expired", reason="INVALID_API_KEY")
        return api_keys_pb2.ResolveApiKeyResponse(
            tenant_id=principal.tenant_id,
            key_id=principal.subject.removeprefix("apikey:"),
            scopes=sorted(principal.scopes),
            test=principal.test,
        )
