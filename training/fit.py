"""Model fitting: both heads of one artifact from encoded ``(user, item, rating)`` rows.

* the rating head (:mod:`mfserve.training.rating_head`): ``mu + b_u + b_i + p_u . q_i`` by
  minibatch SGD on squared error, with SVD++-style implicit terms folded into the factors;
* the ranking head (:mod:`mfserve.training.ials`): ``x_u . y_i`` by implicit-feedback weighted
  MF (iALS).

This module holds what both share: the device, determinism, validation of the recipe and the
float32 CPU tensors an artifact stores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from mfserve.training.config import TrainConfig
from mfserve.training.distributed import SINGLE, Ranks
from mfserve.training.ials import fit_ials
from mfserve.training.rating_head import fit_rating_head

DEFAULT_RATING_RANGE = (0.5, 5.0)  # MovieLens; fit() takes the data set's own


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

    # Deterministic mode makes the scatter-adds and sorts of both heads order-independent, so
    # the same seed gives bit-identical tensors.
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    # CUDA lacks deterministic kernels for some of these ops: there, warn rather than refuse.
    torch.use_deterministic_algorithms(True, warn_only=u.device.type != "cpu")
    try:
        head = fit_rating_head(
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
    history = list(head.history)
    tensors: dict[str, torch.Tensor] = {
        "user_factors": head.state["p"],
        "item_factors": head.state["q"],
        "user_bias": head.state["bu"],
        "item_bias": head.state["bi"],
    }
    if config.rank_head == "ials":
        x, y, losses = fit_ials(
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
        global_mean=head.global_mean,
        history=history,
        best_epoch=head.best_epoch,
        seconds=time.perf_counter() - start,
    )
