"""Training under torchrun: two local processes on the bundled data train the model one process
trains (within 0.01 RMSE and NDCG@10), and only rank 0 writes it."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mfserve.training.distributed import Ranks

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("n", "world"), [(10, 3), (2, 4), (0, 2), (7, 1)])
def test_blocks_cover_every_row_once(n: int, world: int) -> None:
    blocks = [Ranks(rank, world).block(n) for rank in range(world)]
    assert blocks[0][0] == 0 and blocks[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(blocks))
    sizes = [hi - lo for lo, hi in blocks]
    assert max(sizes) - min(sizes) <= 1


def test_two_processes_train_the_model_one_process_trains(
    movielens_model: tuple[Path, dict[str, float]], tmp_path: Path
) -> None:
    _, single = movielens_model
    out = tmp_path / "models"
    command = [
        sys.executable, "-m", "mfserve.training", "train", "--nproc", "2",
        "--out", str(out), "--no-progress", "--json",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout[result.stdout.index("{") :])
    assert [p.name for p in out.iterdir()] == ["1"]  # one artifact, from rank 0 alone
    metrics = json.loads((out / "1" / "manifest.json").read_text())["metrics"]
    assert metrics == pytest.approx(report["metrics"])
    assert abs(metrics["rmse"] - single["rmse"]) <= 0.01, (metrics["rmse"], single["rmse"])
    assert abs(metrics["ndcg_at_10"] - single["ndcg_at_10"]) <= 0.01, (
        metrics["ndcg_at_10"],
        single["ndcg_at_10"],
    )


def test_nproc_must_be_positive(tmp_path: Path) -> None:
    from mfserve.training.cli import main

    assert main(["train", "--nproc", "0", "--out", str(tmp_path / "m")]) == 2
    assert not (tmp_path / "m").exists()


def test_cuda_without_a_gpu_is_a_clear_error(tmp_path: Path) -> None:
    import torch

    from mfserve.training.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["train", "--device", "cuda", "--out", str(tmp_path / "m")]) == 2
    assert not (tmp_path / "m").exists()


def test_training_on_a_gpu_matches_the_cpu(
    movielens_model: tuple[Path, dict[str, float]], tmp_path: Path
) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the GPU path is checked where one is lent")
    from mfserve.training.pipeline import train_and_save

    _, single = movielens_model
    path, metrics = train_and_save(tmp_path / "gpu", progress=False, device="cuda")
    assert path is not None
    assert abs(metrics["rmse"] - single["rmse"]) <= 0.01
    assert abs(metrics["ndcg_at_10"] - single["ndcg_at_10"]) <= 0.01
