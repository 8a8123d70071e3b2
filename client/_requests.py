"""Ids and batches for the requests ``_base`` builds, so both clients send exactly the same bytes.

Ids may come as lists, tuples, any iterable, or array-likes (numpy arrays, pandas Series): anything
with ``.tolist()`` is converted through it, so numpy stays optional and is never imported here, and
an ``int64`` id ``42`` becomes ``"42"`` rather than ``"np.int64(42)"``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from typing import Any

from mfserve.v1 import recommender_pb2 as pb

IdsLike = Iterable[Any]


def ids_list(values: IdsLike, name: str) -> list[str]:
    """``values`` as a list of ``str`` ids (via ``.tolist()`` for array-likes)."""
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of ids, not a single {type(values).__name__}")
    tolist = getattr(values, "tolist", None)
    items = tolist() if callable(tolist) else values
    return [v if isinstance(v, str) else str(v) for v in items]


def _id_bytes(value: str) -> int:
    """Wire size of one repeated-string element: tag, length prefix, UTF-8 body."""
    size = len(value) if value.isascii() else len(value.encode())
    return size + (2 if size < 128 else 4)


def batch_requests(
    user_ids: IdsLike,
    item_ids: IdsLike,
    *,
    allow_cold_start: bool,
    max_pairs: int,
    max_bytes: int,
) -> list[Any]:
    """One ``BatchPredictRequest`` per chunk of at most ``max_pairs`` pairs and ~``max_bytes``.

    The server refuses a batch over its pair limit, and gRPC refuses a message over its size limit;
    splitting on both lets a caller send any number of pairs. An empty batch is still sent (as one
    empty request) so the server's ``INVALID_ARGUMENT`` is what the caller sees, as documented.
    """
    users = ids_list(user_ids, "user_ids")
    items = ids_list(item_ids, "item_ids")
    if len(users) != len(items):
        raise ValueError(
            f"user_ids has {len(users)} ids but item_ids has {len(items)}; they are parallel arrays"
        )
    if max_pairs < 1:
        raise ValueError("batch_size must be at least 1")
    bounds: list[int] = [0]
    size = 0
    for index, (user, item) in enumerate(zip(users, items, strict=True)):
        pair = _id_bytes(user) + _id_bytes(item)
        if index > bounds[-1] and (index - bounds[-1] >= max_pairs or size + pair > max_bytes):
            bounds.append(index)
            size = 0
        size += pair
    bounds.append(len(users))
    return [
        pb.BatchPredictRequest(
            user_ids=users[start:stop],
            item_ids=items[start:stop],
            allow_cold_start=allow_cold_start,
        )
        for start, stop in itertools.pairwise(bounds)
    ]


class Deadline:
    """One timeout shared by the several calls of a split batch: each gets what is left of it."""

    def __init__(self, timeout: float | None) -> None:
        self._end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        """Seconds left (0 once passed: gRPC then fails the call with ``DEADLINE_EXCEEDED``)."""
        return None if self._end is None else max(self._end - time.monotonic(), 0.0)
