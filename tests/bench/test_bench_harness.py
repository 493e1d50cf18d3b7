"""The benchmark harness's own logic: exactly-once proof, table, verdicts, sink, charts.

Benchmarks have no timing assertions; these tests only check that the harness computes and
reports correctly, fast and without Postfix or the suite.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest

from bench.charts import charts
from bench.harness import (
    Result,
    check_exactly_once,
    latency_verdict,
    latency_windows,
    memory_verdict,
    percentile,
    rate_until,
    ratios,
    read_sink_log,
    render_table,
    sample_tree,
)
from bench.run import top_frames
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


def _result(name: str, delivered: float, *, counted: bool = True) -> Result:
    return Result(
        name,
        1000,
        delivered * 2,
        delivered,
        submit_p50_ms=1.0,
        submit_p99_ms=2.0,
        cpu_s={"a": 1.5, "b": 0.5},
        peak_rss_kib={"a": 2048},
        exactly_once=counted,
    )


def test_ratios_only_against_references_that_counted() -> None:
    # A Postfix run that lost mail is no yardstick.
    ours = _result("ours", 50)
    refs = [_result("Postfix relay", 200), _result("Postfix + DKIM", 100, counted=False)]
    assert ratios(ours, refs) == {"Postfix relay": 0.25}


def test_table_shows_every_row_cpu_per_thousand_and_ratios() -> None:
    # One line per variant, CPU seconds per 1,000 messages, the exactly-once verdict, ratios.
    ref = _result("Postfix relay", 200)
    ours = _result("ours: gRPC", 50, counted=False)
    table = render_table([ref, ours], [ref], [ours])
    lines = table.splitlines()
    assert lines[0].startswith("variant")
    assert any(line.startswith("ours: gRPC") and line.rstrip().endswith("NO") for line in lines)
    assert "2.00" in table  # (1.5 + 0.5) CPU s for 1,000 messages
    assert "ours: gRPC: Postfix relay: 0.250x" in table
    assert ours.to_json()["cpu_s_per_1000"] == 2.0


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
    # Reads pass within 2x of empty and under 100 ms p50 (stats for 30 days: 500 ms);
    # delivered/s passes within 10 % of empty.
    from bench.data import table

    def reads(**p50: float) -> dict[str, dict[str, float]]:
        return {name: {"p50_ms": v, "p99_ms": v * 2, "n": 5} for name, v in p50.items()}

    names = {"fast": "ListEmails first page", "stats": "GetEmailStats 30 days"}
    empty = {
        "reads": reads(**{names["fast"]: 10.0, names["stats"]: 100.0}),
        "delivered_per_s": 100.0,
    }
    full = {"reads": reads(**{names["fast"]: 25.0, names["stats"]: 190.0}), "delivered_per_s": 91.0}
    text, rows = table(empty, full)
    verdicts = {r["read"]: r["pass"] for r in rows}
    assert verdicts == {names["fast"]: False, names["stats"]: True, "delivered/s": True}
    assert "FAIL" in text
    full["delivered_per_s"] = 89.0
    _, rows = table(empty, full)
    assert {r["read"]: r["pass"] for r in rows}["delivered/s"] is False
