"""Where training time goes: cProfile of one rating-head epoch and one iALS sweep on a ratings file.

    python -m benchmarks.train_profile DATA [--top 14]

Loads and splits ``DATA`` as ``mfserve train`` does (timed), then runs ``fit`` with the default
recipe cut to 1 epoch and 1 ranking sweep under cProfile, and prints the functions with the most
time of their own. Used to find the per-batch implicit sums and the iALS gathers (issue 19).
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import pstats
import resource
import time

from mfserve.training.config import TrainConfig
from mfserve.training.data import load_ratings
from mfserve.training.fit import fit
from mfserve.training.pipeline import protocol_for


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data")
    parser.add_argument("--top", type=int, default=14)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    data = load_ratings(args.data, progress=False)
    loaded = time.perf_counter()
    protocol = protocol_for(data, 0.2, 42)
    split = time.perf_counter()
    print(
        f"load {loaded - started:.1f} s, protocol {split - loaded:.1f} s: {len(data.ratings):,} "
        f"ratings, {protocol.n_users:,} users, {protocol.n_items:,} items"
    )
    config = dataclasses.replace(TrainConfig(), epochs=1, rank_iters=1, patience=0)
    profile = cProfile.Profile()
    profile.enable()
    began = time.perf_counter()
    fit(
        protocol.train_users,
        protocol.train_items,
        protocol.train_ratings,
        protocol.n_users,
        protocol.n_items,
        config,
        progress=False,
        rating_range=data.rating_range,
    )
    profile.disable()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"fit, 1 epoch + 1 iALS sweep: {time.perf_counter() - began:.1f} s, peak RSS {peak:.0f} MiB"
    )
    pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
