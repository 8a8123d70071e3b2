"""Ids and batches for the requests ``_base`` builds, so both clients send exactly the same bytes.

Ids may come as lists, tuples, any iterable, or array-likes (numpy arrays, pandas Series): anything
with ``.tolist()`` is converted through it, so numpy stays optional and is never imported here, and
an ``int64`` id ``42`` becomes ``"42"`` rather than ``"np.int64(42)"``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator
from typing import Any

from mfserve.v1 import recommender_pb2 as pb

IdsLike = Iterable[Any]
# An Interaction, a bare item id, or an (item_id, rating) / (item_id, rating, weight) tuple.
InteractionLike = Any
InteractionsLike = Iterable[InteractionLike]


def ids_list(values: IdsLike, name: str) -> list[str]:
    """``values`` as a list of ``str`` ids (via ``.tolist()`` for array-likes)."""
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of ids, not a single {type(values).__name__}")
    tolist = getattr(values, "tolist", None)
    items = tolist() if callable(tolist) else values
    return [v if isinstance(v, str) else str(v) for v in items]


def interactions_list(values: InteractionsLike | None, name: str = "interactions") -> list[Any]:
    """``values`` as ``Interaction`` messages. Checks only the shapes here; the server checks
    the values (ratings in the model's range, positive weights) and names the bad one."""
    if values is None:
        return []
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of interactions, not a single string")
    out = []
    for index, value in enumerate(values):
        if isinstance(value, pb.Interaction):  # already the message: presence is its own
            out.append(value)
            continue
        if isinstance(value, tuple):
            if not 1 <= len(value) <= 3:
                raise TypeError(
                    f"{name}[{index}] has {len(value)} parts: give (item_id, rating[, weight])"
                )
            item, rating, weight = (*value, None, None)[:3]
        elif hasattr(value, "item_id") and hasattr(value, "rating"):  # an Interaction
            item, rating, weight = value.item_id, value.rating, value.weight
        elif isinstance(value, (list, dict, set)) or value is None:
            raise TypeError(
                f"{name}[{index}] is {type(value).__name__}: give an item id, an "
                "(item_id, rating[, weight]) tuple or an Interaction"
            )
        else:  # an id of any type, converted with str() like every other id
            item, rating, weight = value, None, None
        tolist = getattr(item, "item", None)  # a numpy scalar: its Python value, not its repr
        message = pb.Interaction(item_id=str(tolist() if callable(tolist) else item))
        if rating is not None:
            message.rating = float(rating)
        if weight is not None:
            message.weight = float(weight)
        out.append(message)
    return out


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
    interactions: list[Any] | None = None,
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
            interactions=interactions or (),
        )
        for start, stop in itertools.pairwise(bounds)
    ]


def batch_top_k_requests(
    user_ids: IdsLike,
    interactions: Iterable[InteractionsLike | None] | None,
    *,
    batch_size: int,
    **options: Any,
) -> Iterator[Any]:
    """``BatchTopKRequest`` messages of at most ``batch_size`` users each, built lazily.

    Users come as ids, as interaction lists (one per user, anonymous), or as both, in parallel
    (``None`` where a user has none); ``options`` are the ``TopKRequest`` fields every entry shares.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    users = ids_list(user_ids, "user_ids")
    histories = None if interactions is None else list(interactions)
    if histories is not None and users and len(histories) != len(users):
        raise ValueError(
            f"user_ids has {len(users)} ids but interactions has {len(histories)} lists; "
            "they are parallel (None where a user has none)"
        )
    count = len(users) if users else len(histories or ())
    for start in range(0, count, batch_size):
        entries = []
        for index in range(start, min(start + batch_size, count)):
            history = histories[index] if histories is not None else None
            entries.append(
                pb.TopKRequest(
                    user_id=users[index] if users else "",
                    interactions=interactions_list(history, f"interactions[{index}]"),
                    **options,
                )
            )
        yield pb.BatchTopKRequest(requests=entries)


class Deadline:
    """One timeout shared by the several calls of a split batch: each gets what is left of it."""

    def __init__(self, timeout: float | None) -> None:
        self._end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        """Seconds left (0 once passed: gRPC then fails the call with ``DEADLINE_EXCEEDED``)."""
        return None if self._end is None else max(self._end - time.monotonic(), 0.0)
