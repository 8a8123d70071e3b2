"""HNSW graphs renumbered for memory locality: same graph, same answers, item rows outside."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")

from mfserve.training.ann_build import build_index
from mfserve.training.ann_layout import breadth_first_order, locality_ordered
from mfserve.training.ann_store import load_index
from mfserve.training.artifact import load_artifact, save_artifact
from mfserve.training.recommender import RankRequest, Recommender
from mfserve.training.scoring.ann import faiss_module
from mfserve.training.synthetic import synthetic_artifact

faiss = faiss_module()
N_USERS, N_ITEMS = 200, 3_000


def test_breadth_first_order_visits_every_node_once_nearest_first() -> None:
    # 0 -> 2, 4; 2 -> 3; 4 -> 1, 3; 3 -> 0; 1 -> (none); 5 is never reached.
    lists = {0: [2, 4], 1: [], 2: [3], 3: [0], 4: [1, 3], 5: [0]}
    width = 2
    neighbors = np.full(6 * width, -1, dtype=np.int32)
    for node, found in lists.items():
        neighbors[node * width : node * width + len(found)] = found
    begins = np.arange(6, dtype=np.int64) * width
    assert breadth_first_order(neighbors, begins, width, 0).tolist() == [0, 2, 4, 3, 1, 5]
    assert breadth_first_order(neighbors, begins, width, 4).tolist() == [4, 1, 3, 0, 2, 5]


@pytest.fixture(scope="module")
def recommender(tmp_path_factory: pytest.TempPathFactory) -> Recommender:
    artifact = synthetic_artifact(
        N_USERS, N_ITEMS, 16, clusters=8, seen_per_user=20, seed=3, titles=False
    )
    folder = save_artifact(tmp_path_factory.mktemp("models") / "layout", artifact)
    return Recommender(load_artifact(folder))


def _answers(index: object, recommender: Recommender) -> list[tuple[list[int], list[float]]]:
    """Every user's top 10, light (seen items: one shared search) and heavy (a selector)."""
    heavy = RankRequest(exclude_seen=True, exclude=torch.arange(0, N_ITEMS, 7))
    users = list(range(N_USERS))
    answers: list[tuple[list[int], list[float]]] = []
    for request in (RankRequest(exclude_seen=True), heavy):
        answers += index.top_k_lists(recommender.exact, users, 10, [request] * N_USERS)  # type: ignore[attr-defined]
    return answers


def test_renumbering_changes_no_answer_and_answers_item_rows(recommender: Recommender) -> None:
    plain = build_index(recommender.artifact, "hnsw", m=8, ef_search=64, locality=False)
    assert "layout" not in plain.extra
    before = _answers(plain, recommender)
    # The same graph renumbered (a second build could differ: faiss builds with threads).
    clone = faiss.clone_index(plain.index)
    plain.index = locality_ordered(clone, faiss)
    assert isinstance(plain.index, faiss.IndexIDMap)
    order = faiss.vector_to_array(plain.index.id_map)
    assert sorted(order.tolist()) == list(range(N_ITEMS)) and order.tolist() != sorted(order)
    assert _answers(plain, recommender) == before
    heavy_rows = {row for rows, _ in before[N_USERS:] for row in rows}
    assert heavy_rows and not any(row % 7 == 0 for row in heavy_rows)


def test_a_built_index_is_renumbered_and_keeps_it_through_save_and_load(
    tmp_path: Path, recommender: Recommender
) -> None:
    index = build_index(recommender.artifact, "hnsw", m=8)
    assert index.extra == {"layout": "breadth-first"}
    folder = tmp_path / "v"
    folder.mkdir()
    meta = json.loads(index.save(folder).read_text())
    assert meta["layout"] == "breadth-first"
    loaded = load_index(folder, recommender.artifact)
    assert loaded is not None and loaded.extra == {"layout": "breadth-first"}
    assert isinstance(faiss.downcast_index(loaded.index), faiss.IndexIDMap)
    assert _answers(loaded, recommender) == _answers(index, recommender)


def test_ivf_keeps_its_own_numbering(recommender: Recommender) -> None:
    index = build_index(recommender.artifact, "ivf", nlist=16, nprobe=4)
    assert index.extra == {} and not isinstance(index.index, faiss.IndexIDMap)
