"""A lone HNSW search with the graph in item order against the same graph renumbered breadth-first.

    python -m benchmarks.ann_layout --model /tmp/big [--ef 48] [--queries 600] [--rounds 3]

Loads the HNSW index stored beside the model and makes both layouts of the same graph from it
(``mfserve.training.ann_layout``), then times lone searches of random users, alternating the two
layouts query by query, each search after 64 MB of other memory traffic (as a server's lone call
finds its caches after the client and the gRPC stack ran), and again hot (50 users cycled). The
two must answer alike; the script says whether they did.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np


def _both_layouts(stored: Any, faiss: Any) -> tuple[Any, Any]:
    """(item order, renumbered) copies of a stored HNSW graph, whichever layout it was saved in."""
    from mfserve.training.ann_layout import locality_ordered

    stored = faiss.downcast_index(stored)
    if isinstance(stored, faiss.IndexIDMap):
        order = faiss.vector_to_array(stored.id_map)
        item_order = faiss.clone_index(faiss.downcast_index(stored.index))
        item_order.permute_entries(np.argsort(order))  # node i back to item i
    else:
        item_order = stored
    return item_order, locality_ordered(faiss.clone_index(item_order), faiss)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a model with an HNSW index")
    parser.add_argument("--ef", type=int, default=48, help="efSearch")
    parser.add_argument("--queries", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=3)
    opts = parser.parse_args(argv)

    from mfserve.training.ann_store import load_index
    from mfserve.training.artifact import load_artifact, resolve_version
    from mfserve.training.scoring.ann import faiss_module

    faiss = faiss_module()
    faiss.omp_set_num_threads(1)
    version = resolve_version(opts.model)
    artifact = load_artifact(version)
    index = load_index(version, artifact, "hnsw")
    if index is None:
        raise SystemExit(f"{version}: no HNSW index stored beside the model")
    started = time.perf_counter()
    item_order, renumbered = _both_layouts(index.index, faiss)
    print(f"renumbered {item_order.ntotal:,} nodes in {time.perf_counter() - started:.1f} s")

    users = np.random.default_rng(0).integers(0, artifact.n_users, opts.queries)
    queries = index.tables.queries[users].astype(np.float32)
    if index.augmented:
        queries = np.hstack([queries, np.ones((len(users), 1), dtype=np.float32)])
    params = faiss.SearchParametersHNSW(efSearch=opts.ef)
    traffic = np.ones(64 << 20, dtype=np.uint8)

    def search(layout: Any, n: int, *, cold: bool) -> tuple[float, np.ndarray]:
        if cold:
            traffic[::64] += 1  # one write per cache line
        query = queries[n : n + 1]
        begun = time.perf_counter()
        _, rows = layout.search(query, 10, params=params)
        return time.perf_counter() - begun, rows[0]

    layouts = {"item order": item_order, "renumbered": renumbered}
    print(f"lone search p50, efSearch {opts.ef}, {opts.queries} random users a round (us):")
    for number in range(opts.rounds):
        cold: dict[str, list[float]] = {name: [] for name in layouts}
        hot: dict[str, list[float]] = {name: [] for name in layouts}
        differ = 0
        for n in range(opts.queries):
            names = list(layouts) if n % 2 else list(reversed(layouts))
            answers = {}
            for name in names:
                seconds, answers[name] = search(layouts[name], n, cold=True)
                cold[name].append(seconds)
            differ += int(set(answers["item order"]) != set(answers["renumbered"]))
        for n in range(2_000):
            for name in layouts:
                hot[name].append(search(layouts[name], n % 50, cold=False)[0])
        figures = ", ".join(
            f"{name}: cold {1e6 * statistics.median(cold[name]):.0f}, "
            f"hot {1e6 * statistics.median(hot[name]):.0f}"
            for name in layouts
        )
        print(f"  round {number + 1}: {figures}; answers differ for {differ} of {opts.queries}")


if __name__ == "__main__":
    main()
