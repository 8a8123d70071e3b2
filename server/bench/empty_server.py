"""The floor: a grpc.aio server on the same stack that does no model work at all.

Every RPC returns a canned response of the shape mfserve would send (``k`` ScoredItems with real
item ids for TopK, one float per pair for BatchPredict), so the gap between this server and mfserve
is exactly what the model path costs: id lookup, scoring, and building the response.
"""

from __future__ import annotations

import asyncio
from typing import Any

from mfserve.server.bench.common import read_ids, serve_until_signal, server_args
from mfserve.training.artifact import resolve_version
from mfserve.v1 import recommender_pb2 as pb
from mfserve.v1 import recommender_pb2_grpc as pb_grpc

DEFAULT_K = 10


class EmptyServicer(pb_grpc.RecommenderServiceServicer):  # type: ignore[misc]
    def __init__(self, item_ids: list[str]) -> None:
        self._item_ids = item_ids[:1000] or ["i0"]
        self._predict = pb.PredictResponse(rating=3.5, model_version=1)
        self._topk: dict[int, pb.TopKResponse] = {}
        self._batch: dict[int, pb.BatchPredictResponse] = {}

    async def Predict(  # noqa: N802 - gRPC's method name
        self, request: pb.PredictRequest, context: Any
    ) -> pb.PredictResponse:
        return self._predict

    async def BatchPredict(  # noqa: N802
        self, request: pb.BatchPredictRequest, context: Any
    ) -> pb.BatchPredictResponse:
        n = len(request.user_ids)
        response = self._batch.get(n)
        if response is None:  # one canned response per batch size, built once
            response = pb.BatchPredictResponse(ratings=[3.5] * n, model_version=1)
            self._batch[n] = response
        return response

    async def TopK(  # noqa: N802
        self, request: pb.TopKRequest, context: Any
    ) -> pb.TopKResponse:
        k = request.k or DEFAULT_K
        response = self._topk.get(k)
        if response is None:
            response = pb.TopKResponse(model_version=1)
            for rank in range(1, k + 1):
                item = self._item_ids[(rank - 1) % len(self._item_ids)]
                response.items.add(item_id=item, score=1.0 / rank, rank=rank)
            self._topk[k] = response
        return response


def main(argv: list[str] | None = None) -> None:
    args = server_args(argv, "benchmark floor: canned responses, no model work")
    _users, items = read_ids(resolve_version(args.model))
    asyncio.run(serve_until_signal(EmptyServicer(items), args.host, args.port))


if __name__ == "__main__":
    main()
