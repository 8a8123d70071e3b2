"""``AsyncRecommenderClient`` against a real server: every method, and its errors.

Each test runs its own event loop (``asyncio.run``): a ``grpc.aio`` channel belongs to one loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from server_harness import running_server, running_server_handle

from mfserve.client import (
    AsyncRecommenderClient,
    DeadlineExceededError,
    HealthStatus,
    InvalidArgumentError,
    NotFoundError,
    RecommenderClient,
    UnavailableError,
)
from mfserve.v1 import recommender_pb2 as pb

T = TypeVar("T")


def run(address: str, body: Callable[[AsyncRecommenderClient], Awaitable[T]], **kwargs: Any) -> T:
    async def main() -> T:
        async with AsyncRecommenderClient(address, **kwargs) as client:
            return await body(client)

    return asyncio.run(main())


def test_every_method_answers_like_the_sync_client(server_address: str) -> None:
    users, items = [f"u{n}" for n in range(30)], [f"i{n * 3}" for n in range(30)]

    async def body(client: AsyncRecommenderClient) -> dict[str, Any]:
        return {
            "predict": await client.predict("u3", "i7"),
            "cold": await client.predict("nobody", "i7", allow_cold_start=True),
            "batch": await client.batch_predict(users, items, batch_size=7),
            "top_k": await client.top_k("u1", k=5, include_metadata=True),
            "cold_top_k": await client.top_k(
                "nobody", k=3, allow_cold_start=True, candidate_item_ids=["i1", "zz"]
            ),
            "similar": await client.similar_items("i8", k=4, exclude_item_ids=["i4"]),
            "info": await client.model_info(),
            "health": await client.health(),
            "stub": await client.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10),
        }

    got = run(server_address, body)
    with RecommenderClient(server_address) as sync:
        assert got["predict"] == sync.predict("u3", "i7")
        assert got["cold"].missing_user_ids == ("nobody",)
        assert got["batch"].ratings == sync.batch_predict(users, items).ratings
        assert got["batch"].model_versions == (1,) * 5
        assert got["top_k"] == sync.top_k("u1", k=5, include_metadata=True)
        cold = sync.top_k("nobody", k=3, allow_cold_start=True, candidate_item_ids=["i1", "zz"])
        assert got["cold_top_k"] == cold
        assert (cold.missing_user_ids, cold.missing_item_ids) == (("nobody",), ("zz",))
        assert got["similar"] == sync.similar_items("i8", k=4, exclude_item_ids=["i4"])
        assert got["info"] == sync.model_info()
    assert got["health"] is HealthStatus.SERVING
    assert got["stub"].item_count == 400


def test_errors_are_typed_and_chained(server_address: str) -> None:
    async def body(client: AsyncRecommenderClient) -> list[BaseException]:
        caught: list[BaseException] = []
        for call in (
            client.predict("nobody", "i1"),
            client.top_k("u1", candidate_item_ids=["i1", "phantom"]),
            client.top_k("u1", k=-1),
            client.batch_predict(
                [f"u{n % 60}" for n in range(50_000)], ["i1"] * 50_000, timeout=0.001
            ),
        ):
            try:
                await call
            except Exception as exc:
                caught.append(exc)
        return caught

    not_found, unknown_candidate, invalid, deadline = run(server_address, body)
    assert isinstance(not_found, NotFoundError) and not_found.ids == ("nobody",)
    assert isinstance(unknown_candidate, NotFoundError)
    assert unknown_candidate.unknown == {"candidate_item_ids": ("phantom",)}
    assert isinstance(invalid, InvalidArgumentError)
    assert [v.field for v in invalid.field_violations] == ["k"]
    assert isinstance(deadline, DeadlineExceededError)
    for error in (not_found, unknown_candidate, invalid, deadline):
        assert isinstance(error.__cause__, grpc.aio.AioRpcError)


def test_unavailable_when_no_server_listens(model_dir: Path) -> None:
    with running_server(model_dir) as address:
        pass  # the port is free again

    async def body(client: AsyncRecommenderClient) -> None:
        await client.predict("u1", "i1")

    with pytest.raises(UnavailableError):
        run(address, body, retries=2)


def test_wait_until_ready(model_dir: Path) -> None:
    with running_server_handle(None) as handle:

        async def body(client: AsyncRecommenderClient) -> HealthStatus:
            assert await client.health() is HealthStatus.NOT_SERVING
            with pytest.raises(DeadlineExceededError):
                await client.wait_until_ready(0.2)
            loader = threading.Timer(0.3, lambda: handle.call(handle.server.load(model_dir)))
            loader.start()
            try:
                await client.wait_until_ready(30)
            finally:
                await asyncio.to_thread(loader.join)
            return await client.health()

        assert run(handle.address, body) is HealthStatus.SERVING


def test_a_caller_channel_is_left_open(server_address: str) -> None:
    async def main() -> int:
        channel = grpc.aio.insecure_channel(server_address)
        async with AsyncRecommenderClient(server_address, channel=channel) as client:
            assert client.channel is channel
        # The client did not close it: the channel still serves calls.
        response = await channel.unary_unary(
            "/mfserve.v1.RecommenderService/GetModelInfo",
            request_serializer=pb.GetModelInfoRequest.SerializeToString,
            response_deserializer=pb.GetModelInfoResponse.FromString,
        )(pb.GetModelInfoRequest(), timeout=10)
        await channel.close()
        return int(response.item_count)

    assert asyncio.run(main()) == 400
