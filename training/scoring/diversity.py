"""Variety in a ranked list: maximal marginal relevance (Carbonell and Goldstein, 1998) over the
ranking head's item factors, and the stable order that paging relies on.

MMR re-ranks a pool of the most relevant items greedily: each next item maximises
``(1 - diversity) * relevance - diversity * max cosine similarity to the items already chosen``,
with relevance scaled to [0, 1] over the pool. Greedy selection makes the answer for ``k`` a
prefix of the answer for any larger ``k`` over the same pool, so pages of one list agree.
"""

from __future__ import annotations

import numpy as np

from mfserve.training.scoring.types import RankedRow

NORM_EPS = 1e-12


def pool_size(k: int) -> int:
    """How many of the most relevant items MMR chooses ``k`` from (the proto's rule)."""
    return max(5 * k, 100)


def tie_stable(row: RankedRow) -> RankedRow:
    """``row`` with equal scores ordered by item row, so that a list never depends on how a
    ranker happened to order ties (a page boundary must cut the same list every time)."""
    items, scores = row
    if len(scores) < 2 or len(set(scores)) == len(scores):
        return row
    order = sorted(range(len(items)), key=lambda n: (-scores[n], items[n]))
    return [items[n] for n in order], [scores[n] for n in order]


def diversify(row: RankedRow, keys: np.ndarray, k: int, diversity: float) -> RankedRow:
    """The ``k`` items of ``row`` (a relevance-ordered pool) chosen by MMR at ``diversity``;
    each keeps its relevance score."""
    items, scores = row
    if not items or diversity <= 0:
        return items[:k], scores[:k]
    rows = np.asarray(items, dtype=np.int64)
    relevance = np.asarray(scores, dtype=np.float64)
    spread = relevance.max() - relevance.min()
    relevance = (relevance - relevance.min()) / spread if spread > 0 else np.ones_like(relevance)
    vectors = keys[rows].astype(np.float64)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), NORM_EPS)
    chosen = [0]  # nothing chosen yet: the most relevant item has no similarity to pay for
    closest = vectors @ vectors[0]
    taken = np.zeros(len(rows), dtype=bool)
    taken[0] = True
    for _ in range(min(k, len(rows)) - 1):
        value = (1.0 - diversity) * relevance - diversity * closest
        value[taken] = -np.inf
        pick = int(np.argmax(value))  # ties: the more relevant (earlier) item
        chosen.append(pick)
        taken[pick] = True
        np.maximum(closest, vectors @ vectors[pick], out=closest)
    return [items[n] for n in chosen], [scores[n] for n in chosen]
