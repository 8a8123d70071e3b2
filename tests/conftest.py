"""Shared fixtures. The server fixtures live in ``server_harness`` (importable by any test)."""

from __future__ import annotations

from pathlib import Path

import pytest
from server_harness import model_dir, server_address, synthetic_model

__all__ = ["model_dir", "movielens_model", "server_address", "synthetic_model"]


@pytest.fixture(scope="session")
def movielens_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, float]]:
    """The default recipe trained once per session on the bundled data: (version folder, metrics)."""
    from mfserve.training.pipeline import train_and_save

    return train_and_save(tmp_path_factory.mktemp("models") / "movielens", progress=False)
