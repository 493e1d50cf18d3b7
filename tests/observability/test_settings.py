"""Observability settings: per-process metrics ports, peers, OTLP endpoint."""

from __future__ import annotations

import pytest

from services.core.settings import Settings, SettingsError
from services.health.settings import HealthSettings


# Each process reads its own metrics port variable; other names (tests) get no port at all.
def test_metrics_port_follows_the_process() -> None:
    env = {"AZORA_METRICS_PORT_SMTP": "0", "AZORA_METRICS_PORT_MAIL": "9999"}
    assert Settings.from_env(env, service_name="domain-service").metrics_port == 9101
    assert Settings.from_env(env, service_name="smtp-service").metrics_port == 0
    assert Settings.from_env(env, service_name="mail-service").metrics_port == 9999
    assert Settings.from_env(env, service_name="gateway").metrics_port == 9104
    assert Settings.from_env(env, service_name="test").metrics_port == 0


# Peers must be name=URL; the OTLP endpoint is taken as given (empty = tracing off).
def test_peers_and_endpoint() -> None:
    settings = HealthSettings.from_env(
        {
            "AZORA_METRICS_PEERS": "smtp-service=http://127.0.0.1:9102/metrics",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
        }
    )
    assert settings.metrics_peers == ("smtp-service=http://127.0.0.1:9102/metrics",)
    assert settings.otel_endpoint == "http://collector:4318"
    assert HealthSettings.from_env({}).otel_endpoint == ""
    with pytest.raises(SettingsError, match="AZORA_METRICS_PEERS"):
        HealthSettings.from_env({"AZORA_METRICS_PEERS": "127.0.0.1:9102"})
