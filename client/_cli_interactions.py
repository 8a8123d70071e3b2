"""``--interactions 296:5,318:4.5,1:3:2`` for the client commands: a user's interactions, as
``ITEM[:RATING[:WEIGHT]]`` entries separated by commas (the flag may be repeated). An item id with
a comma or a colon in it cannot be written this way; the SDK takes any id."""

from __future__ import annotations

import argparse
import math

from ._models import Interaction


def _number(text: str, what: str, entry: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{entry!r}: {what} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{entry!r}: {what} {text!r} is not finite")
    return value


def parse_interactions(text: str) -> list[Interaction]:
    """One ``--interactions`` value; argparse reports the error with the flag's name."""
    out: list[Interaction] = []
    for entry in text.split(","):
        parts = entry.strip().split(":")
        if not parts[0] or len(parts) > 3:
            raise argparse.ArgumentTypeError(
                f"{entry!r} is not ITEM[:RATING[:WEIGHT]] (e.g. 296:5,318:4.5)"
            )
        rating = _number(parts[1], "rating", entry) if len(parts) > 1 and parts[1] else None
        weight = _number(parts[2], "weight", entry) if len(parts) > 2 else None
        out.append(Interaction(parts[0], rating, weight))
    return out


def add_interactions_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--interactions",
        type=parse_interactions,
        action="extend",
        default=[],
        metavar="ITEM[:RATING[:WEIGHT]],...",
        help="what the user just did, folded in at call time (e.g. 296:5,318:4.5); the user "
        "may then be new or omitted",
    )
