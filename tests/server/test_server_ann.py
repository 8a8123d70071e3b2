"""``--ann``: TopK through the approximate index stored beside a version, end to end over gRPC.

The index answers known users without an allow-list; unknown users (cold start), allow-lists,
SimilarItems and Predict stay exact. A missing index that was asked for, or a stale or corrupt one,
is refused at load.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

pytest.importorskip("faiss")

from server_harness import running_server, running_server_handle, serve_command

from mfserve.server.app import ServerConfig, create_server
from mfserve.training.ann_build import build_index
from mfserve.training.artifact import load_artifact, save_artifact
from mfserve.training.recommender import RankRequest, Recommender
from mfserve.training.scoring import ranking_tables
from mfserve.training.scoring.ann import AnnError
from mfserve.training.synthetic import synthetic_artifact
from mfserve.v1 import recommender_pb2 as pb
from mfserve.v1 import recommender_pb2_grpc as pb_grpc

N_USERS, N_ITEMS, FACTORS = 30, 5_000, 16
TOL = 1e-4


def _artifact(seed: int) -> Any:
    return synthetic_artifact(N_USERS, N_ITEMS, FACTORS, seen_per_user=20, seed=seed, titles=False)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ann-models")


@pytest.fixture(scope="module")
def indexed(root: Path) -> Path:
    """A version with an HNSW index beside it."""
    version: Path = save_artifact(root / "indexed", _artifact(seed=1))
    build_index(load_artifact(version), "hnsw").save(version)
    return version


@pytest.fixture(scope="module")
def bare(root: Path) -> Path:
    """A version without any index."""
    version: Path = save_artifact(root / "bare", _artifact(seed=2))
    return version


@pytest.fixture(scope="module")
def rec(indexed: Path) -> Recommender:
    return Recommender(load_artifact(indexed))


@pytest.fixture(scope="module")
def handle(indexed: Path) -> Iterator[Any]:
    with running_server_handle(indexed, ann="hnsw") as handle:
        yield handle


@pytest.fixture(scope="module")
def stub(handle: Any) -> Iterator[Any]:
    with grpc.insecure_channel(handle.address) as channel:
        yield pb_grpc.RecommenderServiceStub(channel)


class Spy:
    """Counts the users the served index answers (its ``top_k_lists``, wrapped on the instance)."""

    def __init__(self, handle: Any) -> None:
        serving = handle.server.holder.serving
        assert serving is not None and serving.ann is not None
        self.index = serving.ann.index
        self.users = 0
        original = self.index.top_k_lists

        def counted(recommender: Any, users: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.users += len(users)
            return original(recommender, users, *args, **kwargs)

        self.index.top_k_lists = counted

    def __enter__(self) -> Spy:
        return self

    def __exit__(self, *exc: object) -> None:
        del self.index.top_k_lists  # the class's method again


def exact(rec: Recommender, row: int, k: int, **options: Any) -> tuple[list[str], list[float]]:
    [(items, scores)] = rec.top_k(torch.tensor([row]), k, [RankRequest(**options)])
    return [rec.item_ids[i] for i in items.tolist()], scores.tolist()


def ids(response: Any) -> list[str]:
    return [item.item_id for item in response.items]


def scores(response: Any) -> list[float]:
    return [item.score for item in response.items]


# ------------------------------------------------------------------------------ approximate path
def test_index_is_loaded_with_the_model(handle: Any) -> None:
    serving = handle.server.holder.serving
    assert serving is not None and serving.ann is not None
    assert serving.ann.kind == "hnsw" and serving.ann.search == {"ef_search": 64}
    assert serving.ann.index.model_sha256  # the one load_index checked against this version


def test_top_k_recall_against_exact(handle: Any, stub: Any, rec: Recommender) -> None:
    hits = 0
    with Spy(handle) as spy:
        for user in range(N_USERS):
            response = stub.TopK(pb.TopKRequest(user_id=f"u{user}", k=10), timeout=30)
            assert [item.rank for item in response.items] == list(range(1, 11))
            want, _ = exact(rec, user, 10)
            hits += len(set(ids(response)) & set(want))
        assert spy.users == N_USERS  # every answer came from the index
    assert hits / (10 * N_USERS) >= 0.9


def test_scores_are_the_exact_scores_of_the_items_returned(stub: Any, rec: Recommender) -> None:
    response = stub.TopK(pb.TopKRequest(user_id="u3", k=10, exclude_seen=False), timeout=30)
    rows = torch.from_numpy(rec.item_rows(ids(response)))
    tables = ranking_tables(rec.artifact)
    want = torch.from_numpy(tables.keys)[rows] @ torch.from_numpy(tables.queries[3])
    if tables.user_offset is not None:
        want += float(tables.user_offset[3])
    if tables.key_bias is not None:
        want += torch.from_numpy(tables.key_bias)[rows]
    assert scores(response) == pytest.approx(want.tolist(), abs=TOL)
    assert scores(response) == sorted(scores(response), reverse=True)


def test_seen_and_excluded_items_never_come_back(handle: Any, stub: Any, rec: Recommender) -> None:
    with Spy(handle) as spy:
        for user in range(N_USERS):
            # Deny what the user would get first: the index must dig past it, still answering k.
            denied, _ = exact(rec, user, 10)
            request = pb.TopKRequest(user_id=f"u{user}", k=10, exclude_item_ids=denied)
            got = ids(stub.TopK(request, timeout=30))
            seen = {rec.item_ids[i] for i in rec.seen_items(user).tolist()}
            assert len(got) == 10
            assert not set(got) & seen, user
            assert not set(got) & set(denied), user
        assert spy.users == N_USERS


def test_allow_lists_are_exact(handle: Any, stub: Any, rec: Recommender) -> None:
    candidates = [f"i{n}" for n in range(0, N_ITEMS, 97)]
    rows = torch.from_numpy(rec.item_rows(candidates))
    with Spy(handle) as spy:
        for user in (0, 7, 29):
            request = pb.TopKRequest(user_id=f"u{user}", k=5, candidate_item_ids=candidates)
            response = stub.TopK(request, timeout=30)
            want_ids, want_scores = exact(rec, user, 5, candidates=rows)
            assert ids(response) == want_ids
            assert scores(response) == pytest.approx(want_scores, abs=TOL)
        assert spy.users == 3  # asked, and answered exactly by the index's own fallback


def test_unknown_users_get_the_exact_cold_start_answer(stub: Any, rec: Recommender) -> None:
    request = pb.TopKRequest(user_id="nobody", k=10, allow_cold_start=True)
    response = stub.TopK(request, timeout=30)
    want_ids, want_scores = exact(rec, -1, 10)
    assert ids(response) == want_ids and list(response.missing_ids) == ["nobody"]
    assert scores(response) == pytest.approx(want_scores, abs=TOL)
    with pytest.raises(grpc.RpcError) as error:
        stub.TopK(pb.TopKRequest(user_id="nobody", k=10), timeout=30)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_similar_items_and_predict_stay_exact(handle: Any, stub: Any, rec: Recommender) -> None:
    with Spy(handle) as spy:
        response = stub.SimilarItems(pb.SimilarItemsRequest(item_id="i42", k=10), timeout=30)
        [(items, want)] = rec.similar_items(torch.tensor([42]), 10)
        assert ids(response) == [rec.item_ids[i] for i in items.tolist()]
        assert scores(response) == pytest.approx(want.tolist(), abs=TOL)
        rating = stub.Predict(pb.PredictRequest(user_id="u1", item_id="i2"), timeout=30).rating
        assert rating == pytest.approx(float(rec.predict(torch.tensor([1]), torch.tensor([2]))[0]))
        assert spy.users == 0


def test_a_lone_approximate_call_is_cheap_enough_for_the_loop(handle: Any, stub: Any) -> None:
    # Exact, a call over the whole catalogue would now go to the executor; the index's cost does not.
    batcher = handle.server.service.top_k_batcher
    saved = batcher.inline_limit
    batcher.inline_limit = N_ITEMS - 1
    try:
        before = batcher.stats.inline
        assert len(stub.TopK(pb.TopKRequest(user_id="u1", k=10), timeout=30).items) == 10
        assert batcher.stats.inline == before + 1
        # An allow-list as big as the catalogue is exact, so it is costed as exact.
        request = pb.TopKRequest(
            user_id="u1", k=10, candidate_item_ids=[f"i{n}" for n in range(N_ITEMS)]
        )
        assert len(stub.TopK(request, timeout=30).items) == 10
        assert batcher.stats.inline == before + 1
    finally:
        batcher.inline_limit = saved


def test_a_heavy_users_widened_walk_is_costed_as_such(handle: Any, stub: Any) -> None:
    # 1,000 excluded items widen the HNSW walk from 64 candidates to 1,024 (AnnIndex.walk_width),
    # so the call costs 16 lone queries and leaves the loop, where a light one stays.
    batcher = handle.server.service.top_k_batcher
    ann = handle.server.holder.serving.ann
    saved = batcher.inline_limit
    lone = ann.visits(1, RankRequest(exclude_seen=False))
    assert ann.visits(1, RankRequest(exclude_seen=False, exclude=torch.arange(1_000))) == 16 * lone
    batcher.inline_limit = 4 * lone
    try:
        before = batcher.stats.inline
        heavy = pb.TopKRequest(user_id="u1", k=10, exclude_item_ids=[f"i{n}" for n in range(1_000)])
        answer = stub.TopK(heavy, timeout=30)
        assert len(answer.items) == 10
        assert all(int(item.item_id[1:]) >= 1_000 for item in answer.items)
        assert batcher.stats.inline == before
        assert len(stub.TopK(pb.TopKRequest(user_id="u1", k=10), timeout=30).items) == 10
        assert batcher.stats.inline == before + 1
    finally:
        batcher.inline_limit = saved


def test_concurrent_calls_are_batched_through_the_index(handle: Any, stub: Any) -> None:
    with Spy(handle) as spy:
        futures = [
            stub.TopK.future(pb.TopKRequest(user_id=f"u{n % N_USERS}", k=10), timeout=30)
            for n in range(64)
        ]
        assert all(len(future.result().items) == 10 for future in futures)
        assert spy.users == 64


def test_search_parameter_override(indexed: Path) -> None:
    server = create_server(indexed, ServerConfig(ann="hnsw", ann_ef_search=200, ann_nprobe=3))
    serving = server.holder.serving
    assert serving is not None and serving.ann is not None
    assert serving.ann.search == {"ef_search": 200}  # nprobe is for IVF indexes


# ------------------------------------------------------------------------------ modes and refusals
def test_missing_index_fails_to_start(bare: Path) -> None:
    with pytest.raises(AnnError, match=r"no hnsw index beside .*mfserve index --model"):
        create_server(bare, ServerConfig(ann="hnsw"))


def test_missing_index_exits_1_from_the_command_line(bare: Path) -> None:
    result = subprocess.run(
        serve_command(bare, "--ann", "ivf"),
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "cannot load the approximate index" in result.stderr
    assert "no ivf index" in result.stderr


def test_auto_without_an_index_serves_exactly(bare: Path) -> None:
    rec = Recommender(load_artifact(bare))
    with running_server_handle(bare, ann="auto") as handle:
        serving = handle.server.holder.serving
        assert serving is not None and serving.ann is None
        with grpc.insecure_channel(handle.address) as channel:
            stub = pb_grpc.RecommenderServiceStub(channel)
            for user in (0, 5):
                response = stub.TopK(pb.TopKRequest(user_id=f"u{user}", k=10), timeout=30)
                want_ids, want_scores = exact(rec, user, 10)
                assert ids(response) == want_ids
                assert scores(response) == pytest.approx(want_scores, abs=1e-5)


def test_auto_finds_the_index(indexed: Path) -> None:
    serving = create_server(indexed, ServerConfig(ann="auto")).holder.serving
    assert serving is not None and serving.ann is not None and serving.ann.kind == "hnsw"


def test_none_ignores_an_index(indexed: Path) -> None:
    serving = create_server(indexed, ServerConfig()).holder.serving
    assert serving is not None and serving.ann is None


@pytest.fixture(scope="module")
def stale(root: Path, indexed: Path) -> Path:
    """A version whose index sidecar belongs to another model (same shapes, other factors)."""
    version: Path = save_artifact(root / "stale", _artifact(seed=3))
    for name in ("ann-hnsw.faiss", "ann-hnsw.json"):
        shutil.copy(indexed / name, version / name)
    return version


@pytest.mark.parametrize("mode", ["hnsw", "auto"])
def test_a_stale_index_is_refused(stale: Path, mode: str) -> None:
    with pytest.raises(AnnError, match="stale"):
        create_server(stale, ServerConfig(ann=mode))


def test_hot_reload_swaps_model_and_index_together(bare: Path, indexed: Path, stale: Path) -> None:
    with running_server_handle(bare, ann="auto") as handle:
        holder = handle.server.holder
        first = holder.serving
        assert first is not None and first.ann is None
        handle.call(handle.server.load(indexed))
        second = holder.serving
        assert second is not None and second.ann is not None
        assert second.recommender.artifact.path == indexed
        # A push whose index is stale is refused, and the serving pair stays as it was.
        with pytest.raises(AnnError, match="stale"):
            handle.call(handle.server.load(stale))
        assert holder.serving is second
        with grpc.insecure_channel(handle.address) as channel:
            stub = pb_grpc.RecommenderServiceStub(channel)
            assert len(stub.TopK(pb.TopKRequest(user_id="u2", k=10), timeout=30).items) == 10


def test_an_unsaved_model_has_no_index() -> None:
    artifact = _artifact(seed=4)
    with pytest.raises(AnnError, match="never saved"):
        create_server(artifact, ServerConfig(ann="hnsw"))
    with running_server(artifact, ann="auto") as address, grpc.insecure_channel(address) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)
        assert len(stub.TopK(pb.TopKRequest(user_id="u2", k=10), timeout=30).items) == 10


def test_workers_share_the_index_loaded_by_the_parent(indexed: Path) -> None:
    command = [*serve_command(indexed, "--ann", "hnsw", "--workers", "2")]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "workers ready on" in line:
                break
        log = "".join(lines)
        # One index load, in the parent, before the fork.
        assert log.count(": approximate hnsw index") == 1, log
        assert "layout breadth-first" in log  # built now: renumbered for locality
        port = int(log.split("workers ready on ")[1].split()[0].rsplit(":", 1)[1])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.RecommenderServiceStub(channel)
            assert len(stub.TopK(pb.TopKRequest(user_id="u2", k=10), timeout=30).items) == 10
    finally:
        proc.terminate()
        proc.wait(60)
    assert proc.returncode == 0, "".join(lines)
