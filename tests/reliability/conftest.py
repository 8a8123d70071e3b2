"""Fixtures of the reliability suite: a writable model folder per test, and server helpers."""

from __future__ import annotations

import re
import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_harness import ServerProcess, make_model_dir, wait_for

READY = re.compile(r"mfserve: (\d+) workers ready on \S+ \(pids ([\d, ]+)\)")


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    """``.../synthetic`` holding version 1 of the synthetic model, the test's own to change."""
    return make_model_dir(tmp_path / "models").parent


@pytest.fixture(scope="module")
def ids(model_dir: Path, synthetic_model: Any) -> tuple[list[str], list[str]]:
    """Every user and item id of the synthetic model (every version made here has the same)."""
    return list(synthetic_model.user_ids), list(synthetic_model.item_ids)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def worker_pids(server: ServerProcess) -> list[int]:
    """The worker pids, once the parent says every worker is serving."""
    assert wait_for(lambda: READY.search(server.log) is not None, timeout=120), server.log
    match = READY.search(server.log)
    assert match is not None
    return [int(pid) for pid in match[2].split(", ")]


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metric(port: int, name: str, **labels: str) -> float:
    return scrape(port).get((name, frozenset(labels.items())), 0.0)


def metric_sum(port: int, name: str) -> float:
    return sum(value for (sample, _), value in scrape(port).items() if sample == name)
