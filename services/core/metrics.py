"""Every Prometheus metric of the suite, defined in this one place.

Metrics live in prometheus_client's process-wide default registry (``REGISTRY``), together
with its process collector (``process_resident_memory_bytes``, ``process_cpu_seconds_total``,
...). Each process exposes its registry for scraping (`start_exposition`, started by the
process entry points only, never by tests) and the domain process serves it, merged with its
peers' expositions, as ``GET /metrics`` (`render_suite`; see docs/operations.md).

Label rules: names follow Prometheus conventions (base units, ``_total`` for counters) and every
label has a small, fixed set of values (service, method, code, route template, status, outcome,
command, ...). Never put an email address, a domain name, a tenant id or any other id into a
label: the series count would grow with the data.

The mail-specific metrics are defined here so there is one place for definitions; the mail
service increments them where the events happen (see each docstring).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import aiohttp
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# The Prometheus text format version our expositions use (google.api.HttpBody content type).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Latency buckets in seconds: 1 ms .. 30 s (gRPC/REST/DB calls and SMTP deliveries).
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

# -- requests --------------------------------------------------------------------------------

GRPC_REQUESTS = Counter(
    "azora_grpc_requests",
    "gRPC requests handled by a service, by gRPC service, method and status code.",
    ("service", "method", "code"),
)
"""Incremented once per azora rpc by `services.core.interceptors.ErrorMappingInterceptor`."""

GRPC_REQUEST_DURATION = Histogram(
    "azora_grpc_request_duration_seconds",
    "Time to handle a gRPC request, by gRPC service and method.",
    ("service", "method"),
    buckets=LATENCY_BUCKETS,
)
"""Observed once per azora rpc by `ErrorMappingInterceptor`."""

HTTP_REQUESTS = Counter(
    "azora_http_requests",
    "REST requests answered by the gateway, by route template, HTTP method and status.",
    ("route", "method", "status"),
)
"""Incremented once per REST request by the gateway middleware (route template, never a path)."""

HTTP_REQUEST_DURATION = Histogram(
    "azora_http_request_duration_seconds",
    "Time to answer a REST request at the gateway, by route template and HTTP method.",
    ("route", "method"),
    buckets=LATENCY_BUCKETS,
)
"""Observed once per REST request by the gateway middleware."""

# -- dependencies ----------------------------------------------------------------------------

DB_COMMAND_DURATION = Histogram(
    "azora_db_command_duration_seconds",
    "Time of one MongoDB command as seen by the driver, by command name and outcome.",
    ("command", "outcome"),
    buckets=LATENCY_BUCKETS,
)
"""Observed by the PyMongo command listener of `services.core.mongo` (outcome ok/error)."""

DNS_LOOKUPS = Counter(
    "azora_dns_lookups",
    "DNS lookups made by the services, by outcome (found, no_records, nxdomain, timeout, error).",
    ("outcome",),
)
"""Incremented once per lookup by `services.core.dns.DnsResolver`."""

DOMAINS = Gauge(
    "azora_domains",
    "Domains registered in the suite, by lifecycle status.",
    ("status",),
)
"""Set by the domain process (suite health) before every exposition and periodically."""

# -- mail (incremented by the mail service) ----------------------------------------------------

EMAILS_ACCEPTED = Counter(
    "azora_emails_accepted",
    "Emails accepted for delivery (SendEmail and ResendEmail that stored a message), by sender "
    "domain.",
    ("domain",),
)
"""Mail service: ``EMAILS_ACCEPTED.labels(domain=...).inc()`` once per stored email (not on
idempotent replays). ``domain`` is the sender's verified domain as an A-label: one series per
sending domain, never an address or id. A deployment with very many domains drops the label
at scrape time (``metric_relabel_configs`` with ``labeldrop: domain``); the sums stay right."""

EMAIL_DELIVERIES = Counter(
    "azora_email_deliveries",
    "Final or intermediate delivery results per email: sent, deferred, bounced, failed; by "
    "sender domain.",
    ("outcome", "domain"),
)
"""Mail service: ``EMAIL_DELIVERIES.labels(outcome=..., domain=...).inc()`` when an email
changes state.

outcome is one of ``sent`` (relay accepted it), ``deferred`` (4xx/timeout, will retry),
``bounced`` (5xx) or ``failed`` (gave up: lifetime exceeded, no relay, ...); domain as for
EMAILS_ACCEPTED.
"""

DELIVERY_ATTEMPT_DURATION = Histogram(
    "azora_email_delivery_attempt_duration_seconds",
    "Time of one SMTP delivery attempt (connect to final reply), by outcome.",
    ("outcome",),
    buckets=LATENCY_BUCKETS,
)
"""Mail service: observe once per SMTP attempt with outcome sent/deferred/bounced/failed."""

QUEUE_DEPTH = Gauge(
    "azora_email_queue_depth",
    "Emails waiting for delivery (queued or deferred), counted by the mail service.",
)
"""Mail service: ``QUEUE_DEPTH.set(n)`` from a periodic count of its own queue."""

QUEUE_OLDEST_DUE_AGE = Gauge(
    "azora_email_queue_oldest_due_age_seconds",
    "How long the most overdue queued email has been due; 0 when nothing is overdue.",
)
"""Mail service: ``QUEUE_OLDEST_DUE_AGE.set(seconds)`` alongside QUEUE_DEPTH."""

WEBHOOK_ATTEMPTS = Counter(
    "azora_webhook_attempts",
    "Webhook requests sent by the dispatcher, by outcome: success (2xx), http_error (another "
    "status), no_answer (timeout, refused connection, refused by the SSRF guard).",
    ("outcome",),
)
"""Webhook dispatcher: ``WEBHOOK_ATTEMPTS.labels(outcome=...).inc()`` once per request."""

WEBHOOK_ATTEMPT_DURATION = Histogram(
    "azora_webhook_attempt_duration_seconds",
    "Time of one webhook request (connect to answer or failure), by outcome.",
    ("outcome",),
    buckets=LATENCY_BUCKETS,
)
"""Webhook dispatcher: observe once per request, outcome as for WEBHOOK_ATTEMPTS."""

WEBHOOK_LAG = Histogram(
    "azora_webhook_lag_seconds",
    "From an event's occurrence to the first 2xx answer of an endpoint it was sent to.",
    buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 7200.0, 86400.0),
)
"""Webhook dispatcher: observe at a delivery's first success (replays are not counted)."""

DKIM_SIGNATURES = Counter(
    "azora_dkim_signatures",
    "DKIM signatures added to outgoing messages, by outcome (signed, failed).",
    ("outcome",),
)
"""Mail service: ``DKIM_SIGNATURES.labels(outcome="signed").inc()`` per signed message."""

# -- rate limits -----------------------------------------------------------------------------

RATE_LIMIT_REFUSALS = Counter(
    "azora_rate_limit_refusals",
    "Requests refused by a rate limit or sending quota, by budget (api, send, quota-hour, "
    "quota-day) and scope (ip, user, tenant).",
    ("budget", "scope"),
)
"""Incremented by `services.core.ratelimit.RateLimiter.admit` for each refusal."""

RATE_LIMIT_SYNCS = Counter(
    "azora_rate_limit_syncs",
    "Exchanges of rate-limit counts with the database, by outcome (ok, error).",
    ("outcome",),
)
"""Incremented by `services.core.ratelimit.SharedCounters.run` after each sync."""

# -- aggregation -----------------------------------------------------------------------------

PEER_UP = Gauge(
    "azora_metrics_peer_up",
    "Whether the last scrape of a peer process's metrics (for GET /metrics) succeeded.",
    ("peer",),
)
"""Set by `render_suite` for each configured peer."""


def start_exposition(host: str, port: int) -> None:
    """Serve this process's registry at http://host:port/metrics (port 0: do nothing).

    A port that cannot be bound is logged as an error, not fatal: the service still serves
    its callers, and ``azora_metrics_peer_up`` / the missing scrape target show the gap.
    """
    if not port:
        return
    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        log.error(
            "metrics port unavailable; not exposed",
            extra={"fields": {"host": host, "port": port, "error": str(exc)}},
        )
        return
    log.info("metrics exposed", extra={"fields": {"host": host, "port": port}})


@dataclass(frozen=True, slots=True)
class Peer:
    """Another process whose exposition GET /metrics includes: a name and its metrics URL."""

    name: str
    url: str

    @classmethod
    def parse(cls, value: str) -> Peer:
        """Read ``name=http://host:port/metrics``.

        Raises:
            ValueError: the value is not of that form.
        """
        name, sep, url = value.partition("=")
        if not sep or not name.strip() or not url.strip().startswith(("http://", "https://")):
            raise ValueError(f"expected name=http://host:port/metrics, got {value!r}")
        return cls(name.strip(), url.strip())


class _Families(Collector):
    """A collector yielding already-built metric families (for re-rendering merged text)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


# Labels kept off the suite's merged exposition (GET /metrics answers without credentials):
# a sender domain names a tenant's domain. Per-process scrape ports keep them; here the samples
# that differ only in these labels are summed.
PRIVATE_LABELS = frozenset({"domain"})


def _labelled(families: Iterable[Metric], process: str, into: dict[str, Metric]) -> None:
    # `_created` timestamps are dropped: a registry yields them inside their counter while the
    # 0.0.4 text of a peer has them as separate gauges, and merging both would repeat a family.
    for family in families:
        merged = into.get(family.name)
        if merged is None:
            merged = Metric(family.name, family.documentation, family.type, family.unit)
            into[family.name] = merged
        index = {(s.name, tuple(sorted(s.labels.items()))): i for i, s in enumerate(merged.samples)}
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            labels = {k: v for k, v in sample.labels.items() if k not in PRIVATE_LABELS}
            labels["process"] = process
            key = (sample.name, tuple(sorted(labels.items())))
            if key in index:
                earlier = merged.samples[index[key]]
                merged.samples[index[key]] = earlier._replace(value=earlier.value + sample.value)
            else:
                index[key] = len(merged.samples)
                merged.samples.append(sample._replace(labels=labels))


async def _scrape(session: aiohttp.ClientSession, peer: Peer) -> str | None:
    try:
        async with session.get(peer.url) as response:
            response.raise_for_status()
            text = await response.text()
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.warning(
            "metrics peer unreachable",
            extra={"fields": {"peer": peer.name, "error": str(exc)[:200]}},
        )
        PEER_UP.labels(peer=peer.name).set(0)
        return None
    PEER_UP.labels(peer=peer.name).set(1)
    return text


async def render_suite(
    process: str,
    peers: Sequence[Peer] = (),
    *,
    registry: CollectorRegistry = REGISTRY,
    scrape_timeout: float = 2.0,
) -> bytes:
    """This process's exposition plus its peers', merged, every sample labelled ``process``.

    Without peers the answer is this process's registry with a ``process`` label added. A peer
    that does not answer is left out and reported by ``azora_metrics_peer_up{peer} 0``.
    """
    texts: list[tuple[str, str]] = []
    if peers:
        client_timeout = aiohttp.ClientTimeout(total=scrape_timeout)
        async with aiohttp.ClientSession(timeout=client_timeout) as session:
            scraped = await asyncio.gather(*(_scrape(session, peer) for peer in peers))
        texts = [(p.name, t) for p, t in zip(peers, scraped, strict=True) if t is not None]
    merged: dict[str, Metric] = {}
    _labelled(registry.collect(), process, merged)
    for name, text in texts:
        try:
            _labelled(text_string_to_metric_families(text), name, merged)
        except ValueError as exc:
            log.warning(
                "metrics peer sent malformed text",
                extra={"fields": {"peer": name, "error": str(exc)[:200]}},
            )
    out = CollectorRegistry(auto_describe=False)
    out.register(_Families(merged.values()))
    return generate_latest(out)


__all__ = [
    "CONTENT_TYPE",
    "DB_COMMAND_DURATION",
    "DELIVERY_ATTEMPT_DURATION",
    "DKIM_SIGNATURES",
    "DNS_LOOKUPS",
    "DOMAINS",
    "EMAILS_ACCEPTED",
    "EMAIL_DELIVERIES",
    "GRPC_REQUESTS",
    "GRPC_REQUEST_DURATION",
    "HTTP_REQUESTS",
    "HTTP_REQUEST_DURATION",
    "PEER_UP",
    "QUEUE_DEPTH",
    "QUEUE_OLDEST_DUE_AGE",
    "Peer",
    "render_suite",
    "start_exposition",
]
