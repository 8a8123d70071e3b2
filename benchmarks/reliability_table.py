"""The table of docs/reliability.md, from the figures ``scripts/soak.sh`` wrote.

    python -m benchmarks.reliability_table [reliability-report.jsonl]

One row per test of the soak: how many calls, how many failed, the p50 and p99 of its calls
(the median over methods), and memory before and after where the test measured it.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any


def _latency(row: dict[str, Any]) -> str:
    table = row.get("latency_ms") or {}
    if not table:
        return "-"
    p50 = statistics.median(cut["p50"] for cut in table.values())
    p99 = statistics.median(cut["p99"] for cut in table.values())
    return f"{p50:.1f} / {p99:.1f}"


def _memory(row: dict[str, Any]) -> str:
    before, after = row.get("rss_before_kib"), row.get("rss_after_kib")
    if not before or not after:
        return "-"
    return f"{before / 1024:.0f} -> {after / 1024:.0f} MiB ({after / before:.2f}x)"


def _notes(row: dict[str, Any]) -> str:
    skip = {"test", "calls", "failed", "seconds", "latency_ms", "rss_before_kib", "rss_after_kib"}
    return "; ".join(f"{key}: {value}" for key, value in row.items() if key not in skip)


def main(argv: list[str]) -> int:
    path = Path(argv[0] if argv else "reliability-report.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    print("| test | calls | failed | p50 / p99 ms | memory | notes |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        calls = row.get("calls", "-")
        failed = row.get("failed", "-")
        print(
            f"| {row['test']} | {calls} | {failed} | {_latency(row)} | {_memory(row)} "
            f"| {_notes(row)} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
