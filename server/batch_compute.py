"""What each kind of batch computes: the functions the :class:`~mfserve.server.batching.Batcher`
runs on the compute thread (or inline).

Each ``*_batch`` takes the model and one payload per call and returns one result per call, in
order; the batcher owns queueing, threads and failures, the model's ranker
(:mod:`mfserve.training.scoring`) owns the tensor work.
"""

from __future__ import annotations

import numpy as np

from mfserve.server.model_holder import ServingModel
from mfserve.training.scoring import RankedRow, RankRequest

PredictPayload = tuple[np.ndarray, np.ndarray]  # user rows, item rows (int64; -1 = unknown)
RankPayload = tuple[int, int, RankRequest]  # query row, k, per-row options


def predict_batch(model: ServingModel, payloads: list[PredictPayload]) -> list[np.ndarray]:
    """Ratings for every pair of every call in one pass; each call gets its slice, as a float32
    array (the response packs it as it is: no Python float per rating)."""
    if len(payloads) == 1:
        users, items = payloads[0]
        return [model.predict(users, items)]
    users = np.concatenate([p[0] for p in payloads])
    items = np.concatenate([p[1] for p in payloads])
    ratings = model.predict(users, items)
    bounds = np.cumsum([len(p[0]) for p in payloads])[:-1]
    return np.split(ratings, bounds)


def top_k_batch(model: ServingModel, payloads: list[RankPayload]) -> list[RankedRow]:
    ranked = model.ranker.top_k(
        [p[0] for p in payloads], max(p[1] for p in payloads), [p[2] for p in payloads]
    )
    return _cut(ranked, payloads)


def similar_batch(model: ServingModel, payloads: list[RankPayload]) -> list[RankedRow]:
    ranked = model.ranker.similar(
        [p[0] for p in payloads], max(p[1] for p in payloads), [p[2] for p in payloads]
    )
    return _cut(ranked, payloads)


def _cut(ranked: list[RankedRow], payloads: list[RankPayload]) -> list[RankedRow]:
    """Each call's row cut to its own k (a batch ranks once, with the largest)."""
    return [
        (items[:want], scores[:want]) if len(items) > want else (items, scores)
        for (items, scores), (_, want, _) in zip(ranked, payloads, strict=True)
    ]
