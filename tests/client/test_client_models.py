"""Unit tests of request building (ids, batch splitting) and result conversion, without a server."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mfserve.client import (
    BatchPrediction,
    HealthStatus,
    Prediction,
    Recommendation,
    TopKResult,
    _models,
    _render,
    _requests,
)
from mfserve.v1 import recommender_pb2 as pb


def split(users: list[str], items: list[str], pairs: int, size: int = 10**9) -> Any:
    return _requests.batch_requests(
        users, items, allow_cold_start=True, max_pairs=pairs, max_bytes=size
    )


def test_ids_accept_lists_iterables_and_array_likes() -> None:
    assert _requests.ids_list([1, "b"], "x") == ["1", "b"]
    assert _requests.ids_list((str(i) for i in range(3)), "x") == ["0", "1", "2"]

    class ArrayLike:  # numpy arrays and pandas Series convert through .tolist()
        def tolist(self) -> list[int]:
            return [7, 8]

    assert _requests.ids_list(ArrayLike(), "x") == ["7", "8"]
    with pytest.raises(TypeError, match="single str"):
        _requests.ids_list("u1", "user_ids")


def test_numpy_arrays_become_plain_string_ids() -> None:
    np = pytest.importorskip("numpy")
    assert _requests.ids_list(np.array([1, 22], dtype=np.int64), "x") == ["1", "22"]
    assert _requests.ids_list(np.array(["u1", "u2"]), "x") == ["u1", "u2"]


def test_batch_is_split_by_pairs_in_order() -> None:
    users = [f"u{i}" for i in range(7)]
    items = [f"i{i}" for i in range(7)]
    requests = split(users, items, pairs=3)
    assert [list(r.user_ids) for r in requests] == [users[0:3], users[3:6], users[6:7]]
    assert [list(r.item_ids) for r in requests] == [items[0:3], items[3:6], items[6:7]]
    assert all(r.allow_cold_start for r in requests)


def test_batch_is_split_by_bytes_and_an_oversized_pair_still_goes_alone() -> None:
    users = ["u" * 50, "u", "u" * 500]
    requests = split(users, ["i"] * 3, pairs=100, size=60)
    assert [len(r.user_ids) for r in requests] == [1, 1, 1]


def test_an_empty_batch_is_one_empty_request_and_lengths_must_match() -> None:
    [request] = split([], [], pairs=10)
    assert len(request.user_ids) == 0
    with pytest.raises(ValueError, match="parallel"):
        split(["u1"], [], pairs=10)


@given(
    n=st.integers(min_value=0, max_value=300),
    pairs=st.integers(min_value=1, max_value=50),
    size=st.integers(min_value=1, max_value=400),
)
def test_splitting_preserves_every_pair_in_order(n: int, pairs: int, size: int) -> None:
    users = [f"u{i}" for i in range(n)]
    items = [f"i{i * 7}" for i in range(n)]
    requests = split(users, items, pairs=pairs, size=size)
    assert [u for r in requests for u in r.user_ids] == users
    assert [i for r in requests for i in r.item_ids] == items
    assert all(0 < len(r.user_ids) <= pairs for r in requests) or n == 0


def test_batch_prediction_joins_responses_in_order() -> None:
    first = pb.BatchPredictResponse(ratings=[1.0, 2.0], model_version=3, missing_user_ids=["a"])
    second = pb.BatchPredictResponse(
        ratings=[3.0], model_version=4, missing_user_ids=["a", "b"], missing_item_ids=["x"]
    )
    result = _models.batch_prediction([first, second])
    assert result == BatchPrediction(
        ratings=(1.0, 2.0, 3.0),
        model_version=3,
        missing_user_ids=("a", "b"),
        missing_item_ids=("x",),
        model_versions=(3, 4),
    )
    assert list(result) == [1.0, 2.0, 3.0] and result[-1] == 3.0 and len(result) == 3
    assert result.cold_start


def test_results_are_frozen_typed_dataclasses() -> None:
    response = pb.TopKResponse(
        model_version=2, missing_ids=["u9", "i7"], missing_user_ids=["u9"], missing_item_ids=["i7"]
    )
    response.items.add(item_id="i1", score=0.5, rank=1, title="One", genres=["a", "b"])
    result = _models.top_k_result(response)
    assert result == TopKResult(
        items=(Recommendation("i1", 0.5, 1, "One", ("a", "b")),),
        model_version=2,
        missing_ids=("u9", "i7"),
        missing_user_ids=("u9",),
        missing_item_ids=("i7",),
    )
    assert result.cold_start
    assert result.item_ids == ["i1"] and result[0].title == "One"
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.model_version = 3
    prediction = _models.prediction("u", "i", pb.PredictResponse(rating=3.5, model_version=1))
    assert prediction == Prediction("u", "i", 3.5, 1) and not prediction.cold_start


def test_top_k_from_a_server_before_the_split() -> None:
    # Such a server fills only the deprecated mixed list: it stays readable, and says cold start.
    result = _models.top_k_result(pb.TopKResponse(model_version=1, missing_ids=["u9"]))
    assert result.missing_ids == ("u9",) and result.cold_start
    assert result.missing_user_ids == result.missing_item_ids == ()
    similar = _models.top_k_result(pb.SimilarItemsResponse(model_version=1))
    assert not similar.cold_start and similar.missing_ids == ()


def test_model_info_converts_time_and_maps() -> None:
    response = pb.GetModelInfoResponse(model_name="m", model_version=2, factors=8)
    response.create_time.FromDatetime(datetime(2026, 1, 2, 3, 4, 5))
    response.metrics["rmse"] = 0.9
    response.hyperparameters["lr"] = "0.01"
    info = _models.model_info(response)
    assert info.create_time == datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    assert info.metrics == {"rmse": 0.9} and info.hyperparameters == {"lr": "0.01"}
    assert _models.model_info(pb.GetModelInfoResponse()).create_time is None


def test_health_status_is_a_str_enum() -> None:
    assert HealthStatus.SERVING == "SERVING" and str(HealthStatus.NOT_SERVING) == "NOT_SERVING"


@pytest.mark.parametrize(
    ("value", "shown"), [(3.609999895095825, 3.61), (0.1, 0.1), (4.0, 4.0), (1e39, 1e39)]
)
def test_float32_values_print_short(value: float, shown: float) -> None:
    assert _render.f32(value) == shown


def test_table_aligns_numbers_right_and_text_left() -> None:
    text = _render.table(["rank", "item_id", "score"], [[1, "i10", 0.5], [10, "i2", 0.25]])
    assert text.splitlines() == [
        "rank  item_id   score",
        "   1  i10      0.5000",
        "  10  i2       0.2500",
    ]
