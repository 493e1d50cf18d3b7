"""The inbound server's clients: recipient routes (domain service), message storage (mail service).

Both call internal rpcs with a service token. The route of a recipient is asked before the
tenant is known, so that token's tenant is a placeholder the domain service ignores for this rpc;
storing uses a token minted for the recipient's tenant. Answers about recipients (a route, or
none) are cached for ``AZORA_INBOUND_ROUTE_CACHE_TTL`` seconds.

Return paths of our outgoing mail (``bounce-<token>@<bounce domain>``, AZORA_BOUNCE_DOMAIN)
are accepted by their shape, without asking anyone (the mail service, which holds the key,
tells authentic ones from forged ones), as recipients with the ``bounce`` action, and their
messages go to the mail service's bounce mailbox (``ReceiveBounceMessage``) instead of a route.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from azora.domain.v1 import routes_pb2, routes_pb2_grpc
from azora.mail.v1 import inbound_pb2, inbound_pb2_grpc

from services.core import verp
from services.core.auth import ServiceTokens
from services.core.cache import TtlCache
from services.core.settings import Settings
from services.inbound.authentication import AuthenticationResults

SERVICE_SUBJECT = "service:inbound"
# The token of the cross-tenant recipient lookup needs some tenant claim; it is not used.
LOOKUP_TENANT = "inbound-lookup"
# A return path of our outgoing mail: no route, the bounce mailbox (the tenant comes from it).
BOUNCE_ACTION = "bounce"
BOUNCE_TENANT = "inbound-bounces"


@dataclass(frozen=True, slots=True)
class Recipient:
    """Whose an accepted recipient is and what its route says."""

    address: str
    tenant_id: str
    domain_id: str
    route_id: str
    action: str
    reject_text: str
    # The route's target: its webhook endpoint, or the forwarding addresses.
    webhook_id: str = ""
    forward_to: tuple[str, ...] = ()


class LookupFailed(Exception):
    """The domain service could not be asked (the client should retry: 451)."""


class GrpcRecipientResolver:
    """Recipient -> route through RouteService.ResolveInboundRecipient, briefly cached."""

    def __init__(
        self, channel: grpc.aio.Channel, *, settings: Settings, ttl: float, timeout: float
    ):
        self._stub = routes_pb2_grpc.RouteServiceStub(channel)
        self._tokens = ServiceTokens.from_settings(
            settings, subject=SERVICE_SUBJECT, scopes=["domains:read"]
        )
        # Values are 1-tuples so that "no route" (None) can be cached too.
        self._cache: TtlCache[str, tuple[Recipient | None]] = TtlCache(ttl=ttl)
        self._timeout = timeout
        self._bounce_domain = settings.bounce_domain

    async def resolve(self, address: str) -> Recipient | None:
        """The recipient's route, or None when it is not ours to accept.

        Raises:
            LookupFailed: the domain service did not answer.
        """
        if verp.is_return_path(address, self._bounce_domain):
            return Recipient(address, BOUNCE_TENANT, "", "", BOUNCE_ACTION, "")
        key = address.lower()
        hit = self._cache.get(key)
        if hit is not None:
            return hit[0]
        try:
            found = await self._stub.ResolveInboundRecipient(
                routes_pb2.ResolveInboundRecipientRequest(address=address),
                metadata=self._tokens.metadata(LOOKUP_TENANT),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                self._cache.put(key, (None,))
                return None
            raise LookupFailed(exc.code().name) from exc
        recipient = Recipient(
            address=address,
            tenant_id=found.tenant_id,
            domain_id=found.domain_id,
            route_id=found.route.id,
            action=found.route.action,
            reject_text=found.route.reject_text,
            webhook_id=found.route.webhook_id,
            forward_to=tuple(found.route.forward_to),
        )
        self._cache.put(key, (recipient,))
        return recipient


class GrpcInboundStorer:
    """Stores a received message through InboundService.StoreInboundMessage."""

    def __init__(self, channel: grpc.aio.Channel, *, settings: Settings, timeout: float) -> None:
        self._stub = inbound_pb2_grpc.InboundServiceStub(channel)
        self._tokens = ServiceTokens.from_settings(
            settings, subject=SERVICE_SUBJECT, scopes=["emails:write"]
        )
        self._timeout = timeout

    async def store(
        self,
        *,
        recipient: Recipient,
        raw: bytes,
        added_headers: bytes,
        envelope_from: str,
        client_address: str,
        helo: str,
        authentication: AuthenticationResults,
    ) -> str:
        """Store the message for `recipient`; return its id.

        Raises:
            grpc.aio.AioRpcError: the mail service refused it or could not be reached.
        """
        auth = authentication
        results = inbound_pb2.AuthenticationResults(
            spf=auth.spf,
            spf_domain=auth.spf_domain,
            dkim=auth.dkim,
            dkim_domains=list(auth.dkim_domains),
            dmarc=auth.dmarc,
            from_domain=auth.from_domain,
            header=auth.header,
        )
        if recipient.action == BOUNCE_ACTION:
            kept = await self._stub.ReceiveBounceMessage(
                inbound_pb2.ReceiveBounceMessageRequest(
                    raw_message=raw,
                    added_headers=added_headers,
                    envelope_from=envelope_from,
                    recipient=recipient.address,
                    client_address=client_address,
                    helo=helo,
                    authentication=results,
                ),
                metadata=self._tokens.metadata(BOUNCE_TENANT),
                timeout=self._timeout,
            )
            return kept.id
        stored = await self._stub.StoreInboundMessage(
            inbound_pb2.StoreInboundMessageRequest(
                raw_message=raw,
                added_headers=added_headers,
                envelope_from=envelope_from,
                recipient=recipient.address,
                domain_id=recipient.domain_id,
                route_id=recipient.route_id,
                action=recipient.action,
                client_address=client_address,
                helo=helo,
                webhook_id=recipient.webhook_id,
                forward_to=list(recipient.forward_to),
                authentication=results,
            ),
            metadata=self._tokens.metadata(recipient.tenant_id),
            timeout=self._timeout,
        )
        return stored.id


__all__ = [
    "BOUNCE_ACTION",
    "GrpcInboundStorer",
    "GrpcRecipientResolver",
    "LookupFailed",
    "Recipient",
]
