"""Where a lone approximate TopK spends its time inside a serving process.

    python -m benchmarks.lone_handler --model /tmp/big --ef 48 [--duration 4] [--rounds 2]

End-to-end latency at concurrency 1 swings by 0.1-0.3 ms between runs on a shared host, more than
most changes to the server's own path are worth. So this starts ``mfserve serve --ann hnsw`` with
timers wrapped around the TopK handler and the steps inside it, drives it from a separate client
process (grpc.aio, concurrency 1, random users), and prints each step's median from the server's
side, beside the canned-answer server's latency with the same client in the same round. The
timers cost ~1 us each; compare runs of this script with each other, not with the harness.
"""

from __future__ import annotations

import argparse
import atexit
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.serve_probe import READY

TIMINGS: dict[str, list[float]] = {}
REPORT = "lone_handler timings: "


def _timed(label: str, function: Callable[..., Any]) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            TIMINGS.setdefault(label, []).append(time.perf_counter() - started)

    return timed


def _instrumented_serve(argv: list[str]) -> int:
    """``mfserve serve`` with the timers in place (this is the server subprocess)."""
    from mfserve.server import service
    from mfserve.server.__main__ import main
    from mfserve.training.scoring import ann

    handler = service.RecommenderService.TopK

    async def top_k(self: Any, request: Any, context: Any) -> Any:
        started = time.perf_counter()
        try:
            return await handler(self, request, context)
        finally:
            TIMINGS.setdefault("handler", []).append(time.perf_counter() - started)

    service.RecommenderService.TopK = top_k
    # The servicer binds these names when it is built, so they are wrapped where it reads them.
    for name in ("top_k_batch", "top_k_cost", "add_scored"):
        if hasattr(service, name):  # an older checkout may lack one (for A/B runs by hand)
            setattr(service, name, _timed(name, getattr(service, name)))
    for name, label in (("top_k_lists", "index top_k_lists"), ("_best", "index _best")):
        setattr(ann.AnnIndex, name, _timed(label, getattr(ann.AnnIndex, name)))
    ann.AnnIndex._raw_search = _timed("faiss search", ann.AnnIndex._raw_search)

    def report() -> None:
        medians = {k: 1e6 * statistics.median(v) for k, v in TIMINGS.items() if v}
        print(REPORT + json.dumps(medians), file=sys.stderr, flush=True)

    atexit.register(report)
    code: int = main(argv)
    return code


def _one_round(model: Path, ef: int, opts: argparse.Namespace) -> dict[str, float]:
    from benchmarks.serve_probe import run_client

    command = [sys.executable, "-m", "benchmarks.lone_handler", "serve", "serve", "--model",
               str(model), "--port", "0", "--ann", "hnsw", "--ann-ef-search", str(ef)]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert server.stdout is not None
    for line in server.stdout:
        match = READY.search(line)
        if match:
            address = f"{match[1]}:{match[2]}"
            break
    else:
        raise RuntimeError(f"the server did not start (exit {server.wait()})")
    try:
        result = run_client(address, "topk", 1, opts)
    finally:
        server.terminate()
        rest = server.communicate(timeout=60)[0]
    line = next(x for x in rest.splitlines() if x.startswith(REPORT))
    medians: dict[str, float] = json.loads(line[len(REPORT) :])
    return {"end to end (client)": 1000 * result["p50_ms"], **medians}


def _floor(model: Path, opts: argparse.Namespace) -> float:
    from benchmarks.serve_probe import Server, run_client
    from mfserve.training.artifact import resolve_version

    server = Server(resolve_version(model), ["<empty>"])
    try:
        result = run_client(server.address, "topk", 1, opts)
    finally:
        server.stop()
    return 1000 * float(result["p50_ms"])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        raise SystemExit(_instrumented_serve(argv[1:]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a model with an HNSW index")
    parser.add_argument("--ef", type=int, default=48, help="--ann-ef-search")
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--users", type=int, default=10_000, help="ids u0..uN-1 are drawn")
    parser.add_argument("--items", type=int, default=1_000_000)
    opts = parser.parse_args(argv)
    opts.channels = 1
    rounds = []
    for _ in range(opts.rounds):
        cells = _one_round(opts.model, opts.ef, opts)
        # The canned-answer server with the same client just before or after: what the gRPC
        # stack alone costs in this phase of the host, so "end to end" minus "handler" can be
        # read against it.
        rounds.append({"floor (canned answers)": _floor(opts.model, opts), **cells})
    print(f"lone approximate TopK, --ann-ef-search {opts.ef}, p50 in us, {opts.rounds} rounds:")
    for step in rounds[0]:
        print(f"  {step:22s} " + "  ".join(f"{r.get(step, float('nan')):8.0f}" for r in rounds))


if __name__ == "__main__":
    main()
