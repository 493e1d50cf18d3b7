"""The envelope sender (Return-Path) of outgoing mail: a VERP address per email and recipient.

Every message leaves with ``MAIL FROM:<bounce-<token>@<bounce domain>>`` where the token names
the email and the one recipient of that SMTP transaction (services/core/verp.py), so a bounce
that comes back hours later (a DSN to the Return-Path) says which email and which recipient it
is about, whatever the report itself contains, and cannot be forged. One recipient per
envelope follows: an email to several recipients is handed to the relay as one transaction
per recipient (the same connection serves them in turn), which is what VERP means and costs
nothing for the usual one-recipient email.

The key is derived from the suite's master key (``AZORA_SECRETS_KEY``); return paths made
with a former master key (``AZORA_SECRETS_PREVIOUS_KEYS``) are still recognised, so rotating
it does not orphan the bounces of mail already sent.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from services.core import verp
from services.core.settings import Settings


@dataclass(frozen=True, slots=True)
class ReturnPaths:
    """Makes and recognises the return paths of the suite's outgoing mail."""

    keys: tuple[bytes, ...]  # the current key first
    template: str  # AZORA_BOUNCE_DOMAIN: "bounces.{domain}" or a fixed name

    @classmethod
    def from_settings(cls, settings: Settings) -> ReturnPaths:
        """The current and former keys (from the master keys) and the bounce domain setting."""
        masters = [
            settings.secrets_key_bytes(),
            *(base64.b64decode(k, validate=True) for k in settings.secrets_previous_keys),
        ]
        return cls(tuple(verp.key_from_master(m) for m in masters), settings.bounce_domain)

    def envelope_sender(self, *, email_id: str, sender_domain: str, recipient: str) -> str:
        """The MAIL FROM address of the transaction of `email_id` to `recipient`."""
        return verp.return_path(
            key=self.keys[0],
            email_id=email_id,
            recipient=recipient,
            bounce_domain=verp.bounce_domain(self.template, sender_domain),
        )

    def parse(self, address: str) -> verp.VerpToken | None:
        """What an authentic return path of ours names; None for anything else."""
        if not verp.is_return_path(address, self.template):
            return None
        return verp.parse_any(address, keys=list(self.keys))


__all__ = ["ReturnPaths"]
