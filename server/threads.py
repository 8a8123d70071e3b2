"""OpenMP thread counts, which OpenMP keeps per thread: the event loop's, the compute thread's,
and faiss's are each set on the thread that uses them.

Why one thread each by default: a serving process is one core's worth of event loop, and a team
of OpenMP threads spinning beside it on a small host steals the cores the loops need
(parallelism comes from ``--workers``).
"""

from __future__ import annotations


def init_compute_thread(ann: bool, torch_threads: int) -> None:
    """The compute thread's initializer. Without it the thread starts at one OpenMP thread per
    core, and a lone TopK on it spins up (and spins on) a team of OpenMP threads (measured 7 ms
    instead of 0.3 ms per call on a busy 2-core host)."""
    set_torch_threads(torch_threads)
    if ann:
        set_faiss_threads(1)


def current_torch_threads() -> int:
    """The calling thread's torch intra-op threads."""
    import torch

    return torch.get_num_threads()


def set_faiss_threads(threads: int) -> None:
    """faiss's OpenMP threads for the calling thread (a no-op without faiss)."""
    try:
        import faiss
    except ImportError:  # no index can have been loaded without it
        return
    faiss.omp_set_num_threads(threads)


def set_torch_threads(threads: int) -> None:
    """Set the calling thread's torch intra-op threads (and the default of threads started later;
    0 keeps torch's default)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
        # torch initialises each thread's OpenMP count lazily, from the last value set by any
        # thread: without this read, another thread setting its own count before this thread's
        # first parallel op would silently overwrite this one.
        torch.get_num_threads()
