"""In-process microbenchmark for a large catalogue (default 1M items x 64 factors, synthetic).

Measures, without gRPC in the way:

* loading the artifact (memory-mapped) and building the ``Recommender``, with the process's RSS,
* exact TopK (``Recommender.top_k``, chunked full scan) for a lone query and per query in batches,
* HNSW (and optionally IVF) build seconds, index size, ANN query p50 for a lone query and per query
  in batches, and recall@10 against the exact answer for a sweep of efSearch / nprobe values.

``--serve`` measures the real server end to end instead of building indexes: the index stored
beside the version (``mfserve synth --ann hnsw`` / ``mfserve index``) is used as is, and
``mfserve serve --model DIR`` runs in a subprocess, once with ``--ann none`` and once per
``--serve-ef`` value with ``--ann hnsw``; each measurement is a separate client process
(``benchmarks.serve_probe``'s closed loop): TopK p50 at concurrency 1, TopK calls/s at concurrency
64, and recall@10 of the served approximate answers against the served exact ones. Then the
memory of ``--workers 1`` vs ``--workers 2`` (sum of Rss and Pss over the parent and its workers,
``/proc/PID/smaps_rollup``, after a few seconds of queries).

Usage::

    python -m benchmarks.big_catalogue --markdown big.md               # generates the model (~15 s)
    python -m benchmarks.big_catalogue --model /tmp/big --ivf --ef 16,32,64,128
    mfserve synth --out /tmp/big --users 2000 --items 1000000 --factors 64 --ann hnsw
    python -m benchmarks.big_catalogue --model /tmp/big --serve --serve-ef 0,64 --markdown serve.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mfserve.server.idle_poll import IdlePoll
from mfserve.training.ann_build import build_index, measure_recall
from mfserve.training.ann_store import load_index
from mfserve.training.artifact import load_artifact, resolve_version
from mfserve.training.recommender import RankRequest, Recommender
from mfserve.training.scoring import ranking_tables
from mfserve.training.scoring.ann import AnnIndex


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def timed(fn: Any, repeats: int) -> list[float]:
    """Wall seconds of each of ``repeats`` calls of ``fn(i)``."""
    out = []
    for i in range(repeats):
        started = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - started)
    return out


def ms(values: list[float], per: int = 1) -> str:
    return f"{1000 * statistics.median(values) / per:.3f}"


def exact_rows(rec: Recommender, users: torch.Tensor, args: argparse.Namespace) -> list[str]:
    plain = RankRequest(exclude_seen=False)
    lone = timed(lambda i: rec.top_k(users[i : i + 1], 10, [plain]), args.lone)
    b = args.batch
    batched = timed(lambda i: rec.top_k(users[i * b : (i + 1) * b], 10, [plain] * b), args.batches)
    return [
        f"| exact TopK, lone query (torch threads {torch.get_num_threads()}) | {ms(lone)} ms |",
        f"| exact TopK, per query in batches of {b} (torch threads {torch.get_num_threads()}) "
        f"| {ms(batched, b)} ms "
        f"({ms(batched)} ms a batch) |",
    ]


def ann_rows(
    rec: Recommender, index: AnnIndex, users: torch.Tensor, args: argparse.Namespace
) -> list[str]:
    import faiss

    knob = "ef_search" if index.kind == "hnsw" else "nprobe"
    values = args.ef if index.kind == "hnsw" else args.nprobe
    queries = torch.from_numpy(ranking_tables(rec.artifact).queries)
    rows = []
    for value in values:
        params = {knob: value}
        recall = measure_recall(rec, index, args.recall_queries, k=10, **params)
        faiss.omp_set_num_threads(1)  # a lone query has nothing to parallelise
        lone = timed(
            lambda i, p=params: index.search(queries[users[i : i + 1]], 10, **p), args.lone
        )
        # Batches also on one thread: a serving worker is one core; parallelism is across workers.
        batched = timed(
            lambda i, p=params, b=args.batch: index.search(
                queries[users[i * b : (i + 1) * b]], 10, **p
            ),
            args.batches,
        )
        served = timed(
            lambda i, p=params: index.top_k(rec.exact, users[i : i + 1], 10, **p), args.lone
        )
        rows.append(
            f"| {index.kind} {knob}={value} | {recall:.4f} | {ms(lone)} ms | {ms(served)} ms | "
            f"{ms(batched, args.batch)} ms |"
        )
    return rows


# ------------------------------------------------------------------------------ --serve
def fetch_main(address: str, users: list[str], k: int) -> None:
    """Client process: TopK for each user, one call at a time; prints {user: [item ids]}."""
    import grpc

    from mfserve.v1 import recommender_pb2 as pb
    from mfserve.v1 import recommender_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)
        out = {
            u: [i.item_id for i in stub.TopK(pb.TopKRequest(user_id=u, k=k), timeout=60).items]
            for u in users
        }
    print(json.dumps(out))


def fetch(address: str, users: list[str], k: int = 10) -> dict[str, list[str]]:
    command = [sys.executable, "-m", "benchmarks.big_catalogue", "--fetch", address,
               "--fetch-users", ",".join(users), "--fetch-k", str(k)]  # fmt: skip
    out = subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    answers: dict[str, list[str]] = json.loads(out.stdout.strip().splitlines()[-1])
    return answers


def recall(approx: dict[str, list[str]], exact: dict[str, list[str]]) -> float:
    hits = sum(len(set(approx[u]) & set(want)) for u, want in exact.items())
    return hits / max(1, sum(len(want) for want in exact.values()))


def serve_rows(version: Path, n_users: int, n_items: int, args: argparse.Namespace) -> list[str]:
    """End-to-end rows: a server subprocess per configuration, a client process per figure."""

    opts = argparse.Namespace(
        duration=args.duration, warmup=1.0, channels=8, users=n_users, items=n_items
    )
    rng = random.Random(0)
    sample = [f"u{rng.randrange(n_users)}" for _ in range(args.recall_users)]
    configs: list[tuple[str, list[str]]] = [
        ("gRPC floor: canned answers, no model work", ["<empty>"]),
        ("exact (--ann none)", ["--ann", "none"]),
    ]
    for ef in args.serve_ef:
        label = "stored ef_search" if ef == 0 else f"--ann-ef-search {ef}"
        extra = ["--ann", "hnsw"] + (["--ann-ef-search", str(ef)] if ef else [])
        configs.append((f"approximate (--ann hnsw, {label})", extra))
    if args.serve_arg:
        configs = [
            (label, extra if extra == ["<empty>"] else [*extra, *args.serve_arg])
            for label, extra in configs
        ]
    if args.pin_cpus:
        configs = [(label, [*extra, "--pin-cpus", args.pin_cpus]) for label, extra in configs]
    lines = [
        "",
        "## End to end: `mfserve serve` subprocess, separate client processes",
        "",
        f"TopK k=10 (seen items excluded), {args.duration:.0f} s closed loop per cell after 1 s "
        f"warm-up; recall@10 of the served answers against the served exact ones for "
        f"{len(sample)} users; server CPU per call = user+sys seconds of the server / calls.",
        "",
        "| server | command | TopK p50 c=1 | server CPU/call c=1 | TopK calls/s c=64 "
        "| p50 c=64 | recall@10 vs served exact | start (load + index) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    polling = IdlePoll() if args.idle_poll else contextlib.nullcontext()
    if args.pin_cpus:
        lines[4:4] = [
            "",
            f"Every server, the floor included, bound to one CPU (`--pin-cpus {args.pin_cpus}`).",
        ]
    if args.idle_poll:
        lines[4:4] = [
            "",
            "Idle polling on for every row, the floor included (`mfserve serve --idle-poll`'s "
            "SCHED_IDLE spinner per CPU, started once by this script).",
        ]
    with polling:
        lines += _serve_configs(version, configs, sample, opts)
    return lines


def _serve_configs(
    version: Path,
    configs: list[tuple[str, list[str]]],
    sample: list[str],
    opts: argparse.Namespace,
) -> list[str]:
    from benchmarks.serve_probe import Server, run_client

    lines: list[str] = []
    exact_answers: dict[str, list[str]] | None = None
    for label, extra in configs:
        empty = extra[0] == "<empty>"
        floor = ["python", "-m", "benchmarks.harness.empty_server", "--model", str(version)]
        command = (
            shlex.join([*floor, *extra[1:]])
            if empty
            else f"mfserve serve --model {version} --port 0 {shlex.join(extra)}"
        )
        started = time.perf_counter()
        server = Server(version, extra)
        start_s = time.perf_counter() - started
        try:
            lone = run_client(server.address, "topk", 1, opts, server)
            wide = run_client(server.address, "topk", 64, opts, server)
            answers = {} if empty else fetch(server.address, sample)
        finally:
            server.stop()
        if empty:
            score = "-"
        elif exact_answers is None:
            exact_answers, score = answers, "1 (reference)"
        else:
            score = f"{recall(answers, exact_answers):.4f}"
        row = (
            f"| {label} | `{command}` | {lone['p50_ms']:.3f} ms | "
            f"{lone.get('server_cpu_us', float('nan')):.0f} us | {wide['qps']:,.0f} | "
            f"{wide['p50_ms']:.1f} ms | {score} | {start_s:.1f} s |"
        )
        lines.append(row)
        print(row, flush=True)
    return lines


def memory_rows(version: Path, n_users: int, n_items: int, args: argparse.Namespace) -> list[str]:
    """Sum of Rss and Pss over the server's processes, --workers 1 vs 2 (with the index)."""
    from benchmarks.serve_probe import Server, run_client, smaps

    opts = argparse.Namespace(duration=2.0, warmup=0.0, channels=8, users=n_users, items=n_items)
    lines = [
        "",
        "## Memory: `--workers 1` vs `--workers 2` (sum over the parent and its workers)",
        "",
        "After 2 s of TopK at concurrency 8 and 2 s of BatchPredict (1,000 pairs) at concurrency "
        "8, over 8 connections (both workers answer).",
        "",
        "| command | processes | sum Rss | sum Pss (real memory) | Pss vs 1 worker |",
        "|---|---:|---:|---:|---:|",
    ]
    base: float | None = None
    for workers in (1, 2):
        # serve_probe.Server waits for the "workers ready" line whenever --workers is given.
        extra = ["--ann", args.memory_ann] + (["--workers", str(workers)] if workers > 1 else [])
        server = Server(version, extra)
        try:
            for rpc in ("topk", "predict"):
                run_client(server.address, rpc, 8, opts)
            rows = [smaps(pid) for pid in server.pids()]
        finally:
            server.stop()
        rss, pss = sum(r["Rss"] for r in rows), sum(r["Pss"] for r in rows)
        base = pss if base is None else base
        command = f"mfserve serve --model {version} --port 0 {shlex.join(extra)}"
        row = f"| `{command}` | {len(rows)} | {rss:,} MiB | {pss:,} MiB | {pss / base:.2f}x |"
        lines.append(row)
        print(row, flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--model", help="model or version folder (default: generate a synthetic one)"
    )
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--factors", type=int, default=64)
    parser.add_argument("--lone", type=int, default=50, help="lone queries timed")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=10, help="batches timed")
    parser.add_argument("--recall-queries", type=int, default=500)
    parser.add_argument("--m", type=int, default=16, help="HNSW M")
    parser.add_argument("--ef-construction", type=int, default=64)
    parser.add_argument("--ef", default="16,32,64,128", help="HNSW efSearch values to sweep")
    parser.add_argument("--ivf", action="store_true", help="also build and sweep an IVF index")
    parser.add_argument("--no-hnsw", action="store_true", help="skip the HNSW index")
    parser.add_argument("--exact-only", action="store_true", help="skip every index")
    parser.add_argument("--nlist", type=int, default=4096)
    parser.add_argument("--nprobe", default="8,32,128", help="IVF nprobe values to sweep")
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="build threads"
    )
    parser.add_argument("--markdown", help="also write the results to this file")
    parser.add_argument(
        "--serve",
        action="store_true",
        help="measure the real server (and the stored index) instead of building indexes",
    )
    parser.add_argument(
        "--serve-ef",
        default="0",
        help="--serve: efSearch values served with --ann hnsw, one server each; 0: the stored one",
    )
    parser.add_argument("--duration", type=float, default=5.0, help="--serve: seconds per cell")
    parser.add_argument(
        "--idle-poll",
        action="store_true",
        help="--serve: keep the CPUs busy with mfserve serve --idle-poll's SCHED_IDLE spinners "
        "for the whole measurement, so the floor and every server are measured alike",
    )
    parser.add_argument(
        "--pin-cpus",
        default="",
        metavar="CPUS",
        help="--serve: every server, the floor included, bound to the first CPU of CPUS "
        "(mfserve serve --pin-cpus); load clients stay unbound",
    )
    parser.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="--serve: extra `mfserve serve` argument for every mfserve server (not the floor), "
        "repeatable: --serve-arg=--workers=2",
    )
    parser.add_argument("--recall-users", type=int, default=200, help="--serve: users for recall")
    parser.add_argument(
        "--memory-ann", default="hnsw", help="--serve: the --ann of the memory rows ('' to skip)"
    )
    parser.add_argument("--fetch", help=argparse.SUPPRESS)  # client process of --serve
    parser.add_argument("--fetch-users", help=argparse.SUPPRESS)
    parser.add_argument("--fetch-k", type=int, default=10, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fetch:
        fetch_main(args.fetch, args.fetch_users.split(","), args.fetch_k)
        return 0
    args.load_before = os.getloadavg()
    args.serve_ef = [int(v) for v in args.serve_ef.split(",") if v.strip()]
    args.ef = [int(v) for v in args.ef.split(",")]
    args.nprobe = [int(v) for v in args.nprobe.split(",")]
    command = "python -m benchmarks.big_catalogue " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )

    with tempfile.TemporaryDirectory(prefix="mfserve-big-") as tmp:
        started = time.perf_counter()
        if args.model:
            version = resolve_version(args.model)
        else:
            from mfserve.training.synth import main as synth_main

            sizes = ["--users", str(args.users), "--items", str(args.items)]
            synth_main(["synth", "--out", f"{tmp}/big", *sizes, "--factors", str(args.factors)])
            version = resolve_version(f"{tmp}/big")
        generated = time.perf_counter() - started
        base_rss = rss_mb()
        started = time.perf_counter()
        artifact = load_artifact(version)
        loaded = time.perf_counter() - started
        rec = Recommender(artifact)
        built = time.perf_counter() - started - loaded
        rec.top_k(torch.arange(4), 10)  # touch every page of the ranking tables once
        shape = (
            f"{artifact.n_users:,} users x {artifact.n_items:,} items x {artifact.factors} factors"
        )
        lines = [
            "# Large-catalogue microbenchmark (in-process)",
            "",
            f"Command: `{command}`",
            "",
            f"Model: {shape} ({'given' if args.model else f'generated in {generated:.1f}s'})",
            "",
            f"load_artifact {loaded:.2f}s (sha256 of every file + mmap); "
            f"Recommender() {built:.2f}s; RSS {base_rss:.0f} MB before, "
            f"{rss_mb():.0f} MB after loading and one TopK.",
            "",
            "| exact path | median |",
            "|---|---:|",
        ]
        generator = torch.Generator().manual_seed(0)
        users = torch.randint(
            0, artifact.n_users, (max(args.lone, args.batch * args.batches),), generator=generator
        )
        # Both thread settings: on a small shared machine intra-op threads can hurt a lone query.
        for threads in sorted({1, args.threads}):
            torch.set_num_threads(threads)
            lines += exact_rows(rec, users, args)
        torch.set_num_threads(args.threads)
        print("\n".join(lines), flush=True)

        import faiss

        if args.serve:
            lines += stored_index_rows(rec, version, users, args)
            n_users, n_items = artifact.n_users, artifact.n_items
            del rec, artifact  # the servers load their own copies
            lines += serve_rows(version, n_users, n_items, args)
            if args.memory_ann:
                lines += memory_rows(version, n_users, n_items, args)
            return finish(lines, args)

        kinds: list[tuple[str, dict[str, int]]] = []
        if not args.no_hnsw and not args.exact_only:
            hnsw = {"m": args.m, "ef_construction": args.ef_construction, "ef_search": args.ef[0]}
            kinds.append(("hnsw", hnsw))
        if args.ivf and not args.exact_only:
            kinds.append(("ivf", {"nlist": args.nlist, "nprobe": args.nprobe[0]}))
        for kind, params in kinds:
            faiss.omp_set_num_threads(args.threads)
            index = build_index(artifact, kind, **params)
            sidecar = index.save(version)
            size = (version / f"ann-{kind}.faiss").stat().st_size / 2**20
            started = time.perf_counter()
            reloaded = load_index(version, artifact, kind)
            assert reloaded is not None
            lines += [
                "",
                f"{kind} {params}: built in {index.build_seconds:.1f}s "
                f"with {args.threads} threads; file {size:.0f} MB; "
                f"load_index (sha256 checks + read) {time.perf_counter() - started:.1f}s; "
                f"sidecar {sidecar.name}",
                "",
                "| index | recall@10 vs exact | search p50, lone query (1 thread) "
                "| top_k p50, lone query (incl. seen filter) "
                f"| search per query, batches of {args.batch} (1 thread) |",
                "|---|---:|---:|---:|---:|",
            ]
            lines += ann_rows(rec, reloaded, users, args)
            print("\n".join(lines[-6:]), flush=True)
            del index, reloaded
    return finish(lines, args)


def stored_index_rows(
    rec: Recommender, version: Path, users: torch.Tensor, args: argparse.Namespace
) -> list[str]:
    """In-process rows for the index stored beside the version (--serve builds nothing)."""
    import faiss

    faiss.omp_set_num_threads(1)
    started = time.perf_counter()
    index = load_index(version, rec.artifact, "hnsw")
    if index is None:
        raise SystemExit(f"no hnsw index beside {version}: mfserve index --model {version}")
    loaded = time.perf_counter() - started
    size = (version / "ann-hnsw.faiss").stat().st_size / 2**20
    served = sorted({v or index.params["ef_search"] for v in args.serve_ef})
    lines = [
        "",
        f"Stored index: hnsw {index.params}, built in {index.build_seconds:.1f}s (sidecar "
        f"build_seconds); file {size:.0f} MB; load_index (sha256 checks + read) {loaded:.1f}s.",
        "",
        "| index | recall@10 vs exact | search p50, lone query (1 thread) "
        "| top_k p50, lone query (incl. seen filter) "
        f"| search per query, batches of {args.batch} (1 thread) |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += ann_rows(rec, index, users, argparse.Namespace(**{**vars(args), "ef": served}))
    print("\n".join(lines), flush=True)
    return lines


def finish(lines: list[str], args: argparse.Namespace) -> int:
    before, after = args.load_before, os.getloadavg()
    lines += [
        "",
        f"Machine: {os.cpu_count()} cores, shared with other jobs; load average (1/5/15 min) "
        f"before {before[0]:.2f} {before[1]:.2f} {before[2]:.2f}, "
        f"after {after[0]:.2f} {after[1]:.2f} {after[2]:.2f}.",
    ]
    text = "\n".join(lines) + "\n"
    print("\n---\n" + text)
    if args.markdown:
        Path(args.markdown).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
