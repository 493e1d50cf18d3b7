"""The envelope sender (Return-Path) of outgoing mail: a VERP address per email and recipient.

Every message leaves with ``MAIL FROM:<bounce-<token>@<bounce domain>>`` where the token names
the email and the one recipient of that SMTP transaction (services/core/verp.py), so a bounce
that comes back hours later (a DSN to the Return-Path) says which email and which recipient it
is about, whatever the report itself contains, and cannot be forged. One recipient per
envelope follows: an email to several recipients is handed to the relay as one transaction
per recipient (the same connection serves them in turn), which is what VERP means and costs
nothing for the usual one-recipient email.

Mail we relay for somebody else keeps the envelope sender it was given: a null sender (a
report must never cause another) and an SRS address (``SRS0=...``/``SRS1=...``, a forwarded
message: its bounces belong to the original sender, to whom the SRS address leads back).

The key is derived from the suite's master key (``AZORA_SECRETS_KEY``); return paths made
with a former master key (``AZORA_SECRETS_PREVIOUS_KEYS``) are still recognised, so rotating
it does not orphan the bounces of mail already sent.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from services.core import verp
from services.core.settings import Settings
from services.mail.models import Email


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

    def for_email(self, email: Email, recipient: str) -> str:
        """The MAIL FROM address of the transaction of `email` to `recipient`.

        Its return path, unless the email keeps its own envelope sender (module docstring).
        """
        if keeps_own_sender(email.envelope_from):
            return email.envelope_from
        return self.envelope_sender(
            email_id=email.id, sender_domain=email.domain_name, recipient=recipient
        )

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


def keeps_own_sender(envelope_from: str) -> bool:
    """Whether mail with this envelope sender keeps it: null, or an SRS address (forwarded)."""
    local = envelope_from.rpartition("@")[0].upper()
    return not envelope_from or local.startswith(("SRS0=", "SRS1="))


__all__ = ["ReturnPaths", "keeps_own_sender"]
