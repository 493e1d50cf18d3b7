"""Pure pieces shared by the benchmarks, the soak and the drills (no processes started here).

* `percentile`: nearest-rank percentiles of latency samples;
* `check_exactly_once`: which expected Message-IDs arrived once, never, or more than once;
* `ProcStats` / `ProcSampler`: CPU seconds and RSS of processes (and their children) from
  ``/proc/<pid>/stat`` and ``/proc/<pid>/status``;
* `Result`, `ratios`, `render_table`: one row per variant and the printed table;
* `write_json`: every run's output file.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def percentile(samples: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of `samples` (nan when there are none)."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(frozen=True)
class Delivery:
    """Outcome of the exactly-once check of one run."""

    expected: int
    arrived: int
    missing: list[str]
    duplicates: dict[str, int]
    unexpected: list[str]

    @property
    def exactly_once(self) -> bool:
        """Every expected message arrived exactly once and nothing else arrived."""
        return not (self.missing or self.duplicates or self.unexpected)

    def summary(self) -> str:
        """One line for the report."""
        return (
            f"expected {self.expected}, arrived {self.arrived}, missing {len(self.missing)}, "
            f"duplicated {len(self.duplicates)} (extra copies "
            f"{sum(n - 1 for n in self.duplicates.values())}), unexpected {len(self.unexpected)}"
        )


def check_exactly_once(expected: Iterable[str], arrived: Iterable[str]) -> Delivery:
    """Compare the Message-IDs a run expects with those the sink logged (in any order).

    An empty or repeated expected Message-ID is itself a failure (reported as missing/duplicate):
    without unique IDs nothing can be proved.
    """
    wanted = Counter(expected)
    got = Counter(arrived)
    missing = sorted(m for m in wanted if got[m] < 1 or not m)
    duplicates = {m: n for m, n in got.items() if n > 1 and m in wanted}
    duplicates.update({m: n for m, n in wanted.items() if n > 1})
    unexpected = sorted(m for m in got if m not in wanted)
    return Delivery(sum(wanted.values()), sum(got.values()), missing, duplicates, unexpected)


def read_sink_log(path: Path, offset: int = 0) -> tuple[list[tuple[float, str, str, bool]], int]:
    """Sink log lines after byte `offset`: (arrival, Message-ID, rcpt, signed), new offset."""
    rows = []
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1  # a half-written last line is read next time
    for line in data[:end].decode(errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            signed = len(parts) > 3 and parts[3] == "1"
            # Stored Message-IDs have no angle brackets; the header has them.
            rows.append((float(parts[0]), parts[1].strip("<>"), parts[2], signed))
    return rows, offset + end


# --------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class ProcSample:
    """CPU seconds (self + reaped children + live descendants) and RSS of a process tree."""

    cpu: float
    rss_kib: int


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text().split()
            found.extend(int(c) for c in text)
    except OSError:
        pass
    return found


def _stat_cpu(pid: int, *, reaped: bool) -> float:
    """utime+stime (+cutime+cstime when `reaped`) of one process in seconds."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    # fields[0] is state (field 3 of proc(5)); utime is field 14, stime 15, cutime 16, cstime 17.
    ticks = int(fields[11]) + int(fields[12])
    if reaped:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLOCK_TICKS


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def sample_tree(pid: int) -> ProcSample | None:
    """CPU and RSS of `pid` and all its live descendants (None when `pid` is gone).

    CPU includes children already reaped (cutime/cstime), so a difference of two samples
    counts short-lived children (Postfix's smtpd/cleanup/smtp) too: a child alive at the first
    sample and reaped before the second moves from "live" to "reaped" without being counted
    twice.
    """
    try:
        cpu = _stat_cpu(pid, reaped=True)
        rss = _rss_kib(pid)
    except (OSError, ValueError):
        return None
    stack = _children(pid)
    while stack:
        child = stack.pop()
        try:
            cpu += _stat_cpu(child, reaped=True)
            rss += _rss_kib(child)
        except (OSError, ValueError):
            continue
        stack.extend(_children(child))
    return ProcSample(cpu, rss)


class ProcSampler:
    """Samples named process trees every `interval` seconds in a thread while a phase runs.

    Gives CPU seconds used during the phase and the peak RSS seen per name, and keeps the
    time series (for the soak).
    """

    def __init__(self, pids: Mapping[str, int], interval: float = 0.5) -> None:
        self.pids = dict(pids)
        self.interval = interval
        self.first: dict[str, ProcSample] = {}
        self.last: dict[str, ProcSample] = {}
        self.peak_rss: dict[str, int] = {}
        self.series: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProcSampler:
        self._sample()
        self.first = dict(self.last)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        rss_now: dict[str, int] = {}
        for name, pid in self.pids.items():
            sample = sample_tree(pid)
            if sample is None:
                continue
            self.last[name] = sample
            rss_now[name] = sample.rss_kib
            self.peak_rss[name] = max(self.peak_rss.get(name, 0), sample.rss_kib)
        self.series.append((time.time(), rss_now))

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds per name between the first and last sample."""
        return {
            name: round(self.last[name].cpu - self.first[name].cpu, 3)
            for name in self.first
            if name in self.last
        }


# --------------------------------------------------------------------------- results


@dataclass
class Result:
    """One variant of a run: what the table prints and the JSON keeps."""

    name: str
    messages: int
    accepted_per_s: float
    delivered_per_s: float
    submit_p50_ms: float = math.nan
    submit_p99_ms: float = math.nan
    # Messages per second until 99 % of them had arrived: a straggler that waits out a lease
    # sets the strict figure above alone, this one shows the rate of the bulk.
    delivered_99_per_s: float = math.nan
    e2e_p50_ms: float = math.nan
    e2e_p99_ms: float = math.nan
    cpu_s: dict[str, float] = field(default_factory=dict)
    peak_rss_kib: dict[str, int] = field(default_factory=dict)
    exactly_once: bool = False
    delivery: str = ""
    errors: dict[str, int] = field(default_factory=dict)
    notes: str = ""
    # The slowest deliveries with their timelines (diagnosis of outliers).
    slowest: list[dict[str, Any]] = field(default_factory=list)

    @property
    def cpu_per_1000(self) -> float:
        """CPU seconds of every measured process per 1,000 messages."""
        if not self.messages:
            return math.nan
        return sum(self.cpu_s.values()) * 1000.0 / self.messages

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (nan becomes null)."""
        data = asdict(self)
        data["cpu_s_per_1000"] = self.cpu_per_1000
        return {k: _clean(v) for k, v in data.items()}


def _clean(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, float):
        return round(value, 3)
    return value


def ratios(ours: Result, references: Sequence[Result]) -> dict[str, float]:
    """Our delivered msg/s divided by each reference's (only references that counted)."""
    return {
        ref.name: ours.delivered_per_s / ref.delivered_per_s
        for ref in references
        if ref.exactly_once and ref.delivered_per_s > 0
    }


def _fmt(value: float, digits: int = 1) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def render_table(
    results: Sequence[Result], references: Sequence[Result], ours: Sequence[Result] = ()
) -> str:
    """The printed table: one row per result, then `ours` relative to every reference."""
    header = (
        "variant",
        "msgs",
        "deliv/s",
        "deliv/s 99%",
        "accept/s",
        "submit p50/p99 ms",
        "e2e p50/p99 ms",
        "CPU s/1k",
        "peak RSS MiB (per process)",
        "exactly once",
    )
    rows = [header]
    for r in results:
        rss = ", ".join(f"{k} {v / 1024:.0f}" for k, v in sorted(r.peak_rss_kib.items()))
        rows.append(
            (
                r.name,
                str(r.messages),
                _fmt(r.delivered_per_s),
                _fmt(r.delivered_99_per_s),
                _fmt(r.accepted_per_s),
                f"{_fmt(r.submit_p50_ms)} / {_fmt(r.submit_p99_ms)}",
                f"{_fmt(r.e2e_p50_ms, 0)} / {_fmt(r.e2e_p99_ms, 0)}",
                _fmt(r.cpu_per_1000, 2),
                rss or "-",
                "yes" if r.exactly_once else "NO",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    if references and ours:
        lines.append("")
        lines.append("delivered msg/s relative to each Postfix variant (same run):")
        for r in ours:
            parts = [f"{name}: {value:.3f}x" for name, value in ratios(r, references).items()]
            lines.append(f"  {r.name}: " + (", ".join(parts) or "no reference counted"))
    return "\n".join(lines)


def rate_until(arrivals: Sequence[float], started: float, fraction: float) -> float:
    """Messages per second from `started` until `fraction` of `arrivals` (times) had arrived."""
    if not arrivals:
        return math.nan
    ordered = sorted(arrivals)
    count = max(1, math.ceil(fraction * len(ordered)))
    return count / max(ordered[count - 1] - started, 1e-9)


def write_json(path: Path, payload: Mapping[str, Any]) -> Path:
    """Write a run's JSON output (creating directories); return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def machine() -> dict[str, Any]:
    """What docs/benchmarks.md describes: CPUs, model, memory, kernel."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kib = 0
    uname = os.uname()
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": f"{uname.sysname} {uname.release}",
    }


# --------------------------------------------------------------------------- soak verdicts


def latency_windows(
    samples: Sequence[tuple[float, float]], start: float, window_s: float
) -> list[dict[str, float]]:
    """Per-window p50/p99 (ms) and count of (end time, latency s) samples since `start`."""
    buckets: dict[int, list[float]] = {}
    for t, latency in samples:
        buckets.setdefault(int((t - start) // window_s), []).append(latency)
    return [
        {
            "t": round((i + 1) * window_s, 1),
            "count": len(values),
            "p50_ms": round(percentile(values, 50) * 1000, 2),
            "p99_ms": round(percentile(values, 99) * 1000, 2),
        }
        for i, values in sorted(buckets.items())
    ]


def memory_verdict(
    series: Sequence[tuple[float, Mapping[str, int]]],
    *,
    max_growth_mib: float = 32.0,
    max_growth_fraction: float = 0.25,
) -> tuple[bool, dict[str, str]]:
    """Flat memory: per process, the peak of the last fifth vs the median of the second fifth.

    The first fifth is warm-up (caches, pools, lazily imported modules). A process passes when
    its growth is within `max_growth_mib` or within `max_growth_fraction` of its baseline.
    """
    names = sorted({name for _, rss in series for name in rss})
    fifth = max(1, len(series) // 5)
    ok = True
    report = {}
    for name in names:
        early = sorted(rss[name] for _, rss in series[fifth : 2 * fifth] if name in rss)
        late = [rss[name] for _, rss in series[-fifth:] if name in rss]
        if not early or not late:
            report[name] = "not enough samples"
            continue
        base = early[len(early) // 2]
        growth = max(late) - base
        passed = growth <= max_growth_mib * 1024 or growth <= max_growth_fraction * base
        ok = ok and passed
        report[name] = (
            f"{base / 1024:.0f} -> {max(late) / 1024:.0f} MiB "
            f"({growth / 1024:+.1f} MiB) {'ok' if passed else 'GROWS'}"
        )
    return ok, report


def latency_verdict(
    windows: Sequence[Mapping[str, float]], *, factor: float = 2.0, slack_ms: float = 50.0
) -> tuple[bool, str]:
    """Stable latency: p99 of the last quarter of windows within factor x first quarter + slack."""
    if len(windows) < 4:
        return False, f"only {len(windows)} latency windows (run longer)"
    quarter = max(1, len(windows) // 4)
    first = max(w["p99_ms"] for w in windows[:quarter])
    last = max(w["p99_ms"] for w in windows[-quarter:])
    ok = last <= first * factor + slack_ms
    return ok, f"p99 first quarter {first:.0f} ms, last quarter {last:.0f} ms"
