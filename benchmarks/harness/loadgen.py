"""A load-generating client process: closed loops on one grpc.aio channel, driven over stdin.

The harness starts a few of these per server as separate processes, so the client's own Python work
(serialising requests, decoding responses) is not done in the harness or the server. Each process
keeps its channel for the whole server run and executes one *cell* per JSON command line on stdin::

    {"rpc": "topk", "concurrency": 8, "start_at": 1712.5, "warmup": 1.0, "duration": 5.0}

and answers one JSON line: ``{"latencies": [...], "errors": {...}, "late_s": 0.0}``.

In a cell, ``concurrency`` loops each send a call, wait for its answer and send the next (closed
loop). All processes start at the same wall-clock instant ``start_at``, run ``warmup`` seconds
unrecorded, then record every call that *starts* inside the ``duration`` window. Requests are
prebuilt from the model's id lists and cycled, so a call costs serialising an existing message.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from benchmarks.harness.common import read_ids
from mfserve.v1 import recommender_pb2 as pb
from mfserve.v1 import recommender_pb2_grpc as pb_grpc

RPCS = ("predict", "batch", "topk", "foldin")
POOL = 64  # distinct prebuilt requests per rpc
# A fold-in TopK is a user the model has never seen, sent with this many rated items: about what
# a new MovieLens user rates before the site recommends (its minimum is 20).
FOLD_IN_INTERACTIONS = 20


def build_requests(
    rpc: str, users: list[str], items: list[str], *, batch: int, k: int, seed: int
) -> list[Any]:
    rng = random.Random(seed)
    if rpc == "predict":
        return [
            pb.PredictRequest(user_id=rng.choice(users), item_id=rng.choice(items))
            for _ in range(POOL)
        ]
    if rpc == "batch":
        return [
            pb.BatchPredictRequest(
                user_ids=[rng.choice(users) for _ in range(batch)],
                item_ids=[rng.choice(items) for _ in range(batch)],
            )
            for _ in range(POOL // 4)
        ]
    if rpc == "topk":
        return [pb.TopKRequest(user_id=rng.choice(users), k=k) for _ in range(POOL)]
    if rpc == "foldin":
        return [
            pb.TopKRequest(
                k=k,
                interactions=[
                    pb.Interaction(item_id=item, rating=rng.choice((2.5, 3.0, 4.0, 4.5, 5.0)))
                    for item in rng.sample(items, FOLD_IN_INTERACTIONS)
                ],
            )
            for _ in range(POOL)
        ]
    raise ValueError(f"unknown rpc {rpc!r}")


async def run_cell(
    method: Any, requests: list[Any], cell: dict[str, Any], seed: int
) -> dict[str, Any]:
    await method(requests[0], timeout=30)  # a live connection before the shared start instant
    start_at = float(cell["start_at"])
    late = max(0.0, time.time() - start_at)  # > 0: the harness's start margin was too short
    begin = start_at + float(cell["warmup"])
    end = begin + float(cell["duration"])
    latencies: list[float] = []
    errors: dict[str, int] = {}

    async def loop(offset: int) -> None:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        i = offset
        while True:
            started = time.time()
            if started >= end:
                return
            try:
                await method(requests[i % len(requests)], timeout=30)
            except grpc.aio.AioRpcError as exc:
                if started >= begin:
                    errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
            else:
                if started >= begin:
                    latencies.append(time.time() - started)
            i += 1

    await asyncio.gather(*(loop(j * 7 + seed) for j in range(int(cell["concurrency"]))))
    return {"latencies": latencies, "errors": errors, "late_s": late}


async def serve(args: argparse.Namespace) -> None:
    users, items = read_ids(Path(args.model))
    cache: dict[str, list[Any]] = {}
    loop = asyncio.get_running_loop()
    options = [("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(args.target, options=options) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)
        methods = {
            "predict": stub.Predict,
            "batch": stub.BatchPredict,
            "topk": stub.TopK,
            "foldin": stub.TopK,
        }
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line.strip():
                return  # EOF: the harness is done with this server
            cell = json.loads(line)
            rpc = str(cell["rpc"])
            if rpc not in cache:
                cache[rpc] = build_requests(
                    rpc, users, items, batch=args.batch, k=args.k, seed=args.seed
                )
            result = await run_cell(methods[rpc], cache[rpc], cell, args.seed)
            sys.stdout.write(json.dumps(result) + "\n")
            sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="closed-loop gRPC load from one process")
    parser.add_argument("--target", required=True, help="host:port")
    parser.add_argument("--model", required=True, help="version folder (for its id lists)")
    parser.add_argument("--batch", type=int, default=1000, help="pairs per BatchPredict")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    asyncio.run(serve(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
