"""deploy/grafana-dashboard.json uses only metrics the suite defines."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import REGISTRY

import services.core.metrics  # noqa: F401 - registers the suite's metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana-dashboard.json"
SUFFIXES = ("", "_total", "_bucket", "_count", "_sum", "_created")


# Every metric name a panel queries exists in the registry (a renamed metric fails here).
def test_dashboard_queries_only_defined_metrics() -> None:
    defined = {f.name + s for f in REGISTRY.collect() for s in SUFFIXES}
    dashboard = json.loads(DASHBOARD.read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\b(?:azora|process)_[a-z_]+", target["expr"])
    }
    assert queried
    assert queried <= defined, queried - defined
