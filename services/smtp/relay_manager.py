"""Relay configuration and probe: a domain's SMTP relay, its sealed password, live tests.

Every use case first asks the domain service whether the domain exists in the caller's tenant
(`DomainDirectory`), so another tenant's domain is NOT_FOUND everywhere. A stored relay password
is only ever sent to the host and port it was stored with (see `_stored_password_for`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from services.core.clock import Clock
from services.core.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from services.core.netguard import AddressPolicy
from services.core.secrets_box import SecretsBox, SecretsError
from services.smtp.domains_client import DomainDirectory
from services.smtp.models import ConnectionReport, RelaySettings, RelaySettingsInput, SmtpConfig
from services.smtp.relay_probe import RelayTester
from services.smtp.relay_settings import normalize_relay
from services.smtp.repository import SmtpConfigRepository

log = logging.getLogger(__name__)


def _stored_password_for(
    stored: SmtpConfig | None, relay: RelaySettings, *, field: str
) -> str | None:
    """The stored (sealed) password, if `relay` may be sent it; None when none is stored.

    A relay password authenticates to one server: whoever can edit or test a config must not
    be able to point it at a server of their own and receive the password there. So it only
    ever goes to the host and port it was stored with; anything else needs the password again.

    Raises:
        InvalidArgument: on `field`, when a password is stored for another host or port.
    """
    if stored is None or stored.sealed_password is None:
        return None
    if (relay.host, relay.port) != (stored.relay.host, stored.relay.port):
        raise InvalidArgument.single(
            field,
            "the relay's host or port differs from the stored one, and the stored password is "
            "only ever sent to the relay it was stored for: send the password for "
            f"{relay.host}:{relay.port} (or an empty password for none)",
        )
    return stored.sealed_password


def password_context(domain_id: str) -> bytes:
    """Associated data sealing a relay password to its domain."""
    return f"smtp-password:{domain_id}".encode()


@dataclass(frozen=True, slots=True)
class RelayPolicy:
    """Tunable rules of relay configuration."""

    default_timeout: timedelta = timedelta(seconds=30)


class RelayManager:
    """Relay use cases; the servicer translates to and from protobuf only."""

    def __init__(
        self,
        *,
        domains: DomainDirectory,
        configs: SmtpConfigRepository,
        secrets: SecretsBox,
        tester: RelayTester,
        address_policy: AddressPolicy,
        clock: Clock,
        policy: RelayPolicy,
    ) -> None:
        self._domains = domains
        self._configs = configs
        self._secrets = secrets
        self._tester = tester
        self._address_policy = address_policy
        self._clock = clock
        self._policy = policy

    async def get_config(self, *, tenant_id: str, domain_id: str) -> SmtpConfig:
        """The domain's relay.

        Raises:
            NotFound: no such domain in this tenant, or no relay configured.
        """
        await self._domains.get(tenant_id=tenant_id, domain_id=domain_id)
        config = await self._configs.find(tenant_id=tenant_id, domain_id=domain_id)
        if config is None:
            raise NotFound("SmtpConfig", domain_id)
        return config

    async def update_config(
        self, *, tenant_id: str, domain_id: str, settings: RelaySettingsInput
    ) -> SmtpConfig:
        """Create or replace the domain's relay.

        Without a password the stored one stays, but only while the host and port stay the
        same: a stored password is never carried to another relay.

        Raises:
            InvalidArgument: a setting is invalid (one violation per field), or the host or
                port changed and no password was sent (on ``password``).
            NotFound: no such domain in this tenant.
            Conflict: the relay changed concurrently.
        """
        domain = await self._domains.get(tenant_id=tenant_id, domain_id=domain_id)
        relay = normalize_relay(
            settings, default_timeout=self._policy.default_timeout, policy=self._address_policy
        )
        existing = await self._configs.find(tenant_id=tenant_id, domain_id=domain.id)
        sealed: str | None
        if not relay.username:
            sealed = None  # without a user name there is no AUTH, so nothing to keep
        elif settings.password is not None:
            sealed = (
                self._secrets.seal(settings.password.encode(), context=password_context(domain.id))
                if settings.password
                else None
            )
        else:
            sealed = _stored_password_for(existing, relay, field="password")
        now = self._clock.now()
        config = SmtpConfig(
            domain_id=domain.id,
            tenant_id=tenant_id,
            relay=relay,
            sealed_password=sealed,
            created_at=existing.created_at if existing else now,
            updated_at=now,
            version=existing.version if existing else 0,
        )
        saved = await self._configs.save(config=config)
        log.info("relay configured", extra={"fields": {"domain_id": domain.id}})
        return saved

    async def test_connection(
        self, *, tenant_id: str, domain_id: str, settings: RelaySettingsInput | None
    ) -> ConnectionReport:
        """Test the stored relay of `domain_id`, or the ad-hoc `settings`.

        With both and no password in `settings` (a form testing edits before saving), the
        stored password is used, but only when the settings name the stored host and port.

        Raises:
            InvalidArgument: neither a domain nor settings, invalid settings, or settings for
                another host or port without a password (on ``config.password``).
            NotFound: the domain (or, without settings, its relay) does not exist.
            FailedPrecondition: the stored password cannot be decrypted.
        """
        if settings is None:
            if not domain_id:
                raise InvalidArgument.single(
                    "domain_id", "name a domain with a stored relay, or send a config to test"
                )
            config = await self.get_config(tenant_id=tenant_id, domain_id=domain_id)
            return await self._tester.test(config.relay, password=self._password(config))
        try:
            relay = normalize_relay(
                settings, default_timeout=self._policy.default_timeout, policy=self._address_policy
            )
        except InvalidArgument as exc:
            # The settings arrive as the request's `config`: name the fields as the client did.
            raise InvalidArgument(
                [FieldViolation(f"config.{v.field}", v.description) for v in exc.violations]
            ) from None
        password = settings.password
        if domain_id:
            await self._domains.get(tenant_id=tenant_id, domain_id=domain_id)
            if password is None and relay.username:
                stored = await self._configs.find(tenant_id=tenant_id, domain_id=domain_id)
                if _stored_password_for(stored, relay, field="config.password") is not None:
                    assert stored is not None
                    password = self._password(stored)
        return await self._tester.test(relay, password=password)

    async def relay_credentials(
        self, *, tenant_id: str, domain_id: str
    ) -> tuple[SmtpConfig, str | None]:
        """The domain's relay with its decrypted password, for the delivery path.

        Served only to other services (the internal GetRelayCredentials rpc); the caller's
        service token names the tenant, and the domain is confirmed with its owner like
        everywhere else, so a deleted domain stops being deliverable within the cache TTL.

        Raises:
            NotFound: no such domain in this tenant.
            FailedPrecondition: the domain has no relay configured (reason
                RELAY_NOT_CONFIGURED: the sender tells "cannot deliver yet" from "no such
                domain"), or the stored password cannot be decrypted.
        """
        await self._domains.get(tenant_id=tenant_id, domain_id=domain_id)
        config = await self._configs.find(tenant_id=tenant_id, domain_id=domain_id)
        if config is None:
            raise FailedPrecondition(
                "no relay configured for this domain", reason="RELAY_NOT_CONFIGURED"
            )
        return config, self._password(config)

    def _password(self, config: SmtpConfig) -> str | None:
        if config.sealed_password is None:
            return None
        try:
            return self._secrets.open(
                config.sealed_password, context=password_context(config.domain_id)
            ).decode()
        except SecretsError:
            log.exception("stored relay password unreadable")
            raise FailedPrecondition(
                "the stored relay password cannot be decrypted (was AZORA_SECRETS_KEY changed "
                "without listing the old key in AZORA_SECRETS_PREVIOUS_KEYS?); set it again",
                reason="SECRET_UNREADABLE",
            ) from None


__all__ = ["RelayManager", "RelayPolicy", "password_context"]
