"""``mfserve synth``: write a synthetic model with planted clusters as a normal artifact version.

User ``u`` prefers cluster ``u % C`` and item ``i`` belongs to cluster ``i % C``, so any answer
can be checked without a trained model; benchmarks use it for catalogues of any size (1M x 64
takes about 15 s and 1.5 GB peak). ``--ann`` also builds an approximate index beside the new
version (``mfserve index``, in ``mfserve.training.index_cli``, builds one for an existing version).

``register`` only builds the parser: torch and faiss are imported inside the handler.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from mfserve.training.config import DefaultsOnceFormatter
from mfserve.training.index_cli import add_ann_param, build_and_save, parse_params
from mfserve.training.index_cli import register as register_index

EXIT_OK = 0
EXIT_BAD_INPUT = 2


def register(subparsers: Any) -> None:
    """Add ``mfserve synth`` to the ``mfserve`` parser."""
    parser = subparsers.add_parser(
        "synth",
        help="write a synthetic model with planted clusters (for tests and benchmarks)",
        description=(
            "Write a synthetic factor model as the next numbered version under --out. Item i "
            "belongs to cluster i % C and user u prefers cluster u % C, so user u's top items "
            "come from that cluster. Ids are u<row> and i<row>."
        ),
        formatter_class=DefaultsOnceFormatter,
    )
    parser.add_argument("--out", required=True, help="model folder; the version goes in OUT/<N>/")
    parser.add_argument("--users", type=int, required=True, help="number of users")
    parser.add_argument("--items", type=int, required=True, help="number of items")
    parser.add_argument("--factors", type=int, default=64, help="factor width")
    parser.add_argument("--clusters", type=int, default=32, help="planted clusters")
    parser.add_argument(
        "--seen-per-user", type=int, default=5, help="training items per user (excluded by TopK)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument(
        "--no-titles", action="store_true", help="omit item titles and genres (smaller files)"
    )
    parser.add_argument(
        "--ann",
        choices=("hnsw", "ivf", "none"),
        default="none",
        help="also build an approximate top-k index beside the version (needs the [ann] extra)",
    )
    add_ann_param(parser)
    parser.set_defaults(handler=run_synth)


def run_synth(args: argparse.Namespace) -> int:
    """Handler of ``mfserve synth``: returns the exit code."""
    for flag in ("users", "items", "factors", "clusters"):
        if getattr(args, flag) < 1:
            print(f"mfserve synth: --{flag} must be at least 1", file=sys.stderr)
            return EXIT_BAD_INPUT
    try:
        params = parse_params(args.ann_param)
    except ValueError as exc:
        print(f"mfserve synth: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    if args.ann != "none":
        from mfserve.training.scoring.ann import DEFAULT_PARAMS

        unknown = sorted(set(params) - set(DEFAULT_PARAMS[args.ann]))
        if unknown:  # refuse before writing a version nobody asked for without its index
            print(
                f"mfserve synth: unknown {args.ann} parameter(s): {', '.join(unknown)}",
                file=sys.stderr,
            )
            return EXIT_BAD_INPUT
    elif params:
        print("mfserve synth: --ann-param needs --ann hnsw or --ann ivf", file=sys.stderr)
        return EXIT_BAD_INPUT

    from mfserve.training.artifact import save_artifact
    from mfserve.training.synthetic import synthetic_artifact

    started = time.perf_counter()
    artifact = synthetic_artifact(
        args.users,
        args.items,
        args.factors,
        clusters=args.clusters,
        seen_per_user=args.seen_per_user,
        seed=args.seed,
        titles=not args.no_titles,
    )
    folder = save_artifact(args.out, artifact)
    del artifact  # the generated tables; the index is built from the memory-mapped saved copy
    shape = f"{args.users} users x {args.items} items x {args.factors} factors"
    seconds = time.perf_counter() - started
    print(f"wrote {folder} ({shape}, {args.clusters} clusters) in {seconds:.1f}s")
    if args.ann == "none":
        return EXIT_OK

    code: int = build_and_save(folder, args.ann, params, args.seed, "synth")
    return code


def main(argv: list[str] | None = None) -> int:
    """``python -m mfserve.training.synth``: the two commands that write into a model folder,
    without the rest of ``mfserve`` (what tests/training/test_synth.py runs)."""
    parser = argparse.ArgumentParser(prog="mfserve")
    subparsers = parser.add_subparsers(dest="command", required=True)
    register(subparsers)
    register_index(subparsers)
    args = parser.parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    raise SystemExit(main())
