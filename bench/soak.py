"""`make soak`: steady submission at half the measured maximum, memory and latency over time.

The suite (bench/suite.py, in-process workers) takes SendEmail over gRPC at a fixed rate for
SOAK_SECONDS (default 1,800 = 30 minutes) with at most 16 requests in flight. The rate is
SOAK_RATE, or half of the maximum measured at the start (a short burst: the lower of accepted/s
and delivered/s until 95 % of the burst arrived, because a rate above what delivery sustains
only grows the queue). Every process's RSS is sampled every SOAK_SAMPLE_SECONDS; submit
latency is summarised per window.

Prints PASS/FAIL for: flat memory (per process, growth after warm-up within 32 MiB or 25 %),
stable latency (p99 of the last quarter within 2x the first quarter + 50 ms), every email
delivered exactly once, and no client errors. Writes JSON for bench/charts.py.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.harness import (
    ProcSampler,
    check_exactly_once,
    latency_verdict,
    latency_windows,
    machine,
    memory_verdict,
    rate_until,
    read_sink_log,
    write_json,
)
from bench.load import grpc_send
from bench.run import git_commit, wait_finished
from bench.suite import REPO, Suite


async def calibrate(suite: Suite, burst: int) -> tuple[float, float]:
    """Accepted/s and delivered/s of a burst of `burst` emails.

    Delivered/s is measured until 95 % of the burst arrived: an email that waits out a whole
    lease (docs/benchmarks.md, problems found) would otherwise set the maximum alone.
    """
    _, offset = read_sink_log(suite.sink_log)
    started = time.time()
    load = await grpc_send(suite.ports["mail"], burst, 16, "calibrate")
    deadline = time.monotonic() + 600
    arrivals: list[tuple[float, str, str, bool]] = []
    while len(arrivals) < 0.95 * load.ok and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        arrivals, _ = read_sink_log(suite.sink_log, offset)
    # The stragglers must be out of the way before the soak's own accounting starts.
    await wait_finished(suite, "calibrate", load.ok, 600)
    return load.per_s, rate_until([t for t, *_ in arrivals], started, 0.95)


async def soak(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """Run the soak and return its JSON record."""
    suite = Suite(run_dir / "suite")
    try:
        await asyncio.to_thread(suite.start)
        await suite.setup_domain()
        rate = args.rate
        calibration = None
        if not rate:
            accepted, delivered = await calibrate(suite, args.burst)
            rate = min(accepted, delivered) / 2
            calibration = {"accepted_per_s": accepted, "delivered_per_s": delivered}
            print(f"maximum: accepted {accepted:.1f}/s, delivered {delivered:.1f}/s -> "
                  f"soak at {rate:.1f}/s", file=sys.stderr)  # fmt: skip
        _, offset = read_sink_log(suite.sink_log)
        started = time.time()
        with ProcSampler(suite.pids(), interval=args.sample) as sampler:
            load = await grpc_send(
                suite.ports["mail"], 10**9, 16, "soak", rate=rate, until=started + args.seconds
            )
            emails = await wait_finished(suite, "soak", load.ok, args.drain)
        arrivals, _ = read_sink_log(suite.sink_log, offset)
    finally:
        await asyncio.to_thread(suite.stop)
    windows = latency_windows(load.samples, started, args.window)
    mem_ok, mem_report = memory_verdict(sampler.series)
    lat_ok, lat_report = latency_verdict(windows)
    delivery = check_exactly_once(
        [str(e["message_id"]) for e in emails],
        [mid for _, mid, _, _ in arrivals],
    )
    delivered_ok = delivery.exactly_once and len(emails) == load.ok
    errors_ok = not load.errors
    verdict = mem_ok and lat_ok and delivered_ok and errors_ok
    print(f"soak: {args.seconds:.0f} s at {rate:.1f} emails/s, {load.ok} accepted, "
          f"errors {dict(load.errors) or 'none'}")  # fmt: skip
    print(f"  {'PASS' if mem_ok else 'FAIL'} flat memory:")
    for name, line in mem_report.items():
        print(f"      {name}: {line}")
    print(f"  {'PASS' if lat_ok else 'FAIL'} stable latency: {lat_report}")
    print(f"  {'PASS' if delivered_ok else 'FAIL'} delivered exactly once: {delivery.summary()}")
    print(f"  {'PASS' if errors_ok else 'FAIL'} no client errors")
    print(f"{'PASS' if verdict else 'FAIL'}  soak")
    return {
        "kind": "soak",
        "pass": verdict,
        "rate_per_s": rate,
        "calibration": calibration,
        "accepted": load.ok,
        "errors": dict(load.errors),
        "memory": mem_report,
        "latency": lat_report,
        "delivery": delivery.summary(),
        "latency_windows": windows,
        "rss_series": [{"t": t, "rss_kib": rss} for t, rss in sampler.series],
        "cpu_s": sampler.cpu_seconds(),
    }


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS") or 1800)
    )
    parser.add_argument("--rate", type=float, default=float(os.environ.get("SOAK_RATE") or 0))
    parser.add_argument("--burst", type=int, default=100, help="emails of the calibration burst")
    parser.add_argument(
        "--sample", type=float, default=float(os.environ.get("SOAK_SAMPLE_SECONDS") or 5)
    )
    parser.add_argument("--window", type=float, default=0.0, help="latency window (s)")
    parser.add_argument("--drain", type=float, default=600, help="seconds to wait for delivery")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    args.window = args.window or max(10.0, args.seconds / 30)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out) if args.out else REPO / "build" / "bench" / f"soak-{stamp}.json"
    record = asyncio.run(soak(args, REPO / "build" / "bench" / f"soak-run-{stamp}"))
    record.update(
        started=stamp,
        git_commit=git_commit(),
        machine=machine(),
        params={k: v for k, v in vars(args).items() if k != "out"},
    )
    print(f"JSON: {write_json(out, record)}")
    sys.exit(0 if record["pass"] else 1)


if __name__ == "__main__":
    main()
