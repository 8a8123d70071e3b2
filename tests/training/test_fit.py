"""Fast tests of the model and training loop on tiny synthetic data with planted structure."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from mfserve.training.fit import FitResult, TrainConfig, fit
from mfserve.training.rating_head import add_rows, batch_gradients
from mfserve.training.sparse import implicit_matrices

N_USERS, N_ITEMS = 80, 60


def planted(seed: int = 0, density: float = 0.4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ratings from a rank-3 model plus biases and a little noise, on a random subset of pairs."""
    rng = np.random.default_rng(seed)
    pu, qi = rng.normal(0, 0.8, (N_USERS, 3)), rng.normal(0, 0.8, (N_ITEMS, 3))
    bu, bi = rng.normal(0, 0.3, N_USERS), rng.normal(0, 0.3, N_ITEMS)
    mask = rng.random((N_USERS, N_ITEMS)) < density
    users, items = np.nonzero(mask)
    r = (
        3.2
        + bu[users]
        + bi[items]
        + (pu[users] * qi[items]).sum(1)
        + rng.normal(0, 0.2, len(users))
    )
    order = rng.permutation(len(users))
    return users[order], items[order], np.clip(r, 0.5, 5.0)[order].astype(np.float32)


SMALL = TrainConfig(
    factors=8, epochs=40, batch_size=256, rank_factors=8, rank_iters=4, rank_reg=1.0, patience=5
)


def _fit(config: TrainConfig = SMALL, seed: int = 0) -> tuple[FitResult, tuple[np.ndarray, ...]]:
    u, i, r = planted(seed)
    return fit(u, i, r, N_USERS, N_ITEMS, config, progress=False), (u, i, r)


def test_same_seed_gives_bit_identical_tensors() -> None:
    a, _ = _fit()
    b, _ = _fit()
    assert a.tensors.keys() == b.tensors.keys()
    for name in a.tensors:
        assert torch.equal(a.tensors[name], b.tensors[name]), name
    assert a.global_mean == b.global_mean
    c, _ = _fit(dataclasses.replace(SMALL, seed=7))
    assert not torch.equal(a.tensors["user_factors"], c.tensors["user_factors"])


def test_tensors_are_float32_contiguous_with_expected_shapes() -> None:
    res, _ = _fit()
    shapes = {
        "user_factors": (N_USERS, 8),
        "item_factors": (N_ITEMS, 8),
        "user_bias": (N_USERS,),
        "item_bias": (N_ITEMS,),
        "rank_user_factors": (N_USERS, 8),
        "rank_item_factors": (N_ITEMS, 8),
    }
    assert {k: tuple(v.shape) for k, v in res.tensors.items()} == shapes
    for t in res.tensors.values():
        assert t.dtype == torch.float32 and t.is_contiguous() and not t.requires_grad


def test_training_reduces_loss_and_beats_global_mean() -> None:
    u, i, r = planted(0)
    n_fit = int(0.8 * len(r))
    res = fit(u[:n_fit], i[:n_fit], r[:n_fit], N_USERS, N_ITEMS, SMALL, progress=False)
    losses = [h["train_mse"] for h in res.history if "epoch" in h]
    assert losses[-1] < 0.5 * losses[0]
    t = res.tensors
    uu, ii, rr = u[n_fit:], i[n_fit:], r[n_fit:]
    pred = (
        res.global_mean
        + t["user_bias"][uu]
        + t["item_bias"][ii]
        + (t["user_factors"][uu] * t["item_factors"][ii]).sum(1)
    ).numpy()
    rmse = float(np.sqrt(np.mean((np.clip(pred, 0.5, 5) - rr) ** 2)))
    baseline = float(np.sqrt(np.mean((r[:n_fit].mean() - rr) ** 2)))
    assert rmse < 0.75 * baseline


def test_early_stopping_stops_and_keeps_best_epoch() -> None:
    # A huge learning rate with no regularisation overfits fast: validation RMSE turns up.
    cfg = dataclasses.replace(SMALL, epochs=200, patience=2, reg=0.0, lr=0.05, factors=16)
    res, _ = _fit(cfg)
    epochs = [h for h in res.history if "epoch" in h]  # the rest are iALS sweeps
    assert len(epochs) < 200
    assert len(epochs) == res.best_epoch + 2
    vals = [h["val_rmse"] for h in epochs]
    assert min(vals) == vals[res.best_epoch - 1]


def test_no_biases_and_no_rank_head() -> None:
    cfg = dataclasses.replace(SMALL, use_biases=False, rank_head="none", implicit=False)
    res, _ = _fit(cfg)
    assert res.global_mean == 0.0
    assert not res.tensors["user_bias"].any() and not res.tensors["item_bias"].any()
    assert "rank_user_factors" not in res.tensors


def test_ranking_head_ranks_liked_items_above_unrated_ones() -> None:
    res, (u, i, _) = _fit()
    scores = res.tensors["rank_user_factors"] @ res.tensors["rank_item_factors"].T
    rated = torch.zeros(N_USERS, N_ITEMS, dtype=torch.bool)
    rated[torch.as_tensor(u), torch.as_tensor(i)] = True
    assert scores[rated].mean() > scores[~rated].mean() + 0.2


def test_reference_config_fields() -> None:
    ref = TrainConfig.reference()
    assert (ref.factors, ref.epochs, ref.batch_size, ref.lr) == (8, 128, 128, 1e-3)
    assert (ref.init, ref.init_std, ref.optimizer) == ("uniform", 0.05, "adam")
    assert not ref.use_biases and not ref.implicit
    assert ref.reg == 0.0 and ref.val_fraction == 0.0 and ref.rank_head == "none"
    # The uniform init really is U(0, 0.05).
    res = fit(
        *planted(0), N_USERS, N_ITEMS, dataclasses.replace(ref, epochs=1, lr=0.0), progress=False
    )
    uf = res.tensors["user_factors"]
    assert float(uf.min()) >= 0.0 and float(uf.max()) <= 0.05


def test_invalid_config_is_rejected() -> None:
    with pytest.raises(ValueError):
        _fit(dataclasses.replace(SMALL, optimizer="lbfgs"))
    with pytest.raises(ValueError):
        _fit(dataclasses.replace(SMALL, val_fraction=1.0))


def test_written_out_gradients_are_autograds() -> None:
    g = torch.Generator().manual_seed(3)
    pu, qi = torch.randn(50, 6, generator=g), torch.randn(50, 6, generator=g)
    b_u, b_i, r = torch.randn(50, generator=g), torch.randn(50, generator=g), torch.rand(50) * 5
    leaves = [t.clone().requires_grad_() for t in (pu, qi, b_u, b_i)]
    lp, lq, lbu, lbi = leaves
    pred = 3.3 + lbu + lbi + (lp * lq).sum(1)
    loss = ((pred - r) ** 2).sum() + 0.07 * ((lp * lp).sum() + (lq * lq).sum())
    loss = loss + 0.02 * ((lbu * lbu).sum() + (lbi * lbi).sum())
    loss.backward()
    err, *grads = batch_gradients(pu, qi, b_u, b_i, r, 3.3, 0.07, 0.02)
    assert torch.allclose(err, pred.detach() - r, atol=1e-5)
    for mine, theirs in zip(grads, leaves, strict=True):
        assert theirs.grad is not None
        assert torch.allclose(mine, theirs.grad, atol=1e-4)


def test_add_rows_sums_repeated_rows_like_index_add() -> None:
    rows = torch.tensor([3, 1, 3, 3, 0])
    values = torch.arange(10, dtype=torch.float32).reshape(5, 2)
    table = torch.zeros(4, 2)
    add_rows(table, rows, values)
    assert torch.equal(table, torch.zeros(4, 2).index_add_(0, rows, values))
    flat = torch.zeros(4)
    add_rows(flat, rows, values[:, 0])
    assert flat.tolist() == [8.0, 2.0, 0.0, 10.0]  # row 3: 0 + 4 + 6


def test_implicit_matrices_match_the_dense_definition() -> None:
    users = torch.tensor([0, 0, 1, 2, 2, 2, 0])  # (0, 1) twice: counted once
    items = torch.tensor([1, 3, 1, 0, 1, 2, 1])
    s_u, s_u_t, s_i, s_i_t = implicit_matrices(users, items, 4, 5)
    seen = torch.zeros(4, 5)
    seen[users, items] = 1.0
    by_user = seen / seen.sum(1, keepdim=True).clamp_min(1).sqrt()
    by_item = seen / seen.sum(0, keepdim=True).clamp_min(1).sqrt()
    assert torch.allclose(s_u.to_dense(), by_user)
    assert torch.allclose(s_u_t.to_dense(), by_user.T)
    assert torch.allclose(s_i.to_dense(), by_item.T)
    assert torch.allclose(s_i_t.to_dense(), by_item)
