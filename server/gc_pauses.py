"""Garbage-collection pauses while serving, counted for the shutdown log.

A serving process holds a few hundred thousand long-lived objects (torch, numba and faiss modules,
the model's tables), and every full collection walks them all with the event loop stopped:
91-117 ms a pass on this project's 2-core host (docs/benchmarks.md). ``serve()`` therefore
freezes everything loaded at startup (``gc.freeze()``, as the multi-worker parent does before forking), so collections only walk what
was allocated since. This module measures the result: each collection's generation and wall time,
summed per generation, for one log line at shutdown.
"""

from __future__ import annotations

import gc
import time
from types import TracebackType
from typing import Any

GENERATIONS = ("young", "middle", "full")


class GcPauses:
    """Counts collections and their pause time per generation while the context is open."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self._started = 0.0

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        generation = min(int(info.get("generation", 0)), 2)
        self.collections[generation] += 1
        self.seconds[generation] += time.perf_counter() - self._started

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._on_gc)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def summary(self) -> str:
        """``young 931 (30.7 ms), middle 84 (26.7 ms), full 0 (0.0 ms); 264,317 objects frozen``."""
        counts = ", ".join(
            f"{name} {count} ({seconds * 1000:.1f} ms)"
            for name, count, seconds in zip(
                GENERATIONS, self.collections, self.seconds, strict=True
            )
        )
        return f"{counts}; {gc.get_freeze_count():,} objects frozen"
