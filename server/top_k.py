"""TopK's request and response, shared by ``TopK`` and each entry of ``BatchTopK``: checking a
request and turning it into the ranker's row options (:func:`prepare_top_k`), and building the
response, a page of it when paged, from the ranked rows (:func:`top_k_response`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from mfserve.server.errors import invalid_argument
from mfserve.server.fold_in import folded_user, require_known_user
from mfserve.server.paging import Page, next_token, read_page
from mfserve.server.responses import add_scored
from mfserve.server.validation import require_id, require_ids, resolve_k, unknown_ids
from mfserve.training.recommender import Recommender
from mfserve.training.scoring import RankRequest
from mfserve.v1 import recommender_pb2 as pb

# Shared options of the common TopK call (no lists): no allocation per call.
_RANK_UNSEEN = RankRequest(exclude_seen=True)
_RANK_ALL = RankRequest(exclude_seen=False)


@dataclass(frozen=True)
class PreparedTopK:
    """One checked TopK: the user's row, the list's length, the ranker's options, the page, and
    what the response lists as unknown."""

    row: int
    k: int
    rank: RankRequest
    page: Page
    include_metadata: bool
    missing_user_ids: list[str]
    missing_item_ids: list[str]
    missing_candidates: list[str]


def known_rows(rows: np.ndarray) -> torch.Tensor | None:
    """Known rows as a deny-list tensor, or None when none are known (unknown ids are ignored)."""
    known = rows[rows >= 0]
    return torch.from_numpy(known) if known.size else None


def check_top_k(request: pb.TopKRequest, *, max_k: int) -> int:
    """The checks that need no model (a bad request is refused even while none is loaded, so a
    client never retries it); returns ``k``, resolved."""
    if not request.interactions:
        require_id("user_id", request.user_id)
    k: int = resolve_k(request.k, max_k)
    require_ids("exclude_item_ids", request.exclude_item_ids)
    require_ids("candidate_item_ids", request.candidate_item_ids)
    diversity = request.diversity
    if not (math.isfinite(diversity) and 0.0 <= diversity <= 1.0):
        raise invalid_argument("diversity", diversity, "must be between 0 and 1")
    return k


def prepare_top_k(
    model: Recommender, request: pb.TopKRequest, *, max_k: int, max_interactions: int
) -> PreparedTopK:
    """Every check TopK makes before ranking (each raises ``ServiceError``), in one place."""
    k = check_top_k(request, max_k=max_k)
    interactions, user, diversity = request.interactions, request.user_id, request.diversity
    page = (
        read_page(request, k, model.artifact.version)
        if request.page_size or request.page_token
        else _WHOLE
    )
    # Explicit presence: unset means true; only an explicit false keeps the seen items.
    exclude_seen = request.exclude_seen if request.HasField("exclude_seen") else True

    folded = folded_user(model, user, interactions, max_interactions)
    candidates: torch.Tensor | None = None
    missing_candidates: list[str] = []
    if len(request.candidate_item_ids):
        rows = model.item_rows(request.candidate_item_ids)
        missing_candidates = unknown_ids(request.candidate_item_ids, rows)
        # Unknown candidates are skipped (cold start); an all-unknown allow-list ranks nothing.
        candidates = torch.from_numpy(rows[rows >= 0])
    require_known_user(
        folded,
        "user_id",
        allow_cold_start=request.allow_cold_start,
        other={"candidate_item_ids": missing_candidates},
    )
    plain = folded.evidence is None and candidates is None and not diversity
    if plain and not len(request.exclude_item_ids):
        rank = _RANK_UNSEEN if exclude_seen else _RANK_ALL
    else:
        rank = RankRequest(
            exclude_seen=exclude_seen,
            exclude=known_rows(model.item_rows(request.exclude_item_ids)),
            candidates=candidates,
            evidence=folded.evidence,
            diversity=diversity,
        )
    missing_items = missing_candidates + folded.missing_item_ids
    return PreparedTopK(
        folded.row,
        k,
        rank,
        page,
        request.include_metadata,
        folded.missing_user_ids,
        list(dict.fromkeys(missing_items)) if folded.missing_item_ids else missing_items,
        missing_candidates,
    )


def top_k_response(
    model: Recommender, prepared: PreparedTopK, rows: list[int], scores: list[float]
) -> pb.TopKResponse:
    """The response for ``prepared`` from its ranked list (of up to ``k`` items)."""
    response = pb.TopKResponse()
    version = model.artifact.version
    response.model_version = version
    if prepared.missing_user_ids or prepared.missing_item_ids:
        response.missing_user_ids.extend(prepared.missing_user_ids)
        response.missing_item_ids.extend(prepared.missing_item_ids)
        # Deprecated, filled for one more release: clients before the split read only this.
        response.missing_ids.extend(prepared.missing_user_ids + prepared.missing_candidates)
    page = prepared.page
    if page.size:
        available = len(rows)
        end = page.offset + page.size
        rows, scores = rows[page.offset : end], scores[page.offset : end]
        response.next_page_token = next_token(page, len(rows), available, prepared.k, version)
    add_scored(
        response.items, model, rows, scores, prepared.include_metadata, first_rank=page.offset + 1
    )
    return response


_WHOLE = Page(0, 0, "")
