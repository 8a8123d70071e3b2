"""Evaluation protocol and metrics on hand-computed tiny examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mfserve.training.artifact import ModelArtifact
from mfserve.training.evaluate import (
    Csr,
    evaluate_recommender,
    prepare_protocol,
    protocol_split,
    ranking_metrics,
    rating_metrics,
)
from mfserve.training.recommender import Recommender


def test_protocol_split_is_pinned() -> None:
    train, test = protocol_split(100_836, 42)
    assert train[:5].tolist() == [16141, 70464, 33322, 26420, 5741]
    assert len(train) == 80_668 and len(test) == 20_168
    assert len(np.union1d(train, test)) == 100_836
    assert np.array_equal(protocol_split(100_836, 42)[1], test)


def test_rating_metrics_clip_and_exact_values() -> None:
    m = rating_metrics(np.array([6.0, 3.0, 0.0]), np.array([5.0, 4.0, 0.5]))
    # clipped predictions 5.0, 3.0, 0.5 -> errors 0, -1, 0
    assert m["rmse"] == pytest.approx(math.sqrt(1 / 3))
    assert m["mae"] == pytest.approx(1 / 3)


def test_ranking_metrics_hand_computed() -> None:
    topk = np.array([[1, 2, 3], [4, 5, 6]])
    relevant = [{1, 3, 9, 10}, {7}]
    m = ranking_metrics(topk, relevant, k=3, n_train_items=20)
    d = [1 / math.log2(r + 1) for r in (1, 2, 3)]
    ndcg0 = (d[0] + d[2]) / sum(d)  # hits at ranks 1 and 3; ideal over min(4, 3) = 3
    assert m["ndcg"] == pytest.approx(ndcg0 / 2)
    assert m["precision"] == pytest.approx((2 / 3 + 0) / 2)
    assert m["recall"] == pytest.approx((2 / 4 + 0) / 2)
    assert m["hit_rate"] == pytest.approx(0.5)
    assert m["map"] == pytest.approx(((1 / 1 + 2 / 3) / 3) / 2)  # / min(#relevant, k)
    assert m["coverage"] == pytest.approx(6 / 20)


def test_ranking_metrics_perfect_list_is_one() -> None:
    m = ranking_metrics(np.array([[5, 6, 0, 1]]), Csr.from_sets([{5, 6}]), k=4, n_train_items=8)
    assert m["ndcg"] == pytest.approx(1.0)
    assert m["map"] == pytest.approx(1.0)
    assert m["recall"] == pytest.approx(1.0)


def test_select_rows_keeps_order() -> None:
    csr = Csr.from_sets([{0}, {3, 2}, set(), {5}])
    picked = csr.select_rows(np.array([3, 1]))
    assert [picked.row(r).tolist() for r in range(2)] == [[5], [2, 3]]


def test_prepare_protocol_encodes_over_train_part_like_label_encoder() -> None:
    users = np.array(["10", "2", "10", "7", "2"], dtype=object)
    items = np.array(["a", "b", "c", "a", "zz"], dtype=object)
    d = prepare_protocol(users, items, np.array([4.0, 3.0, 5.0, 1.0, 4.0]), test_fraction=0.0)
    assert d.users.classes == ["10", "2", "7"]  # string sort, like LabelEncoder on str
    assert d.train_by_user.row(0).tolist() == [0, 2]  # user "10" rated a and c


def test_evaluate_recommender_uses_serving_fallback_and_masks_seen() -> None:
    rng = np.random.default_rng(0)
    n = 400
    users = rng.integers(0, 10, n).astype(str).astype(object)
    items = rng.integers(0, 30, n).astype(str).astype(object)
    ratings = rng.choice([1.0, 3.0, 4.0, 5.0], n).astype(np.float32)
    d = prepare_protocol(users, items, ratings)
    assert len(d.train_ratings) == 320 and len(d.test_ratings) == 80
    assert d.relevant.n_rows == len(d.eval_users)
    artifact = ModelArtifact(
        tensors={
            "user_factors": torch.ones(d.n_users, 2),
            "item_factors": torch.ones(d.n_items, 2),
            "user_bias": torch.full((d.n_users,), 0.5),
            "item_bias": torch.full((d.n_items,), -0.25),
        },
        user_ids=d.users.to_list(),
        item_ids=d.items.to_list(),
        global_mean=3.0,
        rating_range=(0.5, 5.0),
        seen_indptr=torch.from_numpy(d.train_by_user.indptr),
        seen_indices=torch.from_numpy(d.train_by_user.indices),
        item_popularity=torch.from_numpy(np.bincount(d.train_items, minlength=d.n_items)),
    )
    recommender = Recommender(artifact)
    pred = recommender.predict(torch.tensor([0, 0, -1]), torch.tensor([0, -1, 0]))
    assert pred.tolist() == [5.0, 3.5, 2.75]  # 3+.5-.25+2 -> 5.25 clipped; user only; item only
    metrics = evaluate_recommender(d, recommender)
    expected = np.where((d.test_users >= 0) & (d.test_items >= 0), 5.0, 0.0)
    expected = np.where((d.test_users >= 0) & (d.test_items < 0), 3.5, expected)
    expected = np.where((d.test_users < 0) & (d.test_items >= 0), 2.75, expected)
    expected = np.where((d.test_users < 0) & (d.test_items < 0), 3.0, expected)
    assert metrics["rmse"] == pytest.approx(
        float(np.sqrt(np.mean((expected - d.test_ratings) ** 2)))
    )
    assert 0.0 <= metrics["ndcg_at_10"] <= 1.0
