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


def test_the_table_carries_the_servers_batching_log() -> None:
    from mfserve.server.bench.harness import Cell, render_markdown

    cells = [Cell("mfserve", "topk", 64, calls=10, qps=5.0, p50_ms=1.0, p95_ms=2.0, p99_ms=3.0)]
    log = ["mfserve: batching top_k: 10 calls in 2 batches (mean 5.0, max 6), 0 computed inline"]
    text = render_markdown(cells, {"cores": "2"}, "mfserve bench", "m", (0.1, 0.2), log)
    assert "| mfserve | TopK | 64 |" in text
    assert text.index("Server log at shutdown") > text.index("| mfserve | TopK")
    assert log[0] in text
    assert "Server log" not in render_markdown(cells, {}, "mfserve bench", "m", (0.1, 0.2))
