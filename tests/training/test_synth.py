"""``mfserve synth``: a small synthetic model loads as an artifact and has its planted structure."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mfserve.training.artifact import load_artifact
from mfserve.training.recommender import RankRequest, Recommender
from mfserve.training.synth import main, register

CLUSTERS = 8


@pytest.fixture(scope="module")
def synth_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "synthetic"
    sizes = ["--users", "64", "--items", "2000", "--factors", "16", "--clusters", str(CLUSTERS)]
    code = main(["synth", "--out", str(out), *sizes, "--seed", "3"])
    assert code == 0
    return out


def test_writes_a_loadable_numbered_version(synth_model: Path) -> None:
    artifact = load_artifact(synth_model)
    assert artifact.path == synth_model / "1"
    assert (artifact.n_users, artifact.n_items, artifact.factors) == (64, 2000, 16)
    assert artifact.user_ids[5] == "u5" and artifact.item_ids[7] == "i7"
    assert artifact.hyperparameters["clusters"] == CLUSTERS


def test_users_top_items_come_from_their_cluster(synth_model: Path) -> None:
    recommender = Recommender(load_artifact(synth_model))
    users = torch.arange(recommender.n_users)
    for user, (rows, _scores) in zip(users.tolist(), recommender.top_k(users, 10), strict=True):
        assert rows.numel() == 10
        assert set((rows % CLUSTERS).tolist()) == {user % CLUSTERS}


def test_seen_items_are_excluded_by_default(synth_model: Path) -> None:
    recommender = Recommender(load_artifact(synth_model))
    seen = recommender.seen_items(0)
    assert seen.numel() > 0
    ((kept, _),) = recommender.top_k(torch.tensor([0]), 2000)
    ((everything, _),) = recommender.top_k(
        torch.tensor([0]), 2000, [RankRequest(exclude_seen=False)]
    )
    assert not torch.isin(seen, kept).any()
    assert torch.isin(seen, everything).all()


def test_second_run_writes_the_next_version(tmp_path: Path) -> None:
    out = tmp_path / "m"
    for _ in range(2):
        sizes = ["--users", "4", "--items", "50", "--factors", "4"]
        assert main(["synth", "--out", str(out), *sizes, "--no-titles"]) == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["1", "2"]


def test_bad_sizes_are_exit_code_2(tmp_path: Path) -> None:
    assert main(["synth", "--out", str(tmp_path / "m"), "--users", "0", "--items", "5"]) == 2
    bad_param = ["--users", "2", "--items", "5", "--ann-param", "m=x"]
    assert main(["synth", "--out", str(tmp_path / "m"), *bad_param]) == 2
    unknown = ["--users", "2", "--items", "5", "--ann", "ivf", "--ann-param", "m=3"]
    assert main(["synth", "--out", str(tmp_path / "m"), *unknown]) == 2
    assert not (tmp_path / "m").exists()


def test_register_imports_nothing_heavy() -> None:
    # A fresh interpreter: torch must not be imported by building the parser.
    code = (
        "import argparse, sys\n"
        "from mfserve.training.synth import register\n"
        "register(argparse.ArgumentParser().add_subparsers())\n"
        "assert 'torch' not in sys.modules and 'faiss' not in sys.modules, sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_register_adds_a_handler() -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["synth", "--out", "x", "--users", "1", "--items", "1"])
    assert callable(args.handler) and args.ann == "none" and args.factors == 64


def test_ann_flag_writes_an_index_beside_the_version(tmp_path: Path) -> None:
    pytest.importorskip("faiss")
    from mfserve.training.ann_store import load_index

    sizes = ["--users", "20", "--items", "3000", "--factors", "8"]
    assert main(["synth", "--out", str(tmp_path / "m"), *sizes, "--ann", "hnsw"]) == 0
    version = tmp_path / "m" / "1"
    index = load_index(version, load_artifact(version))
    assert index is not None and index.kind == "hnsw" and index.n_items == 3000


def test_index_command_builds_beside_an_existing_version(tmp_path: Path) -> None:
    pytest.importorskip("faiss")
    from mfserve.training.ann_store import load_index

    assert main(["synth", "--out", str(tmp_path / "m"), "--users", "10", "--items", "500"]) == 0
    assert main(["index", "--model", str(tmp_path / "m"), "--kind", "hnsw"]) == 0
    version = tmp_path / "m" / "1"
    index = load_index(version, load_artifact(version), "hnsw")
    assert index is not None and index.n_items == 500


def test_index_command_refuses_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["index", "--model", str(tmp_path / "missing")]) == 2
    assert "no such model folder" in capsys.readouterr().err
    assert main(["synth", "--out", str(tmp_path / "m"), "--users", "5", "--items", "50"]) == 0
    assert main(["index", "--model", str(tmp_path / "m"), "--ann-param", "bogus=1"]) == 2
    assert "unknown hnsw parameter" in capsys.readouterr().err
