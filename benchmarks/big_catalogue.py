"""In-process microbenchmark for a large catalogue (default 1M items x 64 factors, synthetic).

Measures, without gRPC in the way:

* loading the artifact (memory-mapped) and building the ``Recommender``, with the process's RSS,
* exact TopK (``Recommender.top_k``, chunked full scan) for a lone query and per query in batches,
* HNSW (and optionally IVF) build seconds, index size, ANN query p50 for a lone query and per query
  in batches, and recall@10 against the exact answer for a sweep of efSearch / nprobe values.

Usage::

    python -m benchmarks.big_catalogue --markdown big.md               # generates the model (~15 s)
    python -m benchmarks.big_catalogue --model /tmp/big --ivf --ef 16,32,64,128
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mfserve.training.ann import AnnIndex, build_index, load_index, measure_recall, ranking_tables
from mfserve.training.artifact import load_artifact, resolve_version
from mfserve.training.recommender import RankRequest, Recommender


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
    queries = ranking_tables(rec.artifact).user_query
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
        served = timed(lambda i, p=params: index.top_k(rec, users[i : i + 1], 10, **p), args.lone)
        rows.append(
            f"| {index.kind} {knob}={value} | {recall:.4f} | {ms(lone)} ms | {ms(served)} ms | "
            f"{ms(batched, args.batch)} ms |"
        )
    return rows


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
    args = parser.parse_args(argv)
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
    text = "\n".join(lines) + "\n"
    print("\n---\n" + text)
    if args.markdown:
        Path(args.markdown).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
