"""The ``mfserve`` console script: one parser, every area's subcommands.

The client commands (``predict``, ``batch-predict``, ``topk``, ``similar``, ``info``, ``health``)
live here because the client is the base install; training (``mfserve.training.cli``) and the
server (``mfserve.server.cli``) register theirs through ``register(subparsers)``, which touches only
argparse. Their handlers import torch and friends when they run; if an extra is missing, the user is
told which one to install instead of seeing a traceback.

Exit codes: 0 success; 1 the service answered with an error or could not be reached; 2 bad usage
(argparse, unreadable input or TLS files, a missing extra); 130 interrupted.

The connection options (``--target``, TLS, ``--token``) and the client they make are in
``_cli_connection``. The console script enters through ``mfserve._command``, which quiets gRPC's
C-core logs before this package (and grpc with it) is imported.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from mfserve import __version__

from . import _cli_batch, _render
from ._cli_connection import connection_options, error_message, open_client
from ._cli_interactions import add_interactions_option
from ._exceptions import MfserveError
from ._models import HealthStatus, TopKResult

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# Other areas' command modules, registered when present (each may be absent from an install).
_AREA_MODULES = ("mfserve.training.cli", "mfserve.server.cli")
# Which extra provides a module a handler failed to import, by the command that failed.
_EXTRA_BY_COMMAND = {
    "train": "train",
    "evaluate": "train",
    "recommend": "train",
    "synth": "train",
    "serve": "server",
}
_EXTRA_MODULES = {
    "torch": "train",
    "numpy": "train",
    "pandas": "train",
    "pyarrow": "train",
    "sklearn": "train",
    "safetensors": "train",
    "tqdm": "train",
    "grpc_health": "server",
    "grpc_reflection": "server",
    "grpc_status": "server",
    "google.rpc": "server",
    "faiss": "ann",
}

Handler = Callable[[argparse.Namespace], int]


# --------------------------------------------------------------------------- parser
def _add_ranking_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-k", type=int, default=10, help="how many items (default: %(default)s)")
    parser.add_argument(
        "--exclude",
        action="extend",
        nargs="+",
        default=[],
        metavar="ITEM",
        help="items never to return",
    )
    parser.add_argument(
        "--candidates",
        action="extend",
        nargs="+",
        default=[],
        metavar="ITEM",
        help="rank only these items",
    )
    parser.add_argument("--metadata", action="store_true", help="include titles and genres")
    parser.add_argument("--csv", action="store_true", help="print CSV instead of a table")


def _register_client_commands(subparsers: Any) -> None:
    parent = connection_options()

    def add(name: str, handler: Handler, **kwargs: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = subparsers.add_parser(name, parents=[parent], **kwargs)
        parser.set_defaults(handler=handler)
        return parser

    parser = add("predict", _predict, help="predict one user's rating of one item (from a server)")
    parser.add_argument("user", help="user id ('' with --interactions: an anonymous user)")
    parser.add_argument("item", help="item id")
    parser.add_argument(
        "--cold-start", action="store_true", help="answer unknown ids with a cold-start estimate"
    )
    add_interactions_option(parser)

    parser = add(
        "batch-predict",
        _batch_predict,
        help="predict ratings for (user, item) pairs from a CSV file or stdin",
        description="Reads CSV with user,item columns (a header naming them is optional).",
    )
    parser.add_argument("input", nargs="?", default="-", help="CSV file, or - for stdin (default)")
    parser.add_argument(
        "--cold-start", action="store_true", help="answer unknown ids with a cold-start estimate"
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="pairs per call (default: 100000)"
    )
    parser.add_argument(
        "--csv", action="store_true", help="print CSV (user,item,rating) instead of a table"
    )

    parser = add("topk", _topk, help="recommend items for one user (from a server)")
    parser.add_argument(
        "user", nargs="?", default=None, help="user id (optional with --interactions)"
    )
    _add_ranking_options(parser)
    add_interactions_option(parser)
    parser.add_argument(
        "--diversity", type=float, default=0.0, help="0 to 1: trade relevance for variety"
    )
    parser.add_argument(
        "--page-size",
        type=int,
        default=0,
        help="items per page (the next page's token goes to stderr)",
    )
    parser.add_argument("--page-token", default="", help="the page to show (from --page-size)")
    parser.add_argument(
        "--include-seen", action="store_true", help="keep items the user rated in training"
    )
    parser.add_argument(
        "--cold-start", action="store_true", help="answer an unknown user with popular items"
    )

    _cli_batch.register(add)

    parser = add("similar", _similar, help="items most similar to one item (from a server)")
    parser.add_argument("item", help="item id")
    _add_ranking_options(parser)

    add("info", _info, help="describe the model a server is serving")

    parser = add("health", _health, help="a server's health status (exit 0 only when SERVING)")
    parser.add_argument(
        "--service", default="", help="health service name (default: the whole server)"
    )
    parser.add_argument(
        "--wait",
        type=float,
        metavar="SECONDS",
        help="wait up to SECONDS for the server to be SERVING",
    )


def _register_area_commands(subparsers: Any) -> None:
    """Let training and the server add their commands.

    An area whose command module is absent (an install without it, or not written yet) is skipped
    silently; one that fails to import or register is skipped with a warning, so a bug there never
    takes the client commands down with it.
    """
    for name in _AREA_MODULES:
        try:
            importlib.import_module(name).register(subparsers)
        except ImportError as exc:
            parents = {".".join(name.split(".")[:i]) for i in range(2, name.count(".") + 2)}
            if isinstance(exc, ModuleNotFoundError) and exc.name in parents:
                continue
            print(f"warning: the commands of {name} are unavailable: {exc}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mfserve",
        description="Matrix-factorisation recommender: train, serve, and query over gRPC.",
    )
    parser.add_argument("--version", action="version", version=f"mfserve {__version__}")
    subparsers = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    _register_client_commands(subparsers)
    _register_area_commands(subparsers)
    return parser


# --------------------------------------------------------------------------- client commands
def _predict(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        result = client.predict(
            args.user, args.item, interactions=args.interactions, allow_cold_start=args.cold_start
        )
    if args.json:
        _render.print_json(result)
        return 0
    pairs: list[tuple[str, object]] = [
        ("user_id", result.user_id),
        ("item_id", result.item_id),
        ("rating", result.rating),
        ("model_version", result.model_version),
    ]
    if result.missing_user_ids:
        pairs.append(("missing_user_ids", result.missing_user_ids))
    if result.missing_item_ids:
        pairs.append(("missing_item_ids", result.missing_item_ids))
    print(_render.fields_table(pairs))
    return 0


def _read_pairs(source: TextIO) -> tuple[list[str], list[str]]:
    """(users, items) from CSV; a first row naming user/item columns is a header, else data."""
    rows = [row for row in csv.reader(source) if row and any(cell.strip() for cell in row)]
    user_col, item_col = 0, 1
    if rows:
        header = [cell.strip().lower() for cell in rows[0]]
        names = {"user", "user_id", "userid"}, {"item", "item_id", "itemid", "movieid"}
        found = [next((i for i, h in enumerate(header) if h in group), None) for group in names]
        if found[0] is not None and found[1] is not None:
            user_col, item_col = found[0], found[1]
            rows = rows[1:]
    users, items = [], []
    for number, row in enumerate(rows, start=1):
        if len(row) <= max(user_col, item_col):
            raise ValueError(f"CSV row {number} has {len(row)} column(s); expected user,item")
        users.append(row[user_col].strip())
        items.append(row[item_col].strip())
    return users, items


def _batch_predict(args: argparse.Namespace) -> int:
    if args.input == "-":
        users, items = _read_pairs(sys.stdin)
    else:
        with open(args.input, newline="", encoding="utf-8") as handle:
            users, items = _read_pairs(handle)
    with open_client(args) as client:
        result = client.batch_predict(
            users, items, allow_cold_start=args.cold_start, batch_size=args.batch_size
        )
    rows = list(zip(users, items, result.ratings, strict=True))
    if args.json:
        _render.print_json(
            {
                "model_version": result.model_version,
                "predictions": [{"user_id": u, "item_id": i, "rating": r} for u, i, r in rows],
                "missing_user_ids": result.missing_user_ids,
                "missing_item_ids": result.missing_item_ids,
            }
        )
    elif args.csv:
        _render.write_csv(("user", "item", "rating"), rows)
    else:
        print(_render.table(("user", "item", "rating"), rows))
    return 0


def _print_ranked(args: argparse.Namespace, result: TopKResult) -> None:
    if args.json:
        _render.print_json(result)
        return
    headers = ["rank", "item_id", "score"] + (["title", "genres"] if args.metadata else [])
    rows = [
        [r.rank, r.item_id, r.score] + ([r.title, r.genres] if args.metadata else [])
        for r in result
    ]
    if args.csv:
        _render.write_csv(headers, rows)
    else:
        print(_render.table(headers, rows))
    if args.csv:
        return
    # The split fields name what each id was: a user and an item may share an id string.
    folded = bool(getattr(args, "interactions", None))
    notes = {
        "user": "folded in from --interactions" if folded else "cold start",
        "item": "skipped" if folded else "cold start",
    }
    for kind, ids in (("user", result.missing_user_ids), ("item", result.missing_item_ids)):
        if ids:
            print(f"unknown {kind} ids ({notes[kind]}): {', '.join(ids)}", file=sys.stderr)


def _topk(args: argparse.Namespace) -> int:
    if args.user is None and not args.interactions:
        print("mfserve topk: give a user id, --interactions, or both", file=sys.stderr)
        return 2
    with open_client(args) as client:
        result = client.top_k(
            args.user,
            args.k,
            interactions=args.interactions,
            exclude_seen=not args.include_seen,
            exclude_item_ids=args.exclude,
            candidate_item_ids=args.candidates,
            include_metadata=args.metadata,
            allow_cold_start=args.cold_start,
            diversity=args.diversity,
            page_size=args.page_size,
            page_token=args.page_token,
        )
    _print_ranked(args, result)
    if result.next_page_token and not args.json:
        print(f"next page: --page-token {result.next_page_token}", file=sys.stderr)
    return 0


def _similar(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        result = client.similar_items(
            args.item,
            args.k,
            exclude_item_ids=args.exclude,
            candidate_item_ids=args.candidates,
            include_metadata=args.metadata,
        )
    _print_ranked(args, result)
    return 0


def _info(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        info = client.model_info()
    if args.json:
        _render.print_json(info)
        return 0
    pairs: list[tuple[str, object]] = []
    for name, value in _render.jsonable(info).items():
        if isinstance(value, dict):
            pairs.extend((f"{name}.{key}", inner) for key, inner in value.items())
        else:
            # "-" for a field with nothing in it (no reload tried yet, say): a row is never blank.
            pairs.append((name, "-" if value is None or value == "" else value))
    print(_render.fields_table(pairs))
    return 0


def _health(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        if args.wait is not None:
            client.wait_until_ready(args.wait, service=args.service)
        status = client.health(args.service)
    if args.json:
        _render.print_json({"service": args.service, "status": status})
    else:
        print(status)
    return 0 if status is HealthStatus.SERVING else EXIT_ERROR


# --------------------------------------------------------------------------- dispatch
def _missing_extra(command: str, exc: ModuleNotFoundError) -> str | None:
    """The extra that provides the module a handler could not import; None if it is not ours."""
    missing = exc.name or ""
    for module, extra in _EXTRA_MODULES.items():
        if missing == module or missing.startswith(module + "."):
            return _EXTRA_BY_COMMAND.get(command, extra)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mfserve``; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return handler(args)
    except MfserveError as exc:
        print(f"error: {error_message(exc, args)}", file=sys.stderr)
        return EXIT_ERROR
    except (ValueError, OSError) as exc:  # bad input or TLS file, bad arguments, before any call
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ModuleNotFoundError as exc:
        extra = _missing_extra(args.command, exc)
        if extra is None:
            raise
        command = f"mfserve {args.command}"
        install = f"pip install 'mfserve[{extra}]'"
        print(f"error: '{command}' needs the [{extra}] extra: {install}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # python -m mfserve.client._cli (python -m mfserve also quiets gRPC)
    raise SystemExit(main())
