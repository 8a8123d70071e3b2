"""Request validation shared by the RPCs: plain functions that raise :class:`ServiceError`.

Checks are whole-array operations (``"" in ids`` is one C-level scan; id lookup is one dict ``get``
per id inside ``np.fromiter``), so a 100,000-pair batch is validated without a Python-level loop.
Only the error path and the (rare, usually short) list of unknown ids iterate in Python.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mfserve.server.errors import invalid_argument, invalid_fields

# TopKRequest.k / SimilarItemsRequest.k: 0 means this many.
DEFAULT_K = 10

COLD_START_HINT = "set allow_cold_start to answer unknown ids with the cold-start estimate"


def require_id(field: str, value: str) -> str:
    """A required, non-empty id."""
    if not value:
        raise invalid_argument(field, value, "is empty; an id is required")
    return value


def require_ids(field: str, values: Sequence[str]) -> None:
    """Every id of a repeated field is non-empty; the error names the first empty one's index."""
    if "" in values:
        index = list(values).index("")
        raise invalid_argument(
            f"{field}[{index}]", "", "is empty; every id in the list must be non-empty"
        )


def resolve_k(k: int, max_k: int) -> int:
    """``k`` checked against ``[0, max_k]``; 0 becomes the default (10, or ``max_k`` if lower)."""
    if k < 0:
        raise invalid_argument("k", k, f"must not be negative (0 means the default, {DEFAULT_K})")
    if k > max_k:
        raise invalid_argument("k", k, f"is over the server's maximum of {max_k}")
    return k or min(DEFAULT_K, max_k)


def check_sizes(n_users: int, n_items: int, max_pairs: int) -> int:
    """``BatchPredict``'s parallel arrays by length only: equal, and 1..max_pairs pairs."""
    if n_users != n_items:
        text = (
            f"user_ids has {n_users} ids but item_ids has {n_items}; "
            "the arrays are parallel and must have the same length"
        )
        raise invalid_fields(text, "user_ids", "item_ids")
    if n_users == 0:
        raise invalid_fields(
            "user_ids and item_ids are empty; at least one (user, item) pair is required",
            "user_ids",
            "item_ids",
        )
    if n_users > max_pairs:
        text = (
            f"user_ids/item_ids hold {n_users} pairs, over the server's batch maximum of "
            f"{max_pairs}; split the batch"
        )
        raise invalid_fields(text, "user_ids", "item_ids")
    return n_users


def unknown_ids(ids: Sequence[str], rows: np.ndarray) -> list[str]:
    """Distinct ids whose row is -1, in order of first appearance (empty when all are known)."""
    positions = np.flatnonzero(rows < 0)
    if positions.size == 0:
        return []
    return list(dict.fromkeys(ids[p] for p in positions.tolist()))
