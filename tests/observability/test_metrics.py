"""Prometheus metrics: GET /metrics through the gateway, /health/metrics, peer aggregation."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import sys

import aiohttp
from prometheus_client import REGISTRY, CollectorRegistry, Counter, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from scripts.run_suite import suite_environment
from services.core.metrics import Peer, render_suite
from services.core.settings import METRICS_PORTS
from tests.conftest import REPO_ROOT, Tenant, unique_domain
from tests.gateway.rest import call
from tests.support import ports

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
EMAIL_OR_ID = re.compile(r"@|\b[0-9a-f]{24}\b|\bt-[0-9a-f]{12}\b")


async def scrape(http: aiohttp.ClientSession, base_url: str) -> tuple[str, Samples]:
    """GET /metrics: the text and its samples keyed by (name, labels without `process`)."""
    async with http.get(f"{base_url}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await response.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = frozenset((k, v) for k, v in sample.labels.items() if k != "process")
            key = (sample.name, labels)
            samples[key] = samples.get(key, 0.0) + sample.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


# REST requests move the gRPC and HTTP counters under the route template and rpc labels, the
# database histogram counts commands, and no label value carries an email address or an id.
async def test_requests_move_counters_with_bounded_labels(
    http: aiohttp.ClientSession, rest_base_url: str, tenant: Tenant
) -> None:
    _, before = await scrape(http, rest_base_url)
    headers = {"Authorization": f"Bearer {tenant.token}"}
    name = unique_domain()
    created = await call(
        http, "POST", f"{rest_base_url}/api/v1/domains", json={"name": name}, headers=headers
    )
    assert created.status == 200, created.json
    domain_id = created.json["id"]
    got = await call(http, "GET", f"{rest_base_url}/api/v1/domains/{domain_id}", headers=headers)
    assert got.status == 200
    text, after = await scrape(http, rest_base_url)

    def delta(metric: str, **labels: str) -> float:
        return value(after, metric, **labels) - value(before, metric, **labels)

    route = "/api/v1/domains/{id}"
    assert delta("azora_http_requests_total", route=route, method="GET", status="200") == 1
    assert (
        delta("azora_http_requests_total", route="/api/v1/domains", method="POST", status="200")
        == 1
    )
    assert delta("azora_http_request_duration_seconds_count", route=route, method="GET") == 1
    domain_service = "azora.domain.v1.DomainService"
    assert (
        delta("azora_grpc_requests_total", service=domain_service, method="GetDomain", code="OK")
        == 1
    )
    assert (
        delta(
            "azora_grpc_request_duration_seconds_count",
            service=domain_service,
            method="CreateDomain",
        )
        == 1
    )
    assert delta("azora_db_command_duration_seconds_count", command="insert", outcome="ok") >= 1
    assert value(after, "azora_domains", status="pending") >= 1
    assert value(after, "process_resident_memory_bytes") > 0
    for _, labels in after:
        for _, label_value in labels:
            assert not EMAIL_OR_ID.search(label_value), label_value
    assert domain_id not in text
    assert name not in text
    assert tenant.id not in text


# /health/metrics answers the key figures as JSON, taken from the same registry.
async def test_health_metrics_key_figures(http: aiohttp.ClientSession, rest_base_url: str) -> None:
    await call(http, "GET", f"{rest_base_url}/health/ping")
    reply = await call(http, "GET", f"{rest_base_url}/health/metrics")
    assert reply.status == 200, reply.json
    values = reply.json["values"]
    assert values["grpc_requests_total"] >= 1
    assert values["http_requests_total"] >= 1
    assert values["process_resident_memory_bytes"] > 0
    for key in (
        "emails_accepted_total",
        "emails_sent_total",
        "emails_bounced_total",
        "domains_active",
        "dns_lookups_total",
        "process_cpu_seconds_total",
    ):
        assert key in values, key


# A peer's exposition is merged in under its own `process` label (a family both have comes out
# once); an unreachable peer is left out and reported by azora_metrics_peer_up 0.
async def test_render_suite_merges_peers(closed_port: int) -> None:
    here_registry, peer_registry = CollectorRegistry(), CollectorRegistry()
    for registry, count in ((here_registry, 2), (peer_registry, 5)):
        labels = ("service", "method", "code")
        rpcs = Counter("azora_grpc_requests", "rpcs", labels, registry=registry)
        rpcs.labels("s", "m", "OK").inc(count)
    Counter("azora_test_peer_things", "things", registry=peer_registry).inc(3)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=peer_registry)
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        text = await render_suite(
            "here",
            [
                Peer.parse(f"smtp-service={url}"),
                Peer.parse(f"gone=http://127.0.0.1:{closed_port}/metrics"),
            ],
            registry=here_registry,
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    types = [line for line in text.decode().splitlines() if line.startswith("# TYPE")]
    assert len(types) == len(set(types)), types
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }

    def rpcs_of(process: str) -> float:
        labels = (("code", "OK"), ("method", "m"), ("process", process), ("service", "s"))
        return samples[("azora_grpc_requests_total", labels)]

    assert rpcs_of("here") == 2
    assert rpcs_of("smtp-service") == 5
    assert samples[("azora_test_peer_things_total", (("process", "smtp-service"),))] == 3
    assert REGISTRY.get_sample_value("azora_metrics_peer_up", {"peer": "smtp-service"}) == 1
    assert REGISTRY.get_sample_value("azora_metrics_peer_up", {"peer": "gone"}) == 0


# `make run` (scripts/run_suite.py) wires its own processes: GET /metrics through its gateway
# carries the mail process's email metrics without AZORA_METRICS_PEERS set by hand.
async def test_the_suite_merges_its_own_processes_by_default(
    ferretdb: str, http: aiohttp.ClientSession
) -> None:
    port_variables = (
        "AZORA_DOMAIN_GRPC_PORT",
        "AZORA_SMTP_GRPC_PORT",
        "AZORA_MAIL_GRPC_PORT",
        "PORT",
        *(variable for variable, _ in METRICS_PORTS.values()),
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZORA_", "OTEL_"))}
    env.pop("AZORA_METRICS_PEERS", None)
    env.update({variable: str(ports.closed_port()) for variable in port_variables})
    env.update(
        {
            "MONGODB_URI": ferretdb,
            "AZORA_MONGODB_DATABASE": "suite_" + secrets.token_hex(4),
            "AZORA_ENV": "development",
            "LOG_LEVEL": "warn",
        }
    )
    suite = await asyncio.create_subprocess_exec(
        sys.executable,
        str(REPO_ROOT / "scripts" / "run_suite.py"),
        env=env,
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    metrics_url = f"http://127.0.0.1:{env['PORT']}/metrics"
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 90
        everyone_up = {"smtp-service": 1.0, "mail-service": 1.0, "gateway": 1.0}
        up: dict[str, float] = {}
        text = ""
        # Until every process has started and answered a merged scrape (a peer that is still
        # starting is reported down, never fails the page).
        while up != everyone_up:
            assert suite.returncode is None, "the suite exited"
            assert loop.time() < deadline, f"GET /metrics never merged every process: {up}"
            await asyncio.sleep(0.5)
            try:
                async with http.get(metrics_url) as response:
                    if response.status != 200:
                        continue
                    text = await response.text()
            except aiohttp.ClientError:
                continue
            up = {
                s.labels["peer"]: s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
                if s.name == "azora_metrics_peer_up"
            }
        mail_samples = [
            sample.name
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.labels.get("process") == "mail-service"
        ]
        assert "azora_email_queue_depth" in mail_samples
        assert "# TYPE azora_emails_accepted_total counter" in text
    finally:
        if suite.returncode is None:
            suite.terminate()
        await suite.wait()


def test_suite_environment_keeps_an_explicit_peer_list() -> None:
    # The default follows the configured ports and a wildcard listen address; an operator's
    # own AZORA_METRICS_PEERS (even empty) is passed on untouched.
    wildcard = "0.0.0.0"  # noqa: S104 - the setting's value under test, nothing binds it
    env = suite_environment({"AZORA_METRICS_HOST": wildcard, "AZORA_METRICS_PORT_MAIL": "9999"})
    assert env["AZORA_METRICS_PEERS"] == (
        "smtp-service=http://127.0.0.1:9102/metrics,"
        "mail-service=http://127.0.0.1:9999/metrics,"
        "gateway=http://127.0.0.1:9104/metrics"
    )
    without_gateway = suite_environment({"AZORA_METRICS_PORT_GATEWAY": "0"})
    assert "gateway" not in without_gateway["AZORA_METRICS_PEERS"]
    assert suite_environment({"AZORA_METRICS_PEERS": ""})["AZORA_METRICS_PEERS"] == ""
