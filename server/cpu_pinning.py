"""Binding a serving process to one CPU: ``mfserve serve --pin-cpus``.

Why: a gRPC call crosses threads inside the server several times (gRPC's poller thread hands it
to the event loop, the loop may hand a batch to the compute thread, and back). On a virtual
machine a wake-up that lands on another CPU waits for the hypervisor to run that CPU, while one
on the same CPU is a plain switch. ``python -m benchmarks.thread_hop`` measured one trip to a
thread and back at 138.4 us across this 2-CPU VM's CPUs and 26-33 us with both threads on one
CPU; the 1M-item approximate TopK at concurrency 1 takes 0.903-1.210 ms p50 pinned against
1.045-1.241 ms unpinned (docs/benchmarks.md).

The price: a pinned process uses one core. Its compute threads share that core with the event
loop, so a single pinned process gives up the second core that batches of large TopK scans can
use; with ``--workers N``, worker *i* takes the *i*-th CPU of the list, the usual one-worker-per-
core layout (nginx's ``worker_cpu_affinity``). Hence opt-in.

Linux only (``sched_setaffinity``); this module imports nothing heavy, so the command line can
check a CPU list before grpc or torch load.
"""

from __future__ import annotations

import contextlib
import os

AUTO = "auto"


class PinningError(ValueError):
    """A CPU list that cannot be used here; the message names the value."""


def allowed_cpus() -> tuple[int, ...]:
    """The CPUs this process may run on, in order."""
    if not hasattr(os, "sched_getaffinity"):
        raise PinningError("--pin-cpus needs Linux (sched_setaffinity)")
    return tuple(sorted(os.sched_getaffinity(0)))


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """``auto`` (every CPU this process may use) or a list like ``0,2-3``, in the order given.

    Raises ``PinningError`` naming the offending part: not a number, a backwards range, a
    repeated CPU, or a CPU this process may not run on.
    """
    allowed = allowed_cpus()
    if text.strip() == AUTO:
        return allowed
    cpus: list[int] = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            low = int(first)
            high = int(last) if dash else low
        except ValueError:
            raise PinningError(
                f"--pin-cpus {text!r}: {part.strip()!r} is not a CPU number or range like 2-3"
            ) from None
        if low < 0 or high < low:
            raise PinningError(f"--pin-cpus {text!r}: {part.strip()!r} is not a valid range")
        for cpu in range(low, high + 1):
            if cpu in cpus:
                raise PinningError(f"--pin-cpus {text!r}: CPU {cpu} is listed twice")
            if cpu not in allowed:
                names = ",".join(map(str, allowed))
                raise PinningError(
                    f"--pin-cpus {text!r}: CPU {cpu} is not one this process may use ({names})"
                )
            cpus.append(cpu)
    return tuple(cpus)


def cpu_for_worker(cpus: tuple[int, ...], index: int) -> int:
    """The CPU of worker ``index`` (0-based): the list in turn, round again past its end."""
    return cpus[index % len(cpus)]


def pin_process(cpu: int) -> None:
    """Bind every thread of this process to ``cpu``; threads started later inherit it.

    ``sched_setaffinity(0, ...)`` binds only the calling thread on Linux, and threads started
    before this (a library's pool, say) would keep running anywhere, so each thread is bound.
    """
    tasks = [int(name) for name in os.listdir("/proc/self/task")]
    for tid in tasks:
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(tid, {cpu})
    os.sched_setaffinity(0, {cpu})


def usable_cpus(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """The CPUs this process may use: its affinity mask, lowered to a cgroup v2 CPU quota when
    one is set. ``os.cpu_count()`` counts the host's, so ``--workers 0`` in a container limited
    to 2 CPUs on a 64-core node would fork 64 workers that share 2 CPUs of time."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        count = os.cpu_count() or 1
    with contextlib.suppress(OSError, ValueError):
        with open(f"{cgroup_root}/cpu.max") as limits:
            quota, period = limits.read().split()[:2]
        if quota != "max":
            count = min(count, max(1, -(-int(quota) // int(period))))
    return max(1, count)
