"""``RecommenderClient`` against a real server over the synthetic model (60 users, 400 items).

User ``u<n>`` prefers item cluster ``n % 4``; item ``i<m>`` is in cluster ``m % 4`` and titled
``Item m`` with genre ``cluster-(m % 4)`` (``mfserve.training.synthetic``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from server_harness import ServerThread, make_model_dir, running_server, running_server_handle

from mfserve.client import (
    DeadlineExceededError,
    HealthStatus,
    NotFoundError,
    Prediction,
    RecommenderClient,
    TopKResult,
)
from mfserve.v1 import recommender_pb2 as pb

CLUSTERS = 4


@pytest.fixture(scope="module")
def client(server_address: str) -> Iterator[RecommenderClient]:
    with RecommenderClient(server_address) as client:
        yield client


def cluster(item_id: str) -> int:
    return int(item_id[1:]) % CLUSTERS


def seen_items(synthetic_model: Any, user_row: int) -> set[str]:
    start, stop = synthetic_model.seen_indptr[user_row : user_row + 2].tolist()
    rows = synthetic_model.seen_indices[start:stop].tolist()
    return {synthetic_model.item_ids[r] for r in rows}


def test_predict(client: RecommenderClient, synthetic_model: Any) -> None:
    result = client.predict("u3", "i7")
    assert isinstance(result, Prediction)
    assert (result.user_id, result.item_id, result.model_version) == ("u3", "i7", 1)
    low, high = synthetic_model.rating_range
    assert low <= result.rating <= high
    assert not result.cold_start
    # Same answer through the batch path.
    assert client.batch_predict(["u3"], ["i7"]).ratings == (result.rating,)


def test_predict_cold_start(client: RecommenderClient) -> None:
    result = client.predict("nobody", "i7", allow_cold_start=True)
    assert result.missing_user_ids == ("nobody",) and result.missing_item_ids == ()
    assert result.cold_start


def test_batch_predict_lists_and_numpy(client: RecommenderClient) -> None:
    users = [f"u{n % 60}" for n in range(50)]
    items = [f"i{(n * 7) % 400}" for n in range(50)]
    result = client.batch_predict(users, items)
    assert len(result) == 50 and result.model_version == 1 and result.model_versions == (1,)
    singles = [client.predict(u, i).rating for u, i in zip(users[:5], items[:5], strict=True)]
    assert list(result[:5]) == singles
    np = pytest.importorskip("numpy")
    assert client.batch_predict(np.array(users), np.array(items)) == result


def test_batch_predict_cold_start_lists_distinct_unknown_ids(client: RecommenderClient) -> None:
    result = client.batch_predict(
        ["u1", "x", "x", "u2"], ["i1", "i1", "y", "z"], allow_cold_start=True
    )
    assert result.missing_user_ids == ("x",) and result.missing_item_ids == ("y", "z")


def test_batch_predict_splits_and_joins_in_order(model_dir: Path) -> None:
    users = [f"u{n % 60}" for n in range(95)]
    items = [f"i{(n * 13) % 400}" for n in range(95)]
    with running_server(model_dir, max_batch_pairs=10) as address:
        with RecommenderClient(address, max_batch_pairs=10) as client:
            split = client.batch_predict(users, items)
            smaller = client.batch_predict(users, items, batch_size=3)
            one_by_one = [client.predict(u, i).rating for u, i in zip(users, items, strict=True)]
        assert split.ratings == smaller.ratings == tuple(one_by_one)
        assert split.model_versions == (1,) * 10  # ten calls of <= 10 pairs


def test_top_k(client: RecommenderClient, synthetic_model: Any) -> None:
    result = client.top_k("u1", k=5)
    assert isinstance(result, TopKResult) and result.model_version == 1
    assert len(result) == 5
    assert [r.rank for r in result] == [1, 2, 3, 4, 5]
    scores = [r.score for r in result]
    assert scores == sorted(scores, reverse=True)
    assert {cluster(i) for i in result.item_ids} == {1}
    assert not set(result.item_ids) & seen_items(synthetic_model, 1)
    assert all(r.title == "" and r.genres == () for r in result)


def test_top_k_options(client: RecommenderClient, synthetic_model: Any) -> None:
    seen = seen_items(synthetic_model, 2)
    with_seen = client.top_k("u2", k=400, exclude_seen=False)
    assert seen <= set(with_seen.item_ids)
    best = client.top_k("u2", k=3).item_ids
    excluded = client.top_k("u2", k=3, exclude_item_ids=best[:1]).item_ids
    assert best[0] not in excluded and excluded[:2] == best[1:]
    allowed = client.top_k("u2", k=10, candidate_item_ids=["i0", "i1", "i2"]).item_ids
    assert sorted(allowed) == ["i0", "i1", "i2"]
    rich = client.top_k("u2", k=2, include_metadata=True)
    assert rich[0].title == f"Item {rich[0].item_id[1:]}"
    assert rich[0].genres == (f"cluster-{cluster(rich[0].item_id)}",)


def test_top_k_cold_start(client: RecommenderClient) -> None:
    with pytest.raises(NotFoundError):
        client.top_k("nobody")
    result = client.top_k("nobody", k=3, allow_cold_start=True, candidate_item_ids=["i1", "zz"])
    assert (result.missing_user_ids, result.missing_item_ids) == (("nobody",), ("zz",))
    assert result.cold_start and result.item_ids == ["i1"]
    # The deprecated mixed list is still filled for older callers: the user, then the items.
    assert result.missing_ids == ("nobody", "zz")


def test_top_k_cold_start_keeps_users_and_items_apart(client: RecommenderClient) -> None:
    # "i5" is a known item but no user, and "u3" a known user but no item: in the mixed list
    # they would be indistinguishable from an unknown candidate "i5" and an unknown user "u3".
    result = client.top_k("i5", k=2, allow_cold_start=True, candidate_item_ids=["i5", "u3"])
    assert (result.missing_user_ids, result.missing_item_ids) == (("i5",), ("u3",))
    assert result.item_ids == ["i5"]
    known = client.top_k("u3", k=2, candidate_item_ids=["i5"])
    assert not known.cold_start and known.missing_user_ids == known.missing_item_ids == ()


def test_similar_items(client: RecommenderClient) -> None:
    result = client.similar_items("i8", k=6, include_metadata=True)
    assert len(result) == 6 and "i8" not in result.item_ids
    assert {cluster(i) for i in result.item_ids} == {0}
    assert all(-1.0 <= r.score <= 1.0 for r in result)
    assert result.missing_user_ids == result.missing_item_ids == result.missing_ids == ()
    assert not result.cold_start
    assert result[0].title.startswith("Item ")
    narrowed = client.similar_items("i8", k=2, candidate_item_ids=["i1", "i4", "i12"])
    assert set(narrowed.item_ids) <= {"i1", "i4", "i12"}
    assert "i4" not in client.similar_items("i8", k=5, exclude_item_ids=["i4"]).item_ids


def test_model_info(client: RecommenderClient, synthetic_model: Any) -> None:
    info = client.model_info()
    assert (info.model_version, info.user_count, info.item_count) == (1, 60, 400)
    assert info.factors == 8 and info.rank_factors == 8
    assert info.model_name == synthetic_model.name
    assert (info.rating_min, info.rating_max) == synthetic_model.rating_range
    assert info.dataset_fingerprint == synthetic_model.dataset["fingerprint"]
    assert info.create_time is not None and info.create_time.tzinfo is not None
    assert info.hyperparameters["synthetic"] == "true"


def test_health(client: RecommenderClient) -> None:
    assert client.health() is HealthStatus.SERVING
    assert client.health("mfserve.v1.RecommenderService") is HealthStatus.SERVING
    with pytest.raises(NotFoundError):
        client.health("no.such.Service")


def test_wait_until_ready_returns_once_a_model_is_loaded(model_dir: Path) -> None:
    with running_server_handle(None) as handle, RecommenderClient(handle.address) as client:
        assert client.health() is HealthStatus.NOT_SERVING
        with pytest.raises(DeadlineExceededError):
            client.wait_until_ready(0.2)
        loader = threading.Timer(0.3, lambda: handle.call(handle.server.load(model_dir)))
        loader.start()
        try:
            client.wait_until_ready(30)
        finally:
            loader.join()
        assert client.predict("u1", "i1").model_version == 1


def test_wait_until_ready_waits_for_the_server_to_start(model_dir: Path) -> None:
    with running_server_handle(model_dir) as first:
        port = first.port  # a port that was free a moment ago; nothing listens on it now
    started: list[ServerThread] = []
    starter = threading.Timer(0.3, lambda: started.append(ServerThread(model_dir, port=port)))
    with RecommenderClient(f"127.0.0.1:{port}") as client:
        starter.start()
        try:
            client.wait_until_ready(30)
            assert client.health() is HealthStatus.SERVING
        finally:
            starter.join()
            for server in started:
                server.close()


def test_raw_stub_and_channel(client: RecommenderClient) -> None:
    response = client.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert response.item_count == 400
    assert isinstance(client.channel, grpc.Channel)
    assert repr(client).startswith("RecommenderClient('127.0.0.1:")


def test_per_call_timeout_overrides_and_closed_client_refuses(server_address: str) -> None:
    with RecommenderClient(server_address, timeout=None) as client:
        assert client.predict("u1", "i1", timeout=30).rating > 0
    with pytest.raises(ValueError, match="closed"):
        client.predict("u1", "i1")


def test_a_target_with_several_servers_is_used_round_robin(tmp_path: Path) -> None:
    """Two servers behind one target (versions 1 and 2 of a model): calls reach both."""
    first, second = make_model_dir(tmp_path), make_model_dir(tmp_path)
    with running_server(first) as one, running_server(second) as two:
        target = f"ipv4:{one},{two}"
        with RecommenderClient(target) as client:
            versions = {client.predict("u1", "i1").model_version for _ in range(200)}
    assert versions == {1, 2}
