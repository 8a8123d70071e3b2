"""Real-data quality: the default recipe on the bundled MovieLens data, through every path.

One model is trained per session (a few seconds). Its figures are checked three ways that must
agree: what training stored in the manifest, ``mfserve evaluate`` re-measuring the saved version,
and a client outside the process calling BatchPredict and TopK on a real server.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from server_harness import running_server

from mfserve.v1 import recommender_pb2 as pb
from mfserve.v1 import recommender_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow


def test_default_recipe_meets_targets(movielens_model: tuple[Path, dict[str, float]]) -> None:
    _, metrics = movielens_model
    assert metrics["rmse"] <= 0.840, metrics
    assert metrics["ndcg_at_10"] >= 0.24, metrics


def test_evaluate_reproduces_training_metrics(
    movielens_model: tuple[Path, dict[str, float]],
) -> None:
    from mfserve.training.pipeline import evaluate_saved

    path, metrics = movielens_model
    report = evaluate_saved(path.parent)
    for name in ("rmse", "mae", "ndcg_at_10", "precision_at_10", "recall_at_10", "map_at_10"):
        assert report["model"][name] == pytest.approx(metrics[name], abs=1e-9), name
    # The baselines come in the same report, on the same split.
    assert report["popularity"]["ndcg_at_10"] == pytest.approx(0.160, abs=0.002)
    assert report["global_mean"]["rmse"] > metrics["rmse"]


def test_metrics_from_outside_match_evaluate(
    movielens_model: tuple[Path, dict[str, float]],
) -> None:
    """RMSE via BatchPredict over the test pairs and NDCG@10 via TopK per test user, over gRPC."""
    from mfserve.training.data import load_ratings
    from mfserve.training.evaluate import ranking_metrics, rating_metrics
    from mfserve.training.pipeline import protocol_for

    path, metrics = movielens_model
    protocol = protocol_for(load_ratings(None, progress=False), 0.2, 42)
    users, items = protocol.users.classes, protocol.items.classes
    # Test pairs by id; unseen ids get the cold-start estimate, as the protocol prescribes.
    frame = load_ratings(None, progress=False).ratings
    test_rows = np.random.default_rng(42).permutation(len(frame))[int(0.8 * len(frame)) :]
    test = frame.iloc[test_rows]
    with running_server(path) as address, grpc.insecure_channel(address) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)
        reply = stub.BatchPredict(
            pb.BatchPredictRequest(
                user_ids=test["user"].tolist(),
                item_ids=test["item"].tolist(),
                allow_cold_start=True,
            )
        )
        rmse = rating_metrics(np.array(reply.ratings), test["rating"].to_numpy())["rmse"]
        top = np.full((len(protocol.eval_users), 10), len(items), dtype=np.int64)
        item_code = {item: code for code, item in enumerate(items)}
        for row, user in enumerate(protocol.eval_users):
            answer = stub.TopK(pb.TopKRequest(user_id=users[user], k=10))
            codes = [item_code[entry.item_id] for entry in answer.items]
            top[row, : len(codes)] = codes
    ndcg = ranking_metrics(top, protocol.relevant, 10, len(items))["ndcg"]
    assert rmse == pytest.approx(metrics["rmse"], abs=0.002)
    assert ndcg == pytest.approx(metrics["ndcg_at_10"], abs=0.002)


def _top_10_for_user_1(path: Path) -> list[pb.ScoredItem]:
    with running_server(path) as address, grpc.insecure_channel(address) as channel:
        answer = pb_grpc.RecommenderServiceStub(channel).TopK(
            pb.TopKRequest(user_id="1", k=10, include_metadata=True)
        )
    return list(answer.items)


def _assert_believable(items: list[pb.ScoredItem]) -> None:
    assert len(items) == 10
    assert all(entry.title and entry.genres for entry in items)
    # User 1 rates action/adventure classics highly; so should their list lean.
    genres = [g for entry in items for g in entry.genres]
    assert sum(g in ("Action", "Adventure", "Sci-Fi", "Thriller") for g in genres) >= 5


def test_top_k_for_user_1_skips_what_the_model_saw(
    movielens_model: tuple[Path, dict[str, float]],
) -> None:
    """The protocol model never saw the held-out 20%: only the training part is 'seen' to it."""
    from mfserve.training.data import load_ratings
    from mfserve.training.pipeline import protocol_for

    path, _ = movielens_model
    protocol = protocol_for(load_ratings(None, progress=False), 0.2, 42)
    user = protocol.users.index_of("1")
    seen = set(protocol.items.inverse_transform(protocol.train_by_user.row(user)))
    items = _top_10_for_user_1(path)
    assert not {entry.item_id for entry in items} & seen
    _assert_believable(items)


def test_production_model_never_recommends_a_rated_movie(tmp_path: Path) -> None:
    """``--holdout 0`` learns from every rating, so no movie user 1 ever rated comes back."""
    from mfserve.training.data import load_ratings
    from mfserve.training.pipeline import train_and_save

    path, metrics = train_and_save(tmp_path / "movielens", holdout=0.0, progress=False)
    assert "rmse" not in metrics  # nothing held out, nothing to measure on
    frame = load_ratings(None, progress=False).ratings
    rated_by_1 = set(frame.loc[frame["user"] == "1", "item"])
    items = _top_10_for_user_1(path)
    assert not {entry.item_id for entry in items} & rated_by_1
    _assert_believable(items)


def test_default_recipe_is_bit_identical() -> None:
    import torch

    from mfserve.training.config import TrainConfig
    from mfserve.training.data import load_ratings
    from mfserve.training.fit import fit
    from mfserve.training.pipeline import protocol_for

    d = protocol_for(load_ratings(None, progress=False), 0.2, 42)
    args = (d.train_users, d.train_items, d.train_ratings, d.n_users, d.n_items, TrainConfig())
    a, b = fit(*args, progress=False), fit(*args, progress=False)
    for name, t in a.tensors.items():
        assert torch.equal(t, b.tensors[name]), name


def test_users_folded_in_match_users_trained_normally(
    movielens_model: tuple[Path, dict[str, float]],
) -> None:
    # Users held out of training entirely and folded in from their training ratings, against
    # the same users trained normally and popularity (the fold-in issue's targets).
    from mfserve.training.pipeline import evaluate_fold_in_saved

    path, _ = movielens_model
    report = evaluate_fold_in_saved(path)
    trained, folded, popular = report["trained"], report["folded_in"], report["popularity"]
    assert folded["users"] == trained["users"] >= 100
    assert folded["ndcg_at_10"] >= 0.9 * trained["ndcg_at_10"], report
    assert folded["ndcg_at_10"] >= 1.5 * popular["ndcg_at_10"], report
    assert abs(folded["rmse"] - trained["rmse"]) <= 0.03, report


def test_batch_top_k_over_every_user_is_610_top_k_calls(
    movielens_model: tuple[Path, dict[str, float]],
) -> None:
    from mfserve.client import RecommenderClient
    from mfserve.training.artifact import load_artifact

    path, _ = movielens_model
    users = load_artifact(path).user_ids
    with running_server(path) as address, RecommenderClient(address) as client:
        streamed = [r.item_ids for r in client.batch_top_k(users, k=10)]
        one_by_one = [client.top_k(user, k=10).item_ids for user in users]
    assert len(streamed) == len(users) == 610
    assert streamed == one_by_one
