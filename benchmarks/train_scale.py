"""Training at scale: `mfserve train` with the defaults on synthetic ratings shaped like ml-25m.

    python -m benchmarks.train_scale --sizes 1000000,5000000,full [--nprocs 1,2] [--peer]
        [--data-dir /tmp/scale] [--tool ../shared/tools/big_ratings.py] [--extra "--rank-iters 12"]

For each size, the ratings are made once by the workplace's generator (``big_ratings.py OUT
--ratings N``: Zipf item popularity, log-normal user activity) and kept in ``--data-dir``;
then one ``mfserve train --data FILE [--nproc N]`` run per size and process count, timed.
Reported: wall seconds, the peak RSS of the run's largest process (``getrusage`` of a wrapper's
children: with ``--nproc 2`` one rank's, not their sum), the fit seconds and the test RMSE /
NDCG@10 it recorded. Each run is a fresh process.

``--peer`` also fits the same file with the ``implicit`` library's ALS (``pip install
implicit``; the peer of the ranking head: 64 factors, 12 iterations, all cores), timing its
load and its fit in a process of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_TOOL = Path(__file__).resolve().parents[2] / "shared" / "tools" / "big_ratings.py"


# Runs a command and reports the peak RSS of its largest process (itself or a descendant it
# waited for: torchrun's ranks), so each run's figure is its own, not the benchmark's maximum.
_PEAK = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
    "print('PEAK_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
    "sys.exit(code)"
)


def run_measured(command: list[str]) -> tuple[subprocess.CompletedProcess[str], float, float]:
    """``command``'s result, wall seconds and peak RSS in MiB."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _PEAK, *command], capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - started
    peak = next(
        (int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("PEAK_KIB")),
        0,
    )
    return done, wall, peak / 1024


def make_ratings(tool: Path, out: Path, ratings: int | None) -> None:
    """``ratings`` None: the generator's own default set (20,263,078, the issue's)."""
    if out.exists():
        return
    size = [] if ratings is None else ["--ratings", str(ratings)]
    subprocess.run([sys.executable, str(tool), str(out), *size], check=True)


def train_once(data: Path, extra: list[str], nproc: int = 1) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as models:
        command = [sys.executable, "-m", "mfserve", "train", "--data", str(data), "--out"]
        command += [str(Path(models) / "m"), "--no-progress", "--json", "--nproc", str(nproc)]
        command += extra
        done, wall, peak = run_measured(command)
    if done.returncode != 0:
        raise SystemExit(f"train failed on {data}:\n{done.stderr[-2000:]}")
    metrics = json.loads(done.stdout[done.stdout.index("{") :])["metrics"]
    return {"wall_s": wall, "peak_rss_mib": peak, **metrics}


def implicit_peer(data: Path) -> None:
    """In this process (``--run-peer``): load the file, fit implicit's ALS, print the seconds."""
    import implicit
    import pandas as pd
    import pyarrow.parquet as pq
    import scipy.sparse as sp

    started = time.perf_counter()
    table = pq.read_table(data).to_pandas()
    users = pd.factorize(table.iloc[:, 0])[0]
    items = pd.factorize(table.iloc[:, 1])[0]
    ratings = table.iloc[:, 2].to_numpy(dtype="float32")
    matrix = sp.csr_matrix((ratings / 5.0, (users, items)))
    loaded = time.perf_counter()
    model = implicit.als.AlternatingLeastSquares(
        factors=64, iterations=12, regularization=50.0, alpha=5.0, random_state=0
    )
    model.fit(matrix, show_progress=False)
    fitted = time.perf_counter()
    print(json.dumps({"load_s": loaded - started, "fit_s": fitted - loaded}))


def peer_once(data: Path) -> dict[str, float]:
    command = [sys.executable, "-m", "benchmarks.train_scale", "--run-peer", str(data)]
    done, wall, peak = run_measured(command)
    if done.returncode != 0:
        raise SystemExit(f"implicit failed on {data}:\n{done.stderr[-2000:]}")
    return {"wall_s": wall, "peak_rss_mib": peak, **json.loads(done.stdout)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        default="1000000,5000000,full",
        help="ratings to ask the generator for; 'full' is its default set (20,263,078)",
    )
    parser.add_argument("--nprocs", default="1", help="process counts to train with, e.g. 1,2")
    parser.add_argument("--peer", action="store_true", help="also fit implicit's ALS")
    parser.add_argument("--run-peer", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", default=os.environ.get("TMPDIR", "/tmp") + "/mfserve-scale")
    parser.add_argument("--tool", type=Path, default=DEFAULT_TOOL)
    parser.add_argument("--extra", default="", help="more `mfserve train` flags, one string")
    args = parser.parse_args(argv)
    if args.run_peer:
        implicit_peer(args.run_peer)
        return 0
    folder = Path(args.data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    print("| ratings asked | run | wall s | peak RSS MiB | fit s | test RMSE | NDCG@10 |")
    print("|---|---|---:|---:|---:|---:|---:|")
    asked = [None if s == "full" else int(s) for s in args.sizes.split(",")]
    for size in sorted(asked, key=lambda n: float("inf") if n is None else n):
        data = folder / f"ratings-{'full' if size is None else size}.parquet"
        make_ratings(args.tool, data, size)
        label = "20,263,078 (full)" if size is None else f"{size:,}"
        for nproc in (int(n) for n in args.nprocs.split(",")):
            row = train_once(data, shlex.split(args.extra), nproc)
            print(
                f"| {label} | mfserve train --nproc {nproc} | {row['wall_s']:.0f} "
                f"| {row['peak_rss_mib']:.0f} | {row.get('train_seconds', float('nan')):.0f} "
                f"| {row.get('rmse', float('nan')):.4f} "
                f"| {row.get('ndcg_at_10', float('nan')):.4f} |",
                flush=True,
            )
        if args.peer:
            peer = peer_once(data)
            print(
                f"| {label} | implicit ALS (load {peer['load_s']:.0f} s) | {peer['wall_s']:.0f} "
                f"| {peer['peak_rss_mib']:.0f} | {peer['fit_s']:.0f} | - | - |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
