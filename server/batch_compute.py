"""What each kind of batch computes: the functions the :class:`~mfserve.server.batching.Batcher`
runs on the compute thread (or inline).

Each ``*_batch`` takes the model and one payload per call and returns one result per call, in
order; the batcher owns queueing, threads and failures, the model's ranker
(:mod:`mfserve.training.scoring`) owns the tensor work.
"""

from __future__ import annotations

import numpy as np

from mfserve.server.model_holder import ServingModel
from mfserve.training.foldin import UserEvidence
from mfserve.training.scoring import RankedRow, RankRequest
from mfserve.training.scoring.diversity import diversify, pool_size, tie_stable

# User rows, item rows (int64; -1 = unknown), and the evidence a folded-in user is solved from.
PredictPayload = tuple[np.ndarray, np.ndarray, UserEvidence | None]
RankPayload = tuple[int, int, RankRequest]  # query row, k, per-row options


def predict_batch(model: ServingModel, payloads: list[PredictPayload]) -> list[np.ndarray]:
    """Ratings for every pair of every call in one pass; each call gets its slice, as a float32
    array (the response packs it as it is: no Python float per rating)."""
    if any(p[2] is not None for p in payloads):
        return [_predict_one(model, payload) for payload in payloads]
    if len(payloads) == 1:
        users, items, _ = payloads[0]
        return [model.predict(users, items)]
    users = np.concatenate([p[0] for p in payloads])
    items = np.concatenate([p[1] for p in payloads])
    ratings = model.predict(users, items)
    bounds = np.cumsum([len(p[0]) for p in payloads])[:-1]
    return np.split(ratings, bounds)


def _predict_one(model: ServingModel, payload: PredictPayload) -> np.ndarray:
    users, items, evidence = payload
    ratings: np.ndarray = (
        model.predict(users, items)
        if evidence is None
        else model.recommender.fold_in.predict(evidence, items)
    )
    return ratings


def top_k_batch(model: ServingModel, payloads: list[RankPayload]) -> list[RankedRow]:
    """Folded-in users (a request with ``evidence``) are solved and ranked exactly in the same
    batch, the rest by the version's ranker; a row asking for diversity ranks a larger pool and
    is re-ranked from it. Ties are ordered by item row (the order pages rely on)."""
    fetch = max(pool_size(k) if r.diversity > 0 else k for _, k, r in payloads)
    ranked = model.recommender.rank_with(
        model.ranker, [p[0] for p in payloads], fetch, [p[2] for p in payloads]
    )
    keys = model.recommender.ranking_tables().keys
    out = []
    for row, (_, k, request) in zip(ranked, payloads, strict=True):
        stable = tie_stable(row)
        if request.diversity > 0:
            # The row's own pool, whatever else the batch fetched: the same list in any batch.
            pool = pool_size(k)
            stable = diversify((stable[0][:pool], stable[1][:pool]), keys, k, request.diversity)
        out.append(stable)
    return _cut(out, payloads)


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
