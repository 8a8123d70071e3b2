"""Quick probe of the real server: TopK p50 at concurrency 1, QPS at 64, BatchPredict pairs/s.

    python -m benchmarks.serve_probe --model DIR [--duration 4] [--repeat 3]
    python -m benchmarks.serve_probe --model DIR --memory   # RSS/PSS, --workers 1 vs 2

Each configuration is a ``mfserve serve`` subprocess; each load run is a separate client process
(grpc.aio, closed loop, ``--channels`` connections so that SO_REUSEPORT can spread them over the
workers). Client and server share the machine's cores, so compare numbers within one run only.

Besides the wall-clock figures, each cell reports the server's CPU time per call (user + system
seconds of the server processes over the client run, divided by every call the client made,
warm-up included): on a busy host the wall-clock figures swing with the other jobs, while CPU per
call mostly does not, so it is the figure to compare between runs.
Without ``--model``, a 610 x 9,742 x 64 synthetic model (ml-latest-small's shape) is made.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

READY = re.compile(r"mfserve: (?:serving .+|\d+ workers ready) on (\S+):(\d+)|^PORT (\d+)")
CONFIGS = {
    "empty": ["<empty>"],  # benchmarks.harness.empty_server: the gRPC floor, no model work
    "defaults": [],
    "nobatch": ["--max-batch-size", "1"],
    "inline": ["--compute-threads", "0"],
    "workers2": ["--workers", "2"],
}


# ------------------------------------------------------------------------------------- client
async def _client(args: argparse.Namespace) -> dict[str, Any]:
    import grpc

    from mfserve.v1 import recommender_pb2 as pb
    from mfserve.v1 import recommender_pb2_grpc as pb_grpc

    rng = random.Random(os.getpid())
    users = [f"u{rng.randrange(args.users)}" for _ in range(4096)]
    items = [f"i{rng.randrange(args.items)}" for _ in range(4096)]
    options = [("grpc.use_local_subchannel_pool", 1)]  # one connection per channel
    channels = [
        grpc.aio.insecure_channel(args.address, options=options) for _ in range(args.channels)
    ]
    stubs = [pb_grpc.RecommenderServiceStub(c) for c in channels]
    if args.rpc == "topk":
        requests = [pb.TopKRequest(user_id=u, k=10) for u in users[:512]]
        method = "TopK"
    else:
        requests = [
            pb.BatchPredictRequest(user_ids=users[s : s + 1000], item_ids=items[s : s + 1000])
            for s in range(0, 3000, 7)
        ]
        method = "BatchPredict"
    latencies: list[float] = []
    total = 0  # every call, warm-up included (for the server's CPU per call)
    stop_at = 0.0
    record_from = time.perf_counter() + args.warmup

    async def worker(n: int) -> None:
        nonlocal total
        call = getattr(stubs[n % len(stubs)], method)
        i = n
        while True:
            start = time.perf_counter()
            if start >= stop_at:
                return
            await call(requests[i % len(requests)])
            i += 1
            total += 1
            if start >= record_from:
                latencies.append(time.perf_counter() - start)

    for c in channels:
        await c.channel_ready()
    stop_at = record_from + args.duration
    await asyncio.gather(*(worker(n) for n in range(args.concurrency)))
    for c in channels:
        await c.close(None)
    latencies.sort()
    return {
        "calls": len(latencies),
        "total_calls": total,
        "qps": len(latencies) / args.duration,
        "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)] if latencies else None,
    }


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes have used so far (Linux ``/proc``)."""
    ticks = 0
    for pid in pids:
        try:
            # Fields after the ")" of the command name: utime and stime are the 12th and 13th.
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # a worker that has exited
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def run_client(
    address: str, rpc: str, concurrency: int, opts: argparse.Namespace, server: Server | None = None
) -> dict[str, Any]:
    """One load run in a client process; with ``server``, adds its CPU microseconds per call."""
    command = [
        sys.executable, "-m", "benchmarks.serve_probe", "client", "--address", address,
        "--rpc", rpc, "--concurrency", str(concurrency), "--duration", str(opts.duration),
        "--warmup", str(opts.warmup), "--channels", str(opts.channels),
        "--users", str(opts.users), "--items", str(opts.items),
    ]  # fmt: skip
    pids = server.pids() if server is not None else []
    before = cpu_seconds(pids)
    out = subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)
    used = cpu_seconds(pids) - before
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    if pids and result["total_calls"]:
        result["server_cpu_us"] = 1e6 * used / result["total_calls"]
    return result


# ------------------------------------------------------------------------------------- server
class Server:
    def __init__(self, model: Path, extra: list[str]) -> None:
        command = [sys.executable, "-m", "mfserve.server", "serve", "--model", str(model),
                   "--port", "0", *extra]  # fmt: skip
        if extra[:1] == ["<empty>"]:  # the floor, with any arguments after the marker
            command = [
                sys.executable,
                "-m",
                "benchmarks.harness.empty_server",
                "--model",
                str(model),
                *extra[1:],
            ]
        self.proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        workers = "--workers" in extra
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            match = READY.search(line)
            if match and match[3]:
                self.address = f"127.0.0.1:{match[3]}"
                break
            if match and (not workers or "workers ready" in line):
                self.address = f"{match[1]}:{match[2]}"
                break
        else:
            raise RuntimeError("server did not start")

    def pids(self) -> list[int]:
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return [self.proc.pid, *map(int, children)]

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


def smaps(pid: int) -> dict[str, int]:
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value, *_ = line.split()
        fields[name.rstrip(":")] = int(value) // 1024  # MiB
    return fields


def memory(opts: argparse.Namespace, model: Path) -> None:
    for extra in ([], ["--workers", "2"]):
        server = Server(model, extra)
        try:
            # Touch every table in every worker: several connections of TopK and SimilarItems.
            for rpc in ("topk", "predict"):
                run_client(
                    server.address,
                    rpc,
                    8,
                    argparse.Namespace(**{**vars(opts), "duration": 1, "warmup": 0}),
                )
            rows = {pid: smaps(pid) for pid in server.pids()}
        finally:
            server.stop()
        total = {
            k: sum(r[k] for r in rows.values())
            for k in ("Rss", "Pss", "Private_Dirty", "Shared_Clean")
        }
        print(
            f"workers={extra[-1] if extra else 1}: per process {rows and {p: (r['Rss'], r['Pss']) for p, r in rows.items()}}"
        )
        print(f"  total MiB: {total}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", nargs="?", default="probe", choices=["probe", "client"])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--address")
    parser.add_argument("--rpc", default="topk", choices=["topk", "predict"])
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--users", type=int, default=610)
    parser.add_argument("--items", type=int, default=9742)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"of {', '.join(CONFIGS)}")
    parser.add_argument("--memory", action="store_true", help="RSS/PSS of 1 vs 2 workers")
    opts = parser.parse_args(argv)
    if opts.mode == "client":
        print(json.dumps(asyncio.run(_client(opts))))
        return
    model = opts.model
    if model is None:
        from mfserve.training.artifact import save_artifact
        from mfserve.training.synthetic import synthetic_artifact

        model = save_artifact(
            Path(tempfile.mkdtemp()) / "probe", synthetic_artifact(opts.users, opts.items, 64)
        )
    if opts.memory:
        memory(opts, model)
        return
    print(f"load average before: {os.getloadavg()}", flush=True)
    for name in opts.configs.split(","):
        cells: dict[str, list[float]] = {}
        for _ in range(opts.repeat):
            server = Server(model, CONFIGS[name])
            try:
                for label, rpc, concurrency, figure, scale in (
                    ("topk c1", "topk", 1, "p50_ms", 1),
                    ("topk c64", "topk", 64, "qps", 1),
                    ("batch1000 c8", "predict", 8, "qps", 1000),
                ):
                    result = run_client(server.address, rpc, concurrency, opts, server)
                    unit = {"p50_ms": "p50 ms", "qps": "qps" if scale == 1 else "pairs/s"}[figure]
                    cells.setdefault(f"{label} {unit}", []).append(result[figure] * scale)
                    cells.setdefault(f"{label} cpu us/call", []).append(
                        result.get("server_cpu_us", float("nan"))
                    )
            finally:
                server.stop()
        summary = ", ".join(
            f"{k} {statistics.median(v):,.2f} {[round(x, 2) for x in v]}" for k, v in cells.items()
        )
        print(f"{name:18s} {summary}", flush=True)
    print(f"load average after: {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
