"""Real-time personalisation, measured: fold-in quality, BatchTopK against one TopK per user, and
pages, on a trained model (default: the newest version of models/movielens).

* **Quality** (``mfserve evaluate --fold-in``'s protocol): 20% of the users held out of a second
  training run and folded in from their training ratings, against the same users trained
  normally and against popularity: RMSE and NDCG@10.
* **BatchTopK**: a real ``mfserve serve`` subprocess; every user's top 10 as one ``batch_top_k``
  stream against one ``top_k`` call per user, one after another (each timed ``--repeat`` times,
  interleaved; medians). The answers must be identical.
* **Pages**: pages of 10 over the first 100 items of every 10th user, concatenated, against
  TopK k=100 (no repeats, same list).

Fold-in TopK latency against a known user's is the harness's, at concurrency 1::

    python -m benchmarks.harness --model models/movielens --servers mfserve --rpcs topk,foldin \\
        --concurrency 1 --duration 4 --warmup 1 --rounds 5

Usage::

    python -m benchmarks.fold_in [--model models/movielens] [--repeat 3] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from server_harness import serve_subprocess  # the tests' server harness

from mfserve.client import RecommenderClient
from mfserve.training.artifact import load_artifact
from mfserve.training.pipeline import evaluate_fold_in_saved


def quality(model: str) -> list[str]:
    report = evaluate_fold_in_saved(model)
    trained = report["trained"]
    lines = [
        f"Held-out users: {trained['users']:.0f} ({trained['ranked_users']:.0f} with a relevant "
        "test item)",
        "",
        "| users scored by | RMSE | NDCG@10 | NDCG@10 vs trained |",
        "|---|---:|---:|---:|",
    ]
    for name, label in (
        ("trained", "the model trained with them"),
        ("folded_in", "fold-in, from their training ratings"),
        ("popularity", "popularity (bias-only ratings)"),
    ):
        row = report[name]
        ratio = row["ndcg_at_10"] / trained["ndcg_at_10"]
        lines.append(f"| {label} | {row['rmse']:.4f} | {row['ndcg_at_10']:.4f} | {ratio:.3f}x |")
    return lines


def batch_against_calls(model: str, repeat: int) -> list[str]:
    users = load_artifact(model).user_ids
    streamed_s: list[float] = []
    calls_s: list[float] = []
    with serve_subprocess(model) as server, RecommenderClient(server.address) as client:
        client.top_k(users[0])  # a live connection and warm kernels before timing
        for _ in range(repeat):
            started = time.perf_counter()
            streamed = [r.item_ids for r in client.batch_top_k(users, k=10)]
            streamed_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            one_by_one = [client.top_k(user, k=10).item_ids for user in users]
            calls_s.append(time.perf_counter() - started)
            if streamed != one_by_one:
                raise SystemExit("BatchTopK and TopK disagree")
        pages_ok = all(
            _paged(client, user) == client.top_k(user, k=100).item_ids for user in users[::10]
        )
    stream, calls = statistics.median(streamed_s), statistics.median(calls_s)
    return [
        f"| {len(users)} users' top 10 | seconds (median of {repeat}) | users/s |",
        "|---|---:|---:|",
        f"| one `batch_top_k` stream | {stream:.3f} | {len(users) / stream:,.0f} |",
        f"| one `top_k` call per user | {calls:.3f} | {len(users) / calls:,.0f} |",
        "",
        f"BatchTopK streams **{calls / stream:.1f}x** faster, with identical answers. Pages of "
        f"10 over the first 100 items concatenate to TopK k=100 for every 10th user: "
        f"{'yes' if pages_ok else 'NO'}.",
    ]


def _paged(client: Any, user: str) -> list[str]:
    items: list[str] = []
    token = ""
    while True:
        page = client.top_k(user, k=100, page_size=10, page_token=token)
        items += page.item_ids
        token = page.next_page_token
        if not token:
            return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/movielens", help="model or version folder")
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions")
    parser.add_argument("--markdown", help="also write the tables to this file")
    args = parser.parse_args(argv)
    text = "\n".join([*quality(args.model), "", *batch_against_calls(args.model, args.repeat)])
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
