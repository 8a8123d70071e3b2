"""Closed-loop serving benchmark: mfserve beside an empty handler and a naive servicer.

Usage (from the repository root)::

    python -m benchmarks.harness --markdown bench.md        # synthetic, ml-latest-small sized
    python -m benchmarks.harness --model models/movielens --servers empty,naive,mfserve
    python -m benchmarks.harness --quick --concurrency 1,2  # ~1 s a cell (smoke test)
    python -m benchmarks.harness --servers empty,mfserve --variant 'loop=--compute-threads 0'

Every server runs in its own subprocess on 127.0.0.1, port 0 (the port is read from its output).
Load comes from separate client processes (``benchmarks.harness.loadgen``), each holding its
share of the in-flight calls on one grpc.aio channel, all starting at the same instant. A cell is
one (server, rpc, concurrency): warmup, then a fixed window in which every call's latency is recorded.

All servers are started first and their cells interleaved: for each (rpc, concurrency), every
server in turn, so the cells a ratio compares run minutes apart at most, not a whole server's run
apart (a shared host's speed drifts on that scale). ``--rounds N`` repeats the whole sweep and
reports, per cell, the median of each figure over the rounds, and the median (and range) of the
per-round ratio to the empty handler.

Servers:
  empty    canned responses of the right shape: the cost of the gRPC stack alone (the floor)
  empty-hop  the same, but each call goes to a thread and back first: the cost of a thread hop
  naive    one unbatched model call per RPC on the event loop (the baseline to beat)
  mfserve  the real server, ``python -m mfserve.server serve --model DIR --port 0 [--mfserve-arg]``
  NAME     ``--variant NAME=ARGS``: mfserve again, with ARGS added, interleaved with the rest. Two
           configurations compared within one run see the same phases of a shared host; two
           separate runs do not (their ratios to the empty handler can differ by 0.2 from noise).
  baseline ``--baseline PYTHON``: the mfserve installed for another interpreter (an earlier
           release in its own venv), with the same arguments: before and after in one run.

On a small machine the clients and the server share the CPUs; the table says how many cores the
server used during each window, and absolute figures are only comparable within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.harness.cells import (
    RPC_LABELS,
    Cell,
    combine,
    percentile,
    render_markdown,
    set_ratios,
)
from benchmarks.harness.processes import (
    BASE_SERVERS,
    ClientPool,
    RunningServer,
    server_specs,
)
from mfserve.server.cpu_pinning import PinningError, parse_cpu_list


def run_cell(
    server: RunningServer, clients: ClientPool, rpc: str, concurrency: int, args: argparse.Namespace
) -> Cell:
    start_at = time.time() + args.start_margin
    command = {
        "rpc": rpc,
        "concurrency": concurrency,
        "start_at": start_at,
        "warmup": args.warmup,
        "duration": args.duration,
    }
    outcome: list[list[dict[str, Any]]] = []
    worker = threading.Thread(target=lambda: outcome.append(clients.run(command)), daemon=True)
    worker.start()
    # Sample the server's CPU time at the edges of the measured window while the clients run.
    begin = start_at + args.warmup
    time.sleep(max(0.0, begin - time.time()))
    cpu_before = server.cpu_seconds()
    time.sleep(max(0.0, begin + args.duration - time.time()))
    cpu_used = server.cpu_seconds() - cpu_before
    worker.join(timeout=args.duration + 120)
    cell = Cell(server.spec.name, rpc, concurrency, seconds=args.duration)
    if not outcome:
        cell.note = "load clients failed"
        return cell
    latencies: list[float] = []
    for result in outcome[0]:
        latencies.extend(result["latencies"])
        for code, count in result["errors"].items():
            cell.errors[code] = cell.errors.get(code, 0) + count
        if result.get("late_s", 0) > 0:
            cell.note = f"a client started {result['late_s']:.2f}s late (raise --start-margin)"
    latencies.sort()
    cell.calls = len(latencies)
    cell.qps = cell.calls / args.duration
    cell.pairs_per_s = cell.qps * args.batch if rpc == "batch" else None
    cell.p50_ms, cell.p95_ms, cell.p99_ms = (1000 * percentile(latencies, q) for q in (50, 95, 99))
    cell.server_cores = cpu_used / args.duration
    return cell


def machine_info() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "cores": f"{os.cpu_count()} ({usable} usable)",
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": version("torch"),
        "grpcio": version("grpcio"),
        "protobuf": version("protobuf"),
    }


def prepare_model(args: argparse.Namespace, workdir: Path) -> tuple[Path, str]:
    if args.model:
        from mfserve.training.artifact import resolve_version

        version = resolve_version(Path(args.model).resolve())
        return version, f"{version}"
    from mfserve.training.synth import main as synth_main

    out = workdir / "synthetic"
    sizes = ["--users", str(args.users), "--items", str(args.items), "--factors", str(args.factors)]
    code = synth_main(["synth", "--out", str(out), *sizes, "--seed", "0"])
    if code != 0:
        raise SystemExit(code)
    shape = f"{args.users} users x {args.items} items x {args.factors} factors"
    return out / "1", f"synthetic ({shape}, 32 clusters)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.harness",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model", help="model folder or version folder (default: a synthetic model)"
    )
    parser.add_argument(
        "--users", type=int, default=610, help="synthetic users (ml-latest-small: 610)"
    )
    parser.add_argument(
        "--items", type=int, default=9742, help="synthetic items (ml-latest-small: 9742)"
    )
    parser.add_argument("--factors", type=int, default=64, help="synthetic factor width")
    parser.add_argument(
        "--servers",
        default="empty,naive,mfserve",
        help="comma-separated: empty, empty-hop, naive, mfserve",
    )
    parser.add_argument(
        "--rpcs",
        default="predict,batch,topk",
        help="comma-separated: predict, batch, topk, foldin (TopK for a new user sent with 20 rated "
        "items)",
    )
    parser.add_argument(
        "--concurrency", default="1,16,64", help="comma-separated in-flight call counts"
    )
    parser.add_argument("--duration", type=float, help="measured seconds per cell (5; --quick 1)")
    parser.add_argument(
        "--warmup", type=float, help="unrecorded seconds before a window (1; --quick 0.3)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="1 s windows, 0.3 s warmup (smoke test)"
    )
    parser.add_argument(
        "--client-procs", type=int, default=2, help="client processes sharing the load"
    )
    parser.add_argument(
        "--start-margin", type=float, default=0.5, help="seconds for clients to get ready"
    )
    parser.add_argument("--batch", type=int, default=1000, help="pairs per BatchPredict call")
    parser.add_argument("--k", type=int, default=10, help="k of each TopK call")
    parser.add_argument(
        "--mfserve-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra `mfserve serve` argument, repeatable (--mfserve-arg=--compute-threads=2)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="another mfserve server named NAME with ARGS added (shell-quoted), run beside the "
        "others, e.g. --variant 'loop=--compute-threads 0'; repeatable",
    )
    parser.add_argument(
        "--baseline",
        default="",
        metavar="PYTHON",
        help="also serve with the mfserve installed for this interpreter (an earlier release's "
        "venv), as the server 'baseline', interleaved with the rest",
    )
    parser.add_argument(
        "--pin-cpus",
        default="",
        metavar="CPUS",
        help="bind every server, the floors included, to the first CPU of CPUS (each server's "
        "own --pin-cpus), so all are measured alike; load clients stay unbound (default: off)",
    )
    parser.add_argument(
        "--server-timeout", type=float, default=120.0, help="seconds to wait for a server to bind"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat the sweep; report medians over the rounds"
    )
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--json", help="also write the raw results (no latency lists) to this file")
    args = parser.parse_args(argv)
    # --quick only changes what was not given explicitly.
    if args.duration is None:
        args.duration = 1.0 if args.quick else 5.0
    if args.warmup is None:
        args.warmup = 0.3 if args.quick else 1.0
    args.server_list = [s.strip() for s in args.servers.split(",") if s.strip()]
    args.rpc_list = [r.strip() for r in args.rpcs.split(",") if r.strip()]
    args.concurrency_list = [int(c) for c in args.concurrency.split(",") if c.strip()]
    unknown = set(args.server_list) - set(BASE_SERVERS) | set(args.rpc_list) - set(RPC_LABELS)
    args.variants = {}
    for text in args.variant:
        name, sep, extra = text.partition("=")
        name = name.strip()
        if not sep or not re.fullmatch(r"[a-z][a-z0-9-]*", name) or name in BASE_SERVERS:
            parser.error(
                f"--variant {text!r}: expected NAME=ARGS, NAME lowercase letters, digits and '-' "
                f"and not one of {', '.join(BASE_SERVERS)}"
            )
        if name in args.variants:
            parser.error(f"--variant {text!r}: {name!r} is named twice")
        args.variants[name] = shlex.split(extra)
        if name not in args.server_list:
            args.server_list.append(name)
    if args.baseline and "baseline" not in args.server_list:
        args.server_list.append("baseline")
    if "baseline" in args.server_list and not args.baseline:
        parser.error("the server 'baseline' needs --baseline PYTHON")
    if args.pin_cpus:
        try:
            parse_cpu_list(args.pin_cpus)
        except PinningError as exc:
            parser.error(str(exc))
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, not {args.rounds}")
    if unknown or not args.concurrency_list or min(args.concurrency_list) < 1:
        parser.error(f"bad --servers/--rpcs/--concurrency: {sorted(unknown) or args.concurrency}")
    return args


def start_servers(
    args: argparse.Namespace, version: Path
) -> dict[str, tuple[RunningServer, ClientPool] | None]:
    """Every server and its load clients, started before any cell (None: failed to start)."""
    specs = server_specs(
        version, args.mfserve_arg, args.variants, pin_cpus=args.pin_cpus, baseline=args.baseline
    )
    running: dict[str, tuple[RunningServer, ClientPool] | None] = {}
    for name in args.server_list:
        try:
            server = RunningServer(specs[name], args.server_timeout)
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            running[name] = None
            continue
        pool = ClientPool(server, version, procs=args.client_procs, batch=args.batch, k=args.k)
        running[name] = (server, pool)
    return running


def sweep(
    args: argparse.Namespace, running: dict[str, tuple[RunningServer, ClientPool] | None]
) -> list[Cell]:
    """One round: for each (rpc, concurrency), every server in turn."""
    cells: list[Cell] = []
    for rpc in args.rpc_list:
        for concurrency in args.concurrency_list:
            for name in args.server_list:
                pair = running[name]
                if pair is None:
                    cells.append(Cell(name, rpc, concurrency, note="server failed to start"))
                    continue
                cell = run_cell(pair[0], pair[1], rpc, concurrency, args)
                cells.append(cell)
                progress = f"{name:9s} {RPC_LABELS[rpc]:12s} c={concurrency:<3d}"
                timing = f"p50 {cell.p50_ms:.2f} ms p99 {cell.p99_ms:.2f} ms"
                print(f"{progress} {cell.qps:10.1f}/s {timing}", file=sys.stderr)
    set_ratios(cells)
    # The table lists each server's cells together, as before interleaving.
    order = {name: n for n, name in enumerate(args.server_list)}
    return sorted(cells, key=lambda c: order[c.server])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m benchmarks.harness " + shlex.join(sys.argv[1:] if argv is None else argv)
    server_logs: list[str] = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="mfserve-bench-") as tmp:
        version, model = prepare_model(args, Path(tmp))
        running = start_servers(args, version)
        try:
            rounds = []
            for number in range(args.rounds):
                if args.rounds > 1:
                    print(f"round {number + 1} of {args.rounds}", file=sys.stderr)
                rounds.append(sweep(args, running))
        finally:
            for name, pair in running.items():
                if pair is None:
                    continue
                server, clients = pair
                print(f"{name}: server RSS {server.rss_mb():.0f} MB", file=sys.stderr)
                clients.close()
                server.stop()
                server_logs += [f"{name}: {line}" for line in server.shutdown_log()]
    cells = combine(rounds)
    load = (load_before, os.getloadavg()[0])
    text = render_markdown(cells, machine_info(), command, model, load, server_logs)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text, encoding="utf-8")
    if args.json:
        Path(args.json).write_text(
            json.dumps([asdict(c) for c in cells], indent=1) + "\n", encoding="utf-8"
        )
    return 0 if all(c.calls for c in cells) else 1


if __name__ == "__main__":
    raise SystemExit(main())
