"""Smoke run of the serving benchmark: real processes, ~1 s cells, only checks the table's shape.

Timings are never asserted (the machine is shared and noisy); the run proves the harness, the
baseline servers and the load clients work together end to end.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from server_harness import wait_for

from benchmarks.harness.cli import main

ROOT = Path(__file__).resolve().parents[2]
SHORT = ["--duration", "0.4", "--warmup", "0.1", "--start-margin", "0.3"]
TINY_MODEL = ["--users", "50", "--items", "2000", "--factors", "16"]


def bench_table(tmp_path: Path, *args: str) -> str:
    """The harness on a tiny synthetic model with short cells; its markdown table."""
    markdown = tmp_path / "bench.md"
    assert main([*args, *SHORT, *TINY_MODEL, "--markdown", str(markdown)]) == 0
    return markdown.read_text()


@pytest.mark.bench
@pytest.mark.timeout(180)
def test_quick_run_writes_every_row(tmp_path: Path) -> None:
    """Through the harness's own entry point, as ``python -m benchmarks.harness`` runs it."""
    text = bench_table(
        tmp_path, "--quick", "--servers", "empty,empty-hop,naive", "--concurrency", "1,2"
    )
    assert "| server | rpc | concurrency | QPS | pairs/s | p50 ms |" in text
    assert "Command: `python -m benchmarks.harness --quick" in text
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


def test_the_harness_runs_as_a_module_from_the_repository_root() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.harness", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m benchmarks.harness")


def test_the_table_carries_the_servers_shutdown_log() -> None:
    from benchmarks.harness.cells import Cell, render_markdown

    cells = [Cell("mfserve", "topk", 64, calls=10, qps=5.0, p50_ms=1.0, p95_ms=2.0, p99_ms=3.0)]
    log = ["mfserve: batching top_k: 10 calls in 2 batches (mean 5.0, max 6), 0 computed inline"]
    text = render_markdown(
        cells, {"cores": "2"}, "python -m benchmarks.harness", "m", (0.1, 0.2), log
    )
    assert "| mfserve | TopK | 64 |" in text
    assert text.index("Server log at shutdown") > text.index("| mfserve | TopK")
    assert log[0] in text
    assert "Server log" not in render_markdown(
        cells, {}, "python -m benchmarks.harness", "m", (0.1, 0.2)
    )


@pytest.mark.bench
@pytest.mark.timeout(180)
def test_rounds_report_medians_and_the_ratio_range(tmp_path: Path) -> None:
    servers = ["--servers", "empty,naive", "--rpcs", "topk", "--concurrency", "1"]
    text = bench_table(tmp_path, "--rounds", "2", *servers)
    assert "median over 2 rounds" in text
    naive = next(line for line in text.splitlines() if line.startswith("| naive | TopK | 1 |"))
    ratio = naive.split("|")[10].strip()  # "0.83x (0.80-0.86)"
    low, high = (float(x) for x in ratio.split("(")[1].rstrip(")").split("-"))
    assert low <= float(ratio.split("x")[0]) <= high


@pytest.mark.bench
@pytest.mark.timeout(180)
def test_the_table_ends_with_mfserves_shutdown_log(tmp_path: Path) -> None:
    servers = ["--servers", "empty,mfserve", "--rpcs", "topk", "--concurrency", "1"]
    # A variant is a second mfserve with its own arguments: here every call on the event loop.
    variant = ["--variant", "loop=--compute-threads 0 --max-batch-size 1"]
    table, log = bench_table(tmp_path, "--quick", *servers, *variant).split(
        "Server log at shutdown"
    )
    assert "mfserve: batching top_k: " in log
    assert "mfserve: garbage collection while serving: young " in log
    assert "objects frozen" in log
    assert "| loop | TopK | 1 |" in table and "| mfserve | TopK | 1 |" in table
    # Its own log: every batch computed on the loop, and a batch of one at most.
    loop_batching = next(
        line for line in log.splitlines() if line.startswith("loop: batching top_k")
    )
    calls = int(loop_batching.split(": ")[2].split()[0])
    assert f"{calls} calls in {calls} batches (mean 1.0, max 1), {calls} computed inline" in (
        loop_batching
    )


@pytest.mark.parametrize(
    ("variant", "complaint"),
    [
        ("loop", "expected NAME=ARGS"),
        ("Loop=--compute-threads 0", "expected NAME=ARGS"),
        ("mfserve=--compute-threads 0", "not one of empty, empty-hop, naive, mfserve"),
    ],
)
def test_a_bad_variant_is_refused_before_any_server_starts(
    variant: str, complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks.harness.cli import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--variant", variant])
    assert complaint in capsys.readouterr().err


def test_variants_join_the_servers_in_order_with_their_own_arguments() -> None:
    from benchmarks.harness.cli import parse_args
    from benchmarks.harness.processes import server_specs

    variants = ["--variant", "loop=--compute-threads 0", "--variant", "wide=--max-batch-size 128"]
    args = parse_args(["--servers", "empty,mfserve", "--mfserve-arg=--max-k=50", *variants])
    assert args.server_list == ["empty", "mfserve", "loop", "wide"]
    specs = server_specs(Path("m/1"), args.mfserve_arg, args.variants)
    assert specs["loop"].argv[-3:] == ["--max-k=50", "--compute-threads", "0"]
    assert specs["wide"].argv[-3:] == ["--max-k=50", "--max-batch-size", "128"]
    assert specs["mfserve"].argv[-1] == "--max-k=50"


def test_a_baseline_interpreter_serves_beside_mfserve_with_the_same_arguments(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from benchmarks.harness.cli import parse_args
    from benchmarks.harness.processes import server_specs

    args = parse_args(
        ["--servers", "empty,mfserve", "--baseline", "/old/bin/python", "--mfserve-arg=--max-k=5"]
    )
    assert args.server_list == ["empty", "mfserve", "baseline"]
    specs = server_specs(Path("m/1"), args.mfserve_arg, baseline=args.baseline)
    assert specs["baseline"].argv[:3] == ["/old/bin/python", "-m", "mfserve.server"]
    assert specs["baseline"].argv[3:] == specs["mfserve"].argv[3:]
    with pytest.raises(SystemExit):
        parse_args(["--servers", "empty,baseline"])
    assert "needs --baseline PYTHON" in capsys.readouterr().err


def test_combine_takes_medians_and_per_round_ratios() -> None:
    from benchmarks.harness.cells import Cell, combine, set_ratios

    rounds = []
    for empty_qps, ours_qps, p50 in ((100.0, 50.0, 1.0), (200.0, 160.0, 3.0), (300.0, 90.0, 2.0)):
        cells = [
            Cell("empty", "topk", 8, calls=10, qps=empty_qps, p50_ms=0.5),
            Cell("mfserve", "topk", 8, calls=10, qps=ours_qps, p50_ms=p50, errors={"X": 1}),
        ]
        set_ratios(cells)
        rounds.append(cells)
    empty, ours = combine(rounds)
    assert (empty.qps, ours.qps, ours.p50_ms) == (200.0, 90.0, 2.0)
    # Per-round ratios 0.5, 0.8, 0.3: their median 0.5, not the medians' ratio 90 / 200.
    assert ours.vs_empty == pytest.approx(0.5)
    assert ours.vs_empty_range == pytest.approx((0.3, 0.8))
    assert ours.errors == {"X": 3} and ours.calls == 30 and ours.rounds == 3


def test_pinning_reaches_every_server_and_a_bad_list_is_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from benchmarks.harness.cli import parse_args
    from benchmarks.harness.processes import server_specs

    args = parse_args(["--servers", "empty,naive,mfserve", "--pin-cpus", "auto"])
    specs = server_specs(
        Path("m/1"), ["--max-k=50"], {"loop": ["--compute-threads", "0"]}, pin_cpus=args.pin_cpus
    )
    for spec in specs.values():  # the floors too, so they are measured alike
        assert spec.argv[-2:] == ["--pin-cpus", "auto"], spec.name
    with pytest.raises(SystemExit):
        parse_args(["--pin-cpus", "0-x"])
    assert "--pin-cpus '0-x'" in capsys.readouterr().err


@pytest.mark.bench
@pytest.mark.timeout(180)
def test_a_pinned_run_serves_every_cell(tmp_path: Path) -> None:
    servers = ["--servers", "empty,mfserve", "--rpcs", "topk", "--concurrency", "1"]
    table = bench_table(tmp_path, "--quick", "--pin-cpus", "auto", *servers)
    assert "--pin-cpus auto" in table  # the command line, as run
    for server in ("empty", "mfserve"):
        row = next(line for line in table.splitlines() if line.startswith(f"| {server} | TopK |"))
        assert float(row.split("|")[4].replace(",", "")) > 0, row
        assert row.rstrip("| ").endswith("| 0"), row  # no errors


@pytest.mark.bench
@pytest.mark.timeout(180)
def test_server_cpu_counts_the_workers_and_not_the_spinners(model_dir: Path) -> None:
    from benchmarks.harness.processes import RunningServer, server_specs

    variants = {"w2": ["--workers", "2", "--idle-poll", "--access-log"]}
    spec = server_specs(model_dir, [], variants)["w2"]
    server = RunningServer(spec, timeout=120)
    try:
        assert wait_for(lambda: "2 workers ready" in "\n".join(server.tail), timeout=120)
        pids = server._server_pids()
        worker_pids = {
            int(m) for m in re.findall(r"\[worker \d+ pid (\d+)\]", "\n".join(server.tail))
        }
        # The parent and its two workers; the spinner processes (children too) are left out.
        assert pids[0] == server.proc.pid and set(pids[1:]) == worker_pids and len(pids) == 3
        assert server.cpu_seconds() > 0
    finally:
        server.stop()
