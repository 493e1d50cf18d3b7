"""The submission server's client of the mail service: `MailService.SubmitMessage`.

Called with the client's own API key, so its scope, rate limits and quotas apply exactly as
for `SendEmail`, and with the client's address, which the mail service's rate limits count.
"""

from __future__ import annotations

import grpc
from azora.mail.v1 import mail_pb2, mail_pb2_grpc

from services.submission.server import Identity


class GrpcMailSubmitter:
    """`MailSubmitter` over `MailService.SubmitMessage`, authenticated with the client's key."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float) -> None:
        self._stub = mail_pb2_grpc.MailServiceStub(channel)
        self._timeout = timeout

    async def submit(
        self,
        *,
        identity: Identity,
        raw: bytes,
        envelope_from: str,
        envelope_to: list[str],
        client_address: str,
    ) -> str:
        """See `MailSubmitter.submit`."""
        email = await self._stub.SubmitMessage(
            mail_pb2.SubmitMessageRequest(
                raw_message=raw,
                envelope_from=envelope_from,
                envelope_to=envelope_to,
                client_address=client_address,
            ),
            # The client address is what the mail service's rate limits count (it believes
            # x-forwarded-for only from trusted proxies: AZORA_TRUSTED_PROXIES).
            metadata=(
                ("authorization", f"Bearer {identity.api_key}"),
                ("x-forwarded-for", client_address),
            ),
            timeout=self._timeout,
        )
        return email.id


__all__ = ["GrpcMailSubmitter"]
