"""What each kind of batch computes: the functions the :class:`~mfserve.server.batching.Batcher`
runs on the compute thread (or inline), and what one call contributes to a batch.

Each ``*_batch`` takes the model and one payload per call and returns one result per call, in
order; the batcher owns queueing, threads and failures, these own the tensor work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from mfserve.server.model_holder import ServingModel
from mfserve.server.rank_kernel import RankKernel
from mfserve.training.recommender import RankRequest, Recommender

PredictPayload = tuple[np.ndarray, np.ndarray]  # user rows, item rows (int64; -1 = unknown)
RankPayload = tuple[int, int, RankRequest]  # query row, k, per-row options
RankedRow = tuple[list[int], list[float]]  # item rows, scores; best first


def predict_rows(payload: PredictPayload) -> int:
    return len(payload[0])


def predict_cost(model: ServingModel, payload: PredictPayload) -> int:
    return len(payload[0])


def rank_cost(model: Recommender, payload: RankPayload) -> int:
    """Item scores one query computes: its allow-list, or else the whole catalogue."""
    candidates = payload[2].candidates
    return model.n_items if candidates is None else len(candidates)


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


def _rank_batch(
    rank: Callable[[torch.Tensor, int, Sequence[RankRequest]], list[RankedRow]],
    payloads: list[RankPayload],
) -> list[RankedRow]:
    # Calls may ask for different k: rank once with the largest and cut each row to its own.
    rows = torch.tensor([p[0] for p in payloads], dtype=torch.int64)
    k = max(p[1] for p in payloads)
    return _cut(rank(rows, k, [p[2] for p in payloads]), payloads)


def _plain(payload: RankPayload) -> bool:
    """A known user with neither an allow-list nor a deny-list."""
    exclude = payload[2].exclude
    return (
        payload[0] >= 0
        and payload[2].candidates is None
        and (exclude is None or not exclude.numel())
    )


def _cut(ranked: list[RankedRow], payloads: list[RankPayload]) -> list[RankedRow]:
    """Each call's row cut to its own k (a batch ranks once, with the largest)."""
    return [
        (items[:want], scores[:want]) if len(items) > want else (items, scores)
        for (items, scores), (_, want, _) in zip(ranked, payloads, strict=True)
    ]


def top_k_cost(model: ServingModel, payload: RankPayload) -> int:
    """An approximate query (known user, no allow-list) costs what its index visits; the rest are
    exact (:func:`rank_cost`)."""
    ann = model.ann
    if ann is not None and payload[0] >= 0 and payload[2].candidates is None:
        return int(ann.query_cost(model.recommender, payload[0], payload[2]))
    return rank_cost(model.recommender, payload)


def top_k_batch(model: ServingModel, payloads: list[RankPayload]) -> list[RankedRow]:
    """Exact top-k, or with an index ``AnnIndex.top_k`` (which answers unknown users and
    allow-lists exactly itself)."""
    recommender, ann, kernel = model.recommender, model.ann, model.rank_kernel
    if ann is not None:
        # Rows as a list, not a tensor: the index needs none (measured in a serving process, a
        # lone query's torch calls cost ~65-85 us on cold caches, a third of the search's time).
        ranked = ann.top_k_lists(
            recommender,
            [p[0] for p in payloads],
            max(p[1] for p in payloads),
            [p[2] for p in payloads],
        )
        return _cut(ranked, payloads)
    plain = [n for n, payload in enumerate(payloads) if _plain(payload)] if kernel else []
    if kernel is not None and (kernel.max_users is None or len(plain) <= kernel.max_users):
        # Plain calls (the usual ones) through the compiled kernel, batch or lone alike, so a
        # user's answer does not depend on its batch; the rest through torch's general path.
        # Past the kernel's max_users (full scans only) a torch GEMM is faster.
        if len(plain) == len(payloads):
            return _kernel_top_k(kernel, payloads)
        answers: list[RankedRow | None] = [None] * len(payloads)
        if plain:
            ranked = _kernel_top_k(kernel, [payloads[n] for n in plain])
            for n, answer in zip(plain, ranked, strict=True):
                answers[n] = answer
        rest = [n for n in range(len(payloads)) if answers[n] is None]
        general = _rank_batch(recommender.top_k_lists, [payloads[n] for n in rest])
        for n, answer in zip(rest, general, strict=True):
            answers[n] = answer
        return [answer for answer in answers if answer is not None]
    # A lone call slices the user's seen items straight from the CSR arrays: ~120 us, against
    # ~150-240 us as a batch of one through top_k_known_lists (measured in-process).
    if len(payloads) == 1:
        row, k, rank = payloads[0]
        alone = recommender.top_one_lists(row, k, rank)
        if alone is not None:
            return [alone]
    elif all(_plain(payload) for payload in payloads):  # the usual batch under load
        known = recommender.top_k_known_lists(
            [p[0] for p in payloads],
            max(p[1] for p in payloads),
            [p[2].exclude_seen for p in payloads],
        )
        if known is not None:
            return _cut(known, payloads)
    return _rank_batch(recommender.top_k_lists, payloads)


def _kernel_top_k(kernel: RankKernel, payloads: list[RankPayload]) -> list[RankedRow]:
    ranked = kernel.top_k(
        [p[0] for p in payloads], max(p[1] for p in payloads), [p[2].exclude_seen for p in payloads]
    )
    return _cut(ranked, payloads)


def similar_batch(model: Recommender, payloads: list[RankPayload]) -> list[RankedRow]:
    return _rank_batch(model.similar_items_lists, payloads)
