"""Per-message MIME build time: the direct writer of simple messages against the stdlib path.

Builds the bench's own message (2 KB ASCII text, one recipient; bench/load.py) and a text +
HTML message with both `services.mail.compose.build_message` (which writes simple messages
directly) and `build_message_with_stdlib`, `--repeat` rounds of `--count` builds each,
alternating the two so that a busy neighbour disturbs both alike. Prints the median and
min-max of the per-message time per round, the ratio of the medians, and the load average
before and after (the machine may be shared).

Run: ``python -m bench.mime`` (``--count``, ``--repeat``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from bench.load import BODY
from services.mail.compose import (
    Limits,
    SendInput,
    ValidRequest,
    build_message,
    build_message_with_stdlib,
    message_headers,
    validate,
    written_directly,
)

LIMITS = Limits(
    max_recipients=50,
    max_attachment_size=1 << 20,
    max_message_size=10 << 20,
    schedule_horizon=timedelta(days=1),
)
HTML = "<html><body>\n" + "\n".join(f"<p>{BODY[i : i + 70]}</p>" for i in range(0, 2048, 70))
CASES = {
    "text 2 KB": SendInput(
        from_address="Bench <bench@bench.example>",
        to=["user-bench-1@sink.example"],
        subject="bench mime 1",
        text=BODY,
    ),
    "text + html": SendInput(
        from_address="Bench <bench@bench.example>",
        to=["user-bench-1@sink.example"],
        subject="bench mime 1",
        text=BODY,
        html=HTML + "\n</body></html>",
    ),
}

Builder = Callable[..., tuple[bytes, str]]


def per_message_ms(build: Builder, valid: ValidRequest, count: int) -> float:
    """Milliseconds per build, over `count` builds."""
    now = datetime.now(UTC)
    started = time.perf_counter()
    for i in range(count):
        build(valid, email_id=f"{i:024x}", domain="bench.example", now=now)
    return (time.perf_counter() - started) * 1000 / count


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="builds per round")
    parser.add_argument("--repeat", type=int, default=7, help="rounds per path")
    args = parser.parse_args()
    load_start = os.getloadavg()
    now = datetime.now(UTC)
    print(f"bench.mime: {args.repeat} rounds of {args.count} builds per path and message")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in load_start)}")
    for name, request in CASES.items():
        valid = validate(request, limits=LIMITS, now=now)
        headers = message_headers(valid, message_id="<x@bench.example>", now=now)
        if not written_directly(valid, headers):
            raise SystemExit(f"{name}: not a simple message, the direct writer would not run")
        rounds: dict[str, list[float]] = {"stdlib": [], "direct": []}
        for _ in range(args.repeat):
            rounds["stdlib"].append(per_message_ms(build_message_with_stdlib, valid, args.count))
            rounds["direct"].append(per_message_ms(build_message, valid, args.count))
        medians = {path: statistics.median(times) for path, times in rounds.items()}
        for path, times in rounds.items():
            print(
                f"  {name:12} {path:6}: median {medians[path]:.4f} ms/message "
                f"(min {min(times):.4f}, max {max(times):.4f})"
            )
        print(f"  {name:12} stdlib / direct: {medians['stdlib'] / medians['direct']:.1f}x")
    load_end = os.getloadavg()
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in load_end)}")


if __name__ == "__main__":
    main()
