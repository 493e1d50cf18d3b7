"""Settings of the suite health service (served by the domain process).

The shared ones come from `services.core.settings.Settings`; these say which other processes'
metrics `GET /metrics` merges and when the delivery queue counts as degraded.
"""

from __future__ import annotations

from services.core.settings import Peers, Seconds, Settings, setting


class HealthSettings(Settings):
    """The health service's settings: shared ones plus its own."""

    metrics_peers: Peers = setting(
        (),
        "AZORA_METRICS_PEERS",
        "`name=url` list of other processes' metrics merged into `GET /metrics` "
        "(`make run`: its own smtp, mail and gateway processes)",
    )
    health_queue_max_age: Seconds = setting(
        900.0,
        "AZORA_HEALTH_QUEUE_MAX_AGE",
        "seconds the oldest due email may wait before `/health` reports the `queue` component "
        "down (degraded)",
    )


__all__ = ["HealthSettings"]
