"""Training and evaluation end to end: ratings in, a validated artifact and its metrics out.

The split is the evaluation protocol's (``mfserve.training.evaluate``), recorded in the manifest,
so ``mfserve evaluate`` rebuilds exactly the test part a model never saw, and measures it through
the same ``Recommender`` the server answers with.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mfserve.training.artifact import (
    ArtifactWriteError,
    ModelArtifact,
    check_writable,
    load_artifact,
    save_artifact,
)
from mfserve.training.config import TrainConfig
from mfserve.training.data import RatingsData, load_ratings
from mfserve.training.distributed import SINGLE, Ranks
from mfserve.training.evaluate import (
    ProtocolData,
    evaluate_baselines,
    evaluate_recommender,
    prepare_protocol,
)
from mfserve.training.fit import FitResult, fit
from mfserve.training.recommender import Recommender

BUNDLED_SOURCE = "bundled:ml-latest-small"
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)


def protocol_for(data: RatingsData, holdout: float, split_seed: int) -> ProtocolData:
    frame = data.ratings
    return prepare_protocol(
        frame["user"].array,
        frame["item"].array,
        frame["rating"].to_numpy(dtype=np.float32),
        seed=split_seed,
        test_fraction=holdout,
    )


def assemble_artifact(
    protocol: ProtocolData, result: FitResult, data: RatingsData, config: TrainConfig
) -> ModelArtifact:
    """The artifact for a fit on ``protocol``'s train part: tensors, id lists, seen items, metadata."""
    seen = protocol.train_by_user
    titles, genres = _item_metadata(data, protocol.items.classes)
    return ModelArtifact(
        tensors=result.tensors,
        user_ids=protocol.users.to_list(),
        item_ids=protocol.items.to_list(),
        global_mean=float(result.global_mean),
        rating_range=data.rating_range,
        seen_indptr=torch.from_numpy(seen.indptr.astype(np.int64)),
        seen_indices=torch.from_numpy(seen.indices.astype(np.int64)),
        item_popularity=torch.from_numpy(
            np.bincount(protocol.train_items, minlength=protocol.n_items).astype(np.int64)
        ),
        item_titles=titles,
        item_genres=genres,
        hyperparameters={**dataclasses.asdict(config), "best_epoch": result.best_epoch},
    )


def _item_metadata(
    data: RatingsData, item_ids: list[str]
) -> tuple[list[str | None] | None, list[list[str] | None] | None]:
    if data.items is None:
        return None, None
    meta = data.items.drop_duplicates("item").set_index("item")
    titles = meta["title"].reindex(item_ids)
    genres = meta["genres"].reindex(item_ids)
    return (
        [t if isinstance(t, str) else None for t in titles],
        [list(g) if isinstance(g, list) else None for g in genres],
    )


def train_and_save(
    out: str | Path,
    *,
    source: str | Path | None = None,
    config: TrainConfig | None = None,
    holdout: float = 0.2,
    split_seed: int = 42,
    load_options: dict[str, Any] | None = None,
    progress: bool = True,
    ranks: Ranks = SINGLE,
    device: str = "cpu",
) -> tuple[Path | None, dict[str, float]]:
    """Load, split, fit, evaluate on the held-out part, and save the next version under ``out``.

    Nothing is written until training and evaluation have succeeded; a folder that cannot be
    written (read-only, a file in the way) is an ``ArtifactWriteError`` before training starts.
    Under torchrun (``ranks``) every rank trains its share and only rank 0 evaluates and writes:
    the others return ``(None, {})``.
    """
    config = config or TrainConfig()
    problem: ArtifactWriteError | None = None
    if ranks.writes:
        try:
            check_writable(out)
        except ArtifactWriteError as exc:
            problem = exc
    if not ranks.agree(problem is None):
        if problem is not None:
            raise problem
        return None, {}
    data = load_ratings(source, progress=progress and ranks.writes, **(load_options or {}))
    protocol = protocol_for(data, holdout, split_seed)
    result = fit(
        protocol.train_users,
        protocol.train_items,
        protocol.train_ratings,
        protocol.n_users,
        protocol.n_items,
        config,
        progress=progress and ranks.writes,
        rating_range=data.rating_range,
        ranks=ranks,
        device=device,
    )
    if not ranks.writes:
        return None, {}
    artifact = assemble_artifact(protocol, result, data, config)
    metrics: dict[str, float] = {"train_seconds": round(result.seconds, 3)}
    if len(protocol.test_ratings):
        metrics.update(evaluate_recommender(protocol, Recommender(artifact)))
    dataset = {
        "source": _recorded_source(source),
        "fingerprint": data.fingerprint,
        "rows": len(data.ratings),
        "holdout": holdout,
        "split_seed": split_seed,
        "load_options": {
            k: list(v) if isinstance(v, tuple) else v for k, v in (load_options or {}).items()
        },
    }
    artifact = dataclasses.replace(artifact, metrics=metrics, dataset=dataset)
    return save_artifact(out, artifact), metrics


def _recorded_source(source: str | Path | None) -> str:
    """The source as ``evaluate_saved`` can find it again: a local path is made absolute, so
    ``mfserve evaluate`` works from any folder, not only the one training ran in."""
    if source is None:
        return BUNDLED_SOURCE
    text = str(source)
    if _SCHEME.match(text):  # a URL: reloaded (from the cache) by address
        return text
    return str(Path(text).expanduser().resolve())


def evaluate_saved(
    model: str | Path, *, source: str | Path | None = None
) -> dict[str, dict[str, float]]:
    """Re-measure a saved model on the test part of the data it was trained on, with baselines.

    The data is reloaded from the source recorded in the manifest (or ``source``) and its sha256
    must match, so a changed file is an error rather than a silently different figure.
    Returns ``{"model": ..., "global_mean": ..., "popularity": ...}``.
    """
    artifact = load_artifact(model)
    data, holdout, split_seed = _recorded_data(artifact, source)
    protocol = protocol_for(data, holdout, split_seed)
    return {
        "model": evaluate_recommender(protocol, Recommender(artifact)),
        **evaluate_baselines(protocol),
    }


def evaluate_fold_in_saved(
    model: str | Path, *, source: str | Path | None = None, progress: bool = False
) -> dict[str, dict[str, float]]:
    """The fold-in protocol (:mod:`mfserve.training.foldin_eval`) for a saved model: its recipe
    trained again without 20% of the users, who are then folded in from their training ratings.
    Returns ``{"trained", "folded_in", "popularity"}`` over those users."""
    from mfserve.training.foldin_eval import evaluate_fold_in

    artifact = load_artifact(model)
    data, holdout, split_seed = _recorded_data(artifact, source)
    frame = data.ratings
    report: dict[str, dict[str, float]] = evaluate_fold_in(
        frame["user"].to_numpy(dtype=object),
        frame["item"].to_numpy(dtype=object),
        frame["rating"].to_numpy(dtype=np.float32),
        artifact,
        rating_range=data.rating_range,
        holdout=holdout,
        split_seed=split_seed,
        progress=progress,
    )
    return report


def _recorded_data(
    artifact: ModelArtifact, source: str | Path | None
) -> tuple[RatingsData, float, int]:
    """The data a model was trained on (checked by sha256), its holdout and split seed."""
    dataset = artifact.dataset
    recorded = str(dataset.get("source", BUNDLED_SOURCE))
    location = source if source is not None else (None if recorded == BUNDLED_SOURCE else recorded)
    options = dict(dataset.get("load_options", {}))
    if "rating_range" in options:
        options["rating_range"] = tuple(options["rating_range"])
    data = load_ratings(location, progress=False, **options)
    if dataset.get("fingerprint") and data.fingerprint != dataset["fingerprint"]:
        raise ValueError(
            f"{data.source}: sha256 {data.fingerprint} differs from the data the model was trained "
            f"on ({dataset['fingerprint']})"
        )
    holdout = float(dataset.get("holdout", 0.2))
    if holdout <= 0:
        raise ValueError(
            f"{artifact.path}: trained on every row (holdout 0); there is no test part"
        )
    return data, holdout, int(dataset.get("split_seed", 42))
