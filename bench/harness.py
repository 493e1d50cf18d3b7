"""Pure pieces shared by the benchmarks, the soak and the drills (no processes started here).

* `percentile`: nearest-rank percentiles of latency samples;
* `check_exactly_once`: which expected Message-IDs arrived once, never, or more than once;
* `ProcStats` / `ProcSampler`: CPU seconds and RSS of processes (and their children) from
  ``/proc/<pid>/stat`` and ``/proc/<pid>/status``, and optionally of the load generator (this
  process and the load tools it ran to completion);
* `Result` (one run of a variant), `Row` (a variant's runs: medians with min-max), `ratios`,
  `render_table`, `render_cpu_table`: the printed tables;
* `write_json`: every run's output file.
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
LOAD_GENERATOR = "load generator"


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

    def __init__(
        self, pids: Mapping[str, int], interval: float = 0.5, *, load_generator: bool = False
    ) -> None:
        """Sample `pids` (name -> pid) every `interval` s.

        With `load_generator`, `cpu_seconds` also has a ``load generator`` entry: the CPU of
        this process (its in-process clients, the sink-log reader) minus this sampler's own
        thread, plus the children it reaped meanwhile (ghz, smtp-source: run to completion
        inside the block). Nothing else may be reaped inside the block.
        """
        self.pids = dict(pids)
        self.interval = interval
        self.first: dict[str, ProcSample] = {}
        self.last: dict[str, ProcSample] = {}
        self.peak_rss: dict[str, int] = {}
        self.series: list[tuple[float, dict[str, int]]] = []
        self.load_generator = load_generator
        self._own_start = 0.0
        self._own_cpu = math.nan
        self._thread_cpu = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProcSampler:
        self._sample()
        self.first = dict(self.last)
        self._own_start = own_cpu_seconds()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._own_cpu = own_cpu_seconds() - self._own_start - self._thread_cpu
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()
        self._thread_cpu = time.thread_time()

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
        """CPU seconds per name between the first and last sample (+ the load generator)."""
        found = {
            name: round(self.last[name].cpu - self.first[name].cpu, 3)
            for name in self.first
            if name in self.last
        }
        if self.load_generator and not math.isnan(self._own_cpu):
            found[LOAD_GENERATOR] = round(max(self._own_cpu, 0.0), 3)
        return found


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of the children it has reaped (getrusage)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


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
    # Webhook rows: the lag from event to receipt per stage and per quarter of the run.
    webhook_lag: dict[str, Any] = field(default_factory=dict)
    # 1-minute load average when the run started and ended (how busy the machine was).
    load_start: float = math.nan
    load_end: float = math.nan

    @property
    def cpu_per_1000(self) -> float:
        """CPU seconds of every measured process per 1,000 messages."""
        if not self.messages:
            return math.nan
        return sum(self.cpu_s.values()) * 1000.0 / self.messages

    @property
    def cpu_ms_per_message(self) -> dict[str, float]:
        """CPU milliseconds per message of each measured process (and the load generator)."""
        if not self.messages:
            return {}
        return {name: s * 1000.0 / self.messages for name, s in self.cpu_s.items()}

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (nan becomes null)."""
        data = asdict(self)
        data["cpu_s_per_1000"] = self.cpu_per_1000
        data["cpu_ms_per_message"] = {k: round(v, 3) for k, v in self.cpu_ms_per_message.items()}
        return {k: _clean(v) for k, v in data.items()}


@dataclass
class Row:
    """One variant run several times: the tables show medians with min-max over its runs."""

    name: str
    runs: list[Result] = field(default_factory=list)

    def values(self, metric: str) -> list[float]:
        """`metric` (a Result attribute or property) of every run, nan left out."""
        found = [float(getattr(r, metric)) for r in self.runs]
        return [v for v in found if not math.isnan(v)]

    def median(self, metric: str) -> float:
        """Median of `metric` over the runs (nan without values)."""
        values = self.values(metric)
        return statistics.median(values) if values else math.nan

    def spread(self, metric: str) -> str:
        """``median (min-max)`` of `metric`, or the one value for a single run."""
        return _spread(self.values(metric))

    @property
    def counted(self) -> bool:
        """Every run delivered every message exactly once."""
        return bool(self.runs) and all(r.exactly_once for r in self.runs)

    def cpu_ms(self) -> dict[str, list[float]]:
        """CPU-ms per message of each process, one value per run that measured it."""
        found: dict[str, list[float]] = {}
        for run in self.runs:
            for name, value in run.cpu_ms_per_message.items():
                found.setdefault(name, []).append(value)
        return found

    def loads(self) -> str:
        """The 1-minute load average at the start and end of each run."""
        return " ".join(f"{_fmt(r.load_start, 2)}>{_fmt(r.load_end, 2)}" for r in self.runs)

    def summary(self) -> Result:
        """A Result holding the medians (what the charts draw)."""
        first = self.runs[0]
        cpu = {
            name: statistics.median(v) * first.messages / 1000 for name, v in self.cpu_ms().items()
        }
        return Result(
            self.name,
            first.messages,
            self.median("accepted_per_s"),
            self.median("delivered_per_s"),
            submit_p50_ms=self.median("submit_p50_ms"),
            submit_p99_ms=self.median("submit_p99_ms"),
            delivered_99_per_s=self.median("delivered_99_per_s"),
            e2e_p50_ms=self.median("e2e_p50_ms"),
            e2e_p99_ms=self.median("e2e_p99_ms"),
            cpu_s=cpu,
            peak_rss_kib={
                k: max(r.peak_rss_kib.get(k, 0) for r in self.runs) for k in first.peak_rss_kib
            },
            exactly_once=self.counted,
            delivery="; ".join(r.delivery for r in self.runs),
            notes=f"median of {len(self.runs)} run(s)",
            load_start=self.runs[0].load_start,
            load_end=self.runs[-1].load_end,
        )

    def to_json(self) -> dict[str, Any]:
        """Every run, and the medians with min and max of the main figures."""
        figures = {}
        for metric in ("delivered_per_s", "delivered_99_per_s", "accepted_per_s", "cpu_per_1000"):
            values = self.values(metric)
            figures[metric] = {
                "median": _clean(statistics.median(values)) if values else None,
                "min": _clean(min(values)) if values else None,
                "max": _clean(max(values)) if values else None,
            }
        return {
            "name": self.name,
            "runs": [r.to_json() for r in self.runs],
            "exactly_once": self.counted,
            "figures": figures,
            "cpu_ms_per_message": {
                name: {
                    "median": round(statistics.median(v), 3),
                    "min": round(min(v), 3),
                    "max": round(max(v), 3),
                }
                for name, v in self.cpu_ms().items()
            },
            "load_average": [[r.load_start, r.load_end] for r in self.runs],
        }


def _spread(values: Sequence[float], digits: int = 1) -> str:
    if not values:
        return "-"
    middle = _fmt(statistics.median(values), digits)
    if len(values) == 1:
        return middle
    return f"{middle} ({_fmt(min(values), digits)}-{_fmt(max(values), digits)})"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, float):
        return round(value, 3)
    return value


def ratios(ours: Row, references: Sequence[Row]) -> dict[str, float]:
    """Our median delivered msg/s over each reference's (only references whose runs counted)."""
    found = {}
    for ref in references:
        theirs = ref.median("delivered_per_s")
        if ref.counted and theirs > 0:
            found[ref.name] = ours.median("delivered_per_s") / theirs
    return found


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def render_table(rows: Sequence[Row], references: Sequence[Row]) -> str:
    """The main table: medians (min-max) of each variant's runs, ratios to each reference."""
    header = (
        "variant",
        "runs",
        "deliv/s",
        *(f"x {ref.name}" for ref in references),
        "deliv/s 99%",
        "accept/s",
        "submit p50/p99 ms",
        "e2e p50/p99 ms",
        "CPU-ms/msg",
        "load avg start>end",
        "exactly once",
    )
    lines_: list[tuple[str, ...]] = [header]
    for row in rows:
        found = ratios(row, references)
        lines_.append(
            (
                row.name,
                str(len(row.runs)),
                row.spread("delivered_per_s"),
                *(
                    f"{found[ref.name]:.2f}x" if ref.name in found and ref is not row else "-"
                    for ref in references
                ),
                row.spread("delivered_99_per_s"),
                row.spread("accepted_per_s"),
                f"{_fmt(row.median('submit_p50_ms'))} / {_fmt(row.median('submit_p99_ms'))}",
                f"{_fmt(row.median('e2e_p50_ms'), 0)} / {_fmt(row.median('e2e_p99_ms'), 0)}",
                # CPU seconds per 1,000 messages are CPU milliseconds per message.
                _spread(row.values("cpu_per_1000"), 2),
                row.loads(),
                "yes" if row.counted else "NO",
            )
        )
    widths = [max(len(line[i]) for line in lines_) for i in range(len(header))]
    out = [" | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines_]
    out.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(out)


def render_cpu_table(rows: Sequence[Row]) -> str:
    """CPU-ms per message of each process, per variant: median (min-max) of the runs."""
    out = ["CPU-ms per message, per process (median (min-max) of the runs):"]
    for row in rows:
        parts = [f"{name} {_spread(v, 2)}" for name, v in sorted(row.cpu_ms().items())]
        out.append(f"  {row.name}: " + ("; ".join(parts) or "-"))
    return "\n".join(out)


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
