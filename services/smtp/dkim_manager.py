"""DKIM key lifecycle: generation, activation, rotation, retirement, the key that signs now.

Every use case first asks the domain service whether the domain exists in the caller's tenant
(`DomainDirectory`), so another tenant's domain is NOT_FOUND everywhere.

Designed so mail is never unsigned or unverifiable:
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
from dataclasses import dataclass
from datetime import datetime, timedelta

from services.core.clock import Clock
from services.core.errors import (
    AlreadyExists,
    Conflict,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PreconditionViolation,
    Unavailable,
)
from services.core.secrets_box import SecretsBox, SecretsError
from services.smtp import dkim_keys
from services.smtp.dns_check import RecordChecker
from services.smtp.domain_data import DomainDataRemover
from services.smtp.domains_client import DomainDirectory, DomainInfo
from services.smtp.models import (
    CheckStatus,
    DkimAlgorithm,
    DkimKey,
    DkimKeyring,
    DkimKeyStatus,
    RecordCheck,
    SigningKey,
)
from services.smtp.repository import DkimKeyringRepository

log = logging.getLogger(__name__)

MAX_OVERLAP = timedelta(days=90)
_SAVE_ATTEMPTS = 3


def private_key_context(domain_id: str, selector: str) -> bytes:
    """Associated data sealing a DKIM private key to its domain and selector."""
    return f"dkim-private-key:{domain_id}:{selector}".encode()


@dataclass(frozen=True, slots=True)
class DkimPolicy:
    """Tunable rules of the DKIM key lifecycle."""

    rotation_overlap: timedelta = timedelta(days=7)
    check_interval: timedelta = timedelta(minutes=10)
    max_live_keys: int = 5  # pending + active + retiring per domain
    retired_keys_kept: int = 20  # history shown by ListDkimKeys
    lifecycle_batch: int = 100


class DkimManager:
    """DKIM use cases and the lifecycle loop; the servicer translates to and from protobuf only."""

    def __init__(
        self,
        *,
        domains: DomainDirectory,
        keyrings: DkimKeyringRepository,
        secrets: SecretsBox,
        checker: RecordChecker,
        remover: DomainDataRemover,
        clock: Clock,
        policy: DkimPolicy,
    ) -> None:
        self._domains = domains
        self._keyrings = keyrings
        self._secrets = secrets
        self._checker = checker
        self._remover = remover
        self._clock = clock
        self._policy = policy

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
        ring = await self.keyring(domain)
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
                ring = await self.keyring(domain)
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

    async def keyring(self, domain: DomainInfo) -> DkimKeyring:
        """The domain's keyring (an empty one when it has no key yet)."""
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
        ring = await self.keyring(domain)
        if check_dns and ring.version:
            ring = await self.store_checks(ring, await self._check_keys(ring))
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
        ring = await self.keyring(domain)
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

    async def store_checks(self, ring: DkimKeyring, checks: dict[str, RecordCheck]) -> DkimKeyring:
        """Remember the latest DNS check of each key (by selector) in its ring."""
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
            await self._remover.delete_domain_data(
                tenant_id=ring.tenant_id, domain_id=ring.domain_id
            )
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


__all__ = ["MAX_OVERLAP", "DkimManager", "DkimPolicy", "private_key_context"]
