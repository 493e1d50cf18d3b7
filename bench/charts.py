r"""Charts (PNG, matplotlib) from the JSON that `make bench` and `make soak` write.

    .venv/bin/python -m bench.charts build/bench/bench.json [build/bench/soak.json] \\
        --out-dir docs/benchmarks

From a bench file: ``throughput-vs-workers.png`` (scale-out), ``delivered-per-s.png`` (every
variant, log scale), ``latency-percentiles.png`` (submit and end-to-end p50/p99) and
``gateway-overhead.png``. From a soak file: ``soak-rss.png`` and ``soak-latency.png``.
Prints the paths it wrote.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bench_charts(data: dict[str, Any], out: Path, subtitle: str) -> list[Path]:
    """The charts of one `make bench` run."""
    written: list[Path] = []
    scale = (data.get("scale_out") or {}).get("rows") or []
    if scale:
        fig, ax = plt.subplots(figsize=(6, 4))
        workers = [r["workers"] for r in scale]
        rates = [r["delivered_per_s"] for r in scale]
        ax.plot(workers, rates, marker="o", label="delivered msg/s (until the last)")
        if all(r.get("delivered_99_per_s") is not None for r in scale):
            ax.plot(workers, [r["delivered_99_per_s"] for r in scale], marker="s",
                    label="delivered msg/s (until 99 %)")  # fmt: skip
        if rates and rates[0]:
            ax.plot(workers, [rates[0] * w for w in workers], "--", color="grey",
                    label="linear from 1 worker")  # fmt: skip
        ax.set_xlabel("worker processes (one database)")
        ax.set_ylabel("delivered msg/s")
        ax.set_xticks(workers)
        ax.set_ylim(bottom=0)
        ax.set_title(f"Scale-out with workers\n{subtitle}", fontsize=9)
        ax.legend()
        written.append(_save(fig, out / "throughput-vs-workers.png"))
    results = data.get("results") or []
    if results:
        fig, ax = plt.subplots(figsize=(8, 4))
        names = [r["name"] for r in results]
        ys = range(len(results))
        ax.barh([y - 0.2 for y in ys], [_num(r["delivered_per_s"]) for r in results], 0.4,
                label="until the last message")  # fmt: skip
        ax.barh([y + 0.2 for y in ys], [_num(r.get("delivered_99_per_s")) for r in results], 0.4,
                label="until 99 % of them")  # fmt: skip
        ax.set_yticks(list(ys))
        ax.set_yticklabels(names)
        ax.legend(fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("delivered msg/s (log scale)")
        ax.invert_yaxis()
        ax.set_title(f"End-to-end throughput\n{subtitle}", fontsize=9)
        written.append(_save(fig, out / "delivered-per-s.png"))

        fig, ax = plt.subplots(figsize=(8, 4.5))
        series = (
            ("submit p50", "submit_p50_ms"),
            ("submit p99", "submit_p99_ms"),
            ("e2e p50", "e2e_p50_ms"),
            ("e2e p99", "e2e_p99_ms"),
        )
        width = 0.2
        for i, (label, key) in enumerate(series):
            ax.bar(
                [x + (i - 1.5) * width for x in range(len(results))],
                [_num(r.get(key)) for r in results],
                width,
                label=label,
            )
        ax.set_xticks(range(len(results)))
        ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("milliseconds (log scale)")
        ax.set_title(f"Latency percentiles (missing bar = not measured)\n{subtitle}", fontsize=9)
        ax.legend(fontsize=8)
        written.append(_save(fig, out / "latency-percentiles.png"))
    gateway = data.get("gateway") or []
    if gateway:
        fig, ax = plt.subplots(figsize=(7, 4))
        labels = [f"{g['rpc']}\n{g['path']}" for g in gateway]
        xs = range(len(gateway))
        ax.bar([x - 0.2 for x in xs], [g["p50_ms"] for g in gateway], 0.4, label="p50")
        ax.bar([x + 0.2 for x in xs], [g["p99_ms"] for g in gateway], 0.4, label="p99")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel("milliseconds")
        ax.set_title(f"gRPC direct vs REST through the gateway\n{subtitle}", fontsize=9)
        ax.legend()
        written.append(_save(fig, out / "gateway-overhead.png"))
    return written


def soak_charts(data: dict[str, Any], out: Path, subtitle: str) -> list[Path]:
    """RSS of every process and latency percentiles over the soak."""
    written: list[Path] = []
    rss = data.get("rss_series") or []
    if rss:
        t0 = rss[0]["t"]
        names = sorted({n for s in rss for n in s["rss_kib"]})
        fig, ax = plt.subplots(figsize=(8, 4))
        for name in names:
            points = [(s["t"] - t0, s["rss_kib"][name] / 1024) for s in rss if name in s["rss_kib"]]
            ax.plot([p[0] for p in points], [p[1] for p in points], label=name)
        ax.set_xlabel("seconds")
        ax.set_ylabel("RSS MiB")
        ax.set_title(f"Soak: memory of every process\n{subtitle}", fontsize=9)
        ax.legend(fontsize=8)
        written.append(_save(fig, out / "soak-rss.png"))
    windows = data.get("latency_windows") or []
    if windows:
        fig, ax = plt.subplots(figsize=(8, 4))
        xs = [w["t"] for w in windows]
        ax.plot(xs, [_num(w["p50_ms"]) for w in windows], marker=".", label="p50")
        ax.plot(xs, [_num(w["p99_ms"]) for w in windows], marker=".", label="p99")
        ax.set_xlabel("seconds")
        ax.set_ylabel("submit latency ms")
        ax.set_ylim(bottom=0)
        ax.set_title(f"Soak: submit latency per window\n{subtitle}", fontsize=9)
        ax.legend()
        written.append(_save(fig, out / "soak-latency.png"))
    return written


def charts(path: Path, out: Path) -> list[Path]:
    """Every chart one JSON file supports."""
    data = json.loads(path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    subtitle = f"{data.get('started', '')} commit {data.get('git_commit', '?')}"
    if data.get("kind") == "soak":
        return soak_charts(data, out, subtitle)
    return bench_charts(data, out, subtitle)


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", type=Path)
    parser.add_argument("--out-dir", type=Path, default=Path("build/bench/charts"))
    args = parser.parse_args()
    for path in args.json:
        for written in charts(path, args.out_dir):
            print(written)


if __name__ == "__main__":
    main()
