"""The compiled kernels against torch: the pair and rank kernels must give the exact torch path's
ratings and rankings (to float32 rounding) and never depend on their batch, and the pruned scan
must rank exactly as the full one."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mfserve.training.recommender import RankRequest, Recommender
from mfserve.training.scoring import CompiledRanker, RankingTables
from mfserve.training.scoring.compiled import FULL_SCAN_MAX_USERS, RankKernel, rank_kernel
from mfserve.training.scoring.jit import HAVE_NUMBA, compiled
from mfserve.training.scoring.ratings import pair_kernel
from mfserve.training.synthetic import synthetic_artifact

pytestmark = pytest.mark.skipif(not HAVE_NUMBA, reason="the compiled kernels need numba")


# ---------------------------------------------------------------------------- the pair kernel
@pytest.fixture(scope="module")
def model(synthetic_model: Any) -> Recommender:
    return Recommender(synthetic_model, compiled=False)  # torch: the reference


def test_the_model_rates_through_the_kernel_unless_told_not_to(synthetic_model: Any) -> None:
    compiled, plain = Recommender(synthetic_model), Recommender(synthetic_model, compiled=False)
    assert compiled.rating_kernel is not None and plain.rating_kernel is None
    users, items = np.arange(20), np.arange(20)[::-1].copy()
    kernel = pair_kernel(synthetic_model)
    assert kernel is not None
    assert compiled.predict_rows(users, items).tolist() == kernel.predict(users, items).tolist()
    np.testing.assert_allclose(
        compiled.predict_rows(users, items), plain.predict_rows(users, items), rtol=0, atol=1e-5
    )


def test_kernel_matches_recommender_predict(model: Recommender) -> None:
    kernel = pair_kernel(model.artifact)
    assert kernel is not None
    rng = np.random.default_rng(1)
    # -1 rows included: the cold-start estimate (no factors, only the known biases).
    users = rng.integers(-1, model.n_users, 5_000)
    items = rng.integers(-1, model.n_items, 5_000)
    got = kernel.predict(users, items)
    want = model.predict(torch.from_numpy(users), torch.from_numpy(items)).numpy()
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    low, high = model.rating_range
    assert got.min() >= low and got.max() <= high


def test_kernel_answers_do_not_depend_on_the_batch(model: Recommender) -> None:
    kernel = pair_kernel(model.artifact)
    assert kernel is not None
    rng = np.random.default_rng(2)
    users = rng.integers(0, model.n_users, 300)
    items = rng.integers(0, model.n_items, 300)
    together = kernel.predict(users, items)
    one_by_one = np.concatenate(
        [kernel.predict(users[i : i + 1], items[i : i + 1]) for i in range(300)]
    )
    assert np.array_equal(together, one_by_one)  # exactly: each pair is computed alone


class NoCacheLocator:
    """A numba cache locator that finds no place to write, as on a read-only install."""

    @classmethod
    def from_function(cls, function: Any, source: str) -> None:
        return None


def test_without_a_cache_location_kernels_still_compile(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import numba.core.config

    monkeypatch.setattr(
        numba.core.config, "CACHE_LOCATOR_CLASSES", f"{__name__}.NoCacheLocator", raising=False
    )

    def double(x: int) -> int:
        return 2 * x

    assert compiled(double)(21) == 42
    assert "numba cannot cache" in caplog.text  # the fallback, not the cached build, ran


# ---------------------------------------------------------------------------- the rank kernel
def long_tailed(artifact: Any, seed: int = 1) -> Any:
    """``artifact`` with item key lengths spread over two orders of magnitude, as trained models
    have them (popular items get long vectors), so the rank kernel's norm bound prunes most of a
    TopK scan; synthetic clusters alone have keys of one length."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.exp(1.2 * torch.randn(artifact.n_items, 1, generator=generator))
    tensors = dict(artifact.tensors)
    for name in ("item_factors", "rank_item_factors"):
        if name in tensors:
            tensors[name] = tensors[name] * scale
    return dataclasses.replace(artifact, tensors=tensors)


RANKER_SHAPE = {"n_users": 60, "n_items": 400, "factors": 8, "clusters": 4, "seen_per_user": 5}


@pytest.fixture(
    scope="module",
    params=[(True, False), (False, False), (True, True), (False, True)],
    ids=["rank-head-full-scan", "rating-head-full-scan", "rank-head-pruned", "rating-head-pruned"],
)
def ranker(request: pytest.FixtureRequest) -> tuple[Recommender, RankKernel]:
    rank_head, pruned = request.param
    artifact = synthetic_artifact(**RANKER_SHAPE, rank_head=rank_head)
    model = Recommender(long_tailed(artifact) if pruned else artifact)
    kernel = RankKernel.from_tables(model.ranking_tables(), pruned=pruned)
    assert (kernel.order is not None) == pruned
    return model, kernel


def test_the_kernel_prunes_only_where_it_pays() -> None:
    # Measured at load: long-tailed key lengths (as trained models have them) prune most of a
    # scan; synthetic clusters in 32 dimensions, all of one length, prune almost nothing.
    lengths_vary = Recommender(long_tailed(synthetic_artifact(**RANKER_SHAPE)))
    alike = Recommender(synthetic_artifact(n_users=60, n_items=1000, factors=32, clusters=32))
    pruning, scanning = kernel_of(lengths_vary), kernel_of(alike)
    assert pruning is not None and scanning is not None
    assert pruning.order is not None and pruning.max_users is None
    assert scanning.order is None and scanning.max_users == FULL_SCAN_MAX_USERS
    assert pruning.visit_share is not None and pruning.visit_share <= 0.25
    assert scanning.visit_share is not None and scanning.visit_share > 0.25
    assert pruning.describe().startswith("pruned scan (pruning visits ")
    assert scanning.describe().startswith("full scan (pruning visits ")


def kernel_of(model: Recommender) -> RankKernel | None:
    return rank_kernel(model.ranking_tables(), chunk_size=model.chunk_size)


def test_the_model_ranks_through_the_kernel_and_says_which_scan() -> None:
    model = Recommender(long_tailed(synthetic_artifact(**RANKER_SHAPE)))
    ranker = model.ranker
    assert isinstance(ranker, CompiledRanker)
    assert ranker.describe() == f"compiled {ranker.kernel.describe()}"
    assert "of 400 items" in ranker.describe()
    assert Recommender(model.artifact, compiled=False).ranker is not ranker
    assert not isinstance(Recommender(model.artifact, compiled=False).ranker, CompiledRanker)


def test_rank_kernel_matches_the_torch_ranking(ranker: tuple[Recommender, RankKernel]) -> None:
    model, kernel = ranker
    users = list(range(model.n_users))
    seen = [u % 3 != 0 for u in users]  # both kinds in one batch
    got = kernel.top_k(users, 10, seen)
    requests = [RankRequest(exclude_seen=s) for s in seen]
    want = model.exact.top_k(users, 10, requests)
    for (items, scores), (want_items, want_scores) in zip(got, want, strict=True):
        np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-5)
        # Items exactly, except where two scores tie to within the tolerance.
        for n, (item, want_item) in enumerate(zip(items, want_items, strict=True)):
            if item != want_item:
                assert abs(scores[n] - want_scores[n]) < 1e-5


def test_rank_kernel_batches_do_not_change_answers(ranker: tuple[Recommender, RankKernel]) -> None:
    _, kernel = ranker
    users = [5, 17, 5, 42, 0]
    together = kernel.top_k(users, 7, [True, True, False, True, False])
    alone = [kernel.top_k([u], 7, [s])[0] for u, s in zip(users, [1, 1, 0, 1, 0], strict=True)]
    assert together == alone  # exactly


def test_rank_kernel_never_returns_seen_items_and_stops_at_the_eligible(
    ranker: tuple[Recommender, RankKernel],
) -> None:
    model, kernel = ranker
    tables = model.ranking_tables()
    [(items, scores)] = kernel.top_k([3], model.n_items + 50, [True])
    seen = set(tables.seen_indices[tables.seen_indptr[3] : tables.seen_indptr[4]].tolist())
    assert seen and not seen & set(items)
    assert len(items) == model.n_items - len(seen)  # every unseen item, none twice
    assert scores == sorted(scores, reverse=True)


def test_a_mixed_batch_keeps_each_call_on_its_own_path(
    ranker: tuple[Recommender, RankKernel],
) -> None:
    # Plain calls go through the kernel, the others through torch, and every answer comes back
    # in its call's place, equal to what the call gets alone.
    model, kernel = ranker
    compiled_ranker = CompiledRanker(kernel, model.exact)
    users = [4, 9, -1, 11]
    requests = [
        RankRequest(),
        RankRequest(exclude=torch.tensor([0, 1, 2])),  # a deny-list: torch
        RankRequest(),  # unknown user: popularity, torch
        RankRequest(exclude_seen=False),
    ]
    together = compiled_ranker.top_k(users, 6, requests)
    alone = [compiled_ranker.top_k([u], 6, [r])[0] for u, r in zip(users, requests, strict=True)]
    assert [len(items) for items, _ in together] == [6, 6, 6, 6]
    for (items, scores), (want_items, want_scores) in zip(together, alone, strict=True):
        assert items == want_items
        np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-5)


def test_a_catalogue_past_one_chunk_keeps_the_torch_path() -> None:
    model = Recommender(synthetic_artifact(n_users=5, n_items=300, factors=4), chunk_size=128)
    assert kernel_of(model) is None
    assert not isinstance(model.ranker, CompiledRanker)


def test_a_batch_past_the_kernel_limit_gets_the_same_rankings(
    ranker: tuple[Recommender, RankKernel],
) -> None:
    # With full scans, past FULL_SCAN_MAX_USERS the batch is a GEMM through torch: scores to
    # 1e-5. The pruned scan takes the whole batch.
    model, kernel = ranker
    compiled_ranker = CompiledRanker(kernel, model.exact)
    users = list(range(FULL_SCAN_MAX_USERS + 4))
    together = compiled_ranker.top_k(users, 5, [RankRequest()] * len(users))
    for (items, scores), user in zip(together, users, strict=True):
        [(want_items, want_scores)] = compiled_ranker.top_k([user], 5, [RankRequest()])
        np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-5)
        assert len(items) == len(want_items) == 5


def test_the_pruned_scan_ranks_exactly_as_the_full_scan_while_visiting_less() -> None:
    for rank_head in (True, False):
        model = Recommender(long_tailed(synthetic_artifact(**RANKER_SHAPE, rank_head=rank_head)))
        pruned = RankKernel.from_tables(model.ranking_tables(), pruned=True)
        full = RankKernel.from_tables(model.ranking_tables(), pruned=False)
        users = list(range(model.n_users))
        for k in (1, 10, model.n_items + 50):
            for seen in ([True] * len(users), [u % 2 == 0 for u in users]):
                got, scanned = pruned.top_k_scanned(users, k, seen)
                assert got == full.top_k(users, k, seen)  # exactly: items, order and scores
        _, scanned = pruned.top_k_scanned(users, 10, [True] * len(users))
        assert np.mean(scanned) < model.n_items / 4  # the bound stopped most scans early


SMALL = st.integers(-3, 3).map(lambda v: v / 2)  # few distinct values: ties are common


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_pruned_and_full_scans_agree_on_any_table(data: Any) -> None:
    # Exact agreement, ties and all, on tables built to be awkward: tiny and repeated values
    # (many equal scores), long and short keys, with or without bias and offsets, NaN and inf.
    n_users = data.draw(st.integers(1, 4))
    n_items = data.draw(st.integers(1, 40))
    factors = data.draw(st.integers(1, 6))
    special = st.sampled_from([float("nan"), float("inf"), -float("inf")])
    value = st.one_of(SMALL, special) if data.draw(st.booleans()) else SMALL

    def table(rows: int, cols: int) -> np.ndarray:
        cells = data.draw(st.lists(value, min_size=rows * cols, max_size=rows * cols))
        return np.array(cells, dtype=np.float32).reshape(rows, cols)

    with np.errstate(invalid="ignore"):  # inf * 0: a NaN key, which is one of the cases
        keys = table(n_items, factors) * table(n_items, 1).clip(0.5, None) * 4  # lengths vary
    seen = [
        sorted(data.draw(st.sets(st.integers(0, n_items - 1), max_size=n_items)))
        for _ in range(n_users)
    ]
    tables = RankingTables(
        queries=table(n_users, factors),
        keys=keys,
        key_bias=table(n_items, 1)[:, 0] if data.draw(st.booleans()) else None,
        user_offset=table(n_users, 1)[:, 0] if data.draw(st.booleans()) else None,
        seen_indptr=np.cumsum([0] + [len(s) for s in seen], dtype=np.int64),
        seen_indices=np.array([i for s in seen for i in s], dtype=np.int64),
    )
    full = RankKernel.from_tables(tables, pruned=False)
    pruned = RankKernel.from_tables(tables, pruned=True)
    users = data.draw(st.lists(st.integers(0, n_users - 1), min_size=1, max_size=5))
    exclude = data.draw(st.lists(st.booleans(), min_size=len(users), max_size=len(users)))
    k = data.draw(st.integers(1, n_items + 2))
    assert pruned.top_k(users, k, exclude) == full.top_k(users, k, exclude)


def test_a_non_finite_key_means_full_scans() -> None:
    artifact = long_tailed(synthetic_artifact(**RANKER_SHAPE))
    tensors = dict(artifact.tensors)
    broken = tensors["rank_item_factors"].clone()
    broken[7, 0] = float("nan")
    tensors["rank_item_factors"] = broken
    model = Recommender(dataclasses.replace(artifact, tensors=tensors))
    kernel = RankKernel.from_tables(model.ranking_tables(), pruned=True)
    assert kernel.order is None  # no bound holds with a NaN key
    [(items, _)] = kernel.top_k([3], model.n_items, [False])
    assert 7 not in items  # its score is NaN: never ranked
