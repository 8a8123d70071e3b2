"""The exact torch ranker's shortcuts against its general path: a lone user and the usual batch
(known users, no lists) skip the batch bookkeeping with the same tensor ops, so the same answers."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from mfserve.training.recommender import RankRequest, Recommender

TOL = 1e-5


@pytest.mark.parametrize("exclude_seen", [True, False])
def test_lone_top_k_matches_the_batched_path(synthetic_model: Any, exclude_seen: bool) -> None:
    # A lone row takes torch's shortcut unless the catalogue spans several chunks: same answers.
    lone = Recommender(synthetic_model, compiled=False)
    chunked = Recommender(synthetic_model, chunk_size=synthetic_model.n_items // 3)
    request = RankRequest(exclude_seen=exclude_seen)
    for user in range(0, lone.n_users, 7):
        [(items, scores)] = lone.top_k(torch.tensor([user]), 25, [request])
        [(want_items, want_scores)] = chunked.top_k(torch.tensor([user]), 25, [request])
        # In a batch of two the product is a GEMM, rounded differently (see the module doc).
        [(_, pair_scores), _] = lone.top_k(torch.tensor([user, 0]), 25, [request, request])
        assert items.tolist() == want_items.tolist()
        assert scores.tolist() == pytest.approx(want_scores.tolist(), abs=TOL)
        assert scores.tolist() == pytest.approx(pair_scores.tolist(), abs=TOL)
        if exclude_seen:
            assert not set(lone.seen_items(user).tolist()) & set(items.tolist())


def test_lone_top_k_lists_match_the_batched_path(synthetic_model: Any) -> None:
    # A lone TopK skips the batch bookkeeping; a k past the catalogue makes the seen items
    # (scored -inf) fall off the end, as the batched path drops them.
    exact = Recommender(synthetic_model).exact
    request = RankRequest()
    for k in (5, exact.n_items + 10):
        for user in range(0, synthetic_model.n_users, 11):
            [lone] = exact.top_k([user], k, [request])
            [(items, scores)] = exact.top_k([user, 0], k, [request, request])[:1]
            assert lone[0] == items
            assert lone[1] == pytest.approx(scores, abs=TOL)
            assert len(items) == min(k, exact.n_items - exact.tables.seen_count(user))
    # Rows the shortcut does not cover: an unknown user, an allow-list.
    assert exact._top_one(-1, 5, request) is None
    assert exact._top_one(0, 5, RankRequest(candidates=torch.tensor([1, 2]))) is None


def test_known_users_batch_path_matches_the_general_path(synthetic_model: Any) -> None:
    # The usual batch (known users, no lists) takes a short path: the same answers bit for bit.
    exact = Recommender(synthetic_model).exact
    users = np.arange(0, synthetic_model.n_users, 3)
    requests = [RankRequest(exclude_seen=bool(u % 2 == 0)) for u in users]
    for k in (7, exact.n_items + 5):  # the second leaves seen items (-inf) to drop
        known = exact._top_k_known(users, k, requests)
        assert known == exact._top_k(users, k, requests).lists()
        assert exact.top_k(users.tolist(), k, requests) == known
    chunked = Recommender(synthetic_model, chunk_size=synthetic_model.n_items // 3).exact
    assert chunked._top_k_known(users, 5, requests) is None


def test_an_unknown_user_gets_the_popularity_order_with_ties_by_item_row(
    synthetic_model: Any,
) -> None:
    # The synthetic model's popularity counts tie a lot (5 ratings a user over 400 items), so an
    # order that depended on k or on the batch would show here.
    exact = Recommender(synthetic_model).exact
    counts = synthetic_model.item_popularity.tolist()
    want = sorted(range(len(counts)), key=lambda row: (-counts[row], row))
    deny = RankRequest(exclude=torch.tensor(want[:3]))
    for k in (3, 10, 50):
        [(items, scores)] = exact.top_k([-1], k, [RankRequest()])
        assert items == want[:k]
        assert scores == sorted(scores, reverse=True)
        batched = exact.top_k([5, -1, -1], k, [RankRequest(), RankRequest(), deny])
        assert batched[1] == (items, scores)
        assert batched[2][0] == want[3 : 3 + k]
    candidates = RankRequest(candidates=torch.tensor(want[:20][::-1]))
    for k in (2, 7):
        [(items, _)] = exact.top_k([-1], k, [candidates])
        assert items == want[:k]  # an allow-list ranks its ties by item row too
