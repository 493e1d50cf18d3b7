"""Settings of the SMTP service: the DKIM key lifecycle.

The shared ones (relay egress policy, SMTP_TIMEOUT, secrets) come from
`services.core.settings.Settings`.
"""

from __future__ import annotations

from services.core.settings import Seconds, Settings, setting


class SmtpSettings(Settings):
    """The SMTP service's settings: shared ones plus its own. Durations are seconds."""

    dkim_rotation_overlap: Seconds = setting(
        7 * 24 * 3600.0,
        "AZORA_DKIM_ROTATION_OVERLAP",
        "seconds a replaced DKIM key stays RETIRING (its record must stay published meanwhile)",
    )
    dkim_check_interval: Seconds = setting(
        600.0,
        "AZORA_DKIM_CHECK_INTERVAL",
        "seconds between look-ups of a domain's DKIM records by the lifecycle loop",
    )


__all__ = ["SmtpSettings"]
