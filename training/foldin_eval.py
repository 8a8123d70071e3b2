"""How good is fold-in? Users held out of training, folded in from their own ratings.

The protocol, on top of the fixed 80/20 row split of :mod:`mfserve.training.evaluate`:

* 20% of the users with a training row (a seeded draw) are held out: a second model is trained on
  the training rows of the other users only, with the same recipe.
* Each held-out user is folded into that model from their training rows (item and rating, as a
  client would send them) and scored on their test rows: RMSE, and NDCG@10 over the full
  catalogue with their training items excluded.
* The same users are scored in the model trained normally (on every training row), and by
  popularity in the second model's training data.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from mfserve.training.artifact import ModelArtifact
from mfserve.training.config import TrainConfig
from mfserve.training.evaluate import (
    RELEVANT_THRESHOLD,
    TEST_FRACTION,
    Csr,
    ProtocolData,
    prepare_protocol,
    ranking_metrics,
    rating_metrics,
)
from mfserve.training.fit import FitResult, fit
from mfserve.training.foldin import UserEvidence
from mfserve.training.recommender import Recommender
from mfserve.training.scoring import RankRequest

HELD_OUT_USERS = 0.2
USER_SEED = 7


def recipe_of(artifact: ModelArtifact) -> TrainConfig:
    """The recipe a model was trained with, from its manifest (defaults for what it lacks)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    params = {k: v for k, v in artifact.hyperparameters.items() if k in names}
    return TrainConfig(**params)


def _held_out_users(protocol: ProtocolData, fraction: float, seed: int) -> np.ndarray:
    users = np.unique(protocol.train_users)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(users, size=max(1, int(len(users) * fraction)), replace=False))


def _scores(
    recommender: Recommender,
    protocol: ProtocolData,
    users: np.ndarray,
    k: int,
    evidence: list[UserEvidence] | None = None,
    *,
    cold: bool = False,
) -> dict[str, float]:
    """RMSE over ``users``' test rows and NDCG@k over those with a relevant test item, in
    ``recommender``. ``users`` are ``protocol`` codes: the model's own users when ``evidence`` is
    None, else folded in from it (one per user); ``cold``: as users the model knows nothing of,
    the cold-start answer (bias-only ratings, popularity), with the evidence's items excluded."""
    user_rows = recommender.user_rows(protocol.users.classes)
    item_rows = recommender.item_rows(protocol.items.classes)
    position = {int(u): n for n, u in enumerate(users)}
    test = np.flatnonzero(np.isin(protocol.test_users, users))
    test_items = protocol.test_items[test]
    mapped_items = np.where(test_items >= 0, item_rows[np.maximum(test_items, 0)], -1)
    if evidence is None:
        predicted = recommender.predict_rows(user_rows[protocol.test_users[test]], mapped_items)
    elif cold:
        predicted = recommender.predict_rows(np.full(len(test), -1, np.int64), mapped_items)
    else:
        predicted = np.empty(len(test), np.float32)
        owner = np.array([position[int(u)] for u in protocol.test_users[test]], dtype=np.int64)
        for n, user_evidence in enumerate(evidence):
            mine = np.flatnonzero(owner == n)
            if mine.size:
                predicted[mine] = recommender.fold_in.predict(user_evidence, mapped_items[mine])
    metrics: dict[str, float] = rating_metrics(
        predicted.astype(np.float64), protocol.test_ratings[test], recommender.rating_range
    )

    relevant_mask = (protocol.test_ratings[test] >= RELEVANT_THRESHOLD) & (mapped_items >= 0)
    owners = protocol.test_users[test][relevant_mask]
    ranked_users = np.unique(owners)
    relevant = Csr.from_pairs(
        np.searchsorted(ranked_users, owners), mapped_items[relevant_mask], len(ranked_users)
    )
    if evidence is None:
        lists = recommender.top_k_lists(user_rows[ranked_users].tolist(), k)
    else:
        chosen = [evidence[position[int(u)]] for u in ranked_users]
        if cold:
            requests = [RankRequest(exclude=torch.from_numpy(e.items)) for e in chosen]
            lists = recommender.top_k_lists([-1] * len(chosen), k, requests)
        else:
            lists = recommender.top_k_folded(chosen, k)
    top = np.full((len(lists), k), recommender.n_items, dtype=np.int64)
    for row, (items, _) in enumerate(lists):
        top[row, : len(items)] = items
    ranking = ranking_metrics(top, relevant, k, recommender.n_items)
    metrics[f"ndcg_at_{k}"] = ranking["ndcg"]
    metrics["users"] = float(len(users))
    metrics["ranked_users"] = float(len(ranked_users))
    return metrics


def _artifact(
    data: ProtocolData, result: FitResult, config: TrainConfig, rating_range: tuple[float, float]
) -> ModelArtifact:
    seen = data.train_by_user
    return ModelArtifact(
        tensors=result.tensors,
        user_ids=data.users.to_list(),
        item_ids=data.items.to_list(),
        global_mean=float(result.global_mean),
        rating_range=rating_range,
        seen_indptr=torch.from_numpy(seen.indptr.astype(np.int64)),
        seen_indices=torch.from_numpy(seen.indices.astype(np.int64)),
        item_popularity=torch.from_numpy(
            np.bincount(data.train_items, minlength=data.n_items).astype(np.int64)
        ),
        hyperparameters=dataclasses.asdict(config),
    )


def evaluate_fold_in(
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    ratings: np.ndarray,
    trained: ModelArtifact,
    *,
    rating_range: tuple[float, float],
    holdout: float = TEST_FRACTION,
    split_seed: int = 42,
    k: int = 10,
    fraction: float = HELD_OUT_USERS,
    seed: int = USER_SEED,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """The protocol (module doc) for ``trained``, a model fitted on the 80% part of these rows
    (in file order). Returns ``{"trained", "folded_in", "popularity"}``, each with ``rmse`` and
    ``ndcg_at_K`` over the same held-out users."""
    protocol = prepare_protocol(user_ids, item_ids, ratings, seed=split_seed, test_fraction=holdout)
    held_out = _held_out_users(protocol, fraction, seed)
    keep = ~np.isin(protocol.train_users, held_out)
    user_names = np.array(protocol.users.classes, dtype=object)
    item_names = np.array(protocol.items.classes, dtype=object)
    rest = prepare_protocol(
        user_names[protocol.train_users[keep]],
        item_names[protocol.train_items[keep]],
        protocol.train_ratings[keep],
        test_fraction=0.0,
    )
    config = recipe_of(trained)
    result = fit(
        rest.train_users,
        rest.train_items,
        rest.train_ratings,
        rest.n_users,
        rest.n_items,
        config,
        progress=progress,
        rating_range=rating_range,
    )
    without = Recommender(_artifact(rest, result, config, rating_range))

    rest_items = without.item_rows(protocol.items.classes)
    evidence = []
    for user in held_out:
        mine = np.flatnonzero(protocol.train_users == user)
        items = rest_items[protocol.train_items[mine]]
        evidence.append(UserEvidence.of(-1, items, protocol.train_ratings[mine]))
    return {
        "trained": _scores(Recommender(trained), protocol, held_out, k),
        "folded_in": _scores(without, protocol, held_out, k, evidence),
        "popularity": _scores(without, protocol, held_out, k, evidence, cold=True),
    }
