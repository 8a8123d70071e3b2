"""The ``mfserve.v1.RecommenderService`` servicer (grpc.aio): each call answered by one loaded
version, its ids through ``Recommender`` and its ranking through that version's ranker.

Each RPC runs in three steps, kept apart so later work can slot in between them:

1. parse + validate the request (``mfserve.server.validation``; raises ``ServiceError``),
2. read the model ONCE from the ``ModelHolder`` and map ids to rows (vectorised),
3. call the model through the compute seam ``_predict_rows`` / ``_top_k_rows`` / ``_similar_rows``,
   which hand the call to a dynamic batcher (``mfserve.server.batching``): concurrent calls of a
   kind are coalesced into one tensor operation that runs off the event loop (a lone cheap call,
   with nothing else in the server, is answered on the loop: the thread hop would cost more).

Validation happens per call before anything is queued, so a bad request never reaches a batch
and never fails its neighbours.

Errors: a ``ServiceError`` becomes its status with a ``google.rpc.BadRequest`` detail; any other
exception is logged with its traceback and answered ``INTERNAL``, so a bug in one handler never
takes the server down.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc
import numpy as np
import torch
from google.protobuf.message import DecodeError

from mfserve.server.batch_compute import (
    PredictPayload,
    RankPayload,
    predict_batch,
    similar_batch,
    top_k_batch,
)
from mfserve.server.batching import INLINE_PREDICT_PAIRS, INLINE_RANK_SCORES, Batcher
from mfserve.server.costs import predict_cost, predict_rows, similar_cost, top_k_cost
from mfserve.server.errors import (
    ServiceError,
    abort,
    internal,
    invalid_argument,
    invalid_fields,
    malformed,
    not_found,
    unavailable,
)
from mfserve.server.fold_in import folded_user, require_known_user
from mfserve.server.model_holder import ModelHolder, ServingModel
from mfserve.server.reload import Reloader, ReloadError
from mfserve.server.responses import add_scored, model_info
from mfserve.server.top_k import (
    PreparedTopK,
    check_top_k,
    known_rows,
    prepare_top_k,
    top_k_response,
)
from mfserve.server.validation import (
    COLD_START_HINT,
    check_sizes,
    require_id,
    require_ids,
    resolve_k,
    unknown_ids,
)
from mfserve.server.wire import packed_floats
from mfserve.training.foldin import UserEvidence
from mfserve.training.recommender import Recommender
from mfserve.training.scoring import RankedRow, RankRequest
from mfserve.v1 import recommender_pb2 as pb
from mfserve.v1 import recommender_pb2_grpc as pb_grpc

log = logging.getLogger("mfserve.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RecommenderService"].full_name

Request = TypeVar("Request")
Response = TypeVar("Response")

_RATINGS_FIELD = pb.BatchPredictResponse.DESCRIPTOR.fields_by_name["ratings"].number
# BatchTopK hands the TopK batcher this many users at a time (a few of --max-batch-size's
# batches), one chunk ahead of the writes: what a paused reader leaves computed.
BATCH_TOP_K_CHUNK = 256
BATCH_TOP_K_FIRST_CHUNK = 32
# A BatchPredict batch stops growing at this many pairs (a call larger than this goes alone): big
# enough to amortise the per-batch cost, small enough that 64 calls of 100,000 pairs never gather
# a gigabyte of factors at once.
PREDICT_BATCH_ROWS = 131_072


def _rpc(
    method: Callable[[Any, Request], Awaitable[Response]],
) -> Callable[[Any, Request, grpc.aio.ServicerContext[Any, Any]], Awaitable[Response]]:
    """Turn a context-free handler into a servicer method with the error policy applied."""

    @functools.wraps(method)
    async def handler(
        self: Any, request: Request, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Response:
        # Calls inside the handlers: a cheap call is computed on the loop only while it is alone.
        self.in_flight += 1
        try:
            return await method(self, request)
        except ServiceError as error:
            await abort(context, error)
        except Exception:  # the whole point: no exception escapes as a crash
            log.exception("mfserve: %s failed with an unexpected error", method.__name__)
            await abort(
                context, internal(f"{method.__name__} failed: internal error (see the server log)")
            )
        finally:
            self.in_flight -= 1
        raise AssertionError("unreachable: abort() raises")  # pragma: no cover

    return handler


def _stream_rpc(
    method: Callable[[Any, Request], AsyncIterator[Response]],
) -> Callable[[Any, Request, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Response]]:
    """:func:`_rpc` for a server-streaming handler: the same error policy, whether the error
    comes before the first response or between two."""

    @functools.wraps(method)
    async def handler(
        self: Any, request: Request, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Response]:
        self.in_flight += 1
        try:
            async for response in method(self, request):
                yield response
        except ServiceError as error:
            await abort(context, error)
        except Exception:
            log.exception("mfserve: %s failed with an unexpected error", method.__name__)
            await abort(
                context, internal(f"{method.__name__} failed: internal error (see the server log)")
            )
        finally:
            self.in_flight -= 1

    return handler


class RecommenderService(pb_grpc.RecommenderServiceServicer):  # type: ignore[misc]
    """Serves the holder's current model. Stateless between calls apart from the holder."""

    def __init__(
        self,
        holder: ModelHolder,
        *,
        max_batch_pairs: int,
        max_k: int,
        max_interactions: int = 1_000,
        max_batch_users: int = 100_000,
        executor: Executor | None,
        max_batch_size: int,
        reloader: Reloader | None = None,
    ) -> None:
        self.holder = holder
        self.reloader = reloader  # None: started without a model path, nothing to reload
        self.max_batch_pairs = max_batch_pairs
        self.max_k = max_k
        self.max_interactions = max_interactions
        self.max_batch_users = max_batch_users
        self.in_flight = 0  # calls inside the handlers (event-loop thread only)
        # executor None: batches are computed inline on the event loop.
        options: dict[str, Any] = {
            "executor": executor,
            "max_batch_size": max_batch_size,
            "in_flight": self._in_flight,
        }
        self.predict_batcher: Batcher[PredictPayload, np.ndarray] = Batcher(
            "predict",
            predict_batch,
            max_batch_rows=PREDICT_BATCH_ROWS,
            rows=predict_rows,
            cost=predict_cost,
            inline_limit=INLINE_PREDICT_PAIRS,
            **options,
        )
        rank_options = {**options, "inline_limit": INLINE_RANK_SCORES}
        # TopK batches are computed over a ServingModel: exact, or through its approximate index.
        self.top_k_batcher: Batcher[RankPayload, RankedRow] = Batcher(
            "top_k", top_k_batch, cost=top_k_cost, **rank_options
        )
        self.similar_batcher: Batcher[RankPayload, RankedRow] = Batcher(
            "similar_items", similar_batch, cost=similar_cost, **rank_options
        )

    def _in_flight(self) -> int:
        return self.in_flight

    @property
    def batchers(self) -> dict[str, Batcher[Any, Any]]:
        """The batchers by kind (``predict``, ``top_k``, ``similar_items``), e.g. for stats."""
        return {b.name: b for b in (self.predict_batcher, self.top_k_batcher, self.similar_batcher)}

    # ------------------------------------------------------------------ compute seam
    # Each returns an awaitable (the batcher's future): this call's share of a batch.
    def _predict_rows(
        self,
        model: ServingModel,
        users: np.ndarray,
        items: np.ndarray,
        evidence: UserEvidence | None = None,
    ) -> Awaitable[np.ndarray]:
        """Ratings for row pairs (-1 = unknown: the cold-start estimate), as float32; with
        ``evidence``, every pair's user is folded in from it."""
        future: Awaitable[np.ndarray] = self.predict_batcher.submit(model, (users, items, evidence))
        return future

    def _top_k_rows(
        self, model: ServingModel, user: int, k: int, rank: RankRequest
    ) -> Awaitable[RankedRow]:
        """The best ``k`` items for one user row (-1: the popularity ranking). With an approximate
        index in ``model``, a known user without an allow-list is answered by the index."""
        future: Awaitable[RankedRow] = self.top_k_batcher.submit(model, (user, k, rank))
        return future

    def _similar_rows(
        self, model: ServingModel, item: int, k: int, rank: RankRequest
    ) -> Awaitable[RankedRow]:
        """The ``k`` items nearest to one item row."""
        future: Awaitable[RankedRow] = self.similar_batcher.submit(model, (item, k, rank))
        return future

    def _model(self) -> Recommender:
        """The model for this call; read once so one call never mixes two versions."""
        return self._serving().recommender

    def _serving(self) -> ServingModel:
        """The model and its approximate index for this call, read once (one version)."""
        serving = self.holder.serving
        if serving is None:
            raise unavailable(
                "no model is loaded yet; retry shortly (the server is starting or reloading)"
            )
        return serving

    def _ranking_options(self, request: pb.SimilarItemsRequest) -> int:
        """SimilarItems' checks: ``k`` (resolved) and non-empty list ids (TopK: server.top_k)."""
        k: int = resolve_k(request.k, self.max_k)
        require_ids("exclude_item_ids", request.exclude_item_ids)
        require_ids("candidate_item_ids", request.candidate_item_ids)
        return k

    # ------------------------------------------------------------------ RPCs
    @_rpc
    async def Predict(self, request: pb.PredictRequest) -> pb.PredictResponse:  # noqa: N802 (gRPC name)
        interactions = request.interactions
        user = request.user_id if interactions else require_id("user_id", request.user_id)
        item = require_id("item_id", request.item_id)
        serving = self._serving()
        model = serving.recommender
        if not interactions:  # the common call: no fold-in bookkeeping
            users, items = model.user_rows([user]), model.item_rows([item])
            missing_users = [user] if users[0] < 0 else []
            missing_items = [item] if items[0] < 0 else []
            if (missing_users or missing_items) and not request.allow_cold_start:
                raise not_found(
                    {"user_id": missing_users, "item_id": missing_items}, hint=COLD_START_HINT
                )
            ratings = await self._predict_rows(serving, users, items)
        else:
            folded = folded_user(model, user, interactions, self.max_interactions)
            items = model.item_rows([item])
            missing_items = [item] if items[0] < 0 else []
            require_known_user(
                folded,
                "user_id",
                allow_cold_start=request.allow_cold_start,
                other={"item_id": missing_items},
            )
            users = np.array([folded.row], dtype=np.int64)
            ratings = await self._predict_rows(serving, users, items, folded.evidence)
            missing_users = folded.missing_user_ids
            missing_items = list(dict.fromkeys(missing_items + folded.missing_item_ids))
        return pb.PredictResponse(
            rating=float(ratings[0]),
            model_version=model.artifact.version,
            missing_user_ids=missing_users,
            missing_item_ids=missing_items,
        )

    @_rpc
    async def batch_predict_bytes(self, raw: bytes) -> bytes | pb.BatchPredictResponse:
        """BatchPredict, from the request's serialized bytes (the only way it is registered).

        A request whose ids are all known is decoded in compiled code (``batch_decode``) and
        answered with the response's bytes; any other request is parsed by protobuf and answered
        by :meth:`_batch_predict`, so every error is that path's error.
        """
        serving = self._serving()
        model = serving.recommender
        decoded = (
            None
            if serving.batch_decoder is None
            else serving.batch_decoder.decode(raw, self.max_batch_pairs + 1)
        )
        if decoded is None:
            try:
                request = pb.BatchPredictRequest.FromString(raw)
            except DecodeError as exc:
                raise malformed(pb.BatchPredictRequest, exc) from exc
            return await self._batch_predict(serving, request)
        users, items = decoded
        check_sizes(len(users), len(items), self.max_batch_pairs)
        ratings = await self._predict_rows(serving, users, items)
        # The response's bytes: the packed ratings, then model_version as protobuf writes it.
        version = pb.BatchPredictResponse(model_version=model.artifact.version)
        tail: bytes = version.SerializeToString()
        return packed_floats(_RATINGS_FIELD, ratings) + tail

    async def _batch_predict(
        self, serving: ServingModel, request: pb.BatchPredictRequest
    ) -> pb.BatchPredictResponse:
        model = serving.recommender
        # One C-level copy each first: list() makes the strings faster than iterating the
        # protobuf container does. Empty and unknown ids both look up as -1 (no id map holds ""),
        # so only a batch with a -1 pays for the validation scans and the error path.
        check_sizes(len(request.user_ids), len(request.item_ids), self.max_batch_pairs)
        if request.interactions:
            return await self._batch_predict_folded(serving, request)
        user_ids, item_ids = list(request.user_ids), list(request.item_ids)
        users, items = model.user_rows(user_ids), model.item_rows(item_ids)
        missing_users: list[str] = []
        missing_items: list[str] = []
        if users.min() < 0 or items.min() < 0:
            require_ids("user_ids", user_ids)
            require_ids("item_ids", item_ids)
            missing_users = unknown_ids(user_ids, users)
            missing_items = unknown_ids(item_ids, items)
            if not request.allow_cold_start:
                raise not_found(
                    {"user_ids": missing_users, "item_ids": missing_items}, hint=COLD_START_HINT
                )
        # One pass for the whole batch (and for concurrent calls' pairs too).
        ratings = await self._predict_rows(serving, users, items)
        response = pb.BatchPredictResponse(
            model_version=model.artifact.version,
            missing_user_ids=missing_users,
            missing_item_ids=missing_items,
        )
        # The ratings as protobuf's packed encoding, straight from the float32 array: ~2 us for
        # 1,000 ratings, against ~40 us through a list of Python floats.
        response.MergeFromString(packed_floats(_RATINGS_FIELD, ratings))
        return response

    async def _batch_predict_folded(
        self, serving: ServingModel, request: pb.BatchPredictRequest
    ) -> pb.BatchPredictResponse:
        """BatchPredict for one user folded in from the request's interactions."""
        model = serving.recommender
        user_ids = list(dict.fromkeys(request.user_ids))
        if len(user_ids) > 1:
            raise invalid_argument(
                "user_ids",
                f"{len(user_ids)} distinct ids",
                "must hold one user id throughout (or only empty ids) when interactions are "
                "given: the interactions are that user's",
            )
        folded = folded_user(model, user_ids[0], request.interactions, self.max_interactions)
        item_ids = list(request.item_ids)
        require_ids("item_ids", item_ids)
        items = model.item_rows(item_ids)
        missing_items = unknown_ids(item_ids, items)
        require_known_user(
            folded,
            "user_ids",
            allow_cold_start=request.allow_cold_start,
            other={"item_ids": missing_items},
        )
        users = np.full(len(items), folded.row, dtype=np.int64)
        ratings = await self._predict_rows(serving, users, items, folded.evidence)
        response = pb.BatchPredictResponse(
            model_version=model.artifact.version,
            missing_user_ids=folded.missing_user_ids,
            missing_item_ids=list(dict.fromkeys(missing_items + folded.missing_item_ids)),
        )
        response.MergeFromString(packed_floats(_RATINGS_FIELD, ratings))
        return response

    @_rpc
    async def TopK(self, request: pb.TopKRequest) -> pb.TopKResponse:  # noqa: N802 (gRPC name)
        check_top_k(request, max_k=self.max_k)
        serving = self._serving()
        model = serving.recommender
        prepared = prepare_top_k(
            model, request, max_k=self.max_k, max_interactions=self.max_interactions
        )
        rows, scores = await self._top_k_rows(serving, prepared.row, prepared.k, prepared.rank)
        return top_k_response(model, prepared, rows, scores)

    @_stream_rpc
    async def BatchTopK(self, request: pb.BatchTopKRequest) -> AsyncIterator[pb.TopKResponse]:  # noqa: N802 (gRPC name)
        entries = request.requests
        if not entries:
            raise invalid_fields(
                "requests is empty; at least one TopK request is required", "requests"
            )
        if len(entries) > self.max_batch_users:
            raise invalid_argument(
                "requests",
                f"{len(entries)} requests",
                f"is over the server's maximum of {self.max_batch_users}; split the batch",
            )
        serving = self._serving()  # one version answers the whole stream
        model = serving.recommender
        prepared = []
        for index, entry in enumerate(entries):
            field = f"requests[{index}]"
            if entry.page_size or entry.page_token:
                name = "page_size" if entry.page_size else "page_token"
                raise invalid_argument(
                    f"{field}.{name}",
                    getattr(entry, name),
                    "paging is TopK's; BatchTopK answers each request's whole list",
                )
            try:
                prepared.append(
                    prepare_top_k(
                        model, entry, max_k=self.max_k, max_interactions=self.max_interactions
                    )
                )
            except ServiceError as error:
                raise error.within(field) from None
        del entries
        # A chunk at a time through the TopK batcher, one chunk ahead of the answers being
        # written, so that ranking (on the compute thread) overlaps the writes (on the loop);
        # gRPC's flow control pauses this generator, so a slow reader holds at most one chunk.
        # The first chunk small, so that the first answers leave while the rest are ranked.
        bounds = [0, min(BATCH_TOP_K_FIRST_CHUNK, len(prepared))]
        bounds += list(range(bounds[-1] + BATCH_TOP_K_CHUNK, len(prepared), BATCH_TOP_K_CHUNK))
        bounds.append(len(prepared))
        chunks = [prepared[a:b] for a, b in itertools.pairwise(bounds) if b > a]

        def rank(chunk: list[PreparedTopK]) -> asyncio.Future[list[RankedRow]]:
            return asyncio.gather(*(self._top_k_rows(serving, p.row, p.k, p.rank) for p in chunk))

        ahead = rank(chunks[0])
        try:
            for number, chunk in enumerate(chunks):
                ranked = await ahead
                if number + 1 < len(chunks):
                    ahead = rank(chunks[number + 1])
                for entry_prepared, (rows, scores) in zip(chunk, ranked, strict=True):
                    yield top_k_response(model, entry_prepared, rows, scores)
        finally:
            ahead.cancel()  # a cancelled stream leaves no chunk computing

    @_rpc
    async def SimilarItems(self, request: pb.SimilarItemsRequest) -> pb.SimilarItemsResponse:  # noqa: N802 (gRPC name)
        item = require_id("item_id", request.item_id)
        k = self._ranking_options(request)
        serving = self._serving()
        model = serving.recommender

        row = model.item_row(item)
        missing_item = [item] if row < 0 else []
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
            exclude=known_rows(model.item_rows(request.exclude_item_ids)),
            candidates=candidates,
        )
        rows_out, scores = await self._similar_rows(serving, row, k, rank)
        response = pb.SimilarItemsResponse(model_version=model.artifact.version)
        add_scored(response.items, model, rows_out, scores, request.include_metadata)
        return response

    @_rpc
    async def GetModelInfo(self, request: pb.GetModelInfoRequest) -> pb.GetModelInfoResponse:  # noqa: N802 (gRPC name)
        response = model_info(self._model())
        if self.reloader is not None:
            state = self.reloader.state
            if state.time is not None:
                response.last_reload_time.FromDatetime(state.time)
            response.last_reload_version = state.version
            response.last_reload_error = state.error
            response.model_folder_error = self.reloader.folder_error or ""
        return response

    @_rpc
    async def ReloadModel(self, request: pb.ReloadModelRequest) -> pb.ReloadModelResponse:  # noqa: N802 (gRPC name)
        if request.version < 0:
            raise invalid_argument("version", request.version, "must be 0 (the newest) or more")
        if self.reloader is None:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this server was started without a model folder: there is nothing to reload from",
            )
        try:
            version, changed = await self.reloader.reload(
                request.version or None, reason="ReloadModel"
            )
        except ReloadError as exc:
            raise _reload_status(exc) from exc
        return pb.ReloadModelResponse(model_version=version, changed=changed)


def _reload_status(error: ReloadError) -> ServiceError:
    """The status ``ReloadModel`` documents for each reason a reload did not happen."""
    if error.kind == "not_found":
        return ServiceError(grpc.StatusCode.NOT_FOUND, str(error), [("version", str(error))])
    if error.kind == "busy":
        return ServiceError(grpc.StatusCode.ABORTED, str(error))
    return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, str(error))
