"""A warning that may fire thousands of times a second, logged at most once per interval.

Refused and shed calls come in floods (a scanner, a burst): one line per call would bury the log
and cost more than the refusal. Each line says how many events it stands for.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

EVERY_SECONDS = 10.0


class ThrottledLog:
    """``note()`` counts an event; a line is logged for the first and then at most once per
    ``every_seconds``, with the count since the last line."""

    def __init__(self, logger: logging.Logger, every_seconds: float = EVERY_SECONDS) -> None:
        self._log = logger
        self._every = every_seconds
        self._lock = threading.Lock()
        self._count = 0
        self._last = -float("inf")

    def note(self, message: str, *args: Any, extra: dict[str, Any] | None = None) -> None:
        """Count one event; log ``message % (count, *args)`` when the interval has passed."""
        with self._lock:
            self._count += 1
            now = time.monotonic()
            if now - self._last < self._every:
                return
            count, self._count, self._last = self._count, 0, now
        self._log.warning(message, count, *args, extra={**(extra or {}), "events": count})
