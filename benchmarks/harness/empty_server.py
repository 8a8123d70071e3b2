"""The floor: a grpc.aio server on the same stack that does no model work at all.

Every RPC returns a canned response of the shape mfserve would send (``k`` ScoredItems with real
item ids for TopK, one float per pair for BatchPredict), so the gap between this server and mfserve
is exactly what the model path costs: id lookup, scoring, and building the response.

``--hop`` (the harness's ``empty-hop`` server) still does no work, but hands every call to a
one-thread executor and back before answering: what a thread hop alone costs on this host, the
price a server pays for keeping tensor work off the event loop (mfserve pays it once per batch).
"""

from __future__ import annotations

import argparse
import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchmarks.harness.common import read_ids, serve_until_signal, server_args
from mfserve.training.artifact import resolve_version
from mfserve.v1 import recommender_pb2 as pb
from mfserve.v1 import recommender_pb2_grpc as pb_grpc

DEFAULT_K = 10


class EmptyServicer(pb_grpc.RecommenderServiceServicer):  # type: ignore[misc]
    def __init__(self, item_ids: list[str], *, hop: bool = False) -> None:
        self._hop = ThreadPoolExecutor(1, thread_name_prefix="empty-hop") if hop else None
        self._item_ids = item_ids[:1000] or ["i0"]
        self._predict = pb.PredictResponse(rating=3.5, model_version=1)
        self._topk: dict[int, pb.TopKResponse] = {}
        self._batch: dict[int, pb.BatchPredictResponse] = {}

    async def _maybe_hop(self) -> None:
        if self._hop is not None:
            await asyncio.get_running_loop().run_in_executor(self._hop, int)

    async def Predict(  # noqa: N802 - gRPC's method name
        self, request: pb.PredictRequest, context: Any
    ) -> pb.PredictResponse:
        await self._maybe_hop()
        return self._predict

    async def BatchPredict(  # noqa: N802
        self, request: pb.BatchPredictRequest, context: Any
    ) -> pb.BatchPredictResponse:
        await self._maybe_hop()
        n = len(request.user_ids)
        response = self._batch.get(n)
        if response is None:  # one canned response per batch size, built once
            response = pb.BatchPredictResponse(ratings=[3.5] * n, model_version=1)
            self._batch[n] = response
        return response

    async def TopK(  # noqa: N802
        self, request: pb.TopKRequest, context: Any
    ) -> pb.TopKResponse:
        await self._maybe_hop()
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
    def hop_flag(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--hop", action="store_true", help="hand each call to a thread and back (no work)"
        )

    args = server_args(argv, "benchmark floor: canned responses, no model work", hop_flag)
    _users, items = read_ids(resolve_version(args.model))
    servicer = EmptyServicer(items, hop=args.hop)
    asyncio.run(serve_until_signal(servicer, args.host, args.port))


if __name__ == "__main__":
    main()
