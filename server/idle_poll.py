"""Idle polling (``mfserve serve --idle-poll``, opt-in): keep the CPUs from halting between calls.

On a virtual machine an idle CPU halts, and the hypervisor takes the physical core back; the next
network packet or thread wake-up then waits for the host to schedule the virtual CPU again. On
this project's 2-core VM that costs about half a millisecond per round trip: the empty gRPC
handler answers a lone call in 0.684-0.956 ms, and in 0.586-0.695 ms while every CPU is kept busy
(docs/benchmarks.md, the 1M-item runs' floor). Kernels offer the same trade as ``idle=poll`` or the ``haltpoll`` cpuidle
driver; a server process cannot spin itself (its Python threads share one GIL), so this starts
one small process per CPU that spins at ``SCHED_IDLE`` priority: it runs only when nothing else
wants that CPU and is preempted at once when anything else does, so it costs other work almost
nothing, but the CPU never idles. The price: every CPU the server may use shows 100% busy, and it
draws the power of a busy core. Meant for dedicated, latency-critical hosts; off by default.

Linux only (``SCHED_IDLE``). Each spinner asks the kernel to kill it when its parent dies, so a
crashed server leaves none behind; a graceful stop terminates them.

    python -m mfserve.server.idle_poll CPU PARENT_PID    # one spinner (what IdlePoll starts)
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterable
from types import TracebackType

log = logging.getLogger("mfserve.server")

_PR_SET_PDEATHSIG = 1  # prctl option: a signal for this process when its parent thread exits


class IdlePollError(Exception):
    """Idle polling is not available here (not Linux) or a CPU is not one this process may use."""


def available_cpus() -> list[int]:
    if not hasattr(os, "sched_getaffinity") or not hasattr(os, "SCHED_IDLE"):
        raise IdlePollError("--idle-poll needs Linux (SCHED_IDLE and CPU affinity)")
    return sorted(os.sched_getaffinity(0))


class IdlePoll:
    """One ``SCHED_IDLE`` spinner process per CPU while the context is open (module doc)."""

    def __init__(self, cpus: Iterable[int] | None = None) -> None:
        allowed = available_cpus()
        self.cpus = sorted(set(cpus)) if cpus is not None else allowed
        outside = [cpu for cpu in self.cpus if cpu not in allowed]
        if outside or not self.cpus:
            raise IdlePollError(
                f"--idle-poll: CPUs {outside or self.cpus} are not among this process's CPUs "
                f"{allowed}"
            )
        self.spinners: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> IdlePoll:
        parent = str(os.getpid())
        try:
            for cpu in self.cpus:
                self.spinners.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "mfserve.server.idle_poll", str(cpu), parent],
                        stdin=subprocess.DEVNULL,
                    )
                )
        except BaseException:
            self.stop()
            raise
        pids = ", ".join(str(spinner.pid) for spinner in self.spinners)
        log.info(
            "mfserve: idle polling on CPUs %s (SCHED_IDLE spinners, pids %s): idle CPU time is "
            "spent spinning so that wake-ups do not wait for a halted CPU",
            ",".join(map(str, self.cpus)),
            pids,
        )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        for spinner in self.spinners:
            if spinner.poll() is None:
                spinner.terminate()
        for spinner in self.spinners:
            try:
                spinner.wait(timeout=5)
            except subprocess.TimeoutExpired:
                spinner.kill()
                spinner.wait()
        self.spinners.clear()


def spin(cpu: int, parent: int) -> None:
    """Become the spinner for ``cpu`` (never returns; SIGTERM or the parent's death ends it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent died before the line above took effect
        sys.exit(0)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    # `mfserve serve` blocks its stop signals until its handlers exist, and an exec keeps the
    # mask: unblocked here, or the parent-death SIGTERM above would never arrive.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    os.sched_setaffinity(0, {cpu})
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    while True:
        pass


if __name__ == "__main__":
    spin(int(sys.argv[1]), int(sys.argv[2]))
