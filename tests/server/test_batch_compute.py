"""What a batch computes, through the model's one ranker: each call of a mixed batch comes back in
its place, cut to its own k, as it would alone; and the load log says which ranker serves."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from mfserve.server.batch_compute import similar_batch, top_k_batch
from mfserve.server.model_holder import describe, serving_model
from mfserve.training.recommender import RankRequest, Recommender
from mfserve.training.scoring import CompiledRanker, ExactRanker
from mfserve.training.scoring.jit import HAVE_NUMBA


def test_the_load_log_names_the_ranker_that_serves(
    synthetic_model: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="mfserve.server"):
        serving = serving_model(Recommender(synthetic_model))
    assert isinstance(serving.ranker, CompiledRanker if HAVE_NUMBA else ExactRanker)
    assert f"mfserve: TopK for {describe(serving)}: {serving.ranker.describe()}" in caplog.text
    assert "of 400 items" in caplog.text


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch"])
def test_a_mixed_batch_cuts_each_call_to_its_own_k(synthetic_model: Any, compiled: bool) -> None:
    serving = serving_model(Recommender(synthetic_model, compiled=None if compiled else False))
    payloads = [
        (4, 5, RankRequest()),
        (9, 3, RankRequest(exclude=torch.tensor([0, 1, 2]))),  # a deny-list
        (-1, 4, RankRequest()),  # an unknown user: the popularity ranking
        (11, 6, RankRequest(exclude_seen=False)),
        (4, 2, RankRequest(candidates=torch.tensor([7, 8, 9, 10]))),  # an allow-list
    ]
    together = top_k_batch(serving, payloads)
    assert [len(items) for items, _ in together] == [5, 3, 4, 6, 2]
    for (items, scores), payload in zip(together, payloads, strict=True):
        [(want_items, want_scores)] = top_k_batch(serving, [payload])
        assert items == want_items
        np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-5)
    assert not {0, 1, 2} & set(together[1][0])
    assert set(together[4][0]) <= {7, 8, 9, 10}


def test_similar_items_batch_through_the_ranker(synthetic_model: Any) -> None:
    serving = serving_model(Recommender(synthetic_model))
    payloads = [(3, 4, RankRequest(exclude_seen=False)), (8, 2, RankRequest(exclude_seen=False))]
    together = similar_batch(serving, payloads)
    assert [len(items) for items, _ in together] == [4, 2]
    assert 3 not in together[0][0] and 8 not in together[1][0]  # never the query item itself
    for (items, scores), payload in zip(together, payloads, strict=True):
        [(want_items, want_scores)] = similar_batch(serving, [payload])
        assert items == want_items
        np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-5)
