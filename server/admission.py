"""Load shedding: at most ``--max-concurrent-rpcs`` calls of the service at once, the rest told
``RESOURCE_EXHAUSTED`` at once, so that callers back off instead of waiting or being cancelled.

Why not only gRPC's own ``maximum_concurrent_rpcs``: it counts health checks too, so under a burst
the probes fail and an orchestrator restarts a server that was only busy; it answers with a
message of its own that says nothing of the flag; and it can be neither counted nor logged. Here
only the ``RecommenderService`` methods count, and every shed call is counted
(``mfserve_shed_calls_total``) and logged at a bounded rate. gRPC's limit stays on, set
``STANDARD_HEADROOM`` higher (:func:`grpc_limit`), as the bound on everything else a client can
hold open (health watches, reflection streams, calls waiting for their request).

The other half of a burst happens before Python sees a call: gRPC's C core keeps arriving calls
in a queue until the server asks for them, and once more than 1,000 wait there it cancels the
rest (the client sees ``CANCELLED``, nothing is logged). ``PENDING_CALLS`` raises that bound, so
a burst reaches this module and is answered properly; calls that wait there are bounded by
HTTP/2 flow control (at most one window of request bytes each).
"""

from __future__ import annotations

import asyncio
import logging
import time

from mfserve.server import metrics
from mfserve.server.throttled_log import ThrottledLog

log = logging.getLogger("mfserve.server")

# gRPC C core's queue of calls not yet handed to Python (``grpc.server.max_pending_requests``,
# default 1,000, and its hard limit, default 3,000): measured, a burst of 10,000 TopK calls on one
# channel got 6,973 CANCELLED with the defaults and none with this bound.
PENDING_CALLS = 100_000
# The drain before a shutdown (Admission.drain): refuse until no call came for this long...
DRAIN_QUIET_SECONDS = 0.05
# ...or this long has passed, under a load that never pauses.
DRAIN_SECONDS = 1.0
# Calls beyond the service's limit that gRPC itself still admits: health probes and watches,
# reflection, and the service calls this module sheds (each is admitted for as long as it takes
# to refuse it).
STANDARD_HEADROOM = 1_024


class Admission:
    """Counts the service's calls in flight; ``limit`` None admits all.

    Every handler runs on the server's one event loop thread, so plain integers are safe.
    """

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.active = 0
        self.shed = 0
        self.draining = False
        self.last_arrival = 0.0  # monotonic time of the latest call, while draining
        self._log = ThrottledLog(log)
        self.refusal = (
            f"the server is at its limit of {limit} concurrent calls (--max-concurrent-rpcs); "
            "retry with backoff"
        )

    def enter(self, method: str) -> bool:
        """Admit a call of ``method`` (then :meth:`leave` when it ends), or count it shed.
        While :meth:`drain` runs nothing is admitted (the caller answers UNAVAILABLE)."""
        if self.draining:
            self.last_arrival = time.monotonic()
            return False
        if self.limit is not None and self.active >= self.limit:
            self.shed += 1
            metrics.count_shed(method)
            self._log.note(
                "mfserve: shed %d call(s) over --max-concurrent-rpcs %d (latest: %s)",
                self.limit,
                method,
                extra={"method": method},
            )
            return False
        self.active += 1
        return True

    def leave(self) -> None:
        self.active -= 1

    async def drain(self, quiet: float = DRAIN_QUIET_SECONDS, most: float = DRAIN_SECONDS) -> None:
        """Refuse new calls until ``quiet`` seconds pass with none arriving (at most ``most``).

        Why: gRPC's shutdown cancels every call the C core has received but not yet handed to
        Python, so a server stopped under load answered some callers CANCELLED, which SDKs do not
        retry. Refusing here with UNAVAILABLE empties that queue at the speed of a refusal, and the
        callers retry elsewhere; the calls already admitted run on and finish within the grace.
        """
        self.draining = True
        started = self.last_arrival = time.monotonic()
        while True:
            now = time.monotonic()
            if now - self.last_arrival >= quiet or now - started >= most:
                return
            await asyncio.sleep(quiet / 4)


def grpc_limit(limit: int | None) -> int | None:
    """gRPC's own ``maximum_concurrent_rpcs`` for a service limit of ``limit`` (module doc)."""
    return None if limit is None else limit + STANDARD_HEADROOM


def channel_options() -> list[tuple[str, int]]:
    """The server's channel options for the C core's queue of waiting calls (module doc)."""
    return [
        ("grpc.server.max_pending_requests", PENDING_CALLS),
        ("grpc.server.max_pending_requests_hard_limit", PENDING_CALLS),
    ]
