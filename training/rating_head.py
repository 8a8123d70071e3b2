"""The rating head: ``rating = mu + b_u + b_i + p_u . q_i``, squared error, minibatch SGD.

Batches are contiguous slices of the rows shuffled once an epoch (no per-sample Dataset, no
gather of the rows per batch), L2 on the looked-up rows, early stopping on a validation slice.
SVD++-style implicit terms (which items a user rated, which users rated an item) are trained as
separate tables and *folded* into the exported ``p_u``/``q_i``, so serving stays a plain dot
product; on the validation slice this was worth ~0.02 RMSE (0.856 -> 0.834).

The gradients are written out rather than left to autograd: the model is a dot product, its
gradient two lines, and a batch is then ~15 small tensor ops and four ``index_add_`` updates.
With autograd and sparse embedding gradients a batch of 2,048 cost ~4 ms on two cores (graph,
index backward, sparse coalescing in the optimiser), which at 20M ratings was 30 s an epoch.
SGD applies the updates in place; Adam gets them as dense gradients.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from mfserve.training.config import TrainConfig
from mfserve.training.distributed import SINGLE, Ranks
from mfserve.training.sparse import implicit_matrices, row_block

# Rating-visits an epoch may spend refreshing the rating head's implicit sums (two sparse
# matmuls over every rating a refresh, ~50M a second here): 32 refreshes an epoch at 1M ratings,
# 1 at 20M, every batch up to ~280k (the bundled data: 40 batches an epoch, all refreshed).
IMPLICIT_NNZ_BUDGET = 64_000_000


@dataclass(frozen=True)
class RatingHead:
    """The best epoch's tensors (``p``/``q`` with the implicit terms folded in, ``bu``/``bi``)."""

    state: dict[str, torch.Tensor]
    global_mean: float
    history: list[dict[str, float]]
    best_epoch: int


def split_validation(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices ``(fit_rows, val_rows)``: a seeded random ``fraction`` of the rows held out."""
    g = torch.Generator().manual_seed(seed + 1)  # own stream: independent of the batch order
    perm = torch.randperm(n, generator=g)
    n_val = round(fraction * n)
    return perm[n_val:], perm[:n_val]


def _init_factors(n: int, d: int, config: TrainConfig, g: torch.Generator) -> torch.Tensor:
    if config.init == "uniform":
        return torch.rand(n, d, generator=g).mul_(config.init_std)
    return torch.randn(n, d, generator=g).mul_(config.init_std)


def _rmse_known(
    params: dict[str, torch.Tensor],
    mu: float,
    u: torch.Tensor,
    i: torch.Tensor,
    r: torch.Tensor,
    rating_range: tuple[float, float],
) -> float:
    """Validation RMSE (clipped); every row's user/item has a row in the tables (cold ones stay at
    their init / zero bias, which is the fallback a server would give)."""
    squared, block = 0.0, 1 << 18
    # In blocks: one [n, factors] gather of the whole slice (200 MB at 20M) ran out of cache.
    for start in range(0, len(r), block):
        users, items = u[start : start + block], i[start : start + block]
        pred = (params["p"].index_select(0, users) * params["q"].index_select(0, items)).sum(1)
        pred += params["bu"].index_select(0, users) + params["bi"].index_select(0, items) + mu
        err = pred.clamp_(*rating_range) - r[start : start + block]
        squared += float((err * err).sum(dtype=torch.float64))
    return math.sqrt(squared / len(r))


def batch_gradients(
    pu: torch.Tensor,
    qi: torch.Tensor,
    b_u: torch.Tensor,
    b_i: torch.Tensor,
    r: torch.Tensor,
    mu: float,
    reg: float,
    bias_reg: float,
) -> tuple[torch.Tensor, ...]:
    """Per rating: the error ``pred - r`` and the gradients of ``(pred - r)^2 + reg (|p_u|^2 +
    |q_i|^2) + bias_reg (b_u^2 + b_i^2)`` with respect to ``p_u``, ``q_i``, ``b_u``, ``b_i``
    (the implicit terms enter ``p_u``/``q_i``, so their gradient is the same row)."""
    err = (pu * qi).sum(1).add_(b_u).add_(b_i).sub_(r).add_(mu)
    e2 = err.mul(2.0)[:, None]
    g_p = torch.addcmul(pu.mul(2.0 * reg), e2, qi)
    g_q = torch.addcmul(qi.mul(2.0 * reg), e2, pu)
    g_bu = torch.add(err, b_u, alpha=bias_reg).mul_(2.0)
    g_bi = torch.add(err, b_i, alpha=bias_reg).mul_(2.0)
    return err, g_p, g_q, g_bu, g_bi


def add_rows(table: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
    """``table[rows[k]] += values[k]`` for every k, repeated rows summed. For factor rows this is
    ``scatter_add_`` over the expanded index: on the CPU ``index_add_`` dispatches one add per
    row (575 us for 2,048 rows of 32 into 162k here, against 170 us), with the same result."""
    if table.dim() == 1:
        table.index_add_(0, rows, values)
    else:
        table.scatter_add_(0, rows[:, None].expand_as(values), values)


class _Updates:
    """Applies one batch's per-rating gradients to the tables: in place for SGD (``lr`` per
    rating on the summed loss, the classic SGD-MF rate), as dense gradients for Adam (on the
    batch mean, as ``torch.optim.Adam`` is tuned for)."""

    def __init__(self, tables: list[torch.Tensor], config: TrainConfig) -> None:
        self.lr = config.lr
        self.adam = torch.optim.Adam(tables, lr=config.lr) if config.optimizer == "adam" else None

    def apply(
        self, pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], batch_size: int
    ) -> None:
        """``pairs``: ``(table, rows, grads)``; a row listed twice gets both gradients summed,
        all taken at the values before this batch (index_add_ sums, as SGD's sparse step did)."""
        if self.adam is None:
            for table, rows, grads in pairs:
                add_rows(table, rows, grads.mul(-self.lr))
            return
        for table, rows, grads in pairs:
            if table.grad is None:
                table.grad = torch.zeros_like(table)
            add_rows(table.grad, rows, grads.div(batch_size))
        self.adam.step()
        self.adam.zero_grad(set_to_none=True)

    def step_dense(self, table: torch.Tensor, grad: torch.Tensor, batch_size: int) -> None:
        """A summed per-rating gradient over the whole table (the implicit factors at a
        refresh, averaged over the batches since the last)."""
        if self.adam is None:
            table.sub_(grad, alpha=self.lr)
        else:
            table.grad = grad.div_(batch_size)
            self.adam.step()
            self.adam.zero_grad(set_to_none=True)


def fit_rating_head(
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
) -> RatingHead:
    g = torch.Generator().manual_seed(config.seed)
    device = r.device  # random draws on the CPU generator (the same on every device), then moved
    if config.val_fraction > 0:
        fit_rows, val_rows = split_validation(len(r), config.val_fraction, config.seed)
    else:
        fit_rows, val_rows = torch.arange(len(r)), torch.zeros(0, dtype=torch.long)
    fit_rows, val_rows = fit_rows.to(device), val_rows.to(device)
    # One int32 [n, 3] table of (user, item, rating bits): the epoch's shuffle is then one row
    # gather (0.7 s at 20M) instead of three scattered ones (3 s).
    packed = torch.stack(
        [u[fit_rows].int(), i[fit_rows].int(), r[fit_rows].contiguous().view(torch.int32)], 1
    )
    fr = r[fit_rows]
    vu, vi, vr = u[val_rows], i[val_rows], r[val_rows]
    # The global mean is a constant, not a parameter: biases absorb the rest.
    mu = float(fr.mean()) if config.use_biases else 0.0

    # The factor tables as the batches see them: with implicit terms, p_u + (S_u y)_u (and
    # q_i + (S_i z)_i), kept up to date at every refresh, so a batch reads one row per user
    # instead of two; the free factors are these minus the current implicit sums.
    p = _init_factors(n_users, config.factors, config, g).to(device)
    q = _init_factors(n_items, config.factors, config, g).to(device)
    bu = torch.zeros(n_users, device=device)
    bi = torch.zeros(n_items, device=device)
    tables = [p, q] + ([bu, bi] if config.use_biases else [])
    if config.implicit:
        # Implicit-feedback factors: which items a user rated (all given rows, values unused).
        y = torch.randn(n_items, config.factors, generator=g).mul_(config.init_std).to(device)
        z = torch.randn(n_users, config.factors, generator=g).mul_(config.init_std).to(device)
        tables += [y, z]
        # Row-normalised |N|^-1/2 indicator matrices as CSR: one sparse matmul folds the
        # implicit sums for every user (item), ~50x faster than index_add on CPU.
        s_u, s_u_t, s_i, s_i_t = implicit_matrices(u, i, n_users, n_items)
        # Under torchrun each rank multiplies its block of rows and the blocks are gathered, so
        # the sparse products over every rating are split, not repeated on every rank.
        users_lo, users_hi = ranks.block(n_users)
        items_lo, items_hi = ranks.block(n_items)
        s_u, s_i_t = row_block(s_u, users_lo, users_hi), row_block(s_i_t, users_lo, users_hi)
        s_i, s_u_t = row_block(s_i, items_lo, items_hi), row_block(s_u_t, items_lo, items_hi)

        def by_users(product: torch.Tensor) -> torch.Tensor:
            gathered: torch.Tensor = ranks.gather_blocks(product, n_users)
            return gathered

        def by_items(product: torch.Tensor) -> torch.Tensor:
            gathered: torch.Tensor = ranks.gather_blocks(product, n_items)
            return gathered

        imp_u, imp_i = by_users(s_u @ y), by_items(s_i @ z)
        p += imp_u
        q += imp_i
    updates = _Updates(tables, config)

    n = len(fr)
    history: list[dict[str, float]] = []
    best_rmse, best_epoch, since_best = math.inf, 0, 0
    best_state = {"p": p.clone(), "q": q.clone(), "bu": bu.clone(), "bi": bi.clone()}
    bar = tqdm(range(1, config.epochs + 1), desc="rating head", disable=not progress, leave=False)
    # The implicit sums are two sparse matmuls over every rating: recomputed after every batch
    # while that is cheap (the bundled data: 40 batches an epoch, every one refreshed), and at
    # most often enough for IMPLICIT_NNZ_BUDGET rating-visits an epoch on large data (at 1M
    # ratings, refreshing every batch was 22 of an epoch's 29 s). In between, a batch reads
    # the sums as they were, its gradients for them are gathered per user (item), and at the
    # refresh they reach y (z), averaged over the batches since: a summed stale step diverged.
    # The last batch of an epoch always refreshes, so p and q are then the exported factors.
    n_batches = max(1, math.ceil(n / config.batch_size))
    refreshes = max(1, min(n_batches, IMPLICIT_NNZ_BUDGET // max(1, 2 * len(u))))
    window = math.ceil(n_batches / refreshes)
    if config.implicit:
        grad_u, grad_i = torch.zeros_like(p), torch.zeros_like(q)
        since = 0
    # The batches of the epoch under way, with the ratings per second (refreshed by tqdm at most
    # ten times a second, so it costs nothing per batch).
    batches = tqdm(
        total=n_batches, desc="  batches", unit="batch", disable=not progress, leave=False
    )
    reg, bias_reg = config.reg, config.bias_reg if config.use_biases else 0.0
    for epoch in bar:
        # One shuffle an epoch, then contiguous slices: the same batches as indexing a
        # permutation per batch, without scattered gathers a batch.
        shuffled = packed.index_select(0, torch.randperm(n, generator=g).to(device))
        total = torch.zeros((), dtype=torch.float64, device=device)
        batches.reset()
        epoch_started = time.perf_counter()
        for batch, start in enumerate(range(0, n, config.batch_size)):
            stop = min(start + config.batch_size, n)
            # Under torchrun each rank takes every world-th row of the global batch and the
            # ranks exchange their rows' gradients, so every rank applies the whole batch.
            rows = shuffled[start + ranks.rank : stop : ranks.world]
            bu_idx, bi_idx = rows[:, 0].long(), rows[:, 1].long()
            br = rows[:, 2].contiguous().view(torch.float32)
            pu, qi = p.index_select(0, bu_idx), q.index_select(0, bi_idx)
            b_u, b_i = bu.index_select(0, bu_idx), bi.index_select(0, bi_idx)
            err, g_p, g_q, g_bu, g_bi = batch_gradients(pu, qi, b_u, b_i, br, mu, reg, bias_reg)
            total += (err * err).sum(dtype=torch.float64)
            rows_u, rows_i, grads = bu_idx, bi_idx, [g_p, g_q, g_bu, g_bi]
            if ranks.active:
                (rows_u, rows_i), grads = ranks.gather_rows((rows_u, rows_i), grads, stop - start)
            g_p, g_q, g_bu, g_bi = grads
            pairs = [(p, rows_u, g_p), (q, rows_i, g_q)]
            if config.use_biases:
                pairs += [(bu, rows_u, g_bu), (bi, rows_i, g_bi)]
            updates.apply(pairs, stop - start)
            if config.implicit:
                add_rows(grad_u, rows_u, g_p)
                add_rows(grad_i, rows_i, g_q)
                since += 1
                if (batch + 1) % window == 0 or batch + 1 == n_batches:
                    updates.step_dense(y, by_items(s_u_t @ grad_u).div_(since), stop - start)
                    updates.step_dense(z, by_users(s_i_t @ grad_i).div_(since), stop - start)
                    fresh_u, fresh_i = by_users(s_u @ y), by_items(s_i @ z)
                    p += fresh_u.sub(imp_u)
                    q += fresh_i.sub(imp_i)
                    imp_u, imp_i = fresh_u, fresh_i
                    grad_u.zero_()
                    grad_i.zero_()
                    since = 0
            batches.update()
        ranks.sum_(total)
        row: dict[str, float] = {"epoch": float(epoch), "train_mse": float(total) / n}
        rate = n / max(time.perf_counter() - epoch_started, 1e-9)
        snap = {"p": p, "q": q, "bu": bu, "bi": bi}
        if len(vr):
            val = _rmse_known(snap, mu, vu, vi, vr, rating_range)
            row["val_rmse"] = val
            if val < best_rmse - 1e-5:
                best_rmse, best_epoch, since_best = val, epoch, 0
                best_state = {k: v.clone() for k, v in snap.items()}
            else:
                since_best += 1
        else:
            best_epoch = epoch
            best_state = {k: v.clone() for k, v in snap.items()}
        history.append(row)
        shown = {k: f"{v:.4f}" for k, v in row.items() if k != "epoch"}
        bar.set_postfix({**shown, "ratings/s": f"{rate:,.0f}"})
        if config.patience > 0 and len(vr) and since_best >= config.patience:
            break
    batches.close()
    bar.close()
    return RatingHead(best_state, mu, history, best_epoch)
