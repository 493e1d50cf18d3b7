"""The benchmark harness's own logic: exactly-once proof, table, verdicts, sink, charts.

Benchmarks have no timing assertions; these tests only check that the harness computes and
reports correctly, fast and without Postfix or the suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from bench.charts import charts
from bench.harness import (
    LOAD_GENERATOR,
    ProcSampler,
    Result,
    Row,
    check_exactly_once,
    latency_verdict,
    latency_windows,
    memory_verdict,
    percentile,
    rate_until,
    ratios,
    read_sink_log,
    render_cpu_table,
    render_table,
    sample_tree,
)
from bench.load import LoadResult
from bench.run import measure, top_frames
from bench.sink import Sink


def test_exactly_once_accepts_any_order() -> None:
    # Every expected Message-ID once, in another order: the run counts.
    delivery = check_exactly_once(["a", "b", "c"], ["c", "a", "b"])
    assert delivery.exactly_once
    assert delivery.summary().startswith("expected 3, arrived 3, missing 0")


def test_exactly_once_reports_missing_duplicates_and_strangers() -> None:
    # A lost message, a duplicate and one nobody sent are each reported and fail the run.
    delivery = check_exactly_once(["a", "b", "c"], ["a", "a", "c", "x"])
    assert not delivery.exactly_once
    assert delivery.missing == ["b"]
    assert delivery.duplicates == {"a": 2}
    assert delivery.unexpected == ["x"]


def test_exactly_once_refuses_unprovable_ids() -> None:
    # Empty or repeated expected IDs cannot prove anything: never a pass.
    assert not check_exactly_once(["", "a"], ["", "a"]).exactly_once
    assert not check_exactly_once(["a", "a"], ["a", "a"]).exactly_once


def test_percentile_nearest_rank() -> None:
    # Nearest rank, order-insensitive; nan without samples.
    samples = [float(n) for n in range(100, 0, -1)]
    assert percentile(samples, 50) == 50.0
    assert percentile(samples, 99) == 99.0
    assert percentile(samples, 100) == 100.0
    assert math.isnan(percentile([], 50))


def test_rate_until_ignores_stragglers() -> None:
    # 99 messages in 9.9 s and one straggler at 120 s: the 99 % rate is the bulk's rate.
    arrivals = [100.0 + 0.1 * (i + 1) for i in range(99)] + [220.0]
    assert rate_until(arrivals, 100.0, 0.99) == pytest.approx(10.0)
    assert rate_until(arrivals, 100.0, 1.0) == pytest.approx(100 / 120)
    assert math.isnan(rate_until([], 0.0, 0.99))


def _result(
    name: str,
    delivered: float,
    *,
    counted: bool = True,
    cpu: dict[str, float] | None = None,
    load: tuple[float, float] = (0.5, 0.75),
) -> Result:
    return Result(
        name,
        1000,
        delivered * 2,
        delivered,
        submit_p50_ms=1.0,
        submit_p99_ms=2.0,
        cpu_s=cpu if cpu is not None else {"a": 1.5, "b": 0.5},
        peak_rss_kib={"a": 2048},
        exactly_once=counted,
        load_start=load[0],
        load_end=load[1],
    )


def _row(name: str, *delivered: float, counted: bool = True) -> Row:
    return Row(name, [_result(name, d, counted=counted) for d in delivered])


def test_ratios_use_medians_and_only_references_whose_runs_all_counted() -> None:
    # A Postfix row with one run that lost mail is no yardstick; medians, not means.
    ours = _row("ours", 40, 50, 300)
    refs = [
        _row("Postfix relay", 100, 200, 210),
        Row("Postfix + DKIM", [_result("Postfix + DKIM", 100), _result("x", 90, counted=False)]),
    ]
    assert ratios(ours, refs) == {"Postfix relay": 0.25}


def test_table_shows_medians_with_min_max_ratio_columns_load_and_verdict() -> None:
    # One line per variant: runs, median (min-max) delivered/s, a ratio column per reference,
    # CPU-ms per message, the load average at start and end of each run, exactly once.
    dkim = _row("Postfix relay + OpenDKIM", 100, 120, 110)
    relay = _row("Postfix relay", 400, 410, 390)
    ours = Row(
        "ours: gRPC",
        [_result("ours: gRPC", d, load=(1.0 + i, 2.0 + i)) for i, d in enumerate((150, 165, 170))],
    )
    lost = _row("ours: REST", 50, counted=False)
    table = render_table([relay, dkim, ours, lost], [dkim, relay])
    lines = table.splitlines()
    header = [cell.strip() for cell in lines[0].split("|")]
    assert header[:5] == [
        "variant",
        "runs",
        "deliv/s",
        "x Postfix relay + OpenDKIM",
        "x Postfix relay",
    ]
    row = next(line for line in lines if line.startswith("ours: gRPC"))
    cells = [cell.strip() for cell in row.split("|")]
    assert cells[1] == "3"
    assert cells[2] == "165.0 (150.0-170.0)"
    assert cells[3:5] == ["1.50x", "0.41x"]  # 165/110 and 165/400
    assert "2.00 (2.00-2.00)" in cells  # (1.5 + 0.5) CPU s for 1,000 messages = 2 ms each
    assert "1.00>2.00 2.00>3.00 3.00>4.00" in cells
    assert cells[-1] == "yes"
    rest = next(line for line in lines if line.startswith("ours: REST"))
    assert rest.rstrip().endswith("NO")


def test_cpu_per_message_per_process_table_and_json() -> None:
    # Each process's CPU-ms per message, median (min-max) over the runs, the load generator
    # included; the JSON keeps every run and the medians.
    row = Row(
        "ours: gRPC",
        [
            _result("ours: gRPC", 100, cpu={"ferretdb": 4.0, "mail": 3.0, "load generator": 0.5}),
            _result("ours: gRPC", 100, cpu={"ferretdb": 5.0, "mail": 2.0, "load generator": 0.7}),
            _result("ours: gRPC", 100, cpu={"ferretdb": 4.5, "mail": 2.5, "load generator": 0.6}),
        ],
    )
    text = render_cpu_table([row])
    assert "ferretdb 4.50 (4.00-5.00)" in text
    assert "mail 2.50 (2.00-3.00)" in text
    assert "load generator 0.60 (0.50-0.70)" in text
    data = row.to_json()
    assert len(data["runs"]) == 3
    assert data["cpu_ms_per_message"]["ferretdb"] == {"median": 4.5, "min": 4.0, "max": 5.0}
    assert data["figures"]["delivered_per_s"] == {"median": 100.0, "min": 100.0, "max": 100.0}
    assert data["load_average"] == [[0.5, 0.75]] * 3
    summary = row.summary()
    assert summary.cpu_ms_per_message["mail"] == pytest.approx(2.5)


def test_load_generator_cpu_counts_this_process_and_reaped_children() -> None:
    # The load generator's CPU includes a child run to completion inside the block (as ghz
    # and smtp-source are), measured from the child's own resource usage.
    with ProcSampler({}, load_generator=True) as sampler:
        child = subprocess.Popen([sys.executable, "-c", "sum(i * i for i in range(3_000_000))"])
        _, _, usage = os.wait4(child.pid, 0)
        child.returncode = 0  # reaped by wait4
    spent = usage.ru_utime + usage.ru_stime
    assert spent > 0
    assert sampler.cpu_seconds()[LOAD_GENERATOR] >= spent - 0.01  # rounding to ms
    # Without the option there is no such entry (the soak and drills do not ask for it).
    with ProcSampler({}) as plain:
        pass
    assert LOAD_GENERATOR not in plain.cpu_seconds()


class _FakeSuite:
    """What `bench.run.measure` uses of the suite: pids, the sink log, the stored emails."""

    def __init__(self, sink_log: Path) -> None:
        self.sink_log = sink_log
        self.database_reads: list[int] = []  # sink lines present at each database read

    def pids(self) -> dict[str, int]:
        return {"me": os.getpid()}

    def emails(self, tag: str) -> list[dict[str, Any]]:
        self.database_reads.append(len(read_sink_log(self.sink_log)[0]))
        created = datetime.now(UTC).replace(tzinfo=None)
        return [
            {"message_id": f"m{i}@bench.example", "status": "sent", "created_at": created}
            for i in range(3)
        ]


async def test_a_run_waits_on_the_sink_and_reads_the_database_once_afterwards(
    tmp_path: Path,
) -> None:
    # Messages trickle into the sink after the submissions returned; the run ends when the
    # sink has all of them and reads the database once, then, never while it waits.
    log = tmp_path / "sink.log"
    log.touch()
    suite = _FakeSuite(log)
    tasks: list[asyncio.Task[None]] = []

    async def submit() -> LoadResult:
        async def trickle() -> None:
            for i in range(3):
                await asyncio.sleep(0.3)
                with log.open("a") as f:
                    f.write(f"{time.time():.6f}\t<m{i}@bench.example>\tr{i}@sink.example\t1\n")

        tasks.append(asyncio.get_running_loop().create_task(trickle()))
        return LoadResult(requests=3, ok=3, elapsed_s=0.01, latencies_s=[0.01] * 3)

    args = argparse.Namespace(timeout=30.0)
    result = await measure(suite, args, "ours: fake", "tag", submit)  # type: ignore[arg-type]
    await asyncio.gather(*tasks)
    assert suite.database_reads == [3]
    assert result.exactly_once, result.delivery
    assert not math.isnan(result.load_start)
    assert LOAD_GENERATOR in result.cpu_s


def test_sink_log_reader_strips_brackets_and_waits_for_whole_lines(tmp_path: Path) -> None:
    # A line still being written is left for the next read.
    log = tmp_path / "sink.log"
    log.write_text("1.5\t<a@x>\tr@y\t1\n2.5\t<b@x>\tr@y\t0\n3.5\t<c@")
    rows, offset = read_sink_log(log)
    assert rows == [(1.5, "a@x", "r@y", True), (2.5, "b@x", "r@y", False)]
    with log.open("a") as f:
        f.write("x>\tr@y\t0\n")
    more, _ = read_sink_log(log, offset)
    assert more == [(3.5, "c@x", "r@y", False)]


def test_process_sample_of_this_process() -> None:
    # CPU and RSS come from /proc for a live process; a gone process gives None.
    sample = sample_tree(os.getpid())
    assert sample is not None
    assert sample.cpu > 0
    assert sample.rss_kib > 0
    assert sample_tree(2**22 + 1) is None


def test_memory_verdict_flat_and_growing() -> None:
    # Warm-up growth is ignored; steady growth past the bound fails.
    flat = [(float(t), {"svc": 100_000 + (20_000 if t < 4 else 21_000)}) for t in range(20)]
    ok, report = memory_verdict(flat)
    assert ok, report
    leak = [(float(t), {"svc": 100_000 + t * 10_000}) for t in range(20)]
    ok, report = memory_verdict(leak)
    assert not ok
    assert "GROWS" in report["svc"]


def test_latency_windows_and_verdict() -> None:
    # Windows of 10 s; a p99 that triples fails, a steady one passes.
    samples = [(100.0 + t, 0.010) for t in range(40)]
    windows = latency_windows(samples, 100.0, 10.0)
    assert [w["count"] for w in windows] == [10, 10, 10, 10]
    assert latency_verdict(windows)[0]
    worse = [*windows[:3], {**windows[3], "p99_ms": 500.0}]
    assert not latency_verdict(worse)[0]
    assert not latency_verdict(windows[:2])[0]


def test_top_frames_from_collapsed_stacks(tmp_path: Path) -> None:
    # Self time is the last frame of each stack, as a share of all samples.
    raw = tmp_path / "profile.txt"
    raw.write_text("main;claim;find 30\nmain;sign 60\nmain;claim 10\n")
    assert top_frames(raw) == [("sign", 0.6), ("find", 0.3), ("claim", 0.1)]


def test_charts_from_a_sample_run(tmp_path: Path) -> None:
    # The chart script turns a bench JSON and a soak JSON into PNG files.
    bench = {
        "kind": "bench",
        "started": "20261124T000000Z",
        "git_commit": "abc",
        "results": [_result("Postfix relay", 200).to_json(), _result("ours", 50).to_json()],
        "scale_out": {
            "rows": [{"workers": w, "delivered_per_s": 10.0 * w} for w in (1, 2, 4)],
        },
        "gateway": [
            {"rpc": "GetEmail", "path": "gRPC direct", "p50_ms": 1.0, "p99_ms": 2.0},
            {"rpc": "GetEmail", "path": "REST via gateway", "p50_ms": 1.5, "p99_ms": 3.0},
        ],
    }
    soak = {
        "kind": "soak",
        "rss_series": [{"t": float(t), "rss_kib": {"mail": 50_000 + t}} for t in range(5)],
        "latency_windows": [{"t": 10.0 * i, "p50_ms": 5.0, "p99_ms": 9.0} for i in range(4)],
    }
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    (tmp_path / "soak.json").write_text(json.dumps(soak))
    written = charts(tmp_path / "bench.json", tmp_path / "out")
    written += charts(tmp_path / "soak.json", tmp_path / "out")
    names = sorted(p.name for p in written)
    assert names == [
        "delivered-per-s.png",
        "gateway-overhead.png",
        "latency-percentiles.png",
        "soak-latency.png",
        "soak-rss.png",
        "throughput-vs-workers.png",
    ]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)


@pytest.mark.parametrize(
    ("tempfail", "rcpt", "logged"),
    [(0.0, "user@sink.example", True), (2e9, "user@sink.example", False)],
)
async def test_sink_logs_message_ids_and_injects_4xx(
    tmp_path: Path, tempfail: float, rcpt: str, logged: bool
) -> None:
    # The counting sink logs each accepted message's Message-ID; in tempfail mode RCPT gets 451.
    log_path = tmp_path / "sink.log"
    with log_path.open("a", buffering=1) as log:
        sink = Sink(log, tempfail_until=tempfail, reject_prefix="reject-")
        server = await asyncio.start_server(sink.serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        message = EmailMessage()
        message["From"] = "a@bench.example"
        message["To"] = rcpt
        message["Message-ID"] = "<m1@bench.example>"
        message.set_content("hello")
        try:
            if logged:
                await aiosmtplib.send(message, hostname="127.0.0.1", port=port)
            else:
                with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
                    await aiosmtplib.send(message, hostname="127.0.0.1", port=port)
                assert refused.value.recipients[0].code == 451
            message.replace_header("To", "reject-me@sink.example")
            with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as rejected:
                await aiosmtplib.send(message, hostname="127.0.0.1", port=port)
            assert rejected.value.recipients[0].code == (451 if tempfail else 550)
        finally:
            server.close()
            await server.wait_closed()
    rows, _ = read_sink_log(log_path)
    assert [r[1] for r in rows] == (["m1@bench.example"] if logged else [])


def test_data_benchmark_table_judges_each_read_against_its_targets() -> None:
    # A read passes under 100 ms p50 (stats for 30 days: 500 ms) and is judged within 2x of
    # each baseline separately; delivered/s (median of the runs) within 10 % of each.
    from bench.data import table

    def reads(**p50: float) -> dict[str, dict[str, float]]:
        return {name: {"p50_ms": v, "p99_ms": v * 2, "n": 5} for name, v in p50.items()}

    names = {"fast": "ListEmails first page", "stats": "GetEmailStats 30 days"}
    empty = {
        "reads": reads(**{names["fast"]: 10.0, names["stats"]: 100.0}),
        "delivered_per_s": [100.0, 50.0, 101.0],
    }
    page = {
        "reads": reads(**{names["fast"]: 20.0, names["stats"]: 90.0}),
        "delivered_per_s": [95.0, 96.0, 20.0],
    }
    full = {
        "reads": reads(**{names["fast"]: 25.0, names["stats"]: 190.0}),
        "delivered_per_s": [91.0, 90.0, 200.0],
    }
    text, rows = table(empty, page, full)
    by_read = {r["read"]: r for r in rows}
    assert [
        by_read[names["fast"]][k] for k in ("under_target", "within_2x_empty", "within_2x_page")
    ] == [True, False, True]
    assert by_read[names["stats"]]["within_2x_empty"] is True
    assert by_read[names["stats"]]["within_2x_page"] is False
    assert by_read["delivered/s"]["medians"] == [100.0, 95.0, 91.0]
    assert by_read["delivered/s"]["within_10pct_empty"] is True
    assert "NO" in text
    full["delivered_per_s"] = [80.0, 85.0, 85.0]
    _, rows = table(empty, page, full)
    assert {r["read"]: r for r in rows}["delivered/s"]["within_10pct_empty"] is False
    assert {r["read"]: r for r in rows}["delivered/s"]["within_10pct_page"] is False


def test_a_drill_counts_only_errors_it_did_not_retry_and_check(tmp_path: Path) -> None:
    # The SIGTERM drill sends a CANCELLED call again with its idempotency key and checks it
    # itself: that call is not counted as a client error; any other CANCELLED, or an error
    # outside the window, still fails the drill.
    from bench.drills import Drill

    args = argparse.Namespace(lease=15)
    drill = Drill("errors", args, tmp_path)
    now = drill.started
    load = LoadResult(requests=4, ok=1, elapsed_s=1.0, latencies_s=[0.01])
    load.failed = [
        (now, "UNAVAILABLE", 1),
        (now, "CANCELLED", 2),
        (now + 100, "UNAVAILABLE", 3),
    ]
    drill.check_client_errors(load, [(now - 1, now + 1)], retried=[2])
    assert drill.failures == ["1 client errors outside what is allowed: ['UNAVAILABLE at +100.0s']"]
    other = Drill("errors", args, tmp_path)
    other.started = now
    other.check_client_errors(load, [(now - 1, now + 1)])
    assert len(other.failures) == 1
    assert "CANCELLED at +" in other.failures[0]
