"""The optional approximate top-k index: build, save, load, staleness, exclusions, exactness."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")

from mfserve.training.ann_build import build_index, measure_recall
from mfserve.training.ann_store import load_index
from mfserve.training.artifact import load_artifact, save_artifact
from mfserve.training.recommender import RankRequest, Recommender
from mfserve.training.scoring import ranking_tables
from mfserve.training.scoring.ann import MAX_WIDENED_EF, SHARED_EXCLUSIONS, AnnError
from mfserve.training.synthetic import synthetic_artifact

N_ITEMS = 5_000


@pytest.fixture(scope="module")
def version(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models") / "synthetic"
    artifact = synthetic_artifact(
        300, N_ITEMS, 16, clusters=16, seen_per_user=20, seed=1, titles=False
    )
    folder: Path = save_artifact(root, artifact)
    return folder


@pytest.fixture(scope="module")
def recommender(version: Path) -> Recommender:
    return Recommender(load_artifact(version), chunk_size=1024)


@pytest.mark.parametrize(
    ("kind", "params"), [("hnsw", {"m": 16}), ("ivf", {"nlist": 32, "nprobe": 8})]
)
def test_round_trip_and_recall(
    tmp_path: Path, version: Path, recommender: Recommender, kind: str, params: dict[str, int]
) -> None:
    artifact = recommender.artifact
    index = build_index(artifact, kind, **params)
    assert measure_recall(recommender, index, 200, k=10) >= 0.9
    folder = tmp_path / "v"
    folder.mkdir()
    (folder / "manifest.json").write_bytes((version / "manifest.json").read_bytes())
    sidecar = index.save(folder)
    meta = json.loads(sidecar.read_text())
    assert meta["kind"] == kind and meta["model_sha256"] == index.model_sha256
    assert len(meta["index_sha256"]) == 64 and meta["build_seconds"] >= 0
    loaded = load_index(folder, artifact)
    assert loaded is not None and loaded.kind == kind and loaded.params == index.params
    queries = torch.from_numpy(ranking_tables(artifact).queries[:5])
    before, after = index.search(queries, 10), loaded.search(queries, 10)
    assert torch.equal(before[1], after[1])
    assert measure_recall(recommender, loaded, 200, k=10) >= 0.9


def test_no_index_is_none(version: Path, recommender: Recommender) -> None:
    assert load_index(version, recommender.artifact) is None


def test_stale_and_corrupt_indexes_are_refused(tmp_path: Path, version: Path) -> None:
    artifact = load_artifact(version)
    index = build_index(artifact, "hnsw", m=8)
    # Another model version under the same root: same shapes, different factors.
    other_version = save_artifact(
        tmp_path / "other", synthetic_artifact(300, N_ITEMS, 16, clusters=16, seed=2, titles=False)
    )
    other = load_artifact(other_version)
    index.save(other_version)
    with pytest.raises(AnnError, match="stale"):
        load_index(other_version, other)
    # The right model, but the index file altered after the sidecar was written.
    index_for_other = build_index(other, "hnsw", m=8)
    index_for_other.save(other_version)
    assert load_index(other_version, other) is not None
    with (other_version / "ann-hnsw.faiss").open("r+b") as handle:
        handle.seek(-8, 2)
        handle.write(b"\x00" * 8)
    with pytest.raises(AnnError, match="corrupt"):
        load_index(other_version, other)


def test_seen_items_and_deny_list_are_excluded(recommender: Recommender) -> None:
    index = build_index(recommender.artifact, "hnsw", m=16, ef_search=256)
    users = torch.arange(20)
    plain = [RankRequest(exclude_seen=False)] * 20
    unfiltered = index.top_k(recommender.exact, users, 30, plain)
    # Deny the user's current best 10 and exclude seen items: none may come back, and k still do.
    requests = [RankRequest(exclude_seen=True, exclude=rows[:10]) for rows, _ in unfiltered]
    answers = index.top_k(recommender.exact, users, 10, requests)
    for user, request, (rows, _scores) in zip(users.tolist(), requests, answers, strict=True):
        assert rows.numel() == 10
        assert not torch.isin(rows, recommender.seen_items(user)).any()
        assert request.exclude is not None and not torch.isin(rows, request.exclude).any()
    exact = recommender.top_k(users, 10, requests)
    hits = sum(int(torch.isin(a, e).sum()) for (a, _), (e, _) in zip(answers, exact, strict=True))
    assert hits / 200 >= 0.9


@pytest.mark.parametrize(
    ("kind", "params"), [("hnsw", {"m": 8, "ef_search": 16}), ("ivf", {"nlist": 32, "nprobe": 2})]
)
def test_exclusions_are_faiss_filtered_search_alone_or_batched(
    recommender: Recommender, kind: str, params: dict[str, int]
) -> None:
    # Small search settings keep the answers approximate, so they pin the index's own order. Each
    # known user's answer is faiss's search for that user alone with the excluded rows left out by
    # a selector: light exclusions (up to ~23 rows, more than the HNSW walk's 16) through the
    # batch's shared over-fetch, a heavy one (~220 rows) through a search of its own. The server's
    # list path and the tensor API agree, and no answer depends on its batch.
    faiss = pytest.importorskip("faiss")
    index = build_index(recommender.artifact, kind, **params)
    users = torch.tensor([0, 1, 2, -1, 4, 5, 6])
    deny = torch.tensor([7, 11, 13])
    many = torch.arange(100, 300)
    requests = [
        RankRequest(exclude_seen=True),
        RankRequest(exclude_seen=False),
        RankRequest(exclude_seen=False, exclude=deny),
        RankRequest(),  # unknown user: the exact popularity answer
        RankRequest(candidates=torch.tensor([3, 9, 27])),  # allow-list: exact
        RankRequest(exclude_seen=True, exclude=deny),
        RankRequest(exclude_seen=True, exclude=many),
    ]
    k = 7
    lists = index.top_k_lists(recommender.exact, users, k, requests)
    tensors = index.top_k(recommender.exact, users, k, requests)
    assert [(rows.tolist(), scores.tolist()) for rows, scores in tensors] == lists
    queries = torch.from_numpy(ranking_tables(recommender.artifact).queries)
    for b in (0, 1, 2, 5, 6):
        request = requests[b]
        skip = (recommender.seen_items(int(users[b])).tolist() if request.exclude_seen else []) + (
            request.exclude.tolist() if request.exclude is not None else []
        )
        ids = np.array(skip, dtype=np.int64)
        selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids)))
        if kind == "hnsw":
            # A heavy query's walk is widened by its excluded rows (the ef_search it is given
            # counts eligible candidates); light ones keep ef_search.
            widened = len(skip) if len(skip) > SHARED_EXCLUSIONS else 0
            filtered = faiss.SearchParametersHNSW(
                sel=selector, efSearch=params["ef_search"] + widened
            )
        else:
            filtered = faiss.SearchParametersIVF(sel=selector, nprobe=params["nprobe"])
        scores, rows = index.index.search(queries[int(users[b])][None].numpy(), k, params=filtered)
        found = zip(rows[0].tolist(), scores[0].tolist(), strict=True)
        kept = [(row, score) for row, score in found if row >= 0]
        assert kept and not {row for row, _ in kept} & set(skip)
        assert lists[b] == ([row for row, _ in kept], [score for _, score in kept])
        assert index.top_k_lists(recommender.exact, users[b : b + 1], k, [request]) == [lists[b]]
    for b in (3, 4):
        [(rows, scores)] = recommender.top_k(users[b : b + 1], k, [requests[b]])
        assert lists[b] == (rows.tolist(), scores.tolist())


class _FetchRecorder:
    """Stands in for a faiss index and records how many rows each search asks for."""

    def __init__(self, index: Any) -> None:
        self._index = index
        self.fetches: list[tuple[int, int]] = []  # (queries, rows asked for each)
        self.walks: list[int] = []  # efSearch of each search

    def __getattr__(self, name: str) -> Any:
        return getattr(self._index, name)

    def search(self, x: Any, k: int, **kwargs: Any) -> Any:
        self.fetches.append((len(x), k))
        self.walks.append(kwargs["params"].efSearch)
        return self._index.search(x, k, **kwargs)


def test_a_heavy_user_is_searched_alone_for_k_rows(recommender: Recommender) -> None:
    # 4,900 excluded rows would make an over-fetch return ~4,910 rows per query, heap, copy and
    # filter them, and widen the fetch of every query in the batch: the heavy user is searched
    # alone for k rows with a selector (its walk widened instead), and the light one keeps a
    # fetch of k + its ~20 seen rows.
    index = build_index(recommender.artifact, "hnsw", m=8, ef_search=64)
    recorder = _FetchRecorder(index.index)
    index.index = recorder
    heavy = RankRequest(exclude_seen=False, exclude=torch.arange(100, 5_000))
    answers = index.top_k_lists(
        recommender.exact, torch.tensor([0, 1]), 10, [heavy, RankRequest(exclude_seen=True)]
    )
    seen = recommender.seen_items(1).numel()
    assert 0 < seen < 64 - 10
    assert sorted(recorder.fetches) == [(1, 10), (1, 10 + seen)]
    # The heavy user's walk keeps 64 eligible candidates, up to the ceiling; the light one's is 64.
    assert sorted(recorder.walks) == [64, MAX_WIDENED_EF]
    rows, _ = answers[0]
    assert rows and all(row < 100 or row >= 5_000 for row in rows)
    assert not set(answers[1][0]) & set(recommender.seen_items(1).tolist())


def test_unknown_users_and_allow_lists_fall_back_to_exact(recommender: Recommender) -> None:
    index = build_index(recommender.artifact, "hnsw", m=8)
    users = torch.tensor([-1, 3])
    requests = [RankRequest(), RankRequest(candidates=torch.tensor([5, 6, 7, 3]))]
    for (rows, scores), (exact_rows, exact_scores) in zip(
        index.top_k(recommender.exact, users, 2, requests),
        recommender.top_k(users, 2, requests),
        strict=True,
    ):
        assert torch.equal(rows, exact_rows) and torch.allclose(scores, exact_scores)


def test_bias_is_folded_into_the_inner_product(tmp_path: Path) -> None:
    # A ranking head with a large item bias: without augmentation the order would differ.
    base = synthetic_artifact(50, 2_000, 8, clusters=4, seed=5, titles=False)
    bias = 3.0 * torch.randn(2_000, generator=torch.Generator().manual_seed(0))
    version = save_artifact(
        tmp_path / "biased", replace(base, tensors={**base.tensors, "rank_item_bias": bias})
    )
    recommender = Recommender(load_artifact(version))
    index = build_index(recommender.artifact, "hnsw", m=16, ef_search=400)
    assert index.augmented and index.index.d == 9
    users = torch.arange(10)
    plain = [RankRequest(exclude_seen=False)] * 10
    for (rows, scores), (exact_rows, exact_scores) in zip(
        index.top_k(recommender.exact, users, 5, plain),
        recommender.top_k(users, 5, plain),
        strict=True,
    ):
        assert torch.equal(rows, exact_rows)
        assert torch.allclose(scores, exact_scores, atol=1e-4)


def test_rating_head_ranking_matches_recommender(tmp_path: Path) -> None:
    # No ranking head: the score is the predicted rating (item bias, user bias and global mean).
    version = save_artifact(
        tmp_path / "plain", synthetic_artifact(40, 1_000, 8, rank_head=False, titles=False)
    )
    recommender = Recommender(load_artifact(version))
    index = build_index(recommender.artifact, "hnsw", m=16, ef_search=400)
    users = torch.arange(10)
    for (rows, scores), (exact_rows, exact_scores) in zip(
        index.top_k(recommender.exact, users, 5), recommender.top_k(users, 5), strict=True
    ):
        assert torch.equal(rows, exact_rows)
        assert torch.allclose(scores, exact_scores, atol=1e-4)


def test_bad_kind_and_params(recommender: Recommender) -> None:
    with pytest.raises(AnnError, match="kind"):
        build_index(recommender.artifact, "lsh")
    with pytest.raises(AnnError, match="nprobe"):
        build_index(recommender.artifact, "hnsw", nprobe=3)


def test_search_pads_short_answers(recommender: Recommender) -> None:
    index = build_index(recommender.artifact, "hnsw", m=8)
    queries = torch.from_numpy(ranking_tables(recommender.artifact).queries[:2])
    everything = torch.arange(N_ITEMS - 3)
    scores, rows = index.search(queries, 5, exclude=[everything, None])
    assert rows.shape == (2, 5)
    assert torch.isin(rows[0][rows[0] >= 0], everything).sum() == 0
    assert (rows[0] == -1).sum() >= 2 and torch.isinf(scores[0][rows[0] == -1]).all()
    assert (rows[1] >= 0).all()


def test_missing_faiss_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, recommender: Recommender
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(AnnError, match=r"mfserve\[ann\]"):
        build_index(recommender.artifact, "hnsw")
