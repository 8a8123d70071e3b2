"""The server's compiled paths against the protobuf and torch ones, in-process.

BatchPredict: each step the server takes for one call, timed on its own over the same prebuilt
request: the protobuf path (parse, ids to lists, one dict lookup per id, torch's predict) against
the compiled path (``batch_decode`` straight from the bytes, then ``pair_kernel``).
TopK: the usual exact query (known users, seen items excluded, k=10), alone and in batches of 3,
8 and 64, through torch (``ExactRanker.top_k``) and through the compiled kernel's two scans (full
and pruned), each kernel timed alternately with torch; and how
much of the catalogue the pruned scan visits.

Medians of ``--repeat`` runs, one thread, hot caches, so a loaded server's figures are higher
(its caches are shared with the load clients); compare the paths, not these numbers with the
end-to-end ones.

    python -m benchmarks.compiled_paths --model models/movielens [--pairs 1000]
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mfserve.server.batch_decode import batch_decoder
from mfserve.training.artifact import load_artifact, resolve_version
from mfserve.training.recommender import RankRequest, Recommender
from mfserve.training.scoring.compiled import RankKernel, rank_kernel
from mfserve.training.scoring.ratings import pair_kernel
from mfserve.v1 import recommender_pb2 as pb


def median_us(step: Callable[[], Any], repeat: int) -> float:
    for _ in range(min(100, repeat)):  # warm-up
        step()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def paired_median_us(
    first: Callable[[], Any], second: Callable[[], Any], repeat: int
) -> tuple[float, float]:
    """Both steps' medians, timed alternately so the host's drift hits both alike."""
    for _ in range(min(100, repeat)):
        first()
        second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeat):
        for step, out in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            step()
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]) * 1e6, statistics.median(times[1]) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/movielens"))
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=2000)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    model = Recommender(load_artifact(resolve_version(args.model)))
    decoder = batch_decoder(model.user_index, model.item_index)
    kernel = pair_kernel(model.artifact)
    if decoder is None or kernel is None:
        raise SystemExit("numba is not installed: only the protobuf path exists")
    rng = random.Random(0)
    request = pb.BatchPredictRequest(
        user_ids=[rng.choice(model.user_ids) for _ in range(args.pairs)],
        item_ids=[rng.choice(model.item_ids) for _ in range(args.pairs)],
    )
    raw = request.SerializeToString()
    parsed = pb.BatchPredictRequest.FromString(raw)
    user_ids, item_ids = list(parsed.user_ids), list(parsed.item_ids)
    users, items = model.user_rows(user_ids), model.item_rows(item_ids)
    decoded = decoder.decode(raw, args.pairs)
    assert decoded is not None
    assert (decoded[0] == users).all() and (decoded[1] == items).all()
    users_t, items_t = torch.from_numpy(users), torch.from_numpy(items)

    steps = {
        "protobuf: parse the request": lambda: pb.BatchPredictRequest.FromString(raw),
        "protobuf: ids to Python lists": lambda: (list(parsed.user_ids), list(parsed.item_ids)),
        "protobuf: one dict lookup per id": lambda: (
            model.user_rows(user_ids),
            model.item_rows(item_ids),
        ),
        "torch: Recommender.predict": lambda: model.predict(users_t, items_t),
        "compiled: batch_decode from the bytes": lambda: decoder.decode(raw, args.pairs),
        "compiled: pair_kernel": lambda: kernel.predict(users, items),
    }
    print(f"model {args.model}; {args.pairs} pairs; median of {args.repeat}; hot caches\n")
    print("| step | us per call |")
    print("|---|---:|")
    totals = {"protobuf": 0.0, "torch": 0.0, "compiled": 0.0}
    for name, step in steps.items():
        us = median_us(step, args.repeat)
        totals[name.split(":")[0]] += us
        print(f"| {name} | {us:,.1f} |")
    before = totals["protobuf"] + totals["torch"]
    after = totals["compiled"]
    print(f"| **protobuf + torch, ids to ratings** | **{before:,.1f}** |")
    print(f"| **compiled, ids to ratings** | **{after:,.1f}** ({before / after:.1f}x less) |")
    top_k_table(model, args.repeat)
    return 0


def top_k_table(model: Recommender, repeat: int) -> None:
    tables = model.ranking_tables()
    kernel = rank_kernel(tables, chunk_size=model.chunk_size)
    if kernel is None:
        print("\nTopK: no rank kernel for this model (a catalogue past one scoring chunk)")
        return
    full = RankKernel.from_tables(tables, pruned=False)
    pruned = RankKernel.from_tables(tables, pruned=True)
    everyone = list(range(model.n_users))
    _, scanned = pruned.top_k_scanned(everyone, 10, [True] * len(everyone))
    share = statistics.mean(scanned) / model.n_items
    chosen = "pruned" if kernel.order is not None else "full"
    print(
        f"\nTopK k=10, seen items excluded. The pruned scan visits {share:.1%} of the "
        f"{model.n_items:,} items on average over all {len(everyone)} users (p90 "
        f"{sorted(scanned)[int(0.9 * len(scanned))] / model.n_items:.1%}); the server picks the "
        f"{chosen} scan for this model.\n"
    )
    print("| TopK batch | torch us | full scan us | pruned scan us | pruned vs torch |")
    print("|---|---:|---:|---:|---:|")
    step = max(1, model.n_users // 64)
    for size in (1, 3, 8, 64):
        batch, seen = everyone[::step][:size], [True] * size
        torch_step = functools.partial(model.exact.top_k, batch, 10, [RankRequest()] * size)
        times = paired_median_us(
            torch_step, functools.partial(full.top_k, batch, 10, seen), repeat
        ) + paired_median_us(torch_step, functools.partial(pruned.top_k, batch, 10, seen), repeat)
        label = "lone query" if size == 1 else f"{size} users"
        before = (times[0] + times[2]) / 2  # torch, timed twice (once beside each kernel)
        print(
            f"| {label} | {before:,.1f} | {times[1]:,.1f} | {times[3]:,.1f} | "
            f"{times[3] / before:.2f}x |"
        )


if __name__ == "__main__":
    raise SystemExit(main())
