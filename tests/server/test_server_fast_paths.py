"""BatchPredict's compiled path through a real server: the same answers as the protobuf path,
a clear error for bytes that are not a request; and cheap calls under load wait for their batch."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from server_harness import make_model_dir, running_server_handle

from mfserve.server.batching import Batcher
from mfserve.training.scoring.jit import HAVE_NUMBA
from mfserve.v1 import recommender_pb2 as pb
from mfserve.v1 import recommender_pb2_grpc as pb_grpc

USERS = [f"u{n % 60}" for n in range(200)]
ITEMS = [f"i{(13 * n) % 400}" for n in range(200)]


def test_decoded_and_parsed_requests_get_the_same_ratings(model_dir: Path) -> None:
    with (
        running_server_handle(model_dir) as handle,
        grpc.insecure_channel(handle.address) as channel,
    ):
        stub = pb_grpc.RecommenderServiceStub(channel)
        assert (handle.server.holder.serving.batch_decoder is not None) == HAVE_NUMBA
        known = stub.BatchPredict(pb.BatchPredictRequest(user_ids=USERS, item_ids=ITEMS))
        # One unknown id (cold start allowed) sends the same pairs down the protobuf path.
        mixed = stub.BatchPredict(
            pb.BatchPredictRequest(
                user_ids=[*USERS, "stranger"], item_ids=[*ITEMS, "i1"], allow_cold_start=True
            )
        )
    assert list(mixed.missing_user_ids) == ["stranger"]
    assert list(known.ratings) == list(mixed.ratings)[:-1]
    assert known.model_version == mixed.model_version == 1
    assert not known.missing_user_ids and not known.missing_item_ids


@pytest.mark.parametrize("garbage", [b"\x0a\x09short", b"\xff\xff\xff"])
@pytest.mark.parametrize("rpc", ["BatchPredict", "Predict", "TopK", "SimilarItems", "GetModelInfo"])
def test_bytes_that_are_not_a_request_are_invalid_argument(
    model_dir: Path, rpc: str, garbage: bytes
) -> None:
    with (
        running_server_handle(model_dir) as handle,
        grpc.insecure_channel(handle.address) as channel,
    ):
        call = channel.unary_unary(f"/mfserve.v1.RecommenderService/{rpc}")  # bytes as they are
        with pytest.raises(grpc.RpcError) as caught:
            call(garbage, timeout=30)
        # The server is still there for the next call.
        stub = pb_grpc.RecommenderServiceStub(channel)
        assert stub.BatchPredict(pb.BatchPredictRequest(user_ids=["u1"], item_ids=["i1"])).ratings
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert f"not a valid mfserve.v1.{rpc}Request" in (error.details() or "")


def test_a_cheap_call_under_load_waits_for_its_batch() -> None:
    # Deterministic: five calls "in flight", so no call is ever alone, and even a cheap one goes
    # to the executor, where the others may join its batch.
    def compute(model: Any, payloads: list[int]) -> list[int]:
        return [p * 2 for p in payloads]

    async def first_call_done() -> bool:
        with ThreadPoolExecutor(1) as executor:
            batcher: Batcher[int, int] = Batcher(
                "predict",
                compute,
                executor=executor,
                in_flight=lambda: 5,
                cost=lambda model, payload: payload,
                inline_limit=100,
            )
            future = batcher.submit(object(), 21)
            done = future.done()
            assert await future == 42
            return done

    assert not asyncio.run(first_call_done())


def test_a_reload_swaps_the_decoder_with_the_model(tmp_path: Path) -> None:
    big = make_model_dir(tmp_path / "a", n_items=400)
    small = make_model_dir(tmp_path / "b", n_items=300)
    request = pb.BatchPredictRequest(user_ids=["u1", "u2"], item_ids=["i1", "i350"])
    with (
        running_server_handle(big) as handle,
        grpc.insecure_channel(handle.address) as channel,
    ):
        stub = pb_grpc.RecommenderServiceStub(channel)
        assert len(stub.BatchPredict(request).ratings) == 2
        handle.call(handle.server.load(small))
        # The new model's ids, through the new model's decoder: i350 is gone.
        with pytest.raises(grpc.RpcError) as caught:
            stub.BatchPredict(request)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert '"i350"' in (caught.value.details() or "")
        assert handle.server.holder.serving.recommender.n_items == 300
