"""What one trip from the event loop to a compute thread and back costs, with no work at all.

The batchers hand each batch to a compute thread and take the answers back on the loop: the
thread wakes, runs, and wakes the loop through its self-pipe. This times that round trip alone,
one trip at a time on an otherwise idle process, two ways:

* ``executor``: ``ThreadPoolExecutor.submit`` with a done-callback that calls
  ``loop.call_soon_threadsafe``, as ``mfserve.server.batching.Batcher`` does;
* ``queue``: a bare thread reading a ``queue.SimpleQueue`` (the leanest pure-Python hop).

Each way runs twice a round: with the threads free to run on any CPU, and with both bound to one
CPU (what ``mfserve serve --pin-cpus`` does to a serving process; the threads are started after
the binding, so they inherit it).

Reports the median over ``--rounds`` of the wall time and the process CPU time (both threads,
user + system) per trip. On a small VM most of it is the kernel's thread wake-ups across CPUs,
which is why a lone cheap call is computed on the loop instead, and why ``--pin-cpus`` lowers
latency.

    python -m benchmarks.thread_hop [--trips 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import statistics
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


def _nothing() -> int:
    return 1


async def _executor_trips(trips: int) -> None:
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(1) as executor:
        for _ in range(trips):
            answer: asyncio.Future[int] = loop.create_future()

            def back(done: Future[int], answer: asyncio.Future[int] = answer) -> None:
                loop.call_soon_threadsafe(answer.set_result, done.result())

            executor.submit(_nothing).add_done_callback(back)
            await answer


async def _queue_trips(trips: int) -> None:
    loop = asyncio.get_running_loop()
    work: queue.SimpleQueue[asyncio.Future[int] | None] = queue.SimpleQueue()

    def worker() -> None:
        while (answer := work.get()) is not None:
            loop.call_soon_threadsafe(answer.set_result, _nothing())

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    for _ in range(trips):
        answer: asyncio.Future[int] = loop.create_future()
        work.put(answer)
        await answer
    work.put(None)
    thread.join()


def _time(trips: int, run: Callable[[int], Coroutine[Any, Any, None]]) -> tuple[float, float]:
    """(wall us, CPU us) per trip."""
    cpu, wall = time.process_time(), time.perf_counter()
    asyncio.run(run(trips))
    return (time.perf_counter() - wall) / trips * 1e6, (time.process_time() - cpu) / trips * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trips", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    ways = {"executor": _executor_trips, "queue": _queue_trips}
    free = os.sched_getaffinity(0)
    placements = {"any CPU": free, f"one CPU ({min(free)})": {min(free)}}
    results: dict[tuple[str, str], list[tuple[float, float]]] = {
        (name, where): [] for name in ways for where in placements
    }
    for _ in range(args.rounds):  # alternate, so drift on the host hits all alike
        for name, run in ways.items():
            for where, cpus in placements.items():
                os.sched_setaffinity(0, cpus)  # this thread; the hop's threads start after it
                results[name, where].append(_time(args.trips, run))
    os.sched_setaffinity(0, free)
    print(f"{args.trips:,} trips per round, median of {args.rounds} rounds\n")
    print("| hop | threads on | wall us per trip | CPU us per trip |")
    print("|---|---|---:|---:|")
    for (name, where), rows in results.items():
        wall = statistics.median(row[0] for row in rows)
        cpu = statistics.median(row[1] for row in rows)
        print(f"| {name} | {where} | {wall:.1f} | {cpu:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
