"""Fold-in over the wire: TopK, Predict and BatchPredict with ``interactions``, against the
in-process model's answers, with every error the proto documents for them."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from server_harness import running_server
from test_server_errors import call_error, resources, violations

from mfserve.training.foldin import UserEvidence
from mfserve.training.recommender import Recommender
from mfserve.v1 import recommender_pb2 as pb
from mfserve.v1 import recommender_pb2_grpc as pb_grpc

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
MAX_INTERACTIONS = 20


@pytest.fixture(scope="module")
def address(model_dir: Path) -> Iterator[str]:
    with running_server(model_dir, max_interactions=MAX_INTERACTIONS) as address:
        yield address


@pytest.fixture(scope="module")
def stub(address: str) -> Iterator[pb_grpc.RecommenderServiceStub]:
    with grpc.insecure_channel(address) as channel:
        yield pb_grpc.RecommenderServiceStub(channel)


@pytest.fixture(scope="module")
def model(synthetic_model: Any) -> Recommender:
    return Recommender(synthetic_model)


def interactions(*pairs: tuple[str, float | None]) -> list[pb.Interaction]:
    return [
        pb.Interaction(item_id=item)
        if rating is None
        else pb.Interaction(item_id=item, rating=rating)
        for item, rating in pairs
    ]


def ids_of(response: pb.TopKResponse) -> list[str]:
    return [item.item_id for item in response.items]


SESSION = (("i3", 5.0), ("i7", 4.0), ("i11", None), ("i19", 2.0))


def expected_top_k(model: Recommender, user: int, pairs: tuple[Any, ...], k: int) -> Any:
    rows = model.item_rows([item for item, _ in pairs])
    ratings = [np.nan if rating is None else rating for _, rating in pairs]
    evidence = UserEvidence.of(user, rows, ratings)
    [(items, scores)] = model.top_k_folded([evidence], k)
    return [model.item_ids[row] for row in items], scores


def test_a_new_user_is_ranked_from_their_interactions(
    stub: pb_grpc.RecommenderServiceStub, model: Recommender
) -> None:
    request = pb.TopKRequest(user_id="newcomer", k=10, interactions=interactions(*SESSION))
    response = stub.TopK(request)
    want_ids, want_scores = expected_top_k(model, -1, SESSION, 10)
    assert ids_of(response) == want_ids
    np.testing.assert_allclose([i.score for i in response.items], want_scores, rtol=1e-5)
    assert not {"i3", "i7", "i11", "i19"} & set(ids_of(response))
    assert list(response.missing_user_ids) == ["newcomer"]
    assert list(response.missing_item_ids) == []


def test_an_anonymous_user_and_unknown_interaction_items(
    stub: pb_grpc.RecommenderServiceStub, model: Recommender
) -> None:
    pairs = (*SESSION, ("no-such-item", 5.0), ("no-such-item", 1.0))
    response = stub.TopK(pb.TopKRequest(k=10, interactions=interactions(*pairs)))
    assert ids_of(response) == expected_top_k(model, -1, SESSION, 10)[0]
    assert list(response.missing_user_ids) == []
    assert list(response.missing_item_ids) == ["no-such-item"]


def test_a_known_users_interactions_add_to_what_the_model_knows(
    stub: pb_grpc.RecommenderServiceStub, model: Recommender
) -> None:
    plain = stub.TopK(pb.TopKRequest(user_id="u1", k=10))
    pairs = tuple((item, 5.0) for item in ids_of(plain)[:3])
    folded = stub.TopK(pb.TopKRequest(user_id="u1", k=10, interactions=interactions(*pairs)))
    assert ids_of(folded) == expected_top_k(model, model.user_row("u1"), pairs, 10)[0]
    assert not set(ids_of(folded)) & {item for item, _ in pairs}  # interacted: excluded
    seen = {model.item_ids[row] for row in model.seen_items(model.user_row("u1")).tolist()}
    assert not set(ids_of(folded)) & seen
    assert list(folded.missing_user_ids) == []
    kept = stub.TopK(
        pb.TopKRequest(user_id="u1", k=10, exclude_seen=False, interactions=interactions(*pairs))
    )
    assert set(ids_of(kept)) & {item for item, _ in pairs}


def test_a_known_user_with_only_unknown_interactions_gets_the_normal_answer(
    stub: pb_grpc.RecommenderServiceStub,
) -> None:
    plain = stub.TopK(pb.TopKRequest(user_id="u2", k=10))
    request = pb.TopKRequest(user_id="u2", k=10, interactions=interactions(("nope", 4.0)))
    folded = stub.TopK(request)
    assert list(folded.items) == list(plain.items)
    assert list(folded.missing_item_ids) == ["nope"]


def test_allow_lists_apply_to_folded_in_users(stub: pb_grpc.RecommenderServiceStub) -> None:
    candidates = ["i3", "i4", "i5", "i6", "i7"]
    request = pb.TopKRequest(
        k=10, candidate_item_ids=candidates, interactions=interactions(*SESSION)
    )
    assert set(ids_of(stub.TopK(request))) == {"i4", "i5", "i6"}


def test_predict_and_batch_predict_fold_the_user_in(
    stub: pb_grpc.RecommenderServiceStub, model: Recommender
) -> None:
    items = ["i0", "i1", "i2", "i5"]
    rows = model.item_rows([item for item, _ in SESSION])
    evidence = UserEvidence.of(-1, rows, [np.nan if r is None else r for _, r in SESSION])
    want = model.fold_in.predict(evidence, model.item_rows(items))
    single = [
        stub.Predict(pb.PredictRequest(item_id=item, interactions=interactions(*SESSION))).rating
        for item in items
    ]
    batch = stub.BatchPredict(
        pb.BatchPredictRequest(
            user_ids=["visitor"] * len(items), item_ids=items, interactions=interactions(*SESSION)
        )
    )
    np.testing.assert_allclose(single, want, rtol=1e-6)
    np.testing.assert_allclose(list(batch.ratings), want, rtol=1e-6)
    assert list(batch.missing_user_ids) == ["visitor"]
    # A known user without rated interactions predicts as the model does.
    plain = stub.Predict(pb.PredictRequest(user_id="u4", item_id="i9")).rating
    unrated = stub.Predict(
        pb.PredictRequest(user_id="u4", item_id="i9", interactions=interactions(("i3", None)))
    ).rating
    assert unrated == pytest.approx(plain, rel=1e-6)


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.TopKRequest(k=5), "user_id"),
        (
            pb.TopKRequest(interactions=interactions(("i1", 4.0), ("", 3.0))),
            "interactions[1].item_id",
        ),
        (pb.TopKRequest(interactions=interactions(("i1", 5.5))), "interactions[0].rating"),
        (pb.TopKRequest(interactions=interactions(("i1", float("nan")))), "interactions[0].rating"),
        (
            pb.TopKRequest(interactions=[pb.Interaction(item_id="i1", weight=0.0)]),
            "interactions[0].weight",
        ),
        (
            pb.TopKRequest(interactions=[pb.Interaction(item_id="i1", weight=float("inf"))]),
            "interactions[0].weight",
        ),
        (
            pb.TopKRequest(interactions=interactions(*[(f"i{n}", None) for n in range(21)])),
            "interactions",
        ),
        (
            pb.PredictRequest(item_id="i1", interactions=interactions(("i1", 0.1))),
            "interactions[0].rating",
        ),
        (
            pb.BatchPredictRequest(
                user_ids=["a", "b"], item_ids=["i1", "i2"], interactions=interactions(("i3", 4.0))
            ),
            "user_ids",
        ),
    ],
)
def test_bad_interactions_are_invalid_argument_naming_the_field(
    stub: pb_grpc.RecommenderServiceStub, request_: Any, field: str
) -> None:
    method = {
        pb.TopKRequest: stub.TopK,
        pb.PredictRequest: stub.Predict,
        pb.BatchPredictRequest: stub.BatchPredict,
    }[type(request_)]
    error = call_error(method, request_)
    assert error.code() == INVALID, error.details()
    assert field in violations(error), (violations(error), error.details())
    assert field in error.details()


def test_nothing_known_about_a_user_is_not_found_unless_cold_start_is_allowed(
    stub: pb_grpc.RecommenderServiceStub,
) -> None:
    request = pb.TopKRequest(user_id="ghost", k=5, interactions=interactions(("nope", 4.0)))
    error = call_error(stub.TopK, request)
    assert error.code() == NOT_FOUND
    assert ("user", "ghost", "user_id") in resources(error)
    assert ("item", "nope", "interactions.item_id") in resources(error)
    request.allow_cold_start = True
    popular = stub.TopK(request)
    cold = stub.TopK(pb.TopKRequest(user_id="ghost", k=5, allow_cold_start=True))
    assert list(popular.items) == list(cold.items)
    assert list(popular.missing_item_ids) == ["nope"]


def test_concurrent_folded_in_and_plain_calls_batch_together_with_lone_answers(
    address: str, stub: pb_grpc.RecommenderServiceStub
) -> None:
    requests = [
        pb.TopKRequest(user_id=f"u{n}", k=8)
        if n % 2
        else pb.TopKRequest(k=8, interactions=interactions((f"i{n}", 5.0), (f"i{n + 40}", 3.0)))
        for n in range(32)
    ]
    alone = [stub.TopK(request) for request in requests]

    async def together() -> list[pb.TopKResponse]:
        async with grpc.aio.insecure_channel(address) as channel:
            aio_stub = pb_grpc.RecommenderServiceStub(channel)
            return list(await asyncio.gather(*(aio_stub.TopK(r) for r in requests)))

    assert [ids_of(r) for r in asyncio.run(together())] == [ids_of(r) for r in alone]
