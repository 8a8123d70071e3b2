"""The training commands: ``mfserve train``, ``evaluate`` and ``recommend`` here, ``synth`` and
``index`` in ``mfserve.training.synth`` and ``mfserve.training.index_cli``.

``register`` only builds argparse parsers: torch and pandas are imported inside the handlers, so
``mfserve --help`` works on the thin client install.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from mfserve.training.config import DefaultsOnceFormatter

DEFAULT_MODEL_DIR = "models/movielens"
EXIT_BAD_INPUT = 2
EXIT_WRITE_FAILED = 1  # the data was fine; the model could not be written (disk full, read-only)

_DATA_HELP = (
    "ratings to train on: a MovieLens folder or .zip (ml-latest-small, ml-latest, ml-25m, ml-32m, "
    "ml-1m, ml-10m), an http(s) URL of one (downloaded once into the cache), or any CSV/TSV/Parquet "
    "file with user, item and rating columns (default: the bundled ml-latest-small)"
)


def register(subparsers: Any) -> None:
    """Add the training subcommands to the ``mfserve`` parser."""
    from mfserve.training import index_cli, synth

    _register_train(subparsers)
    _register_evaluate(subparsers)
    _register_recommend(subparsers)
    synth.register(subparsers)
    index_cli.register(subparsers)


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--user-col", help="user id column of a generic CSV/Parquet file (default: user or userId)"
    )
    parser.add_argument(
        "--item-col", help="item id column of a generic file (default: item or movieId)"
    )
    parser.add_argument("--rating-col", help="rating column of a generic file (default: rating)")
    parser.add_argument(
        "--rating-range",
        nargs=2,
        type=float,
        metavar=("MIN", "MAX"),
        help="valid rating range; ratings outside it are an error (default: the release's, else observed)",
    )
    parser.add_argument(
        "--cache-dir",
        help="where downloaded datasets are kept (default: ~/.cache/mfserve or $MFSERVE_CACHE)",
    )
    parser.add_argument(
        "--sha256", help="expected sha256 of a downloaded file; a mismatch is an error"
    )


def _load_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for flag in ("user_col", "item_col", "rating_col", "cache_dir", "sha256"):
        if getattr(args, flag, None) is not None:
            options[flag] = getattr(args, flag)
    if getattr(args, "rating_range", None) is not None:
        options["rating_range"] = tuple(args.rating_range)
    return options


def _register_train(subparsers: Any) -> None:
    from mfserve.training.config import add_hyperparameter_flags

    parser = subparsers.add_parser(
        "train",
        help="train a model and save it as the next numbered version",
        description=(
            "Train a factor model (rating head and ranking head) and write it as models/NAME/<N+1>/. "
            "By default 20% of the ratings are held out by the evaluation protocol and the test "
            "metrics are stored in the manifest; --holdout 0 trains on everything."
        ),
        formatter_class=DefaultsOnceFormatter,
    )
    parser.add_argument("--data", default=None, help=_DATA_HELP)
    parser.add_argument(
        "--out", default=DEFAULT_MODEL_DIR, help="model folder; versions go in OUT/<N>/"
    )
    parser.add_argument(
        "--holdout",
        type=float,
        default=0.2,
        help="fraction of ratings held out for the test metrics (0: train on all)",
    )
    parser.add_argument(
        "--split-seed", type=int, default=42, help="seed of the protocol's permutation of the rows"
    )
    parser.add_argument(
        "--reference",
        action="store_true",
        help="start from the reference recipe (8 factors, no biases, Adam 1e-3, batch 128, 128 epochs) instead of the tuned defaults; other flags still override it",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    parser.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="train with N processes on this machine: runs torchrun --standalone "
        "--nproc-per-node N -m mfserve.training train (the same flags); rank 0 writes the model",
    )
    parser.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="where to train: auto takes a CUDA GPU when torch sees one",
    )
    _add_data_flags(parser)
    add_hyperparameter_flags(parser)
    parser.set_defaults(handler=_run_train)


def _register_evaluate(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="measure a saved model on the held-out part of its training data",
        description=(
            "Rebuild the evaluation protocol's test part from the data recorded in the model's "
            "manifest and report RMSE, MAE and top-10 ranking metrics next to global-mean and "
            "popularity baselines."
        ),
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL_DIR,
        help="a model folder (newest version) or a version folder (default: %(default)s)",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="override the data source recorded in the manifest (its sha256 must still match)",
    )
    parser.add_argument(
        "--fold-in",
        action="store_true",
        help="measure fold-in instead: train the model's recipe again without 20%% of the "
        "users, fold each in from their training ratings, and score their test part against "
        "the same users trained normally and popularity",
    )
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    parser.set_defaults(handler=_run_evaluate)


def _register_recommend(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "recommend",
        help="top-k for one user, or every user, from a saved model, offline",
        description=(
            "Answer top-k in-process from the artifact, with no server: for one user (--user), "
            "or for every user into a parquet file (--all --out recs.parquet)."
        ),
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL_DIR,
        help="a model folder or version folder (default: %(default)s)",
    )
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="user id, as in the data (MovieLens: 1)")
    who.add_argument(
        "--all", action="store_true", help="every user of the model, written to --out (parquet)"
    )
    parser.add_argument(
        "--out", help="with --all: the parquet file (user_id, rank, item_id, score) to write"
    )
    parser.add_argument("-k", type=int, default=10, help="how many items (default: %(default)s)")
    parser.add_argument(
        "--include-seen", action="store_true", help="keep items the user rated in training"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(handler=_run_recommend)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _run_train(args: argparse.Namespace) -> int:
    if args.nproc < 1:
        return _fail(f"--nproc must be at least 1, got {args.nproc}")
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _torchrun(args.nproc, getattr(args, "raw_argv", None) or sys.argv[1:])

    from mfserve.training.artifact import ArtifactWriteError
    from mfserve.training.config import config_from_args
    from mfserve.training.data import DataError
    from mfserve.training.distributed import from_environment, shutdown
    from mfserve.training.fit import resolve_device
    from mfserve.training.pipeline import train_and_save

    try:
        wanted = resolve_device(args.device)
    except ValueError as exc:
        return _fail(str(exc))
    ranks = from_environment(wanted)
    try:
        config = config_from_args(args)
        path, metrics = train_and_save(
            args.out,
            source=args.data,
            config=config,
            holdout=args.holdout,
            split_seed=args.split_seed,
            load_options=_load_options(args),
            progress=not args.no_progress,
            ranks=ranks,
            device=ranks.device if ranks.active else wanted,
        )
    except (DataError, ValueError) as exc:
        return _fail(str(exc))
    except ArtifactWriteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_WRITE_FAILED
    finally:
        shutdown(ranks)
    if path is None:  # another rank than 0: it trained its share, rank 0 writes
        return 0
    if args.json:
        print(json.dumps({"path": str(path), "metrics": metrics}, indent=2))
    else:
        print(f"saved {path}")
        _print_metrics(metrics)
    return 0


def _torchrun(nproc: int, argv: list[str]) -> int:
    """``mfserve train --nproc N``: the same command under torchrun, N processes on this host
    (``--standalone``: a local rendezvous on a free port)."""
    import subprocess

    rest: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", "-m", "mfserve.training", *rest,
    ]  # fmt: skip
    return subprocess.run(command, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    """``python -m mfserve.training``: the training commands alone (what torchrun runs)."""
    parser = argparse.ArgumentParser(prog="mfserve")
    subparsers = parser.add_subparsers(dest="command", required=True)
    register(subparsers)
    args = parser.parse_args(argv)
    args.raw_argv = list(sys.argv[1:] if argv is None else argv)
    return int(args.handler(args))


def _run_evaluate(args: argparse.Namespace) -> int:
    from mfserve.training.artifact import ArtifactError
    from mfserve.training.data import DataError
    from mfserve.training.pipeline import evaluate_fold_in_saved, evaluate_saved

    try:
        if args.fold_in:
            metrics = evaluate_fold_in_saved(args.model, source=args.data)
        else:
            metrics = evaluate_saved(args.model, source=args.data)
    except (ArtifactError, DataError, ValueError) as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        _print_report(metrics)
    return 0


_REPORT_COLUMNS = (
    ("rmse", "RMSE"),
    ("mae", "MAE"),
    ("ndcg_at_10", "NDCG@10"),
    ("precision_at_10", "P@10"),
    ("recall_at_10", "R@10"),
    ("hit_rate_at_10", "HR@10"),
    ("map_at_10", "MAP@10"),
    ("coverage_at_10", "coverage"),
)


def _print_report(report: dict[str, dict[str, float]]) -> None:
    """One row per model (the model, then the baselines), one column per metric."""
    header = f"{'':<12}" + "".join(f"{title:>10}" for _, title in _REPORT_COLUMNS)
    print(header)
    for name, metrics in report.items():
        cells = "".join(
            f"{metrics[key]:>10.4f}" if key in metrics else f"{'-':>10}"
            for key, _ in _REPORT_COLUMNS
        )
        print(f"{name:<12}{cells}")


def _print_metrics(metrics: dict[str, float]) -> None:
    width = max((len(name) for name in metrics), default=0)
    for name, value in metrics.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"  {name:<{width}}  {shown}")


def _recommend_all(recommender: Any, args: argparse.Namespace) -> int:
    import time

    from mfserve.training.recommend_all import all_recommendations, write_recommendations

    started = time.perf_counter()
    columns = all_recommendations(recommender, args.k, exclude_seen=not args.include_seen)
    try:
        path = write_recommendations(columns, args.out)
    except OSError as exc:
        print(f"error: cannot write {args.out}: {exc}", file=sys.stderr)
        return EXIT_WRITE_FAILED
    seconds = time.perf_counter() - started
    print(
        f"wrote {path}: {len(columns['rank']):,} rows, top {args.k} for "
        f"{recommender.n_users:,} users in {seconds:.1f}s"
    )
    return 0


def _run_recommend(args: argparse.Namespace) -> int:
    import torch

    from mfserve.training.artifact import ArtifactError, load_artifact
    from mfserve.training.recommender import RankRequest, Recommender

    if args.k <= 0:
        return _fail(f"-k must be positive, got {args.k}")
    if args.all != bool(args.out):
        return _fail("--all and --out go together: --all --out recs.parquet")
    try:
        recommender = Recommender(load_artifact(args.model))
    except ArtifactError as exc:
        return _fail(str(exc))
    if args.all:
        return _recommend_all(recommender, args)
    row = int(recommender.user_rows([args.user])[0])
    if row < 0:
        return _fail(f"user {args.user!r} is not in the model {recommender.artifact.path}")
    [(items, scores)] = recommender.top_k(
        torch.tensor([row]), args.k, [RankRequest(exclude_seen=not args.include_seen)]
    )
    titles = recommender.artifact.item_titles or [None] * recommender.n_items
    rows = [
        {
            "rank": rank,
            "item_id": recommender.item_ids[i],
            "score": round(float(s), 4),
            "title": titles[i] or "",
        }
        for rank, (i, s) in enumerate(zip(items.tolist(), scores.tolist(), strict=True), start=1)
    ]
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        for entry in rows:
            print(
                f"{entry['rank']:>3}  {entry['item_id']:>8}  {entry['score']:>8.4f}  {entry['title']}"
            )
    return 0
