"""Responses built from a model: ranked items and the model's description.

Kept apart from the servicer because the item loop runs on the event loop for every ranking call
(its cost is measured, see ``add_scored``) and ``model_info`` is what logs and, later, metrics
labels describe a model with.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Any

from mfserve.training.artifact import FORMAT_VERSION
from mfserve.training.recommender import Recommender
from mfserve.v1 import recommender_pb2 as pb

log = logging.getLogger("mfserve.server")


def add_scored(
    items: Any,
    model: Recommender,
    rows: list[int],
    scores: list[float],
    include_metadata: bool,
    *,
    first_rank: int = 1,
) -> None:
    """Append ranked items to a repeated ``ScoredItem`` field (the one per-item loop: output)."""
    # Fields set one by one: protobuf's keyword parsing makes add(item_id=..., ...) twice as slow
    # (~10 us against ~5 us for ten items), and this runs on the event loop for every call.
    ids = model.item_ids
    artifact = model.artifact
    titles = artifact.item_titles if include_metadata else None
    genres = artifact.item_genres if include_metadata else None
    add = items.add
    for rank, (row, score) in enumerate(zip(rows, scores, strict=True), start=first_rank):
        scored = add()
        scored.item_id = ids[row]
        scored.score = score
        scored.rank = rank
        if titles is not None and titles[row]:
            scored.title = titles[row]
        if genres is not None and genres[row]:
            scored.genres.extend(genres[row])


def model_info(model: Recommender) -> pb.GetModelInfoResponse:
    """``GetModelInfoResponse`` for a model (also used by logs and, later, metrics labels)."""
    artifact = model.artifact
    low, high = artifact.rating_range
    response = pb.GetModelInfoResponse(
        model_name=artifact.name,
        model_version=artifact.version,
        factors=artifact.factors,
        rank_factors=artifact.rank_factors,
        user_count=artifact.n_users,
        item_count=artifact.n_items,
        rating_count=artifact.rating_count,
        rating_min=low,
        rating_max=high,
        # load_artifact refuses every other format version, so a loaded model is this one.
        format_version=FORMAT_VERSION,
        dataset_fingerprint=str(artifact.dataset.get("fingerprint", "")),
    )
    if artifact.created_time:
        try:
            response.create_time.FromDatetime(datetime.fromisoformat(artifact.created_time))
        except ValueError:
            log.warning(
                "mfserve: unparseable created_time %r in the manifest", artifact.created_time
            )
    for name, value in artifact.metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            response.metrics[name] = float(value)
    for name, value in artifact.hyperparameters.items():
        # Strings as they are; anything else as JSON so `true`, `0.01` and lists read unambiguously.
        response.hyperparameters[name] = value if isinstance(value, str) else json.dumps(value)
    return response
