"""Model fitting: a biased-MF rating head (gradient descent) and an iALS ranking head.

One :func:`fit` call produces every tensor of one artifact:

* rating head, ``rating = mu + b_u + b_i + p_u . q_i`` trained on squared error by minibatch
  gradient descent (batches sliced from a ``torch.randperm`` of the row tensors, no per-sample
  Dataset), L2 on the looked-up rows, early stopping on a validation slice of the given rows.
  SVD++-style implicit terms (which items a user rated, which users rated an item) are trained
  as separate tables and *folded* into the exported ``p_u``/``q_i``, so serving stays a plain dot
  product; on the validation slice this was worth ~0.02 RMSE (0.856 -> 0.834);
* ranking head, ``score = x_u . y_i`` from implicit-feedback weighted matrix factorisation (iALS,
  Hu/Koren/Volinsky 2008) solved by alternating, batched conjugate-gradient steps over the sparse
  interactions. An RMSE-trained MF ranks poorly over the full catalogue (it never sees which items a
  user did *not* rate), which is why the ranking head is separate and trained on that signal.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from mfserve.training.config import TrainConfig
from mfserve.training.distributed import SINGLE, Ranks

DEFAULT_RATING_RANGE = (0.5, 5.0)  # MovieLens; fit() takes the data set's own
# Rating-visits an epoch may spend refreshing the rating head's implicit sums (two sparse
# matmuls over every rating a refresh, ~50M a second here): 32 refreshes an epoch at 1M ratings,
# 1 at 20M, every batch up to ~280k (the bundled data: 40 batches an epoch, all refreshed).
IMPLICIT_NNZ_BUDGET = 64_000_000


@dataclass(frozen=True)
class FitResult:
    """The serving tensors (float32, contiguous) and how training went."""

    tensors: dict[str, torch.Tensor]
    global_mean: float
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0


def _validate(config: TrainConfig) -> None:
    if config.init not in ("normal", "uniform"):
        raise ValueError(f"init must be 'normal' or 'uniform', not {config.init!r}")
    if config.optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', not {config.optimizer!r}")
    if config.rank_head not in ("ials", "none"):
        raise ValueError(f"rank_head must be 'ials' or 'none', not {config.rank_head!r}")
    if config.rank_weighting not in ("binary", "rating"):
        raise ValueError(
            f"rank_weighting must be 'binary' or 'rating', not {config.rank_weighting!r}"
        )
    if not 0.0 <= config.val_fraction < 1.0:
        raise ValueError("val_fraction must be in [0, 1)")
    if config.factors < 1 or config.epochs < 1 or config.batch_size < 1:
        raise ValueError("factors, epochs and batch_size must be >= 1")


def _init_factors(n: int, d: int, config: TrainConfig, g: torch.Generator) -> torch.Tensor:
    if config.init == "uniform":
        return torch.rand(n, d, generator=g).mul_(config.init_std)
    return torch.randn(n, d, generator=g).mul_(config.init_std)


def resolve_device(name: str, ranks: Ranks = SINGLE) -> str:
    """``auto``: a CUDA device when torch sees one, else the CPU; ``cuda`` without one is an
    error that says so. Under torchrun each rank takes the GPU of its local rank."""
    import os

    available = torch.cuda.is_available()
    if name == "cuda" and not available:
        raise ValueError("--device cuda: torch sees no CUDA device (torch.cuda.is_available())")
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device {name!r}: use auto, cpu or cuda")
    if name == "cpu" or not available:
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if ranks.active else "cuda"


def split_validation(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices ``(fit_rows, val_rows)``: a seeded random ``fraction`` of the rows held out."""
    g = torch.Generator().manual_seed(seed + 1)  # own stream: independent of the batch order
    perm = torch.randperm(n, generator=g)
    n_val = round(fraction * n)
    return perm[n_val:], perm[:n_val]


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
    with torch.no_grad():
        pred = mu + params["bu"][u] + params["bi"][i] + (params["p"][u] * params["q"][i]).sum(1)
        pred = pred.clamp(*rating_range)
        return float(torch.sqrt(torch.mean((pred - r) ** 2)))


def _csr(
    rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    """CSR from (row, col, value) triplets (any order)."""
    order = torch.argsort(rows * shape[1] + cols)
    crow = torch.zeros(shape[0] + 1, dtype=torch.long, device=rows.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=shape[0]), 0)
    with warnings.catch_warnings():  # "CSR support is in beta": the ops used here are stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            crow, cols[order], vals[order], shape, check_invariants=False
        )


def _normalised_csr(
    rows: torch.Tensor, cols: torch.Tensor, n_rows: int, n_cols: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR ``[n_rows, n_cols]`` with ``1/sqrt(row count)`` at each distinct (row, col) pair, and
    its transpose."""
    codes = torch.unique(rows * n_cols + cols)  # duplicates counted once
    r, c = codes // n_cols, codes % n_cols
    vals = torch.bincount(r, minlength=n_rows).clamp_min(1).float().rsqrt()[r]
    return _csr(r, c, vals, (n_rows, n_cols)), _csr(c, r, vals, (n_cols, n_rows))


def _fit_rating_head(
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
) -> tuple[dict[str, torch.Tensor], float, list[dict[str, float]], int]:
    g = torch.Generator().manual_seed(config.seed)
    device = r.device  # random draws on the CPU generator (the same on every device), then moved
    if config.val_fraction > 0:
        fit_rows, val_rows = split_validation(len(r), config.val_fraction, config.seed)
    else:
        fit_rows, val_rows = torch.arange(len(r)), torch.zeros(0, dtype=torch.long)
    fit_rows, val_rows = fit_rows.to(device), val_rows.to(device)
    fu, fi, fr = u[fit_rows], i[fit_rows], r[fit_rows]
    vu, vi, vr = u[val_rows], i[val_rows], r[val_rows]
    # The global mean is a constant, not a parameter: biases absorb the rest.
    mu = float(fr.mean()) if config.use_biases else 0.0

    p = _init_factors(n_users, config.factors, config, g).to(device).requires_grad_()
    q = _init_factors(n_items, config.factors, config, g).to(device).requires_grad_()
    bu = torch.zeros(n_users, device=device, requires_grad=config.use_biases)
    bi = torch.zeros(n_items, device=device, requires_grad=config.use_biases)
    params = {"p": p, "q": q, "bu": bu, "bi": bi}
    trainable = [p, q] + ([bu, bi] if config.use_biases else [])
    if config.implicit:
        # Implicit-feedback factors: which items a user rated (all given rows, values unused).
        y = torch.randn(n_items, config.factors, generator=g).mul_(config.init_std)
        z = torch.randn(n_users, config.factors, generator=g).mul_(config.init_std)
        y, z = y.to(device).requires_grad_(), z.to(device).requires_grad_()
        trainable += [y, z]
        # Row-normalised |N|^-1/2 indicator matrices as CSR: one sparse matmul folds the
        # implicit sums for every user (item) per step, ~50x faster than index_add on CPU.
        s_u, s_u_t = _normalised_csr(u, i, n_users, n_items)
        s_i, s_i_t = _normalised_csr(i, u, n_items, n_users)

    def implicit_sums() -> tuple[torch.Tensor, torch.Tensor]:
        """Every user's (item's) implicit term, ``S_u @ y`` (``S_i @ z``)."""
        with torch.no_grad():
            return s_u @ y, s_i @ z

    def effective() -> tuple[torch.Tensor, torch.Tensor]:
        if not config.implicit:
            return p, q
        imp_u, imp_i = implicit_sums()
        return p.detach() + imp_u, q.detach() + imp_i

    # SGD takes sparse gradients: a step then touches the rows a batch looked up, not the
    # whole tables (at 160k users x 32 factors a dense step moved ~100 MB per batch).
    sparse = config.optimizer == "sgd"

    def rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(index, table, sparse=sparse)

    opt: torch.optim.Optimizer
    if config.optimizer == "adam":
        opt = torch.optim.Adam(trainable, lr=config.lr)
    else:
        # Plain SGD on the *summed* batch loss: lr is then the classic per-rating SGD-MF rate.
        opt = torch.optim.SGD(trainable, lr=config.lr)
    loss_scale = float(config.batch_size) if config.optimizer == "sgd" else 1.0

    n = len(fr)
    history: list[dict[str, float]] = []
    best_rmse, best_epoch, since_best = math.inf, 0, 0
    best_state = {k: v.detach().clone() for k, v in params.items()}
    bar = tqdm(range(1, config.epochs + 1), desc="rating head", disable=not progress, leave=False)
    # The implicit sums are two sparse matmuls over every rating: recomputed after every batch
    # while that is cheap (the bundled data: 40 batches an epoch, every one refreshed), and at
    # most often enough for IMPLICIT_NNZ_BUDGET rating-visits an epoch on large data (at 1M
    # ratings, refreshing every batch was 22 of an epoch's 29 s). In between, a batch reads
    # the sums as they were, its gradients for them are gathered per user (item), and at the
    # refresh they reach y (z), averaged over the batches since: a summed stale step diverged.
    n_batches = max(1, math.ceil(n / config.batch_size))
    refreshes = max(1, min(n_batches, IMPLICIT_NNZ_BUDGET // max(1, 2 * len(u))))
    window = math.ceil(n_batches / refreshes)
    if config.implicit:
        imp_u, imp_i = implicit_sums()
        grad_u, grad_i = torch.zeros_like(imp_u), torch.zeros_like(imp_i)
        since = 0
    # The batches of the epoch under way, with the ratings per second (refreshed by tqdm at most
    # ten times a second, so it costs nothing per batch).
    batches = tqdm(
        total=n_batches, desc="  batches", unit="batch", disable=not progress, leave=False
    )
    for epoch in bar:
        perm = torch.randperm(n, generator=g).to(device)
        total = 0.0
        batches.reset()
        epoch_started = time.perf_counter()
        for batch, start in enumerate(range(0, n, config.batch_size)):
            idx = perm[start : start + config.batch_size]
            # With several ranks every loss term is this rank's share of the global batch (its
            # sum over the batch's size), so the ranks' gradients sum to the single-process one;
            # one process keeps torch.mean, bit for bit the recipe's tensors.
            size = len(idx)
            if ranks.active:
                idx = idx[ranks.rank :: ranks.world]

            def batch_mean(values: torch.Tensor, size: int = size) -> torch.Tensor:
                return values.sum() / size if ranks.active else torch.mean(values)

            bu_idx, bi_idx, br = fu[idx], fi[idx], fr[idx]
            pu, qi = rows(p, bu_idx), rows(q, bi_idx)
            if config.implicit:
                iu = imp_u[bu_idx].requires_grad_()
                iq = imp_i[bi_idx].requires_grad_()
                pu, qi = pu + iu, qi + iq
            pred = mu + bu[bu_idx] + bi[bi_idx] + (pu * qi).sum(1)
            mse = batch_mean((pred - br) ** 2)
            # L2 on the looked-up rows only: frequent users/items are regularised per rating,
            # which is the classic SGD-MF objective written as a batch mean.
            loss = mse + config.reg * batch_mean((pu * pu).sum(1) + (qi * qi).sum(1))
            if config.use_biases and config.bias_reg > 0:
                loss = loss + config.bias_reg * batch_mean(bu[bu_idx] ** 2 + bi[bi_idx] ** 2)
            opt.zero_grad(set_to_none=True)
            (loss * loss_scale).backward()
            if ranks.active:
                for table in trainable:
                    if table is not y and table is not z:  # y, z: summed at the refresh
                        table.grad = ranks.sum_grad(table.grad, table)
            refresh = False
            if config.implicit:
                assert iu.grad is not None and iq.grad is not None
                grad_u.index_add_(0, bu_idx, iu.grad)
                grad_i.index_add_(0, bi_idx, iq.grad)
                since += 1
                refresh = (batch + 1) % window == 0 or batch + 1 == n_batches
                if refresh:
                    ranks.sum_(grad_u)
                    ranks.sum_(grad_i)
                    y.grad = (s_u_t @ grad_u).div_(since)
                    z.grad = (s_i_t @ grad_i).div_(since)
            opt.step()
            if refresh:
                imp_u, imp_i = implicit_sums()
                grad_u.zero_()
                grad_i.zero_()
                since = 0
            total += float(mse.detach()) * size
            batches.update()
        if ranks.active:
            summed = ranks.sum_(torch.tensor([total], dtype=torch.float64, device=device))
            total = float(summed.item())
        row: dict[str, float] = {"epoch": float(epoch), "train_mse": total / n}
        rate = n / max(time.perf_counter() - epoch_started, 1e-9)
        with torch.no_grad():
            pe, qe = effective()
        snap = {"p": pe, "q": qe, "bu": bu, "bi": bi}
        if len(vr):
            val = _rmse_known(snap, mu, vu, vi, vr, rating_range)
            row["val_rmse"] = val
            if val < best_rmse - 1e-5:
                best_rmse, best_epoch, since_best = val, epoch, 0
                best_state = {k: v.detach().clone() for k, v in snap.items()}
            else:
                since_best += 1
        else:
            best_epoch = epoch
            best_state = {k: v.detach().clone() for k, v in snap.items()}
        history.append(row)
        shown = {k: f"{v:.4f}" for k, v in row.items() if k != "epoch"}
        bar.set_postfix({**shown, "ratings/s": f"{rate:,.0f}"})
        if config.patience > 0 and len(vr) and since_best >= config.patience:
            break
    batches.close()
    bar.close()
    return best_state, mu, history, best_epoch


def _with_values(pattern: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The CSR ``pattern`` carrying ``values`` (in its own order)."""
    with warnings.catch_warnings():  # "CSR support is in beta": the ops used here are stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            pattern.crow_indices(),
            pattern.col_indices(),
            values,
            pattern.shape,
            check_invariants=False,
        )


def _observed_scores(pattern: torch.Tensor, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``x[a] . other[b]`` for every stored (a, b) of ``pattern``, in its order (an SDDMM: no
    [nnz, d] temporary, which at 20M ratings x 64 factors would be 5 GB)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        scores: torch.Tensor = torch.sparse.sampled_addmm(pattern, x, other.T, beta=0.0).values()
    return scores


def _cg_solve(
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
        scores = _observed_scores(conf_minus_1, v, other) * weights
        return torch.addmm(v @ gram, _with_values(conf_minus_1, scores), other)

    b = _with_values(conf_minus_1, weights + 1.0) @ other
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


def _fit_ials(
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
    by_user = _csr(u, i, conf_minus_1, (n_users, n_items))
    by_item = _csr(i, u, conf_minus_1, (n_items, n_users))
    weights = by_user.values()
    # Each rank solves its block of users (items); CG is per row, so the blocks, gathered, are
    # the single-process sweep.
    users_lo, users_hi = ranks.block(n_users)
    items_lo, items_hi = ranks.block(n_items)
    mine_u = (u >= users_lo) & (u < users_hi)
    mine_i = (i >= items_lo) & (i < items_hi)
    block_u = _csr(
        u[mine_u] - users_lo, i[mine_u], conf_minus_1[mine_u], (users_hi - users_lo, n_items)
    )
    block_i = _csr(
        i[mine_i] - items_lo, u[mine_i], conf_minus_1[mine_i], (items_hi - items_lo, n_users)
    )
    losses: list[float] = []
    bar = tqdm(range(config.rank_iters), desc="ranking head", disable=not progress, leave=False)
    for _ in bar:
        if ranks.active:
            x_block = _cg_solve(x[users_lo:users_hi], y, conf_minus_1=block_u, reg=reg, steps=steps)
            x = ranks.gather_blocks(x_block, n_users)
            y_block = _cg_solve(y[items_lo:items_hi], x, conf_minus_1=block_i, reg=reg, steps=steps)
            y = ranks.gather_blocks(y_block, n_items)
        else:
            x = _cg_solve(x, y, conf_minus_1=by_user, reg=reg, steps=steps)
            y = _cg_solve(y, x, conf_minus_1=by_item, reg=reg, steps=steps)
        # Weighted implicit loss without the dense U x I matrix: the all-zeros part is
        # tr(X^T X Y^T Y), the observed part corrects it per interaction.
        pred = _observed_scores(by_user, x, y)
        loss = (
            float(((x.T @ x) * (y.T @ y)).sum())
            + float(((1.0 + weights) * (1.0 - pred) ** 2 - pred**2).sum())
            + config.rank_reg * float((x * x).sum() + (y * y).sum())
        ) / max(len(r), 1)
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.4f}")
    bar.close()
    return x, y, losses


def fit(
    users: np.ndarray,
    items: np.ndarray,
    ratings: np.ndarray,
    n_users: int,
    n_items: int,
    config: TrainConfig | None = None,
    *,
    progress: bool = True,
    rating_range: tuple[float, float] = DEFAULT_RATING_RANGE,
    ranks: Ranks = SINGLE,
    device: str | torch.device = "cpu",
) -> FitResult:
    """Train both heads on encoded ``(users, items, ratings)`` rows; deterministic for a seed.
    ``ranks``: this process's share of a torchrun job (:mod:`mfserve.training.distributed`);
    ``device``: where the tensors live (``resolve_device``); the saved tensors are on the CPU.

    The rating head trains on the rows minus a ``val_fraction`` validation slice and keeps the
    epoch with the best validation RMSE; the ranking head uses every given row.
    """
    config = config or TrainConfig()
    _validate(config)
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    u = torch.as_tensor(np.asarray(users, dtype=np.int64)).to(device)
    i = torch.as_tensor(np.asarray(items, dtype=np.int64)).to(device)
    r = torch.as_tensor(np.asarray(ratings, dtype=np.float32)).to(device)
    if not (len(u) == len(i) == len(r)) or len(r) == 0:
        raise ValueError("users, items and ratings must be non-empty and of equal length")

    # Gradient scatter (index_put with accumulate) is parallel and order-dependent on CPU by
    # default; deterministic mode sorts first, so the same seed gives bit-identical tensors.
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    # CUDA lacks deterministic kernels for some of these ops: there, warn rather than refuse.
    torch.use_deterministic_algorithms(True, warn_only=u.device.type != "cpu")
    try:
        state, mu, history, best_epoch = _fit_rating_head(
            u,
            i,
            r,
            n_users=n_users,
            n_items=n_items,
            config=config,
            progress=progress,
            rating_range=rating_range,
            ranks=ranks,
        )
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    tensors: dict[str, torch.Tensor] = {
        "user_factors": state["p"],
        "item_factors": state["q"],
        "user_bias": state["bu"],
        "item_bias": state["bi"],
    }
    if config.rank_head == "ials":
        x, y, losses = _fit_ials(
            u,
            i,
            r,
            n_users=n_users,
            n_items=n_items,
            config=config,
            progress=progress,
            rating_range=rating_range,
            ranks=ranks,
        )
        tensors["rank_user_factors"] = x
        tensors["rank_item_factors"] = y
        # Rating epochs first, then one row per iALS sweep (distinguished by "rank_iter").
        history += [{"rank_iter": float(k + 1), "rank_loss": v} for k, v in enumerate(losses)]
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    return FitResult(
        tensors=tensors,
        global_mean=mu,
        history=history,
        best_epoch=best_epoch,
        seconds=time.perf_counter() - start,
    )
