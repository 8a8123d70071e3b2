"""Smoke run of the serving benchmark: real processes, ~1 s cells, only checks the table's shape.

Timings are never asserted (the machine is shared and noisy); the run proves the harness, the
baseline servers and the load clients work together end to end.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mfserve.client._cli import main


@pytest.mark.bench
@pytest.mark.timeout(180)
def test_quick_run_writes_every_row(tmp_path: Path) -> None:
    """Through the real ``mfserve bench`` command, as a user would run it."""
    markdown = tmp_path / "bench.md"
    short = ["--quick", "--duration", "0.4", "--warmup", "0.1", "--start-margin", "0.3"]
    model = ["--users", "50", "--items", "2000", "--factors", "16"]
    servers = ["--servers", "empty,empty-hop,naive", "--concurrency", "1,2"]
    code = main(["bench", *short, *model, *servers, "--markdown", str(markdown)])
    assert code == 0
    text = markdown.read_text()
    assert "| server | rpc | concurrency | QPS | pairs/s | p50 ms |" in text
    assert "Command: `mfserve bench --quick" in text
    assert "grpcio" in text and "torch" in text
    names = ("empty", "empty-hop", "naive")
    rows = [line for line in text.splitlines() if line.startswith(tuple(f"| {n} " for n in names))]
    assert len(rows) == 3 * 3 * 2
    for server in names:
        for rpc in ("Predict", "BatchPredict", "TopK"):
            for concurrency in (1, 2):
                row = next(r for r in rows if r.startswith(f"| {server} | {rpc} | {concurrency} |"))
                qps = float(row.split("|")[4].replace(",", ""))
                assert qps > 0, row
    assert all("| 1.00x |" in r for r in rows if r.startswith("| empty "))
