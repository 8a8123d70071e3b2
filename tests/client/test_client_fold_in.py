"""The SDK's fold-in, pages, diversity and batch_top_k against a real server: the same answers as
the raw RPCs, every accepted form of an interaction, and errors mapped to the SDK's exceptions."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest

from mfserve.client import (
    AsyncRecommenderClient,
    Interaction,
    InvalidArgumentError,
    NotFoundError,
    RecommenderClient,
)
from mfserve.v1 import recommender_pb2 as pb
from mfserve.v1 import recommender_pb2_grpc as pb_grpc

SESSION = [("i3", 5.0), ("i7", 4.0), ("i11",)]
USERS = [f"u{n}" for n in range(60)]


@pytest.fixture(scope="module")
def client(server_address: str) -> Iterator[RecommenderClient]:
    with RecommenderClient(server_address) as client:
        yield client


@pytest.fixture(scope="module")
def stub(server_address: str) -> Iterator[pb_grpc.RecommenderServiceStub]:
    with grpc.insecure_channel(server_address) as channel:
        yield pb_grpc.RecommenderServiceStub(channel)


def raw_session() -> list[pb.Interaction]:
    return [
        pb.Interaction(item_id="i3", rating=5.0),
        pb.Interaction(item_id="i7", rating=4.0),
        pb.Interaction(item_id="i11"),
    ]


def test_top_k_folds_in_a_visitor_as_the_rpc_does(
    client: RecommenderClient, stub: pb_grpc.RecommenderServiceStub
) -> None:
    result = client.top_k(interactions=SESSION, k=8)
    raw = stub.TopK(pb.TopKRequest(k=8, interactions=raw_session()))
    assert result.item_ids == [item.item_id for item in raw.items]
    # Every accepted form of the same interactions sends the same request.
    forms = [
        [Interaction("i3", 5.0), Interaction("i7", 4.0), Interaction("i11")],
        [("i3", 5.0), ("i7", 4.0, None), "i11"],
    ]
    for interactions in forms:
        assert client.top_k(interactions=interactions, k=8).item_ids == result.item_ids


def test_unknown_interaction_items_are_listed_and_new_users_named(
    client: RecommenderClient,
) -> None:
    result = client.top_k("someone-new", interactions=[*SESSION, ("no-such", 3.0)], k=5)
    assert result.missing_user_ids == ("someone-new",)
    assert result.missing_item_ids == ("no-such",)
    with pytest.raises(NotFoundError) as caught:
        client.top_k("someone-new", interactions=[("no-such", 3.0)])
    assert caught.value.unknown == {
        "user_id": ("someone-new",),
        "interactions.item_id": ("no-such",),
    }


def test_predict_and_batch_predict_with_interactions(
    client: RecommenderClient, stub: pb_grpc.RecommenderServiceStub
) -> None:
    single = client.predict(None, "i20", interactions=SESSION)
    raw = stub.Predict(pb.PredictRequest(item_id="i20", interactions=raw_session()))
    assert single.rating == pytest.approx(raw.rating)
    batch = client.batch_predict(["v"] * 3, ["i20", "i21", "i22"], interactions=SESSION)
    assert batch.ratings[0] == pytest.approx(raw.rating)
    assert batch.missing_user_ids == ("v",)


def test_bad_interactions_raise_before_or_from_the_server(client: RecommenderClient) -> None:
    with pytest.raises(TypeError, match=r"interactions\[1\]"):
        client.top_k(interactions=[("i1", 4.0), ["i2"]])
    with pytest.raises(TypeError, match=r"interactions\[0\] has 4 parts"):
        client.top_k(interactions=[("i1", 4.0, 1.0, "extra")])
    with pytest.raises(InvalidArgumentError) as caught:
        client.top_k(interactions=[("i1", 9.0)])
    assert [v.field for v in caught.value.field_violations] == ["interactions[0].rating"]


def test_pages_follow_next_page_token(client: RecommenderClient) -> None:
    whole = client.top_k("u5", k=40)
    got: list[str] = []
    token = ""
    while True:
        page = client.top_k("u5", k=40, page_size=15, page_token=token)
        got += page.item_ids
        token = page.next_page_token
        if not token:
            break
    assert got == whole.item_ids


def test_diversity_is_sent(client: RecommenderClient) -> None:
    assert client.top_k("u5", k=20, diversity=0.9).item_ids != client.top_k("u5", k=20).item_ids


def test_batch_top_k_equals_one_top_k_per_user(client: RecommenderClient) -> None:
    streamed = list(client.batch_top_k(USERS, k=6, batch_size=25))  # three streams
    assert [r.item_ids for r in streamed] == [client.top_k(u, k=6).item_ids for u in USERS]
    histories = [SESSION, None, [("i40", 2.0)]]
    mixed = list(client.batch_top_k(["u1", "u2", ""], interactions=histories, k=6))
    assert mixed[0].item_ids == client.top_k("u1", interactions=SESSION, k=6).item_ids
    assert mixed[1].item_ids == client.top_k("u2", k=6).item_ids
    assert mixed[2].item_ids == client.top_k(interactions=[("i40", 2.0)], k=6).item_ids
    anonymous = list(client.batch_top_k(interactions=[SESSION], k=6))
    assert anonymous[0].item_ids == client.top_k(interactions=SESSION, k=6).item_ids
    with pytest.raises(ValueError, match="parallel"):
        list(client.batch_top_k(["u1"], interactions=[SESSION, SESSION]))
    with pytest.raises(NotFoundError):
        list(client.batch_top_k(["u1", "ghost"]))


def test_a_reader_may_stop_early(client: RecommenderClient) -> None:
    results = client.batch_top_k(USERS * 100, k=3)
    first = next(results)
    results.close()  # cancels the stream; the client keeps working
    assert first.item_ids == client.top_k("u0", k=3).item_ids


def test_async_batch_top_k_and_fold_in(server_address: str, client: RecommenderClient) -> None:
    async def run() -> tuple[list[list[str]], list[str]]:
        async with AsyncRecommenderClient(server_address) as aclient:
            streamed = [r.item_ids async for r in aclient.batch_top_k(USERS[:10], k=4)]
            folded = (await aclient.top_k(interactions=SESSION, k=4)).item_ids
            return streamed, folded

    streamed, folded = asyncio.run(run())
    assert streamed == [client.top_k(u, k=4).item_ids for u in USERS[:10]]
    assert folded == client.top_k(interactions=SESSION, k=4).item_ids


def test_interactions_as_messages_and_non_string_ids(client: RecommenderClient) -> None:
    from mfserve.client._requests import interactions_list

    message = pb.Interaction(item_id="i3")  # no rating, no weight: they stay unset
    sent = interactions_list([message, 7, ("i9", 4)])
    assert sent[0] is message and not sent[0].HasField("weight")
    assert [m.item_id for m in sent] == ["i3", "7", "i9"]
    assert sent[2].rating == 4.0 and not sent[2].HasField("weight")
    assert client.top_k(interactions=[message], k=3).item_ids
