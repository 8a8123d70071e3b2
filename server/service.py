"""The ``mfserve.v1.RecommenderService`` servicer (grpc.aio), answering through ``Recommender``.

Each RPC runs in three steps, kept apart so later work can slot in between them:

1. parse + validate the request (``mfserve.server.validation``; raises ``ServiceError``),
2. read the model ONCE from the ``ModelHolder`` and map ids to rows (vectorised),
3. call the model through the compute seam ``_predict_rows`` / ``_top_k_rows`` / ``_similar_rows``.
   A dynamic batcher replaces these three methods (coalescing rows from concurrent calls); today
   they run the model call inline or on a small thread pool so the event loop stays responsive.

Errors: a ``ServiceError`` becomes its status with a ``google.rpc.BadRequest`` detail; any other
exception is logged with its traceback and answered ``INTERNAL``, so a bug in one handler never
takes the server down.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from datetime import datetime
from typing import Any, TypeVar

import grpc
import numpy as np
import torch

from mfserve.server.errors import ServiceError, abort, internal, not_found, unavailable
from mfserve.server.model_holder import ModelHolder
from mfserve.server.validation import (
    COLD_START_HINT,
    check_pairs,
    require_id,
    require_ids,
    resolve_k,
    unknown_ids,
)
from mfserve.training.artifact import FORMAT_VERSION
from mfserve.training.recommender import RankRequest, Recommender
from mfserve.v1 import recommender_pb2 as pb
from mfserve.v1 import recommender_pb2_grpc as pb_grpc

log = logging.getLogger("mfserve.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RecommenderService"].full_name

Request = TypeVar("Request")
Response = TypeVar("Response")
Ranked = list[tuple[torch.Tensor, torch.Tensor]]


def _rpc(
    method: Callable[[Any, Request], Awaitable[Response]],
) -> Callable[[Any, Request, grpc.aio.ServicerContext[Any, Any]], Awaitable[Response]]:
    """Turn a context-free handler into a servicer method with the error policy applied."""

    @functools.wraps(method)
    async def handler(
        self: Any, request: Request, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Response:
        try:
            return await method(self, request)
        except ServiceError as error:
            await abort(context, error)
        except Exception:  # the whole point: no exception escapes as a crash
            log.exception("mfserve: %s failed with an unexpected error", method.__name__)
            await abort(
                context, internal(f"{method.__name__} failed: internal error (see the server log)")
            )
        raise AssertionError("unreachable: abort() raises")  # pragma: no cover

    return handler


def _known(rows: np.ndarray) -> torch.Tensor | None:
    """Known rows as a deny-list tensor, or None when none are known (unknown ids are ignored)."""
    known = rows[rows >= 0]
    return torch.from_numpy(known) if known.size else None


class RecommenderService(pb_grpc.RecommenderServiceServicer):  # type: ignore[misc]
    """Serves the holder's current model. Stateless between calls apart from the holder."""

    def __init__(
        self,
        holder: ModelHolder,
        *,
        max_batch_pairs: int = 100_000,
        max_k: int = 1_000,
        executor: Executor | None = None,
    ) -> None:
        self.holder = holder
        self.max_batch_pairs = max_batch_pairs
        self.max_k = max_k
        # None: model calls run inline on the event loop (lowest latency for tiny calls).
        self._executor = executor

    # ------------------------------------------------------------------ compute seam
    async def _compute(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._executor is None:
            return fn(*args)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    async def _predict_rows(
        self, model: Recommender, users: torch.Tensor, items: torch.Tensor
    ) -> torch.Tensor:
        """Ratings for row pairs (-1 = unknown: cold-start estimate). A batcher may replace this."""
        result: torch.Tensor = await self._compute(model.predict, users, items)
        return result

    async def _top_k_rows(
        self, model: Recommender, users: torch.Tensor, k: int, requests: Sequence[RankRequest]
    ) -> Ranked:
        result: Ranked = await self._compute(model.top_k, users, k, requests)
        return result

    async def _similar_rows(
        self, model: Recommender, items: torch.Tensor, k: int, requests: Sequence[RankRequest]
    ) -> Ranked:
        result: Ranked = await self._compute(model.similar_items, items, k, requests)
        return result

    def _model(self) -> Recommender:
        """The model for this call; read once so one call never mixes two versions."""
        model = self.holder.current
        if model is None:
            raise unavailable(
                "no model is loaded yet; retry shortly (the server is starting or reloading)"
            )
        return model

    # ------------------------------------------------------------------ RPCs
    @_rpc
    async def Predict(self, request: pb.PredictRequest) -> pb.PredictResponse:  # noqa: N802 (gRPC name)
        user = require_id("user_id", request.user_id)
        item = require_id("item_id", request.item_id)
        model = self._model()
        users, items = model.user_rows([user]), model.item_rows([item])
        missing_users = [user] if users[0] < 0 else []
        missing_items = [item] if items[0] < 0 else []
        if (missing_users or missing_items) and not request.allow_cold_start:
            raise not_found(
                {"user_id": missing_users, "item_id": missing_items}, hint=COLD_START_HINT
            )
        ratings = await self._predict_rows(model, torch.from_numpy(users), torch.from_numpy(items))
        return pb.PredictResponse(
            rating=float(ratings[0]),
            model_version=model.artifact.version,
            missing_user_ids=missing_users,
            missing_item_ids=missing_items,
        )

    @_rpc
    async def BatchPredict(self, request: pb.BatchPredictRequest) -> pb.BatchPredictResponse:  # noqa: N802 (gRPC name)
        # One C-level copy each: iterating the protobuf container re-creates (and re-hashes) every
        # string on each pass, and validation, lookup and the unknown-id scan are three passes.
        user_ids, item_ids = list(request.user_ids), list(request.item_ids)
        check_pairs(user_ids, item_ids, self.max_batch_pairs)
        model = self._model()
        users, items = model.user_rows(user_ids), model.item_rows(item_ids)
        missing_users = unknown_ids(user_ids, users)
        missing_items = unknown_ids(item_ids, items)
        if (missing_users or missing_items) and not request.allow_cold_start:
            raise not_found(
                {"user_ids": missing_users, "item_ids": missing_items}, hint=COLD_START_HINT
            )
        # One gather + row-wise dot for the whole batch.
        ratings = await self._predict_rows(model, torch.from_numpy(users), torch.from_numpy(items))
        response = pb.BatchPredictResponse(
            model_version=model.artifact.version,
            missing_user_ids=missing_users,
            missing_item_ids=missing_items,
        )
        response.ratings.extend(ratings.tolist())
        return response

    @_rpc
    async def TopK(self, request: pb.TopKRequest) -> pb.TopKResponse:  # noqa: N802 (gRPC name)
        user = require_id("user_id", request.user_id)
        k = resolve_k(request.k, self.max_k)
        require_ids("exclude_item_ids", request.exclude_item_ids)
        require_ids("candidate_item_ids", request.candidate_item_ids)
        # Explicit presence: unset means true; only an explicit false keeps the seen items.
        exclude_seen = request.exclude_seen if request.HasField("exclude_seen") else True
        model = self._model()

        users = model.user_rows([user])
        missing_user = [user] if users[0] < 0 else []
        candidates: torch.Tensor | None = None
        missing_candidates: list[str] = []
        if len(request.candidate_item_ids):
            rows = model.item_rows(request.candidate_item_ids)
            missing_candidates = unknown_ids(request.candidate_item_ids, rows)
            # Unknown candidates are skipped (cold start); an all-unknown allow-list ranks nothing.
            candidates = torch.from_numpy(rows[rows >= 0])
        if (missing_user or missing_candidates) and not request.allow_cold_start:
            raise not_found(
                {"user_id": missing_user, "candidate_item_ids": missing_candidates},
                hint=COLD_START_HINT,
            )
        rank = RankRequest(
            exclude_seen=exclude_seen,
            exclude=_known(model.item_rows(request.exclude_item_ids)),
            candidates=candidates,
        )
        [(rows_out, scores)] = await self._top_k_rows(model, torch.from_numpy(users), k, [rank])
        response = pb.TopKResponse(
            model_version=model.artifact.version, missing_ids=missing_user + missing_candidates
        )
        _add_scored(response.items, model, rows_out, scores, request.include_metadata)
        return response

    @_rpc
    async def SimilarItems(self, request: pb.SimilarItemsRequest) -> pb.SimilarItemsResponse:  # noqa: N802 (gRPC name)
        item = require_id("item_id", request.item_id)
        k = resolve_k(request.k, self.max_k)
        require_ids("exclude_item_ids", request.exclude_item_ids)
        require_ids("candidate_item_ids", request.candidate_item_ids)
        model = self._model()

        items = model.item_rows([item])
        missing_item = [item] if items[0] < 0 else []
        candidates: torch.Tensor | None = None
        missing_candidates: list[str] = []
        if len(request.candidate_item_ids):
            rows = model.item_rows(request.candidate_item_ids)
            missing_candidates = unknown_ids(request.candidate_item_ids, rows)
            candidates = torch.from_numpy(rows)
        # No cold start here: similarity needs the query item's factors.
        if missing_item or missing_candidates:
            raise not_found({"item_id": missing_item, "candidate_item_ids": missing_candidates})
        rank = RankRequest(
            exclude_seen=False,
            exclude=_known(model.item_rows(request.exclude_item_ids)),
            candidates=candidates,
        )
        [(rows_out, scores)] = await self._similar_rows(model, torch.from_numpy(items), k, [rank])
        response = pb.SimilarItemsResponse(model_version=model.artifact.version)
        _add_scored(response.items, model, rows_out, scores, request.include_metadata)
        return response

    @_rpc
    async def GetModelInfo(self, request: pb.GetModelInfoRequest) -> pb.GetModelInfoResponse:  # noqa: N802 (gRPC name)
        return model_info(self._model())


def _add_scored(
    items: Any, model: Recommender, rows: torch.Tensor, scores: torch.Tensor, include_metadata: bool
) -> None:
    """Append ranked items to a repeated ``ScoredItem`` field (the one per-item loop: output)."""
    ids = model.item_ids
    artifact = model.artifact
    titles = artifact.item_titles if include_metadata else None
    genres = artifact.item_genres if include_metadata else None
    for rank, (row, score) in enumerate(zip(rows.tolist(), scores.tolist(), strict=True), start=1):
        scored = items.add(item_id=ids[row], score=score, rank=rank)
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
