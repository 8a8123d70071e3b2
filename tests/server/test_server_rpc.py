"""Every RPC over a real channel answers exactly what the in-process ``Recommender`` answers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch

from mfserve.training.recommender import RankRequest, Recommender
from mfserve.v1 import recommender_pb2 as pb
from mfserve.v1 import recommender_pb2_grpc as pb_grpc

TOL = 1e-5


@pytest.fixture(scope="module")
def stub(server_address: str) -> Iterator[pb_grpc.RecommenderServiceStub]:
    with grpc.insecure_channel(server_address) as channel:
        yield pb_grpc.RecommenderServiceStub(channel)


@pytest.fixture(scope="module")
def rec(synthetic_model: Any) -> Recommender:
    return Recommender(synthetic_model)


def rows(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def expected_top_k(
    rec: Recommender, user_row: int, k: int, **options: Any
) -> tuple[list[str], list[float]]:
    [(items, scores)] = rec.top_k(rows(user_row), k, [RankRequest(**options)])
    return [rec.item_ids[i] for i in items.tolist()], scores.tolist()


def ids_scores(items: Any) -> tuple[list[str], list[float]]:
    return [i.item_id for i in items], [i.score for i in items]


def assert_ranked(got: Any, want_ids: list[str], want_scores: list[float]) -> None:
    got_ids, got_scores = ids_scores(got)
    assert got_ids == want_ids
    assert got_scores == pytest.approx(want_scores, abs=TOL)
    assert [i.rank for i in got] == list(range(1, len(got) + 1))


# ------------------------------------------------------------------------------------ Predict
@pytest.mark.parametrize(("user", "item"), [(0, 0), (7, 123), (59, 399), (12, 12)])
def test_predict_matches_recommender(stub: Any, rec: Recommender, user: int, item: int) -> None:
    response = stub.Predict(pb.PredictRequest(user_id=f"u{user}", item_id=f"i{item}"))
    assert response.rating == pytest.approx(float(rec.predict(rows(user), rows(item))[0]), abs=TOL)
    assert response.model_version == rec.artifact.version == 1
    assert not response.missing_user_ids and not response.missing_item_ids


def test_batch_predict_with_and_without_unknown_ids_agree(stub: Any, rec: Recommender) -> None:
    # An all-known batch takes a shortcut past the cold-start masks: the known pairs of a batch
    # with an unknown id get the same ratings.
    users, items = ["u0", "u7", "u59"], ["i0", "i123", "i399"]
    known = stub.BatchPredict(pb.BatchPredictRequest(user_ids=users, item_ids=items))
    mixed = stub.BatchPredict(
        pb.BatchPredictRequest(
            user_ids=[*users, "nobody"], item_ids=[*items, "i5"], allow_cold_start=True
        )
    )
    assert list(mixed.ratings[:3]) == pytest.approx(list(known.ratings), abs=1e-6)
    assert mixed.ratings[3] == pytest.approx(rec.global_mean + float(rec.item_bias[5]), abs=TOL)
    want = rec.predict(rows(0, 7, 59), rows(0, 123, 399)).tolist()
    assert list(known.ratings) == pytest.approx(want, abs=TOL)


def test_predict_cold_start(stub: Any, rec: Recommender) -> None:
    unknown_user = stub.Predict(
        pb.PredictRequest(user_id="nobody", item_id="i5", allow_cold_start=True)
    )
    # Bias-only estimate: global mean + the known item's bias.
    expected = rec.global_mean + float(rec.item_bias[5])
    assert unknown_user.rating == pytest.approx(expected, abs=TOL)
    assert list(unknown_user.missing_user_ids) == ["nobody"]
    assert not unknown_user.missing_item_ids

    unknown_item = stub.Predict(
        pb.PredictRequest(user_id="u3", item_id="nothing", allow_cold_start=True)
    )
    assert unknown_item.rating == pytest.approx(rec.global_mean + float(rec.user_bias[3]), abs=TOL)
    assert list(unknown_item.missing_item_ids) == ["nothing"]

    both = stub.Predict(pb.PredictRequest(user_id="x", item_id="y", allow_cold_start=True))
    assert both.rating == pytest.approx(rec.global_mean, abs=TOL)
    assert (list(both.missing_user_ids), list(both.missing_item_ids)) == (["x"], ["y"])

    known = stub.Predict(pb.PredictRequest(user_id="u3", item_id="i5", allow_cold_start=True))
    assert not known.missing_user_ids and not known.missing_item_ids


# ------------------------------------------------------------------------------- BatchPredict
def test_batch_predict_matches_recommender(stub: Any, rec: Recommender) -> None:
    generator = torch.Generator().manual_seed(7)
    users = torch.randint(0, rec.n_users, (2_000,), generator=generator)
    items = torch.randint(0, rec.n_items, (2_000,), generator=generator)
    response = stub.BatchPredict(
        pb.BatchPredictRequest(
            user_ids=[f"u{u}" for u in users.tolist()], item_ids=[f"i{i}" for i in items.tolist()]
        )
    )
    assert len(response.ratings) == 2_000
    assert list(response.ratings) == pytest.approx(rec.predict(users, items).tolist(), abs=TOL)
    assert response.model_version == 1
    low, high = rec.artifact.rating_range
    assert all(low <= r <= high for r in response.ratings)


def test_batch_predict_cold_start_lists_distinct_missing_in_order(
    stub: Any, rec: Recommender
) -> None:
    user_ids = ["u1", "ghost-b", "u2", "ghost-a", "ghost-b", "u1"]
    item_ids = ["i1", "i2", "nope-2", "i3", "nope-1", "nope-2"]
    response = stub.BatchPredict(
        pb.BatchPredictRequest(user_ids=user_ids, item_ids=item_ids, allow_cold_start=True)
    )
    assert list(response.missing_user_ids) == ["ghost-b", "ghost-a"]
    assert list(response.missing_item_ids) == ["nope-2", "nope-1"]
    want = rec.predict(
        torch.from_numpy(rec.user_rows(user_ids)), torch.from_numpy(rec.item_rows(item_ids))
    )
    assert list(response.ratings) == pytest.approx(want.tolist(), abs=TOL)
    # Pair 5 has an unknown user and item: the global mean.
    assert response.ratings[4] == pytest.approx(rec.global_mean, abs=TOL)


def test_batch_predict_at_the_maximum(stub: Any) -> None:
    n = 100_000  # the default max_batch_pairs: accepted, and fits the default message limits
    response = stub.BatchPredict(
        pb.BatchPredictRequest(
            user_ids=[f"u{i % 60}" for i in range(n)], item_ids=[f"i{i % 400}" for i in range(n)]
        )
    )
    assert len(response.ratings) == n


# ---------------------------------------------------------------------------------------- TopK
@pytest.mark.parametrize("user", [0, 1, 17, 59])
def test_top_k_matches_recommender(stub: Any, rec: Recommender, user: int) -> None:
    response = stub.TopK(pb.TopKRequest(user_id=f"u{user}", k=25))
    assert_ranked(response.items, *expected_top_k(rec, user, 25))
    assert response.model_version == 1
    assert not response.missing_ids


def test_top_k_default_k_is_10(stub: Any, rec: Recommender) -> None:
    response = stub.TopK(pb.TopKRequest(user_id="u4"))
    assert_ranked(response.items, *expected_top_k(rec, 4, 10))


def test_top_k_more_than_eligible_returns_fewer(stub: Any, rec: Recommender) -> None:
    seen = rec.seen_items(4).numel()
    response = stub.TopK(pb.TopKRequest(user_id="u4", k=1000))
    assert len(response.items) == rec.n_items - seen
    kept = stub.TopK(pb.TopKRequest(user_id="u4", k=1000, exclude_seen=False))
    assert len(kept.items) == rec.n_items


def test_top_k_excludes_seen_by_default_and_keeps_them_on_request(
    stub: Any, rec: Recommender
) -> None:
    user = 9
    seen = {rec.item_ids[i] for i in rec.seen_items(user).tolist()}
    assert seen
    default = stub.TopK(pb.TopKRequest(user_id=f"u{user}", k=50))
    assert not seen & {i.item_id for i in default.items}
    explicit_true = stub.TopK(pb.TopKRequest(user_id=f"u{user}", k=50, exclude_seen=True))
    assert ids_scores(explicit_true.items) == ids_scores(default.items)

    kept = stub.TopK(pb.TopKRequest(user_id=f"u{user}", k=50, exclude_seen=False))
    assert_ranked(kept.items, *expected_top_k(rec, user, 50, exclude_seen=False))
    # The seen items sit in the user's own cluster, so some rank in the top 50 once allowed.
    assert seen & {i.item_id for i in kept.items}


def test_top_k_deny_list(stub: Any, rec: Recommender) -> None:
    first = stub.TopK(pb.TopKRequest(user_id="u2", k=10))
    banned = [i.item_id for i in first.items[:3]] + ["not-an-item"]  # unknown ids are ignored
    response = stub.TopK(pb.TopKRequest(user_id="u2", k=10, exclude_item_ids=banned))
    assert not set(banned) & {i.item_id for i in response.items}
    exclude = torch.from_numpy(rec.item_rows(banned[:3]))
    assert_ranked(response.items, *expected_top_k(rec, 2, 10, exclude=exclude))
    assert not response.missing_ids


def test_top_k_allow_list(stub: Any, rec: Recommender) -> None:
    candidates = [f"i{i}" for i in range(0, 400, 7)]
    exclude = [candidates[0], candidates[1]]
    response = stub.TopK(
        pb.TopKRequest(user_id="u5", k=10, candidate_item_ids=candidates, exclude_item_ids=exclude)
    )
    got = [i.item_id for i in response.items]
    assert set(got) <= set(candidates) - set(exclude)
    assert_ranked(
        response.items,
        *expected_top_k(
            rec,
            5,
            10,
            candidates=torch.from_numpy(rec.item_rows(candidates)),
            exclude=torch.from_numpy(rec.item_rows(exclude)),
        ),
    )


def test_top_k_allow_list_cold_start_skips_unknown_candidates(stub: Any, rec: Recommender) -> None:
    candidates = ["i1", "ghost-1", "i2", "i3", "ghost-2"]
    response = stub.TopK(
        pb.TopKRequest(
            user_id="u6",
            k=10,
            candidate_item_ids=candidates,
            allow_cold_start=True,
            exclude_seen=False,
        )
    )
    assert sorted(i.item_id for i in response.items) == ["i1", "i2", "i3"]
    assert list(response.missing_ids) == ["ghost-1", "ghost-2"]
    none_known = stub.TopK(
        pb.TopKRequest(user_id="u6", candidate_item_ids=["ghost"], allow_cold_start=True)
    )
    assert not none_known.items
    assert list(none_known.missing_ids) == ["ghost"]


def test_top_k_cold_start_user_gets_popularity(stub: Any, rec: Recommender) -> None:
    response = stub.TopK(pb.TopKRequest(user_id="newcomer", k=15, allow_cold_start=True))
    assert list(response.missing_ids) == ["newcomer"]
    assert_ranked(response.items, *expected_top_k(rec, -1, 15))
    popularity = rec.artifact.item_popularity.float()
    share = popularity / popularity.sum()
    assert response.items[0].score == pytest.approx(float(share.max()), abs=TOL)

    with_candidates = stub.TopK(
        pb.TopKRequest(
            user_id="newcomer",
            k=3,
            allow_cold_start=True,
            candidate_item_ids=["i0", "i1", "i2", "i3", "who"],
        )
    )
    assert list(with_candidates.missing_ids) == ["newcomer", "who"]
    assert len(with_candidates.items) == 3


def test_top_k_metadata(stub: Any) -> None:
    plain = stub.TopK(pb.TopKRequest(user_id="u1", k=3))
    assert all(not i.title and not i.genres for i in plain.items)
    rich = stub.TopK(pb.TopKRequest(user_id="u1", k=3, include_metadata=True))
    for item in rich.items:
        row = int(item.item_id[1:])
        assert item.title == f"Item {row}"
        assert list(item.genres) == [f"cluster-{row % 4}"]


# ---------------------------------------------------------------------------------- SimilarItems
@pytest.mark.parametrize("item", [0, 33, 399])
def test_similar_items_matches_recommender(stub: Any, rec: Recommender, item: int) -> None:
    response = stub.SimilarItems(pb.SimilarItemsRequest(item_id=f"i{item}", k=20))
    [(want_rows, want_scores)] = rec.similar_items(rows(item), 20)
    assert_ranked(
        response.items, [rec.item_ids[r] for r in want_rows.tolist()], want_scores.tolist()
    )
    assert f"i{item}" not in {i.item_id for i in response.items}
    assert all(-1.0 - TOL <= i.score <= 1.0 + TOL for i in response.items)
    assert response.model_version == 1


def test_similar_items_lists_and_metadata(stub: Any, rec: Recommender) -> None:
    candidates = ["i0", "i4", "i8", "i12", "i1", "i2"]
    response = stub.SimilarItems(
        pb.SimilarItemsRequest(
            item_id="i0",
            candidate_item_ids=candidates,
            exclude_item_ids=["i4", "unknown-is-ignored"],
            include_metadata=True,
        )
    )
    got = [i.item_id for i in response.items]
    assert set(got) == {"i8", "i12", "i1", "i2"}  # not the query item, not the excluded one
    request = RankRequest(
        exclude_seen=False,
        candidates=torch.from_numpy(rec.item_rows(candidates)),
        exclude=torch.from_numpy(rec.item_rows(["i4"])),
    )
    [(want_rows, want_scores)] = rec.similar_items(rows(0), 10, [request])
    assert_ranked(
        response.items, [rec.item_ids[r] for r in want_rows.tolist()], want_scores.tolist()
    )
    assert all(i.title == f"Item {i.item_id[1:]}" for i in response.items)
    # Same cluster (i0, i4, i8, i12) beats the others under the planted structure.
    assert set(got[:2]) == {"i8", "i12"}


def test_similar_items_default_k(stub: Any) -> None:
    assert len(stub.SimilarItems(pb.SimilarItemsRequest(item_id="i3")).items) == 10


# ---------------------------------------------------------------------------------- GetModelInfo
def test_get_model_info(stub: Any, rec: Recommender) -> None:
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    artifact = rec.artifact
    assert info.model_name == "synthetic"
    assert info.model_version == 1
    assert (info.factors, info.rank_factors) == (8, 8)
    assert (info.user_count, info.item_count) == (60, 400)
    assert info.rating_count == artifact.rating_count > 0
    assert (info.rating_min, info.rating_max) == (0.5, 5.0)
    assert info.format_version == 1
    assert info.dataset_fingerprint == artifact.dataset["fingerprint"]
    assert info.HasField("create_time") and info.create_time.seconds > 0
    assert dict(info.hyperparameters) == {"synthetic": "true", "clusters": "4", "seed": "0"}
    assert dict(info.metrics) == {}
