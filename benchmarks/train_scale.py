"""Training at scale: `mfserve train` with the defaults on synthetic ratings shaped like ml-25m.

    python -m benchmarks.train_scale --sizes 1000000,5000000 [--data-dir /tmp/scale]
        [--tool ../shared/tools/big_ratings.py] [--extra "--rank-iters 12"]

For each size, the ratings are made once by the workplace's generator (``big_ratings.py OUT
--ratings N``: Zipf item popularity, log-normal user activity) and kept in ``--data-dir``;
then one ``mfserve train --data FILE`` process per size, timed. Reported: wall seconds, the
training process's peak RSS (``getrusage`` of the child) and the test RMSE / NDCG@10 it
recorded. Each size runs in a fresh process, so peak RSS is that size's own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_TOOL = Path(__file__).resolve().parents[2] / "shared" / "tools" / "big_ratings.py"


def make_ratings(tool: Path, out: Path, ratings: int) -> None:
    if out.exists():
        return
    subprocess.run([sys.executable, str(tool), str(out), "--ratings", str(ratings)], check=True)


def train_once(data: Path, extra: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as models:
        command = [sys.executable, "-m", "mfserve", "train", "--data", str(data), "--out"]
        command += [str(Path(models) / "m"), "--no-progress", "--json", *extra]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"train failed on {data}:\n{done.stderr[-2000:]}")
    metrics = json.loads(done.stdout)["metrics"]
    # ru_maxrss of the children: the largest one so far, so sizes are run smallest first.
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"wall_s": wall, "peak_rss_mib": peak, **metrics}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000000,5000000,20000000")
    parser.add_argument("--data-dir", default=os.environ.get("TMPDIR", "/tmp") + "/mfserve-scale")
    parser.add_argument("--tool", type=Path, default=DEFAULT_TOOL)
    parser.add_argument("--extra", default="", help="more `mfserve train` flags, one string")
    args = parser.parse_args(argv)
    folder = Path(args.data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    print("| ratings asked | wall s | peak RSS MiB | train s (fit) | test RMSE | NDCG@10 |")
    print("|---|---|---|---|---|---|")
    for size in sorted(int(s) for s in args.sizes.split(",")):
        data = folder / f"ratings-{size}.parquet"
        make_ratings(args.tool, data, size)
        row = train_once(data, shlex.split(args.extra))
        print(
            f"| {size:,} | {row['wall_s']:.0f} | {row['peak_rss_mib']:.0f} "
            f"| {row.get('train_seconds', float('nan')):.0f} | {row.get('rmse', float('nan')):.4f} "
            f"| {row.get('ndcg_at_10', float('nan')):.4f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
