"""``mfserve synth``: write a synthetic model with planted clusters as a normal artifact version.

User ``u`` prefers cluster ``u % C`` and item ``i`` belongs to cluster ``i % C``, so any answer
can be checked without a trained model; benchmarks use it for catalogues of any size (1M x 64
takes about 15 s and 1.5 GB peak). ``--ann`` also builds an approximate index beside the new
version.

``register`` only builds the parser: torch and faiss are imported inside the handler.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

EXIT_OK = 0
EXIT_BAD_INPUT = 2


def register(subparsers: Any) -> None:
    """Add ``mfserve synth`` to the ``mfserve`` parser."""
    parser = subparsers.add_parser(
        "synth",
        help="write a synthetic model with planted clusters (for tests and benchmarks)",
        description=(
            "Write a synthetic factor model as the next numbered version under --out. Item i "
            "belongs to cluster i %% C and user u prefers cluster u %% C, so user u's top items "
            "come from that cluster. Ids are u<row> and i<row>."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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
    _add_ann_param(parser)
    parser.set_defaults(handler=run_synth)

    index = subparsers.add_parser(
        "index",
        help="build an approximate top-k index beside a model version (for big catalogues)",
        description=(
            "Build a faiss index (inner product over the ranking head, bias folded in) and store "
            "it beside the version as ann-KIND.faiss plus a JSON sidecar holding its sha256 and "
            "that of the tensors it was built from. Serve it with mfserve serve --ann KIND. "
            "Needs the [ann] extra."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    index.add_argument(
        "--model", required=True, help="a model folder (newest version) or a version folder"
    )
    index.add_argument("--kind", choices=("hnsw", "ivf"), default="hnsw", help="index type")
    index.add_argument("--seed", type=int, default=0, help="random seed of the build")
    _add_ann_param(index)
    index.set_defaults(handler=run_index)


def _add_ann_param(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ann-param",
        action="append",
        default=[],
        metavar="NAME=INT",
        help="index parameter, repeatable: m, ef_construction, ef_search (hnsw); "
        "nlist, nprobe (ivf)",
    )


def _parse_params(pairs: list[str]) -> dict[str, int]:
    params: dict[str, int] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"--ann-param {pair!r}: expected NAME=INT")
        params[name.strip()] = int(value)
    return params


def run_synth(args: argparse.Namespace) -> int:
    """Handler of ``mfserve synth``: returns the exit code."""
    for flag in ("users", "items", "factors", "clusters"):
        if getattr(args, flag) < 1:
            print(f"mfserve synth: --{flag} must be at least 1", file=sys.stderr)
            return EXIT_BAD_INPUT
    try:
        params = _parse_params(args.ann_param)
    except ValueError as exc:
        print(f"mfserve synth: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    if args.ann != "none":
        from mfserve.training.ann import DEFAULT_PARAMS

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

    return _build_and_save(folder, args.ann, params, args.seed, "synth")


def _build_and_save(folder: Any, kind: str, params: dict[str, int], seed: int, command: str) -> int:
    from mfserve.training.ann import AnnError
    from mfserve.training.ann_build import build_index
    from mfserve.training.artifact import ArtifactError, load_artifact

    try:
        index = build_index(load_artifact(folder), kind, seed=seed, **params)
        sidecar = index.save(folder)
    except (AnnError, ArtifactError) as exc:
        print(f"mfserve {command}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"wrote {sidecar} ({kind} {index.params}) built in {index.build_seconds:.1f}s")
    return EXIT_OK


def run_index(args: argparse.Namespace) -> int:
    """Handler of ``mfserve index``: returns the exit code."""
    try:
        params = _parse_params(args.ann_param)
    except ValueError as exc:
        print(f"mfserve index: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from mfserve.training.ann import DEFAULT_PARAMS
    from mfserve.training.artifact import ArtifactError, resolve_version

    unknown = sorted(set(params) - set(DEFAULT_PARAMS[args.kind]))
    if unknown:
        print(
            f"mfserve index: unknown {args.kind} parameter(s): {', '.join(unknown)}",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    try:
        folder = resolve_version(args.model)
    except ArtifactError as exc:
        print(f"mfserve index: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return _build_and_save(folder, args.kind, params, args.seed, "index")


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (``python -m mfserve.training.synth``) until the CLI wires it."""
    parser = argparse.ArgumentParser(prog="mfserve")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    raise SystemExit(main())
