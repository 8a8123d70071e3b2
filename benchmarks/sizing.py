"""The sizing guide's figures: served memory per million users and items, per factor width.

For each factor width, synthetic models (``mfserve synth``: titles on, 5 seen items per user)
that differ only in their user count, or only in their item count, are served by a real
``mfserve serve`` subprocess with the defaults; after a warm-up of TopK and BatchPredict calls the
server's memory is read from ``/proc/PID/smaps``: its PSS (libraries, heap, id maps) and, apart,
the pages of the artifact's memory-mapped tensor files, resident only as far as calls have
touched them and shared by every worker. Under traffic that reaches every user the whole files
become resident, so the figure to plan with ("planned") is the PSS with the mapped files counted
at their full size on disk. The difference between a model and the base model,
divided by the rows added, is what one more user or item costs; the base model's figure is the
fixed cost of a serving process. One more model adds seen items per user
(the ``exclude_seen`` lists) at the middle width. Each run also times exact TopK at concurrency 1
(the SDK, 200 calls), which grows with the catalogue: the figure that says when to turn on the
approximate index.

    python -m benchmarks.sizing                          # factors 32, 64, 128 (~3 min)
    python -m benchmarks.sizing --factors 64 --rows 200000 --markdown sizing.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from server_harness import serve_subprocess

from benchmarks.memory import rollup
from mfserve.client import RecommenderClient
from mfserve.training.synth import main as synth_main

BASE_ROWS = 10_000


def folder_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def mapped_kib(pid: int, folder: Path) -> int:
    """Resident KiB of the mappings of files under ``folder`` (the model's safetensors)."""
    total, inside = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            inside = len(head) >= 6 and head[5].startswith(str(folder))
        elif inside and head[0] == "Pss:":
            total += int(head[1])
    return total


def measure(root: Path, users: int, items: int, factors: int, seen: int) -> dict[str, Any]:
    """Serve one synthetic model; its memory after a warm-up and its exact TopK p50."""
    out = root / f"u{users}-i{items}-f{factors}-s{seen}"
    synth_main(
        [
            "synth", "--out", str(out), "--users", str(users), "--items", str(items),
            "--factors", str(factors), "--seen-per-user", str(seen),
        ]
    )  # fmt: skip
    with serve_subprocess(out) as server, RecommenderClient(server.address) as client:
        user_ids = [f"u{n * 7919 % users}" for n in range(200)]
        item_ids = [f"i{n * 104729 % items}" for n in range(1000)]
        for user in user_ids[:20]:  # warm-up: numba kernels, first-touch of the mapped tables
            client.top_k(user, k=10)
        for start in range(0, len(item_ids), 100):
            client.batch_predict(user_ids[:100], item_ids[start : start + 100])
        seconds = []
        for user in user_ids:
            started = time.perf_counter()
            client.top_k(user, k=10)
            seconds.append(time.perf_counter() - started)
        memory = rollup(server.proc.pid)
        resident_model = mapped_kib(server.proc.pid, out) / 1024
    return {
        "users": users,
        "items": items,
        "factors": factors,
        "seen": seen,
        "rss": memory["Rss"],
        "pss": memory["Pss"],
        "heap": memory["Anonymous"],
        "disk": folder_mib(out / "1"),
        "mapped": resident_model,
        "planned": memory["Pss"] - resident_model + folder_mib(out / "1"),
        "topk_ms": statistics.median(seconds) * 1e3,
    }


def per_million(row: dict[str, Any], base: dict[str, Any], axis: str) -> float:
    added = row[axis] - base[axis]
    return float(row["planned"] - base["planned"]) / added * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--factors", default="32,64,128", help="comma-separated factor widths")
    parser.add_argument("--rows", type=int, default=400_000, help="users (items) added")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args(argv)
    widths = [int(value) for value in args.factors.split(",")]
    big = BASE_ROWS + args.rows

    rows: list[dict[str, Any]] = []
    lines = [
        "| factors | users x items | PSS MiB | of it, model files | files on disk MiB | "
        "planned MiB | exact TopK p50 ms |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    summary = [
        "| factors | planned MiB per 1M users | per 1M items | fixed MiB (10k x 10k) |",
        "|---:|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for factors in widths:
            base = measure(root, BASE_ROWS, BASE_ROWS, factors, 5)
            more_users = measure(root, big, BASE_ROWS, factors, 5)
            more_items = measure(root, BASE_ROWS, big, factors, 5)
            for row in (base, more_users, more_items):
                rows.append(row)
                lines.append(
                    f"| {factors} | {row['users']:,} x {row['items']:,} | {row['pss']:,} | "
                    f"{row['mapped']:,.0f} | {row['disk']:,.0f} | {row['planned']:,.0f} | "
                    f"{row['topk_ms']:.2f} |"
                )
            summary.append(
                f"| {factors} | {per_million(more_users, base, 'users'):,.0f} | "
                f"{per_million(more_items, base, 'items'):,.0f} | {base['planned']:,.0f} |"
            )
            print("\n".join(lines[-3:]), flush=True)
        middle = widths[len(widths) // 2]
        seen_base = next(r for r in rows if r["factors"] == middle and r["users"] == big)
        seen_more = measure(root, big, BASE_ROWS, middle, 50)
        seen_bytes = (seen_more["planned"] - seen_base["planned"]) * 2**20 / (big * 45)
        lines.append(
            f"| {middle} | {big:,} x {BASE_ROWS:,}, 50 seen per user | {seen_more['pss']:,} | "
            f"{seen_more['mapped']:,.0f} | {seen_more['disk']:,.0f} | {seen_more['planned']:,.0f} | "
            f"{seen_more['topk_ms']:.2f} |"
        )
    text = "\n".join(
        [*lines, "", *summary, "", f"seen items: {seen_bytes:.1f} bytes per (user, item) pair", ""]
    )
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
