"""SMTP service use cases: relay configs, connection tests, DKIM rotation, SPF, DMARC, DNS checks.

Every use case first asks the domain service whether the domain exists in the caller's tenant
(`DomainDirectory`), so another tenant's domain is NOT_FOUND everywhere.

DKIM lifecycle, designed so mail is never unsigned or unverifiable:
* a new key is PENDING: it never signs, because its record may not be published yet;
* it becomes ACTIVE only after its record is seen in DNS (ActivateDkimKey, or by itself with
  ``auto_activate`` when the lifecycle loop sees the record);
* in the same atomic write the previous ACTIVE key becomes RETIRING: it no longer signs, but
  its record must stay published for the overlap, so mail signed with it just before the switch
  (still queued or in transit) keeps verifying;
* after the overlap the lifecycle loop marks it RETIRED and its record may be removed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from services.core.clock import Clock
from services.core.errors import (
    AlreadyExists,
    Conflict,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PreconditionViolation,
    Unavailable,
)
from services.core.netguard import AddressPolicy
from services.core.secrets_box import SecretsBox, SecretsError
from services.smtp import dkim_keys
from services.smtp.connection_test import RelayTester
from services.smtp.dmarc import DmarcBuilder
from services.smtp.dns_check import RecordChecker
from services.smtp.domains_client import DomainDirectory, DomainInfo
from services.smtp.models import (
    CheckStatus,
    ConnectionReport,
    DkimAlgorithm,
    DkimKey,
    DkimKeyring,
    DkimKeyStatus,
    DmarcInput,
    DmarcRecord,
    RecordCheck,
    RelaySettings,
    RelaySettingsInput,
    SigningKey,
    SmtpConfig,
    SpfMechanismInput,
    SpfQualifier,
    SpfRecord,
)
from services.smtp.relay import normalize_relay
from services.smtp.repository import (
    AuthRecordRepository,
    DkimKeyringRepository,
    SmtpConfigRepository,
)
from services.smtp.spf import SpfBuilder

log = logging.getLogger(__name__)

MAX_OVERLAP = timedelta(days=90)
_SAVE_ATTEMPTS = 3


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


def private_key_context(domain_id: str, selector: str) -> bytes:
    """Associated data sealing a DKIM private key to its domain and selector."""
    return f"dkim-private-key:{domain_id}:{selector}".encode()


@dataclass(frozen=True, slots=True)
class SmtpPolicy:
    """Tunable rules of the SMTP service."""

    default_timeout: timedelta = timedelta(seconds=30)
    rotation_overlap: timedelta = timedelta(days=7)
    check_interval: timedelta = timedelta(minutes=10)
    max_live_keys: int = 5  # pending + active + retiring per domain
    retired_keys_kept: int = 20  # history shown by ListDkimKeys
    lifecycle_batch: int = 100


class SmtpManager:
    """Use cases of the SMTP service; the servicer translates to and from protobuf only."""

    def __init__(
        self,
        *,
        domains: DomainDirectory,
        configs: SmtpConfigRepository,
        keyrings: DkimKeyringRepository,
        auth_records: AuthRecordRepository,
        secrets: SecretsBox,
        tester: RelayTester,
        checker: RecordChecker,
        spf: SpfBuilder,
        dmarc: DmarcBuilder,
        address_policy: AddressPolicy,
        clock: Clock,
        policy: SmtpPolicy,
    ) -> None:
        self._domains = domains
        self._configs = configs
        self._keyrings = keyrings
        self._auth_records = auth_records
        self._secrets = secrets
        self._tester = tester
        self._checker = checker
        self._spf = spf
        self._dmarc = dmarc
        self._address_policy = address_policy
        self._clock = clock
        self._policy = policy

    # --- relay configuration -----------------------------------------------------------------

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

    # --- DKIM --------------------------------------------------------------------------------

    async def generate_dkim_key(
        self,
        *,
        tenant_id: str,
        domain_id: str,
        selector: str,
        algorithm: DkimAlgorithm | None,
        key_bits: int,
        auto_activate: bool,
    ) -> tuple[DkimKeyring, DkimKey]:
        """Generate a PENDING key and return it with its ring (for the record name).

        Raises:
            InvalidArgument: bad selector or key size.
            NotFound: no such domain in this tenant.
            AlreadyExists: the selector is taken (by any key of the domain, even retired).
            FailedPrecondition: the domain already has the most live keys allowed.
        """
        domain = await self._domains.get(tenant_id=tenant_id, domain_id=domain_id)
        algorithm = algorithm or DkimAlgorithm.RSA
        bits = dkim_keys.check_key_size(algorithm, key_bits)
        wanted = dkim_keys.check_selector(selector, domain=domain.name) if selector.strip() else ""
        ring = await self._ring(domain)
        self._check_room(ring, wanted)
        # RSA-4096 takes seconds of CPU: never on the event loop.
        generated = await asyncio.to_thread(dkim_keys.generate, algorithm, bits)
        for attempt in range(_SAVE_ATTEMPTS):
            now = self._clock.now()
            chosen = wanted or dkim_keys.dated_selector(now, {k.selector for k in ring.keys})
            self._check_room(ring, chosen)
            key = DkimKey(
                selector=chosen,
                algorithm=algorithm,
                key_bits=generated.key_bits,
                public_key=generated.public_key,
                sealed_private_key=self._secrets.seal(
                    generated.private_key_pem, context=private_key_context(domain.id, chosen)
                ),
                status=DkimKeyStatus.PENDING,
                created_at=now,
                auto_activate=auto_activate,
            )
            ring.keys.append(key)
            self._prune(ring)
            ring.next_check_at = self._next_check(ring, now, soon=True)
            try:
                saved = await self._keyrings.save(ring=ring)
            except Conflict:
                if attempt == _SAVE_ATTEMPTS - 1:
                    raise
                ring = await self._ring(domain)
                continue
            log.info(
                "dkim key generated",
                extra={"fields": {"domain_id": domain.id, "selector": chosen}},
            )
            stored = saved.key(chosen)
            assert stored is not None
            return saved, stored
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _check_room(self, ring: DkimKeyring, selector: str) -> None:
        if selector and ring.key(selector) is not None:
            raise AlreadyExists(
                "DkimKey",
                selector,
                message=f"the selector {selector!r} is already used by a key of this domain; "
                "a selector must never be reused for a different key",
            )
        live = [k for k in ring.keys if k.status is not DkimKeyStatus.RETIRED]
        if len(live) >= self._policy.max_live_keys:
            raise FailedPrecondition(
                f"the domain already has {len(live)} keys that are not retired",
                reason="DKIM_KEY_LIMIT_REACHED",
                violations=[
                    PreconditionViolation(
                        "QUOTA", "dkim_keys", f"at most {self._policy.max_live_keys} live keys"
                    )
                ],
            )

    def _prune(self, ring: DkimKeyring) -> None:
        # Keeps the document bounded. Forgotten retired keys were retired long ago, so their
        # selectors have left every DNS cache before anyone could reuse them.
        retired = sorted(
            (k for k in ring.keys if k.status is DkimKeyStatus.RETIRED),
            key=lambda k: k.retired_at or k.created_at,
        )
        drop = {id(k) for k in retired[: max(0, len(retired) - self._policy.retired_keys_kept)]}
        ring.keys = [k for k in ring.keys if id(k) not in drop]

    async def _ring(self, domain: DomainInfo) -> DkimKeyring:
        ring = await self._keyrings.find(tenant_id=domain.tenant_id, domain_id=domain.id)
        return ring or DkimKeyring(domain.id, domain.tenant_id, domain.name)

    async def list_dkim_keys(
        self, *, tenant_id: str, domain_id: str, check_dns: bool
    ) -> tuple[DkimKeyring, list[DkimKey]]:
        """The domain's keys, newest first, optionally with fresh DNS checks.

        Raises:
            NotFound: no such domain in this tenant.
        """
        domain = await self._domains.get(tenant_id=tenant_id, domain_id=domain_id)
        ring = await self._ring(domain)
        if check_dns and ring.version:
            ring = await self._record_checks(ring, await self._check_keys(ring))
        # Newest first; keys made in the same millisecond keep their generation order, reversed.
        keys = sorted(ring.keys, key=lambda k: k.created_at)[::-1]
        return ring, keys

    async def activate_dkim_key(
        self,
        *,
        tenant_id: str,
        domain_id: str,
        selector: str,
        overlap: timedelta | None,
    ) -> tuple[DkimKeyring, DkimKey]:
        """Make a key ACTIVE once its record is seen in DNS; the previous one starts RETIRING.

        Activating the ACTIVE key is a no-op. A RETIRING key may be activated again (a roll
        back while its record is still published).

        Raises:
            InvalidArgument: bad selector or overlap.
            NotFound: no such domain in this tenant, or no key with this selector.
            FailedPrecondition: the record is not (correctly) published, or the key is retired.
            Conflict: the keyring changed concurrently.
        """
        domain = await self._domains.get(tenant_id=tenant_id, domain_id=domain_id)
        selector = dkim_keys.check_selector(selector, domain=domain.name)
        if overlap is not None and not timedelta(0) < overlap <= MAX_OVERLAP:
            raise InvalidArgument.single(
                "overlap", f"must be more than 0 and at most {MAX_OVERLAP.days} days"
            )
        ring = await self._ring(domain)
        key = ring.key(selector)
        if key is None:
            raise NotFound("DkimKey", selector)
        if key.status is DkimKeyStatus.ACTIVE:
            return ring, key
        if key.status is DkimKeyStatus.RETIRED:
            raise FailedPrecondition(
                f"the key {selector!r} is retired and cannot sign again; generate a new key",
                reason="DKIM_KEY_RETIRED",
                violations=[PreconditionViolation("DKIM_KEY_STATUS", selector, "retired")],
            )
        check = await self._checker.dkim(domain.name, key)
        key.dns_check = check
        now = self._clock.now()
        if check.status is not CheckStatus.OK:
            await self._save_quietly(ring)
            raise FailedPrecondition(
                f"the DKIM record {check.record_name} is {check.status.value}: publish "
                f"{check.expected!r} there first ({check.detail})",
                reason="DKIM_RECORD_NOT_PUBLISHED",
                violations=[
                    PreconditionViolation(
                        "DNS_RECORD", check.record_name, f"{check.status.value}: {check.detail}"
                    )
                ],
            )
        self._activate(ring, key, now, overlap or self._policy.rotation_overlap)
        ring.next_check_at = self._next_check(ring, now)
        saved = await self._keyrings.save(ring=ring)
        log.info(
            "dkim key activated", extra={"fields": {"domain_id": domain.id, "selector": selector}}
        )
        stored = saved.key(selector)
        assert stored is not None
        return saved, stored

    @staticmethod
    def _activate(ring: DkimKeyring, key: DkimKey, now: datetime, overlap: timedelta) -> None:
        for other in ring.keys:
            if other is not key and other.status is DkimKeyStatus.ACTIVE:
                other.status = DkimKeyStatus.RETIRING
                other.replaced_at = now
                other.retire_at = now + overlap
        key.status = DkimKeyStatus.ACTIVE
        key.activated_at = now
        key.replaced_at = None
        key.retire_at = None

    async def signing_key(self, *, tenant_id: str, domain_id: str) -> SigningKey | None:
        """The key that signs the domain's mail now, decrypted (for the delivery path).

        In-process only: no rpc returns it. The caller vouches for the tenant (no ownership
        round trip, because the delivery path signs every message).

        Raises:
            FailedPrecondition: the private key cannot be decrypted.
        """
        ring = await self._keyrings.find(tenant_id=tenant_id, domain_id=domain_id)
        active = ring.active if ring else None
        if ring is None or active is None:
            return None
        try:
            pem = self._secrets.open(
                active.sealed_private_key,
                context=private_key_context(ring.domain_id, active.selector),
            )
        except SecretsError:
            log.exception("dkim private key unreadable")
            raise FailedPrecondition(
                "the DKIM private key cannot be decrypted", reason="SECRET_UNREADABLE"
            ) from None
        return SigningKey(ring.domain_name, active.selector, active.algorithm, pem)

    async def _check_keys(self, ring: DkimKeyring) -> dict[str, RecordCheck]:
        live = [k for k in ring.keys if k.status is not DkimKeyStatus.RETIRED]
        results = await asyncio.gather(*(self._checker.dkim(ring.domain_name, k) for k in live))
        return {k.selector: r for k, r in zip(live, results, strict=True)}

    async def _record_checks(
        self, ring: DkimKeyring, checks: dict[str, RecordCheck]
    ) -> DkimKeyring:
        for key in ring.keys:
            if key.selector in checks:
                key.dns_check = checks[key.selector]
        return await self._save_quietly(ring)

    async def _save_quietly(self, ring: DkimKeyring) -> DkimKeyring:
        """Store check results; losing them to a concurrent writer is harmless."""
        try:
            return await self._keyrings.save(ring=ring)
        except Conflict:
            return ring

    def _next_check(
        self, ring: DkimKeyring, now: datetime, *, soon: bool = False
    ) -> datetime | None:
        due: list[datetime] = []
        if any(k.status is not DkimKeyStatus.RETIRED for k in ring.keys):
            interval = self._policy.check_interval
            # A fresh key is looked at sooner: its owner is publishing the record right now.
            due.append(now + (min(interval, timedelta(minutes=1)) if soon else interval))
        due.extend(
            k.retire_at
            for k in ring.keys
            if k.status is DkimKeyStatus.RETIRING and k.retire_at is not None
        )
        return min(due) if due else None

    async def run_lifecycle_once(self) -> tuple[int, int]:
        """Advance due keyrings: retire overlaps that ended, check records, auto-activate.

        Safe in any number of replicas: each ring is claimed atomically, and its changes are
        written with a version check. Rings of deleted domains are removed with the domain's
        relay and records.

        Returns:
            (keyrings looked at, keys whose status changed).
        """
        processed = changed = 0
        now = self._clock.now()
        while processed < self._policy.lifecycle_batch:
            ring = await self._keyrings.claim_due(now=now, lease=self._policy.check_interval)
            if ring is None:
                break
            processed += 1
            try:
                changed += await self._advance(ring, now)
            except (Conflict, Unavailable) as exc:
                log.info(
                    "keyring not advanced",
                    extra={"fields": {"domain_id": ring.domain_id, "reason": exc.reason}},
                )
        return processed, changed

    async def _advance(self, ring: DkimKeyring, now: datetime) -> int:
        try:
            await self._domains.get(tenant_id=ring.tenant_id, domain_id=ring.domain_id)
        except NotFound:
            await self.delete_domain_data(tenant_id=ring.tenant_id, domain_id=ring.domain_id)
            return 0
        changed = 0
        for key in ring.keys:
            if (
                key.status is DkimKeyStatus.RETIRING
                and key.retire_at is not None
                and key.retire_at <= now
            ):
                key.status = DkimKeyStatus.RETIRED
                key.retired_at = now
                changed += 1
        checks = await self._check_keys(ring)
        for key in ring.keys:
            if key.selector in checks:
                key.dns_check = checks[key.selector]
        ready = [
            k
            for k in ring.keys
            if k.status is DkimKeyStatus.PENDING
            and k.auto_activate
            and k.dns_check is not None
            and k.dns_check.status is CheckStatus.OK
        ]
        if ready:
            newest = max(ready, key=lambda k: k.created_at)
            self._activate(ring, newest, now, self._policy.rotation_overlap)
            changed += 1
        ring.next_check_at = self._next_check(ring, now)
        await self._keyrings.save(ring=ring)
        return changed

    async def delete_domain_data(self, *, tenant_id: str, domain_id: str) -> None:
        """Remove the relay, DKIM keys and generated records of a deleted domain."""
        await self._configs.delete(tenant_id=tenant_id, domain_id=domain_id)
        await self._keyrings.delete(tenant_id=tenant_id, domain_id=domain_id)
        await self._auth_records.delete(tenant_id=tenant_id, domain_id=domain_id)
        log.info("domain data removed", extra={"fields": {"domain_id": domain_id}})

    # --- SPF, DMARC, DNS check -----------------------------------------------------------------

    async def generate_spf(
        self,
        *,
        tenant_id: str,
        domain_id: str,
        mechanisms: Sequence[SpfMechanismInput],
        all_qualifier: SpfQualifier | None,
        redirect: str,
        exclude_relay: bool,
    ) -> SpfRecord:
        """Build and validate the domain's SPF record (and remember it for DNS checks).

        Raises:
            InvalidArgument: a mechanism, ``all`` or ``redirect`` is invalid, or the record
                needs more than 10 DNS lookups.
            NotFound: no such domain in this tenant.
        """
        domain = await self._domains.get(tenant_id=tenant_id, domain_id=domain_id)
        config = await self._configs.find(tenant_id=tenant_id, domain_id=domain.id)
        record = await self._spf.build(
            domain=domain.name,
            relay_host=None if exclude_relay or config is None else config.relay.host,
            mechanisms=mechanisms,
            all_qualifier=all_qualifier,
            redirect=redirect,
        )
        await self._auth_records.save_spf(
            tenant_id=tenant_id, domain_id=domain.id, value=record.value, now=self._clock.now()
        )
        return record

    async def generate_dmarc(
        self, *, tenant_id: str, domain_id: str, request: DmarcInput
    ) -> DmarcRecord:
        """Build and validate the domain's DMARC record (and remember it for DNS checks).

        Raises:
            InvalidArgument: a tag is invalid.
            NotFound: no such domain in this tenant.
        """
        domain = await self._domains.get(tenant_id=tenant_id, domain_id=domain_id)
        record = self._dmarc.build(domain=domain.name, request=request)
        await self._auth_records.save_dmarc(
            tenant_id=tenant_id,
            domain_id=domain.id,
            value=record.value,
            authorizations=record.external_authorizations,
            now=self._clock.now(),
        )
        return record

    async def check_dns(self, *, tenant_id: str, domain_id: str) -> list[RecordCheck]:
        """Look up every record the domain should publish and judge each.

        Raises:
            NotFound: no such domain in this tenant.
        """
        domain = await self._domains.get(tenant_id=tenant_id, domain_id=domain_id)
        ring = await self._ring(domain)
        records = await self._auth_records.find(tenant_id=tenant_id, domain_id=domain.id)
        live = sorted(
            (k for k in ring.keys if k.status is not DkimKeyStatus.RETIRED),
            key=lambda k: k.created_at,
        )
        name = domain.name
        checks = await asyncio.gather(
            self._checker.verification(name, domain.verification_token),
            *(self._checker.dkim(name, k) for k in live),
            self._checker.spf(name, records.spf if records else None),
            self._checker.dmarc(name, records.dmarc if records else None),
            *(
                self._checker.report_authorization(a.record_name)
                for a in (records.dmarc_authorizations if records else ())
            ),
            self._checker.mx(name),
        )
        if live:
            await self._record_checks(ring, {k.selector: checks[1 + i] for i, k in enumerate(live)})
        return list(checks)


__all__ = [
    "MAX_OVERLAP",
    "SmtpManager",
    "SmtpPolicy",
    "password_context",
    "private_key_context",
]
