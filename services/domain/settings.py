"""Settings of the domain process (domain, API key and suite health services).

The shared ones come from `services.core.settings.Settings`, the health service's from
`services.health.settings`; these are the domain lifecycle's rules and its limits.
"""

from __future__ import annotations

from services.core.settings import Seconds, setting
from services.health.settings import HealthSettings


class DomainSettings(HealthSettings):
    """The domain process's settings: shared ones, the health service's (it serves it), its own.

    Durations are seconds.
    """

    verification_window: Seconds = setting(
        72 * 3600.0,
        "AZORA_VERIFICATION_WINDOW",
        "seconds a new domain has to prove ownership before it expires",
    )
    recheck_interval: Seconds = setting(
        3600.0,
        "AZORA_RECHECK_INTERVAL",
        "seconds between ownership re-checks of an active domain",
    )
    suspension_grace: Seconds = setting(
        72 * 3600.0,
        "AZORA_SUSPENSION_GRACE",
        "seconds an active domain whose ownership record vanished keeps working before suspension",
    )
    max_domains_per_tenant: int = setting(
        1000, "AZORA_MAX_DOMAINS_PER_TENANT", "domains one tenant may have", ge=1
    )
    max_dns_records_per_domain: int = setting(
        500, "AZORA_MAX_DNS_RECORDS", "DNS records of one domain", ge=1
    )
    max_dns_records_per_tenant: int = setting(
        5000,
        "AZORA_MAX_DNS_RECORDS_PER_TENANT",
        "DNS records of all a tenant's domains together",
        ge=1,
    )


__all__ = ["DomainSettings"]
