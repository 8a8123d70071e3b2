"""The ranking head: implicit-feedback weighted matrix factorisation (iALS, Hu/Koren/Volinsky
2008), ``score = x_u . y_i``, solved by alternating, batched conjugate-gradient steps over the
sparse interactions.

An RMSE-trained MF ranks poorly over the full catalogue (it never sees which items a user did
*not* rate), which is why the ranking head is separate and trained on that signal. Every sweep is
a few sparse products over the interactions, O(nnz * d + n * d^2), so 20M ratings take seconds a
sweep, not minutes.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from mfserve.training.config import TrainConfig
from mfserve.training.distributed import SINGLE, Ranks
from mfserve.training.sparse import csr, observed_scores, row_block, with_values


def cg_solve(
    x: torch.Tensor,
    other: torch.Tensor,
    *,
    conf_minus_1: torch.Tensor,
    reg: float,
    steps: int,
) -> torch.Tensor:
    """Batched conjugate gradient for every row ``a`` of ``x`` at once (warm start from ``x``).

    Solves ``(Y^T Y + Y_a^T (C_a - I) Y_a + reg I) x_a = Y_a^T c_a`` where ``Y = other`` and
    ``conf_minus_1`` is the CSR ``[len(x), len(other)]`` of ``c - 1``; each matvec is an SDDMM
    and a sparse matmul, O(nnz * d + n * d^2), with nothing of size nnz x d.
    """
    gram = other.T @ other + reg * torch.eye(other.shape[1], device=other.device)
    weights = conf_minus_1.values()

    def matvec(v: torch.Tensor) -> torch.Tensor:
        scores = observed_scores(conf_minus_1, v, other) * weights
        return torch.addmm(v @ gram, with_values(conf_minus_1, scores), other)

    b = with_values(conf_minus_1, weights + 1.0) @ other
    res = b - matvec(x)
    direction = res.clone()
    rs_old = (res * res).sum(1)
    for _ in range(steps):
        a_dir = matvec(direction)
        alpha = rs_old / (direction * a_dir).sum(1).clamp_min(1e-20)
        x = x + alpha[:, None] * direction
        res = res - alpha[:, None] * a_dir
        rs_new = (res * res).sum(1)
        direction = res + (rs_new / rs_old.clamp_min(1e-20))[:, None] * direction
        rs_old = rs_new
    return x


def fit_ials(
    u: torch.Tensor,
    i: torch.Tensor,
    r: torch.Tensor,
    *,
    n_users: int,
    n_items: int,
    config: TrainConfig,
    progress: bool,
    rating_range: tuple[float, float],
    ranks: Ranks = SINGLE,
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    g = torch.Generator().manual_seed(config.seed + 2)
    # Duplicate (user, item) rows would double-count confidence: keep one (the last) per pair.
    codes = u * n_items + i
    order = torch.argsort(codes, stable=True)
    codes_sorted = codes[order]
    last = torch.ones(len(codes_sorted), dtype=torch.bool, device=codes.device)
    last[:-1] = codes_sorted[1:] != codes_sorted[:-1]
    keep = order[last]
    u, i, r = u[keep], i[keep], r[keep]
    weight = torch.ones_like(r) if config.rank_weighting == "binary" else r / rating_range[1]
    conf_minus_1 = config.rank_alpha * weight
    d = config.rank_factors
    x = (torch.randn(n_users, d, generator=g) * config.rank_init_std).to(r.device)
    y = (torch.randn(n_items, d, generator=g) * config.rank_init_std).to(r.device)
    reg, steps = config.rank_reg, config.rank_cg_steps
    by_user = csr(u, i, conf_minus_1, (n_users, n_items))
    by_item = csr(i, u, conf_minus_1, (n_items, n_users))
    weights = by_user.values()
    # Each rank solves its block of users (items); CG is per row, so the blocks, gathered, are
    # the single-process sweep.
    users_lo, users_hi = ranks.block(n_users)
    items_lo, items_hi = ranks.block(n_items)
    block_u = row_block(by_user, users_lo, users_hi)
    block_i = row_block(by_item, items_lo, items_hi)
    losses: list[float] = []
    bar = tqdm(range(config.rank_iters), desc="ranking head", disable=not progress, leave=False)
    for _ in bar:
        if ranks.active:
            x_block = cg_solve(x[users_lo:users_hi], y, conf_minus_1=block_u, reg=reg, steps=steps)
            x = ranks.gather_blocks(x_block, n_users)
            y_block = cg_solve(y[items_lo:items_hi], x, conf_minus_1=block_i, reg=reg, steps=steps)
            y = ranks.gather_blocks(y_block, n_items)
        else:
            x = cg_solve(x, y, conf_minus_1=by_user, reg=reg, steps=steps)
            y = cg_solve(y, x, conf_minus_1=by_item, reg=reg, steps=steps)
        # Weighted implicit loss without the dense U x I matrix: the all-zeros part is
        # tr(X^T X Y^T Y), the observed part corrects it per interaction.
        pred = observed_scores(by_user, x, y)
        loss = (
            float(((x.T @ x) * (y.T @ y)).sum())
            + float(((1.0 + weights) * (1.0 - pred) ** 2 - pred**2).sum())
            + config.rank_reg * float((x * x).sum() + (y * y).sum())
        ) / max(len(r), 1)
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.4f}")
    bar.close()
    return x, y, losses
