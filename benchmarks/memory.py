"""How much memory does a served model take, and what do two worker processes share?

Reads ``/proc/<pid>/smaps_rollup``: ``Rss`` counts every resident page of a process, shared or not;
``Pss`` divides each shared page among the processes mapping it, so the sum of Pss over the
workers is the memory they really take together. File-backed pages (the safetensors mmap) show as
``*_Clean``; ``Anonymous`` is the private heap: Python objects, and tensors computed at load time.

Scenarios (each worker: load_artifact + Recommender, then a steady-state mix of id lookups, id and
title reads for responses, batched TopK and SimilarItems, so copy-on-write has had its chance):

  stages  one process, measured after each loading step
  spawn   N independent processes, each loading the model itself (exec, like --workers N would)
  fork    the model loaded once, then N forked workers (gc.freeze() before the fork)

    python -m benchmarks.memory --model /tmp/big --workers 2
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import subprocess
import sys
from pathlib import Path

FIELDS = ("Rss", "Pss", "Shared_Clean", "Private_Clean", "Private_Dirty", "Anonymous")


def rollup(pid: int | str = "self") -> dict[str, int]:
    """smaps_rollup fields in MiB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == "kB":
            out[parts[0].rstrip(":")] = int(parts[1]) // 1024
    return out


def row(label: str, fields: dict[str, int]) -> str:
    return f"| {label} | " + " | ".join(f"{fields.get(f, 0):,}" for f in FIELDS) + " |"


HEADER = (
    "| process | " + " | ".join(f"{f} MB" for f in FIELDS) + " |\n|---|" + "---:|" * len(FIELDS)
)


def load(model: str) -> object:
    from mfserve.training.artifact import load_artifact
    from mfserve.training.recommender import Recommender

    return Recommender(load_artifact(model))


def exercise(recommender: object, queries: int, seed: int) -> None:
    """A serving-like mix: what a worker touches while answering for a while."""
    import torch

    from mfserve.training.recommender import Recommender

    assert isinstance(recommender, Recommender)
    rng = random.Random(seed)
    n_items, n_users = recommender.n_items, recommender.n_users
    titles = recommender.artifact.item_titles or []
    for _ in range(queries):
        ids = [f"i{rng.randrange(n_items)}" for _ in range(10)]
        rows = recommender.item_rows(ids)  # id -> row (dict lookups)
        _ = [recommender.item_ids[r] for r in rows]  # row -> id for a response
        _ = [titles[r] for r in rows] if titles else None  # include_metadata
        recommender.user_rows([f"u{rng.randrange(n_users)}"])
    users = torch.randint(0, n_users, (64,), generator=torch.Generator().manual_seed(seed))
    for _ in range(3):
        recommender.top_k(users, 10)
        recommender.similar_items(users.clamp(max=n_items - 1)[:8], 10)


def stages(model: str, queries: int) -> list[str]:
    lines = ["### One process, step by step", "", HEADER]
    import torch  # noqa: F401 - measured: the interpreter with torch is the baseline

    from mfserve.training.artifact import load_artifact
    from mfserve.training.recommender import Recommender

    lines.append(row("python + torch imported", rollup()))
    artifact = load_artifact(model)
    lines.append(row("load_artifact (mmap, ids and metadata parsed)", rollup()))
    total = sum(float(t.double().sum()) for t in artifact.tensors.values())  # touch every page
    lines.append(row("every tensor page read once", rollup()))
    recommender = Recommender(artifact)
    lines.append(row("Recommender() built", rollup()))
    exercise(recommender, queries, 0)
    lines.append(row(f"after {queries:,} lookups + TopK/SimilarItems", rollup()))
    del total
    return lines


def child_main(model: str, queries: int, seed: int) -> None:
    """A spawned worker: load, exercise, report ready, and stay alive until stdin closes."""
    recommender = load(model)
    exercise(recommender, queries, seed)
    print("READY", flush=True)
    sys.stdin.read()


def _self_command(model: str, queries: int) -> list[str]:
    return [sys.executable, "-m", "benchmarks.memory", "--model", model, "--queries", str(queries)]


def spawn(model: str, workers: int, queries: int) -> list[str]:
    procs = [
        subprocess.Popen(
            [*_self_command(model, queries), "--child", str(seed)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for seed in range(workers)
    ]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
    found = [rollup(proc.pid) for proc in procs]
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait()
    return _summary(f"{workers} spawned workers, each loading the model", found, [])


def fork(model: str, workers: int, queries: int) -> list[str]:
    recommender = load(model)
    gc.collect()
    gc.freeze()  # keep the collector from touching (and so copying) every inherited object
    parent = rollup()
    pids, ready, release = [], [], []
    for seed in range(workers):
        ready_r, ready_w = os.pipe()
        release_r, release_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            # Measured: a child that runs a torch op with the parent's (pre-fork) OpenMP pool hangs
            # forever; one intra-op thread in the child avoids the pool. Any fork-after-load
            # design must do this before its first tensor op.
            import torch

            torch.set_num_threads(1)
            os.close(ready_r)
            os.close(release_w)
            exercise(recommender, queries, seed)
            os.write(ready_w, b"1")
            os.read(release_r, 1)
            os._exit(0)
        os.close(ready_w)
        os.close(release_r)
        pids.append(pid)
        ready.append(ready_r)
        release.append(release_w)
    for fd in ready:
        os.read(fd, 1)
    found = [rollup(pid) for pid in pids]
    parent_now = rollup()
    for fd in release:
        os.close(fd)
    for pid in pids:
        os.waitpid(pid, 0)
    lines = _summary(f"{workers} workers forked after loading (gc.freeze)", found, [parent_now])
    lines.insert(3, row("parent right after loading", parent))
    return lines


def _summary(title: str, workers: list[dict[str, int]], others: list[dict[str, int]]) -> list[str]:
    lines = [f"### {title}", "", HEADER]
    lines += [row(f"worker {i}", w) for i, w in enumerate(workers)]
    lines += [row("parent (holds the model too)", o) for o in others]
    everyone = workers + others
    lines.append(row("**sum**", {f: sum(w.get(f, 0) for w in everyone) for f in FIELDS}))
    pss = sum(w["Pss"] for w in everyone)
    one = workers[0]["Rss"]
    lines += [
        "",
        f"Real memory of all processes (sum of Pss): {pss:,} MB; one worker's Rss: {one:,} MB; "
        f"ratio {pss / one:.2f}x.",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--model", required=True, help="version folder (or model folder: newest)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--queries", type=int, default=20_000, help="lookup rounds per worker")
    parser.add_argument("--modes", default="stages,spawn,fork")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--markdown", help="also write the tables to this file")
    args = parser.parse_args(argv)
    if args.child is not None:
        child_main(args.model, args.queries, args.child)
        return 0
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if len(modes) > 1:
        # Each mode in a fresh interpreter, so no mode inherits another's freed-but-resident heap.
        lines = ["# Memory of a loaded model", ""]
        for mode in modes:
            command = _self_command(args.model, args.queries)
            out = subprocess.run(
                [*command, "--workers", str(args.workers), "--modes", mode],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            lines += [out.rstrip(), ""]
            print(out, flush=True)
    else:
        if modes[0] == "stages":
            lines = stages(args.model, args.queries)
        else:
            lines = {"spawn": spawn, "fork": fork}[modes[0]](args.model, args.workers, args.queries)
        print("\n".join(lines), flush=True)
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
