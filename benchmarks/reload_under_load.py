"""TopK latency under load while the server hot-reloads, against the same load without reloads.

    python -m benchmarks.reload_under_load --model models/movielens [--rounds 3] [--duration 10]

The model folder's newest version is copied to a scratch model folder as versions 1 and 2. One
``mfserve serve`` (the default flags, but ``--poll-seconds 0`` so that only this script reloads)
takes closed-loop TopK load at ``--concurrency`` (16) from ``--client-procs`` load processes
(``benchmarks.harness.loadgen``). Windows alternate: steady (no reload), then reloading (a
``ReloadModel`` call every ``--every`` seconds, switching between versions 1 and 2: each one a
full load, verification, warm-up and swap). Reported: p50/p95/p99 per kind of window (median over
rounds), the per-round p99 ratio, failed calls, and how many reloads succeeded.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc

from benchmarks.harness.processes import ClientPool, RunningServer, ServerSpec
from mfserve.training.artifact import resolve_version
from mfserve.v1 import recommender_pb2 as pb
from mfserve.v1 import recommender_pb2_grpc as pb_grpc

SERVING = re.compile(r"serving .* on \S+:(\d+)\s*$")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class Reloads(threading.Thread):
    """Calls ReloadModel every ``every`` seconds until stopped, alternating versions 1 and 2."""

    def __init__(self, port: int, every: float) -> None:
        super().__init__(daemon=True)
        self.port, self.every = port, every
        self.stop = threading.Event()
        self.done = 0
        self.failed: list[str] = []
        self.seconds: list[float] = []

    def run(self) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = pb_grpc.RecommenderServiceStub(channel)
            version = 2
            while not self.stop.wait(self.every):
                started = time.perf_counter()
                try:
                    stub.ReloadModel(pb.ReloadModelRequest(version=version), timeout=60)
                except grpc.RpcError as exc:
                    self.failed.append(f"{exc.code().name}: {exc.details()}")
                else:
                    self.done += 1
                    self.seconds.append(time.perf_counter() - started)
                version = 3 - version


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model or version folder")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per window")
    parser.add_argument("--every", type=float, default=2.0, help="seconds between reloads")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--client-procs", type=int, default=4)
    args = parser.parse_args(argv)

    source = resolve_version(args.model)
    scratch = Path(tempfile.mkdtemp(prefix="mfserve-reload-"))
    folder = scratch / source.parent.name
    for version in (1, 2):
        shutil.copytree(source, folder / str(version))
    argv_serve = [sys.executable, "-m", "mfserve.server", "serve", "--model", str(folder)]
    server = RunningServer(
        ServerSpec("mfserve", [*argv_serve, "--poll-seconds", "0"], SERVING), 120
    )
    pool = ClientPool(server, folder / "1", procs=args.client_procs, batch=1000, k=10)
    windows: dict[str, list[dict[str, Any]]] = {"steady": [], "reloading": []}
    reload_counts, reload_failures, reload_seconds = 0, [], []
    try:
        for _ in range(args.rounds):
            for kind in ("steady", "reloading"):
                reloads = Reloads(server.port, args.every) if kind == "reloading" else None
                cell = {
                    "rpc": "topk",
                    "concurrency": args.concurrency,
                    "start_at": time.time() + 0.5,
                    "warmup": 1.0,
                    "duration": args.duration,
                }
                if reloads is not None:
                    reloads.start()
                results = pool.run(cell)
                if reloads is not None:
                    reloads.stop.set()
                    reloads.join(120)
                    reload_counts += reloads.done
                    reload_failures += reloads.failed
                    reload_seconds += reloads.seconds
                latencies = [lat for r in results for lat in r["latencies"]]
                errors: dict[str, int] = {}
                for r in results:
                    for code, count in r["errors"].items():
                        errors[code] = errors.get(code, 0) + count
                windows[kind].append({"latencies": latencies, "errors": errors})
    finally:
        pool.close()
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)

    def figures(window: dict[str, Any]) -> tuple[float, float, float, int, int]:
        lat = window["latencies"]
        failed = sum(window["errors"].values())
        return percentile(lat, 0.5), percentile(lat, 0.95), percentile(lat, 0.99), len(lat), failed

    print(f"# TopK at concurrency {args.concurrency} with and without hot reloads\n")
    print(f"Command: `python -m benchmarks.reload_under_load {' '.join(argv or sys.argv[1:])}`\n")
    print("| window | calls | failed | p50 ms | p95 ms | p99 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    medians = {}
    for kind, rounds in windows.items():
        rows = [figures(w) for w in rounds]
        med = [statistics.median(r[i] for r in rows) for i in range(3)]
        calls, failed = sum(r[3] for r in rows), sum(r[4] for r in rows)
        medians[kind] = med
        print(
            f"| {kind} (median of {len(rows)}) | {calls:,} | {failed} | {med[0] * 1e3:.2f} | "
            f"{med[1] * 1e3:.2f} | {med[2] * 1e3:.2f} |"
        )
    ratios = [
        figures(r)[2] / figures(s)[2]
        for s, r in zip(windows["steady"], windows["reloading"], strict=True)
    ]
    print(
        f"\np99 while reloading / steady: {medians['reloading'][2] / medians['steady'][2]:.2f}x "
        f"(per round {', '.join(f'{x:.2f}x' for x in ratios)}). Reloads: {reload_counts} "
        f"succeeded, {len(reload_failures)} failed, each "
        f"{statistics.median(reload_seconds) if reload_seconds else float('nan'):.2f} s (median)."
    )
    for failure in reload_failures[:5]:
        print(f"- reload failed: {failure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
