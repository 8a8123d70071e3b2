"""``mfserve index``: build an approximate top-k index beside a saved model version.

Also the ``--ann-param`` flag and the build-and-save step that ``mfserve synth --ann`` shares.
``register`` only builds the parser: faiss and torch are imported inside the handlers.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mfserve.training.config import DefaultsOnceFormatter

EXIT_OK = 0
EXIT_BAD_INPUT = 2


def register(subparsers: Any) -> None:
    """Add ``mfserve index`` to the ``mfserve`` parser."""
    index = subparsers.add_parser(
        "index",
        help="build an approximate top-k index beside a model version (for big catalogues)",
        description=(
            "Build a faiss index (inner product over the ranking head, bias folded in) and store "
            "it beside the version as ann-KIND.faiss plus a JSON sidecar holding its sha256 and "
            "that of the tensors it was built from. Serve it with mfserve serve --ann KIND. "
            "Needs the [ann] extra."
        ),
        formatter_class=DefaultsOnceFormatter,
    )
    index.add_argument(
        "--model", required=True, help="a model folder (newest version) or a version folder"
    )
    index.add_argument("--kind", choices=("hnsw", "ivf"), default="hnsw", help="index type")
    index.add_argument("--seed", type=int, default=0, help="random seed of the build")
    add_ann_param(index)
    index.set_defaults(handler=run_index)


def add_ann_param(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ann-param",
        action="append",
        default=[],
        metavar="NAME=INT",
        help="index parameter, repeatable: m, ef_construction, ef_search (hnsw); "
        "nlist, nprobe (ivf)",
    )


def parse_params(pairs: list[str]) -> dict[str, int]:
    params: dict[str, int] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"--ann-param {pair!r}: expected NAME=INT")
        params[name.strip()] = int(value)
    return params


def build_and_save(folder: Any, kind: str, params: dict[str, int], seed: int, command: str) -> int:
    """Build a ``kind`` index over the version in ``folder`` and store it there; the exit code."""
    from mfserve.training.ann_build import build_index
    from mfserve.training.artifact import ArtifactError, load_artifact
    from mfserve.training.scoring.ann import AnnError

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
        params = parse_params(args.ann_param)
    except ValueError as exc:
        print(f"mfserve index: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from mfserve.training.artifact import ArtifactError, resolve_version
    from mfserve.training.scoring.ann import DEFAULT_PARAMS

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
    return build_and_save(folder, args.kind, params, args.seed, "index")
