"""What one call costs, for the batcher's rule that a lone cheap call is computed on the event loop
(:data:`mfserve.server.batching.INLINE_RANK_SCORES`): pairs for Predict, item scores (or index
distances) for TopK and SimilarItems.

The ranker knows how much work its query is (``Ranker.visits``: an HNSW walk widened by a heavy
user's exclusions costs more than a light one's), since that depends on how it ranks; what counts
as cheap enough for the loop is the server's business, so the rule lives here. SimilarItems is
always the exact scan (or its allow-list), whatever ranks TopK."""

from __future__ import annotations

from mfserve.server.batch_compute import PredictPayload, RankPayload
from mfserve.server.model_holder import ServingModel


def predict_rows(payload: PredictPayload) -> int:
    return len(payload[0])


def predict_cost(model: ServingModel, payload: PredictPayload) -> int:
    return len(payload[0])


def top_k_cost(model: ServingModel, payload: RankPayload) -> int:
    row, _, request = payload
    # A folded-in user is ranked by the exact scan whatever ranker the version has.
    ranker = model.ranker if request.evidence is None else model.recommender.exact
    visits: int = ranker.visits(row, request)
    return visits


def similar_cost(model: ServingModel, payload: RankPayload) -> int:
    """Item scores one query computes: its allow-list, or else the whole catalogue."""
    candidates = payload[2].candidates
    return model.recommender.n_items if candidates is None else len(candidates)
