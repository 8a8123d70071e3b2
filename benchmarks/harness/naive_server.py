"""The straightforward baseline: one model call per RPC, computed on the event loop.

This is what a first grpc.aio servicer over the factor tables looks like: a dict lookup per id, one
full-catalogue matmul + topk per TopK call, one gather + dot per BatchPredict, no batching across
calls and no thread pool. mfserve must beat it under concurrency (or explain why not).
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import torch

from benchmarks.harness.common import serve_until_signal, server_args
from mfserve.training.artifact import load_artifact, resolve_version
from mfserve.v1 import recommender_pb2 as pb
from mfserve.v1 import recommender_pb2_grpc as pb_grpc

DEFAULT_K = 10


class NaiveServicer(pb_grpc.RecommenderServiceServicer):  # type: ignore[misc]
    def __init__(self, model: str) -> None:
        artifact = load_artifact(resolve_version(model))
        t = artifact.tensors
        self.version = artifact.version
        self.mean = artifact.global_mean
        self.low, self.high = artifact.rating_range
        self.users, self.items = t["user_factors"], t["item_factors"]
        self.user_bias, self.item_bias = t["user_bias"], t["item_bias"]
        self.rank_users = t.get("rank_user_factors", self.users)
        self.rank_items = t.get("rank_item_factors", self.items)
        self.rank_bias = t.get("rank_item_bias")
        self.user_rows = {u: r for r, u in enumerate(artifact.user_ids)}
        self.item_rows = {i: r for r, i in enumerate(artifact.item_ids)}
        self.item_ids = artifact.item_ids
        self.indptr, self.indices = artifact.seen_indptr, artifact.seen_indices

    async def _rows(self, table: dict[str, int], ids: Any, context: Any) -> torch.Tensor:
        try:
            return torch.tensor([table[i] for i in ids], dtype=torch.int64)
        except KeyError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown id {exc.args[0]!r}")
            raise

    def _score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        dot = (self.users[users] * self.items[items]).sum(dim=1)
        estimate: torch.Tensor = self.mean + self.user_bias[users] + self.item_bias[items] + dot
        return estimate.clamp_(self.low, self.high)

    async def Predict(  # noqa: N802 - gRPC's method name
        self, request: pb.PredictRequest, context: Any
    ) -> pb.PredictResponse:
        users = await self._rows(self.user_rows, [request.user_id], context)
        items = await self._rows(self.item_rows, [request.item_id], context)
        return pb.PredictResponse(
            rating=float(self._score(users, items)[0]), model_version=self.version
        )

    async def BatchPredict(  # noqa: N802
        self, request: pb.BatchPredictRequest, context: Any
    ) -> pb.BatchPredictResponse:
        users = await self._rows(self.user_rows, request.user_ids, context)
        items = await self._rows(self.item_rows, request.item_ids, context)
        ratings = self._score(users, items).tolist()
        return pb.BatchPredictResponse(ratings=ratings, model_version=self.version)

    async def TopK(  # noqa: N802
        self, request: pb.TopKRequest, context: Any
    ) -> pb.TopKResponse:
        row = int((await self._rows(self.user_rows, [request.user_id], context))[0])
        scores = self.rank_items @ self.rank_users[row]
        if self.rank_bias is not None:
            scores += self.rank_bias
        if not request.HasField("exclude_seen") or request.exclude_seen:
            scores[self.indices[self.indptr[row] : self.indptr[row + 1]]] = -torch.inf
        top = torch.topk(scores, min(request.k or DEFAULT_K, scores.numel()))
        response = pb.TopKResponse(model_version=self.version)
        for rank, (item, score) in enumerate(
            zip(top.indices.tolist(), top.values.tolist(), strict=True), 1
        ):
            response.items.add(item_id=self.item_ids[item], score=score, rank=rank)
        return response


def main(argv: list[str] | None = None) -> None:
    args = server_args(argv, "benchmark baseline: one unbatched model call per RPC on the loop")
    # One intra-op thread: on a small machine shared with the load clients, torch's default (one
    # thread per core) makes small ops wait on descheduled threads; measured: a 1M-item TopK went
    # from 28 ms to 356 ms. The baseline should show what its design costs, not oversubscription.
    torch.set_num_threads(args.torch_threads)
    asyncio.run(serve_until_signal(NaiveServicer(args.model), args.host, args.port))


if __name__ == "__main__":
    main()
