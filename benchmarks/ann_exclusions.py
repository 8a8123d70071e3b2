"""In-process: approximate TopK for users with few and with many seen items (the exclusions).

The index answers "best k items this user has not seen". Real users differ by orders of magnitude
in how much they have seen (ml-latest-small: a median of ~56 ratings, a maximum of ~2,700), so the
cost of leaving the seen items out matters most for the heaviest users. For the heaviest, median
and lightest ``--group`` users of a model this reports, per efSearch value:

* recall@10 of ``AnnIndex.top_k_lists`` (the server's path, seen items excluded) against the exact
  answer (``Recommender.top_k_lists``);
* p50 of a lone query (one user per call), and p50 of a batch of ``--batch`` users made of one
  heavy user and median users (what a heavy user does to the queries batched with it).

Uses the HNSW index stored beside the version, or builds one in memory with the default settings
when there is none (~0.2 s for ml-latest-small).

    python -m benchmarks.ann_exclusions --model models/movielens [--ef 32,64,128] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from mfserve.training.ann_build import build_index
from mfserve.training.ann_store import load_index
from mfserve.training.artifact import load_artifact, resolve_version
from mfserve.training.recommender import RankRequest, Recommender

UNSEEN = RankRequest(exclude_seen=True)


def p50_us(call: Callable[[int], object], count: int, rounds: int) -> float:
    """Median wall microseconds of ``call(i)`` over ``rounds`` passes of ``i`` in ``range(count)``."""
    times = []
    for _ in range(rounds):
        for i in range(count):
            started = time.perf_counter()
            call(i)
            times.append(time.perf_counter() - started)
    return 1e6 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder or version folder")
    parser.add_argument("--ef", default="32,64,128", help="efSearch values, comma-separated")
    parser.add_argument("--group", type=int, default=30, help="users per group")
    parser.add_argument("--batch", type=int, default=8, help="users per batch (1 heavy + median)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--item-order",
        action="store_true",
        help="keep the graph in item order (built indexes are renumbered for locality)",
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    version = resolve_version(Path(args.model))
    recommender = Recommender(load_artifact(version))
    index = load_index(version, recommender.artifact, "hnsw")
    source = "stored beside the version"
    if index is None:
        index = build_index(recommender.artifact, "hnsw", locality=not args.item_order)
        source = "built in memory, default settings"
    import faiss

    faiss.omp_set_num_threads(1)  # a serving process searches on one thread
    tables = recommender.ranking_tables()
    seen = np.diff(tables.seen_indptr)
    by_seen = np.argsort(seen, kind="stable")
    middle = len(by_seen) // 2 - args.group // 2
    groups = {
        "heaviest": by_seen[::-1][: args.group],
        "median": by_seen[middle : middle + args.group],
        "lightest": by_seen[: args.group],
    }
    print(f"model {version}, {recommender.n_users:,} users x {recommender.n_items:,} items; "
          f"HNSW {index.params} ({source}); torch and faiss on 1 thread")  # fmt: skip
    print()
    print("| users | seen items (median) | efSearch | recall@10 | lone query p50 |")
    print("|---|---:|---:|---:|---:|")
    for name, users in groups.items():
        rows = torch.tensor(users.tolist())
        exact = recommender.top_k_lists(rows, 10, [UNSEEN] * len(rows))
        for ef in [int(v) for v in args.ef.split(",")]:
            answers = index.top_k_lists(
                recommender.exact, rows, 10, [UNSEEN] * len(rows), ef_search=ef
            )
            hits = sum(len(set(a[0]) & set(e[0])) for a, e in zip(answers, exact, strict=True))

            def lone_query(i: int, r: torch.Tensor = rows, e: int = ef) -> object:
                return index.top_k_lists(recommender.exact, r[i : i + 1], 10, [UNSEEN], ef_search=e)

            lone = p50_us(lone_query, len(rows), args.rounds)
            print(f"| {name} | {int(np.median(seen[users]))} | {ef} | "
                  f"{hits / (10 * len(rows)):.3f} | {lone:.0f} us |")  # fmt: skip
    print()
    print(f"| batch of {args.batch} users | efSearch | batch p50 |")
    print("|---|---:|---:|")
    median_users = groups["median"].tolist()
    for label, heavy in (("median users only", None), ("1 heaviest + median users", 0)):
        batches = []
        for i in range(args.group):
            batch = [median_users[(i + j) % len(median_users)] for j in range(args.batch)]
            if heavy is not None:
                batch[0] = int(groups["heaviest"][i])
            batches.append(torch.tensor(batch))
        for ef in [int(v) for v in args.ef.split(",")]:

            def batch_query(i: int, b: list[torch.Tensor] = batches, e: int = ef) -> object:
                return index.top_k_lists(
                    recommender.exact, b[i], 10, [UNSEEN] * len(b[i]), ef_search=e
                )

            took = p50_us(batch_query, len(batches), args.rounds)
            print(f"| {label} | {ef} | {took:.0f} us |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
