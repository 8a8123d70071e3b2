"""Fold-in on tiny synthetic models: the solves against independent formulations of the same
problems, a known user's vectors kept when nothing is added, and ranking through the exact path."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from mfserve.training.artifact import ModelArtifact
from mfserve.training.foldin import FoldIn, UserEvidence
from mfserve.training.recommender import Recommender
from mfserve.training.scoring import RankRequest
from mfserve.training.synthetic import synthetic_artifact

PARAMS = {
    "reg": 0.05,
    "bias_reg": 0.02,
    "rank_alpha": 4.0,
    "rank_reg": 2.0,
    "rank_weighting": "rating",
}


@pytest.fixture(scope="module")
def artifact() -> ModelArtifact:
    base = synthetic_artifact(40, 30, 6, clusters=3, seen_per_user=4, seed=3)
    rng = np.random.default_rng(0)
    tensors = dict(base.tensors)
    tensors["user_bias"] = torch.from_numpy(rng.normal(0, 0.3, 40).astype(np.float32))
    tensors["item_bias"] = torch.from_numpy(rng.normal(0, 0.3, 30).astype(np.float32))
    return dataclasses.replace(
        base,
        tensors=tensors,
        global_mean=3.4,
        rating_range=(0.5, 5.0),
        hyperparameters=PARAMS,
    )


def rated(items: list[int], seed: int = 1) -> UserEvidence:
    ratings = np.random.default_rng(seed).uniform(0.5, 5.0, len(items)).astype(np.float32)
    return UserEvidence.of(-1, items, ratings)


def test_evidence_drops_unknown_items_and_keeps_the_last_entry_of_an_item() -> None:
    evidence = UserEvidence.of(-1, [4, -1, 7, 4], [1.0, 2.0, 3.0, 5.0], [1.0, 1.0, 2.0, 0.5])
    order = np.argsort(evidence.items)
    assert evidence.items[order].tolist() == [4, 7]
    assert evidence.ratings[order].tolist() == [5.0, 3.0]
    assert evidence.weights[order].tolist() == [0.5, 2.0]


def test_rating_fold_in_minimises_the_training_objective(artifact: ModelArtifact) -> None:
    # The objective written out, and its gradient by finite differences, at the solution.
    fold = FoldIn(artifact)
    evidence = UserEvidence.of(-1, [1, 5, 9, 12], [4.0, 2.5, 5.0, 1.0], [1.0, 2.0, 1.0, 0.5])
    factors, biases = fold.rating_params([evidence])
    q = artifact.tensors["item_factors"].double().numpy()[evidence.items]
    bi = artifact.tensors["item_bias"].double().numpy()[evidence.items]
    w, r = evidence.weights.astype(np.float64), evidence.ratings.astype(np.float64)

    def objective(theta: np.ndarray) -> float:
        x, b = theta[:-1], theta[-1]
        err = r - (3.4 + bi + b + q @ x)
        return float((w * err**2).sum() + w.sum() * (0.05 * x @ x + 0.02 * b * b))

    theta = np.append(factors[0], biases[0]).astype(np.float64)
    step = 1e-4
    for axis in range(theta.size):
        bump = np.zeros_like(theta)
        bump[axis] = step
        slope = (objective(theta + bump) - objective(theta - bump)) / (2 * step)
        assert abs(slope) < 1e-2, (axis, slope)
    assert objective(theta) < objective(theta * 0.9) and objective(theta) < objective(theta * 1.1)


def test_ranking_fold_in_is_the_dense_ials_solution(artifact: ModelArtifact) -> None:
    # iALS over the whole confidence matrix: C = 1 + alpha * rating / 5 where interacted, else 1.
    fold = FoldIn(artifact)
    evidence = rated([0, 3, 8, 20, 29])
    queries, offsets = fold.ranking_queries([evidence])
    assert offsets is None
    y = artifact.tensors["rank_item_factors"].double().numpy()
    confidence = np.ones(y.shape[0])
    preference = np.zeros(y.shape[0])
    confidence[evidence.items] += 4.0 * evidence.ratings / 5.0
    preference[evidence.items] = 1.0
    lhs = (y.T * confidence) @ y + 2.0 * np.eye(y.shape[1])
    expected = np.linalg.solve(lhs, (y.T * confidence) @ preference)
    np.testing.assert_allclose(queries[0], expected, rtol=1e-4, atol=1e-5)


def test_a_known_user_with_nothing_added_keeps_the_trained_vectors(
    artifact: ModelArtifact,
) -> None:
    fold = FoldIn(artifact)
    evidence = [UserEvidence.of(user, []) for user in (0, 17, 39)]
    queries, _ = fold.ranking_queries(evidence)
    factors, biases = fold.rating_params(evidence)
    rows = [0, 17, 39]
    np.testing.assert_allclose(
        queries, artifact.tensors["rank_user_factors"].numpy()[rows], rtol=1e-4, atol=1e-5
    )
    np.testing.assert_array_equal(factors, artifact.tensors["user_factors"].numpy()[rows])
    np.testing.assert_array_equal(biases, artifact.tensors["user_bias"].numpy()[rows])


def test_adding_ratings_to_a_known_user_equals_solving_from_all_of_them(
    artifact: ModelArtifact,
) -> None:
    # Make user 5's trained vector the solution of its own training ratings; then adding new
    # ratings must give what a new user with the old and the new ratings together gets.
    user = 5
    seen = artifact.seen_indices[artifact.seen_indptr[user] : artifact.seen_indptr[user + 1]]
    old = rated(seen.tolist(), seed=2)
    theta, bias = FoldIn(artifact).rating_params([old])
    tensors = dict(artifact.tensors)
    tensors["user_factors"] = tensors["user_factors"].clone()
    tensors["user_bias"] = tensors["user_bias"].clone()
    tensors["user_factors"][user] = torch.from_numpy(theta[0])
    tensors["user_bias"][user] = float(bias[0])
    fold = FoldIn(dataclasses.replace(artifact, tensors=tensors))

    new_items = [i for i in (2, 11, 23) if i not in set(seen.tolist())]
    new = rated(new_items, seed=3)
    added = fold.rating_params([dataclasses.replace(new, user=user)])
    together = UserEvidence.of(
        -1,
        np.concatenate([old.items, new.items]),
        np.concatenate([old.ratings, new.ratings]),
    )
    # The old ratings are weighed 1 each, like training's rows.
    expected = fold.rating_params([together])
    np.testing.assert_allclose(added[0], expected[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(added[1], expected[1], rtol=1e-4, atol=1e-5)


def test_unrated_interactions_leave_the_rating_head_at_the_cold_start_estimate(
    artifact: ModelArtifact,
) -> None:
    fold = FoldIn(artifact)
    evidence = UserEvidence.of(-1, [1, 2, 3])
    items = np.array([0, 4, -1])
    got = fold.predict(evidence, items)
    bias = artifact.tensors["item_bias"].numpy()
    np.testing.assert_allclose(got, [3.4 + bias[0], 3.4 + bias[4], 3.4], rtol=1e-6)


def test_folded_in_top_k_excludes_the_interactions_and_matches_a_dense_ranking(
    artifact: ModelArtifact,
) -> None:
    model = Recommender(artifact, compiled=False)
    evidence = rated([0, 3, 6, 9])
    [(items, scores)] = model.top_k_folded([evidence], 30)
    assert not set(items) & {0, 3, 6, 9}
    assert len(items) == 26
    query, _ = model.fold_in.ranking_queries([evidence])
    dense = artifact.tensors["rank_item_factors"].numpy() @ query[0]
    np.testing.assert_allclose(scores, dense[items], rtol=1e-5, atol=1e-6)
    assert scores == sorted(scores, reverse=True)
    [(kept, _)] = model.top_k_folded([evidence], 30, [RankRequest(exclude_seen=False)])
    assert len(kept) == 30


def test_a_known_user_folded_in_with_nothing_ranks_as_the_model_does(
    artifact: ModelArtifact,
) -> None:
    model = Recommender(artifact, compiled=False)
    users = [0, 12, 33]
    folded = model.top_k_folded([UserEvidence.of(u, []) for u in users], 10)
    normal = model.top_k_lists(users, 10)
    for (a_items, a_scores), (b_items, b_scores) in zip(folded, normal, strict=True):
        assert a_items == b_items
        np.testing.assert_allclose(a_scores, b_scores, rtol=1e-4, atol=1e-5)


def test_the_compiled_scan_and_the_torch_path_rank_folded_users_alike(
    artifact: ModelArtifact,
) -> None:
    pytest.importorskip("numba")
    compiled = Recommender(artifact)
    compiled.prepare()
    reference = Recommender(artifact, compiled=False)
    evidence = [rated([0, 3, 6, 9]), UserEvidence.of(7, [1, 2], [5.0, 4.0]), UserEvidence.of(8, [])]
    requests = [
        RankRequest(),
        RankRequest(exclude=torch.tensor([10, 11])),
        RankRequest(exclude_seen=False),
    ]
    got = compiled.top_k_folded(evidence, 12, requests)
    want = reference.top_k_folded(evidence, 12, requests)
    for (got_items, got_scores), (want_items, want_scores) in zip(got, want, strict=True):
        assert got_items == want_items
        np.testing.assert_allclose(got_scores, want_scores, rtol=1e-5, atol=1e-6)


def test_a_training_item_sent_again_at_the_mean_confidence_changes_nothing(
    artifact: ModelArtifact,
) -> None:
    # The prior already counts each training item once, at the model's mean confidence: the
    # same item sent again with that confidence must not count a second preference.
    fold = FoldIn(artifact)
    user = 4
    seen = artifact.seen_indices[artifact.seen_indptr[user] : artifact.seen_indptr[user + 1]]
    mean_rating = fold._mean_weight * artifact.rating_range[1]
    again = UserEvidence.of(user, seen[:2].tolist(), [mean_rating] * 2)
    queries, _ = fold.ranking_queries([again])
    np.testing.assert_allclose(
        queries[0], artifact.tensors["rank_user_factors"].numpy()[user], rtol=1e-4, atol=1e-5
    )
    higher = UserEvidence.of(user, seen[:2].tolist(), [5.0, 5.0])
    assert not np.allclose(fold.ranking_queries([higher])[0][0], queries[0])


def test_a_model_trained_without_regularisation_still_folds_users_in(
    artifact: ModelArtifact,
) -> None:
    # The reference recipe: reg 0, no biases. One rating, six factors: a rank-deficient
    # system without the ridge floor.
    bare = dataclasses.replace(
        artifact, hyperparameters={**PARAMS, "reg": 0.0, "bias_reg": 0.0, "use_biases": False}
    )
    fold = FoldIn(bare)
    rating = fold.predict(UserEvidence.of(-1, [3], [4.5]), np.array([3, 4, 5]))
    assert np.isfinite(rating).all()
    assert rating[0] == pytest.approx(4.5, abs=0.05)  # the rated item is fitted
