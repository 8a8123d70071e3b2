"""Training-quality benchmark on the fixed MovieLens protocol, every row in one run.

Rows: the global-mean and popularity baselines, the reference recipe (8 factors, no biases,
U(0, 0.05) init, Adam 1e-3, MSE, batch 128, 128 epochs) and the default recipe. Each model is
measured through ``Recommender``, the code path the server answers with.

    .venv/bin/python -m benchmarks.train_quality [--reference-epochs N] [--markdown PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mfserve.training.config import TrainConfig
from mfserve.training.data import load_ratings
from mfserve.training.evaluate import evaluate_baselines, evaluate_recommender
from mfserve.training.fit import fit
from mfserve.training.pipeline import assemble_artifact, protocol_for
from mfserve.training.recommender import Recommender

COLUMNS = (
    "rmse", "mae", "ndcg_at_10", "precision_at_10", "recall_at_10", "hit_rate_at_10", "map_at_10",
    "coverage_at_10",
)  # fmt: skip
HEADER = "| model | RMSE | MAE | NDCG@10 | P@10 | R@10 | HR@10 | MAP@10 | coverage | train s |"


def _row(name: str, m: dict[str, float], seconds: str) -> str:
    cells = [f"{m[c]:.4f}" if c in m else "-" for c in COLUMNS]
    return f"| {name} | " + " | ".join(cells) + f" | {seconds} |"


def _cli_wall_seconds(source: str | None) -> float:
    """Wall time of the real ``mfserve train`` command, process start to saved artifact."""
    with tempfile.TemporaryDirectory() as folder:
        command = [
            sys.executable,
            "-m",
            "mfserve",
            "train",
            "--out",
            f"{folder}/m",
            "--no-progress",
        ]
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--data", default=None, help="ratings source (default: bundled ml-latest-small)"
    )
    parser.add_argument(
        "--reference-epochs",
        type=int,
        default=128,
        help="epochs of the reference recipe (the documented figure uses 128)",
    )
    parser.add_argument(
        "--skip-reference", action="store_true", help="leave the ~100 s reference run out"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="default-recipe fits; the median time is reported"
    )
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    parser.add_argument("--progress", action="store_true", help="show tqdm bars")
    args = parser.parse_args(argv)

    data = load_ratings(args.data, progress=False)
    protocol = protocol_for(data, 0.2, 42)
    rows = [HEADER, "|" + "---|" * 10]
    baselines = evaluate_baselines(protocol)
    rows.append(_row("global mean", baselines["global_mean"], "-"))
    rows.append(_row("popularity", baselines["popularity"], "-"))

    runs: list[tuple[str, TrainConfig, int]] = []
    if not args.skip_reference:
        reference = dataclasses.replace(TrainConfig.reference(), epochs=args.reference_epochs)
        runs.append((f"reference recipe ({args.reference_epochs} epochs)", reference, 1))
    runs.append(("mfserve default", TrainConfig(), args.repeats))
    for name, config, repeats in runs:
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            result = fit(
                protocol.train_users, protocol.train_items, protocol.train_ratings,
                protocol.n_users, protocol.n_items, config,
                progress=args.progress, rating_range=data.rating_range,
            )  # fmt: skip
            seconds.append(time.perf_counter() - started)
        artifact = assemble_artifact(protocol, result, data, config)
        metrics = evaluate_recommender(protocol, Recommender(artifact))
        shown = f"{statistics.median(seconds):.1f}" + (
            f" (median of {repeats})" if repeats > 1 else ""
        )
        rows.append(_row(name, metrics, shown))
        print(
            f"[{name}] best_epoch={result.best_epoch} seconds={[round(s, 2) for s in seconds]}",
            flush=True,
        )

    walls = [_cli_wall_seconds(args.data) for _ in range(args.repeats)] if args.data is None else []
    notes = (
        f"\n{len(data.ratings)} ratings, protocol split 80/20 (seed 42): {len(protocol.train_ratings)} "
        f"train / {len(protocol.test_ratings)} test rows, {protocol.n_test_unseen} test rows with an "
        f"unseen user or item (bias-only fallback); {len(protocol.eval_users)} ranking users over "
        f"{protocol.n_items} training items. Machine: {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads."
    )
    if walls:
        notes += (
            " Whole `mfserve train` command (process start, imports, load, fit, evaluate, save), "
            f"wall: {statistics.median(walls):.1f} s (median of {len(walls)}: "
            f"{', '.join(f'{w:.1f}' for w in walls)})."
        )
    table = "\n".join(rows) + "\n" + notes + "\n"
    print(table)
    if args.markdown:
        args.markdown.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
