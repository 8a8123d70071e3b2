"""What the harness measures and how it is reported: cells, medians over rounds, the markdown table."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

RPC_LABELS = {
    "predict": "Predict",
    "batch": "BatchPredict",
    "topk": "TopK",
    "foldin": "TopK fold-in",
}


@dataclass
class Cell:
    server: str
    rpc: str
    concurrency: int
    calls: int = 0
    seconds: float = 0.0
    qps: float = 0.0
    pairs_per_s: float | None = None
    p50_ms: float = math.nan
    p95_ms: float = math.nan
    p99_ms: float = math.nan
    server_cores: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    vs_empty: float | None = None
    vs_empty_range: tuple[float, float] | None = None  # over the rounds (--rounds > 1)
    rounds: int = 1
    note: str = ""


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (NaN when empty)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def set_ratios(cells: list[Cell]) -> None:
    """Each cell's QPS against the empty handler's in the same (rpc, concurrency), same round."""
    floor = {(c.rpc, c.concurrency): c.qps for c in cells if c.server == "empty" and c.qps > 0}
    for c in cells:
        if (c.rpc, c.concurrency) in floor and c.calls:
            c.vs_empty = c.qps / floor[(c.rpc, c.concurrency)]


def combine(rounds: list[list[Cell]]) -> list[Cell]:
    """One cell per (server, rpc, concurrency): medians over the rounds (errors summed)."""
    if len(rounds) == 1:
        return rounds[0]
    combined = []
    for same in zip(*rounds, strict=True):
        first = same[0]
        cell = Cell(first.server, first.rpc, first.concurrency, rounds=len(same))
        measured = [c for c in same if c.calls]
        cell.calls = sum(c.calls for c in same)
        cell.seconds = sum(c.seconds for c in same)
        for c in same:
            for code, count in c.errors.items():
                cell.errors[code] = cell.errors.get(code, 0) + count
        cell.note = "; ".join(sorted({c.note for c in same if c.note}))
        if measured:
            for name in ("qps", "p50_ms", "p95_ms", "p99_ms", "server_cores"):
                setattr(cell, name, statistics.median(getattr(c, name) for c in measured))
            if first.pairs_per_s is not None:
                cell.pairs_per_s = statistics.median(c.pairs_per_s or 0.0 for c in measured)
            ratios = [c.vs_empty for c in measured if c.vs_empty is not None]
            if ratios:
                cell.vs_empty = statistics.median(ratios)
                cell.vs_empty_range = (min(ratios), max(ratios))
        combined.append(cell)
    return combined


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def render_markdown(
    cells: list[Cell],
    info: dict[str, str],
    command: str,
    model: str,
    load: tuple[float, float],
    server_logs: list[str] | None = None,
) -> str:
    rounds = max((c.rounds for c in cells), default=1)
    lines = [
        "# mfserve serving benchmark",
        "",
        f"Command: `{command}`",
        "",
        f"Model: {model}",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in info.items()),
        "",
        # Other work on the machine skews every figure: a 1-minute load average well above zero
        # before the run means the cells competed with something else.
        f"1-minute load average: {load[0]:.2f} before the run, {load[1]:.2f} after.",
        "",
    ]
    if rounds > 1:
        lines += [
            f"Each figure is the median over {rounds} rounds of interleaved cells; the ratio is the "
            "median of the per-round ratios, with their range.",
            "",
        ]
    lines += [
        "| server | rpc | concurrency | QPS | pairs/s | p50 ms | p95 ms | p99 ms | server cores "
        "| QPS vs empty | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in cells:
        errors = ", ".join(f"{k} {v}" for k, v in c.errors.items()) or "0"
        if c.note:
            errors += f" ({c.note})"
        vs = "-" if c.vs_empty is None else f"{c.vs_empty:.2f}x"
        if c.vs_empty_range is not None and c.server != "empty":
            vs += f" ({c.vs_empty_range[0]:.2f}-{c.vs_empty_range[1]:.2f})"
        lines.append(
            f"| {c.server} | {RPC_LABELS[c.rpc]} | {c.concurrency} | {_fmt(c.qps)} | "
            f"{_fmt(c.pairs_per_s, 0)} | {_fmt(c.p50_ms, 2)} | {_fmt(c.p95_ms, 2)} | "
            f"{_fmt(c.p99_ms, 2)} | {_fmt(c.server_cores, 2)} | {vs} | {errors} |"
        )
    if server_logs:
        # The server's own counters over the whole run (every cell): batch sizes, and where an
        # executor batch's time went.
        lines += ["", "Server log at shutdown (all cells together):", "", "```"]
        lines += server_logs
        lines.append("```")
    return "\n".join(lines) + "\n"
