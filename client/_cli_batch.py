"""``mfserve batch-topk``: every listed user's top-k from a server, streamed (``BatchTopK``).

User ids come one per line from a file or stdin; the lists go out as they arrive, one CSV row
per (user, rank) or, with ``--json``, one JSON object per user per line, so a large run can be
piped on without waiting for its end.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from ._cli_connection import open_client
from ._render import f32, jsonable


def register(add: Callable[..., argparse.ArgumentParser]) -> None:
    parser = add(
        "batch-topk",
        _batch_topk,
        help="top-k for many users from a file or stdin, streamed (from a server)",
        description="Reads user ids, one per line (blank lines skipped).",
    )
    parser.add_argument("input", nargs="?", default="-", help="file of user ids, or - for stdin")
    parser.add_argument("-k", type=int, default=10, help="how many items each (default: 10)")
    parser.add_argument(
        "--cold-start", action="store_true", help="answer unknown users with popular items"
    )
    parser.add_argument(
        "--include-seen", action="store_true", help="keep items users rated in training"
    )
    parser.add_argument(
        "--batch-size", type=int, default=10_000, help="users per BatchTopK call (default: 10000)"
    )


def _users(handle: TextIO) -> Iterator[str]:
    for line in handle:
        user = line.strip()
        if user:
            yield user


def _batch_topk(args: argparse.Namespace) -> int:
    if args.input == "-":
        users = list(_users(sys.stdin))
    else:
        with open(args.input, encoding="utf-8") as handle:
            users = list(_users(handle))
    out = sys.stdout
    with open_client(args) as client:
        results = client.batch_top_k(
            users,
            args.k,
            exclude_seen=not args.include_seen,
            allow_cold_start=args.cold_start,
            batch_size=args.batch_size,
        )
        writer = csv.writer(out, lineterminator="\n")
        if not args.json:
            writer.writerow(("user", "rank", "item", "score"))
        for user, result in zip(users, results, strict=True):
            if args.json:
                row: dict[str, Any] = {"user_id": user, **jsonable(result)}
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
            else:
                writer.writerows((user, r.rank, r.item_id, f32(r.score)) for r in result)
    return 0
