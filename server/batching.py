"""Dynamic batching: concurrent calls of one kind coalesced into one tensor operation.

A :class:`Batcher` per kind (predict, top-k, similar items) sits behind the servicer's compute
seams. Scoring a batch of 64 users against the catalogue costs little more than scoring one (one
GEMM streams the item table once instead of 64 times, and the per-op overheads are paid once), so
under load the server answers more calls per second by answering them together.

Policy ("opportunistic", like Triton's dynamic batcher but without making a lone call wait):

* At most one batch per kind computes at a time. While it computes, new calls queue; when it
  finishes, everything queued (up to ``max_batch_size``) is dispatched at once as the next batch.
* When nothing is computing, a new call is dispatched on the next event-loop turn, so calls that
  arrived in the same turn share its batch but a lone call never waits for company. (A queue
  delay, Triton's ``max_queue_delay_microseconds``, gains nothing here: docs/serving.md.)

Everything here runs on the event-loop thread except the compute function, which runs on the
executor (torch releases the GIL inside matmul and top-k). Results come back with one
``call_soon_threadsafe`` per batch, not per call.

A lone cheap call skips the executor: when the batcher is idle, no other call is inside the server
(``in_flight`` is 1) or due to start in this loop turn, and the call's ``cost`` (item scores or
pairs) is within ``inline_limit``, it is computed right in ``submit`` on the event loop. Nobody could
join its batch, and the hop would cost more than the ~0.1 ms tensor op: two thread wake-ups, a
self-pipe write and a GIL hand-off at every torch op (measured on a busy 2-core host: TopK p50 at
concurrency 1 drops by ~0.15-0.2 ms). Under concurrency calls still go to the executor: while a
batch computes there, the next one gathers (at 64 concurrent TopK calls, ~8 calls a batch; computing
them on the loop instead made every batch a batch of one and cost ~40% of the throughput). Expensive
calls (a million-item catalogue, a 100,000-pair BatchPredict) always go to the executor, so they
never stall the loop. Each call is an asyncio future: a call that is
cancelled (client cancel or deadline: grpc.aio cancels the handler, which cancels the future it
awaits) before its batch starts is dropped from the batch; one cancelled later is computed and
discarded. A batch whose compute raises is recomputed call by call, so only the call that fails
gets the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from mfserve.server.config import DEFAULT_MAX_BATCH_SIZE

log = logging.getLogger("mfserve.server")

P = TypeVar("P")  # what one call contributes to a batch
R = TypeVar("R")  # what one call gets back
# compute(model, payloads) -> one result per payload, in order. The model is whatever the caller
# submits (a Recommender; a ServingModel for TopK): the batcher only compares it by identity, so a
# batch never mixes two model versions.
Model = Any
Compute = Callable[[Model, list[P]], list[R]]
# (results, {position: error}, whether the batch failed and was recomputed call by call)
Outcome = tuple[list[Any], dict[int, BaseException], bool]
# With the executor: (outcome, (start wait s, compute wall s, compute CPU s, finished at))
TimedOutcome = tuple[Outcome, tuple[float, float, float, float]]

# A lone call is computed on the event loop instead of the executor (see the module doc) when it
# costs at most this: item scores for top-k and similar items (a TopK on a 10,000-item catalogue
# is ~10,000: ~0.15 ms), pairs for predict (1,000 pairs: ~0.05 ms). Anything bigger, e.g. one exact
# query against a million items or a 100,000-pair BatchPredict, goes to the executor. An
# approximate TopK costs what its index visits (``Ranker.visits``: ~2,000 distances for HNSW
# at ef_search 64, ~0.2 ms on a 1M-item catalogue, whatever the catalogue size; up to 16 times
# that for a heavy user, whose walk is widened by the items it leaves out).
INLINE_RANK_SCORES = 65_536
INLINE_PREDICT_PAIRS = 16_384


@dataclass
class BatchStats:
    """Counters of one batcher (updated on the event-loop thread; read them from anywhere)."""

    calls: int = 0  # calls submitted
    batches: int = 0  # batches computed
    computed: int = 0  # calls computed (the sum of batch sizes)
    dropped: int = 0  # calls cancelled before their batch started (never computed)
    fallbacks: int = 0  # batches that raised and were recomputed call by call
    errors: int = 0  # calls answered with a compute error
    max_batch: int = 0  # largest batch so far
    inline: int = 0  # batches computed on the event loop (lone cheap calls; all without executor)
    sizes: Counter[int] = field(default_factory=Counter)  # batch size -> how many batches
    # Where an executor batch's time goes (seconds, summed over executor batches): handed to the
    # executor until its compute starts; the compute's wall and thread-CPU time; its end until the
    # loop takes the results. Wall far above CPU means the compute thread waited for the GIL or a
    # core, which on a small busy host is what a thread hop costs (docs/benchmarks.md).
    start_wait_s: float = 0.0
    compute_s: float = 0.0
    compute_cpu_s: float = 0.0
    return_wait_s: float = 0.0

    @property
    def executor_batches(self) -> int:
        return self.batches - self.inline


# (model, payload, the call's future, when it was queued: perf_counter, or 0.0 without observe)
Entry = tuple[Model, Any, "asyncio.Future[Any]", float]
# observe(calls in the batch, each call's seconds from submit to its batch's compute start)
Observe = Callable[[int, list[float]], None]


class Batcher(Generic[P, R]):
    """Coalesces concurrent ``submit`` calls into batches for ``compute`` (see module doc)."""

    def __init__(
        self,
        name: str,
        compute: Compute[P, R],
        *,
        executor: Executor | None,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_batch_rows: int | None = None,
        rows: Callable[[P], int] | None = None,
        in_flight: Callable[[], int] | None = None,
        cost: Callable[[Model, P], int] | None = None,
        inline_limit: int | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.name = name
        self.compute = compute  # an attribute, so tests can wrap it
        self.stats = BatchStats()
        self._executor = executor  # None: compute inline on the loop thread
        self._max_batch = max_batch_size
        # A row budget (BatchPredict): calls join a batch while it stays under max_batch_rows.
        self._max_rows = max_batch_rows
        self._rows = rows
        self._in_flight = in_flight
        # A lone call costing at most inline_limit (None: never) is computed on the loop (module doc).
        self._cost = cost
        self.inline_limit = inline_limit  # an attribute, so tests can force the executor
        # Called once per batch when set (server/metrics.py); None costs one test per batch.
        self.observe: Observe | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[Entry] = []
        self._running = False  # a batch is computing
        self._scheduled = False  # a dispatch is scheduled for the next loop turn

    @property
    def queued(self) -> int:
        """Calls waiting for a batch (including cancelled ones not yet dropped)."""
        return len(self._pending)

    @property
    def waiting(self) -> int:
        """Queued calls still wanted (not cancelled): what the next batch would hold."""
        return sum(1 for entry in self._pending if not entry[2].done())

    @property
    def running(self) -> bool:
        return self._running

    def submit(self, model: Model, payload: P) -> asyncio.Future[R]:
        """Queue one call; await the returned future for its result. Event-loop thread only.

        A plain function returning a future (not a coroutine): one allocation less per call.
        """
        # Looked up per call (a C call): a server restarted on a new loop must not use the old one.
        loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        pending = self._pending
        self.stats.calls += 1
        if not self._running and not pending and self._inline(loop, model, payload):
            # A cheap call nobody could join: answered right here.
            batch = [(model, payload, future, 0.0)]
            self._count(batch, inline=True)
            self._complete(batch, self._run(model, [payload]))
            return future
        pending.append((model, payload, future, time.perf_counter() if self.observe else 0.0))
        if not self._running:
            if len(pending) >= self._max_batch:
                self._dispatch()
            elif not self._scheduled:
                # Next loop turn: calls that arrived in this turn join; a lone call does not wait.
                self._scheduled = True
                loop.call_soon(self._dispatch)
        return future

    # ----------------------------------------------------------------- loop side
    def _dispatch(self) -> None:
        self._scheduled = False
        if self._running or not self._pending:
            return
        batch, rest = self._take(self._pending)
        self._pending = rest
        if not batch:
            return
        self._running = True
        model = batch[0][0]
        payloads = [entry[1] for entry in batch]
        if self._executor is None:
            self._count(batch, inline=True)
            self._complete(batch, self._run(model, payloads))
            return
        self._count(batch, inline=False)
        try:
            done = self._executor.submit(self._run_timed, model, payloads, time.perf_counter())
        except RuntimeError as exc:  # the executor is shut down: the server is stopping
            self._complete(
                batch, ([None] * len(batch), dict.fromkeys(range(len(batch)), exc), False)
            )
            return
        done.add_done_callback(functools.partial(self._done_threadsafe, batch))

    def _alone(self, loop: asyncio.AbstractEventLoop) -> bool:
        """No other call could join this one's batch: none is inside the server, and nothing else
        (such as a handler for a call that just arrived) is due to run in this loop turn."""
        in_flight = self._in_flight
        if in_flight is None or in_flight() > 1:
            return False
        # asyncio's queue of callbacks due this turn; another loop (uvloop) says "maybe not alone".
        ready = getattr(loop, "_ready", None)
        return ready is not None and not ready

    def _inline(self, loop: asyncio.AbstractEventLoop, model: Model, payload: P) -> bool:
        """Whether to compute this call on the loop now (the batcher is idle): cheap and alone."""
        return self._cheap(model, payload) and self._alone(loop)

    def _cheap(self, model: Model, payload: P) -> bool:
        """Whether a call is cheap enough to compute on the loop rather than hop to the executor."""
        limit, cost = self.inline_limit, self._cost
        return limit is not None and cost is not None and cost(model, payload) <= limit

    def _count(self, batch: list[Entry], *, inline: bool) -> None:
        stats = self.stats
        size = len(batch)
        stats.batches += 1
        stats.computed += size
        stats.sizes[size] += 1
        stats.max_batch = max(stats.max_batch, size)
        if inline:
            stats.inline += 1
            if self.observe is not None:  # computed right now
                self._observe(batch, time.perf_counter())

    def _observe(self, batch: list[Entry], started: float) -> None:
        assert self.observe is not None
        # 0.0: a lone call computed in submit, which never queued.
        self.observe(len(batch), [started - entry[3] if entry[3] else 0.0 for entry in batch])

    def _take(self, pending: list[Entry]) -> tuple[list[Entry], list[Entry]]:
        """The next batch: live calls of the first live call's model, within the size limits."""
        batch: list[Entry] = []
        rest: list[Entry] = []
        model: Model | None = None
        budget = self._max_rows
        rows = 0
        for entry in pending:
            if entry[2].done():  # cancelled while queued (client cancel or deadline)
                self.stats.dropped += 1
                continue
            if model is None:
                model = entry[0]
            # A batch holds one model object: calls that read the holder after a swap wait.
            if entry[0] is not model or len(batch) >= self._max_batch:
                rest.append(entry)
                continue
            if budget is not None and self._rows is not None:
                size = self._rows(entry[1])
                if batch and rows + size > budget:
                    rest.append(entry)
                    continue
                rows += size
            batch.append(entry)
        return batch, rest

    def _done_threadsafe(self, batch: list[Entry], done: Future[TimedOutcome]) -> None:
        # Runs on the worker thread: hand the whole batch back to the loop in one wake-up.
        loop = self._loop
        assert loop is not None
        # RuntimeError: the loop is closed; the server is gone and nobody is waiting.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._complete_future, batch, done)

    def _complete_future(self, batch: list[Entry], done: Future[TimedOutcome]) -> None:
        try:
            outcome, (start_wait, compute, cpu, finished) = done.result()
            stats = self.stats
            stats.start_wait_s += start_wait
            stats.compute_s += compute
            stats.compute_cpu_s += cpu
            stats.return_wait_s += time.perf_counter() - finished
            if self.observe is not None:
                self._observe(batch, finished - compute)
        except BaseException as exc:  # cancelled by executor shutdown
            error = exc if isinstance(exc, Exception) else RuntimeError("batch cancelled")
            outcome = _failed(len(batch), error)
        self._complete(batch, outcome)

    def _complete(self, batch: list[Entry], outcome: Outcome) -> None:
        self._running = False
        results, errors, fell_back = outcome
        if fell_back:
            self.stats.fallbacks += 1
        self.stats.errors += len(errors)
        for position, (_, _, future, _) in enumerate(batch):
            if future.done():  # cancelled while computing: the answer is discarded
                continue
            if errors and position in errors:
                future.set_exception(errors[position])
            else:
                future.set_result(results[position])
        # Dispatch the next batch before the woken handlers run, so its compute overlaps their
        # response building.
        if self._pending and not self._scheduled:
            self._dispatch()

    # ----------------------------------------------------------------- worker side
    def _run_timed(self, model: Model, payloads: list[P], dispatched: float) -> TimedOutcome:
        started, cpu = time.perf_counter(), time.thread_time()
        outcome = self._run(model, payloads)
        finished = time.perf_counter()
        return outcome, (
            started - dispatched,
            finished - started,
            time.thread_time() - cpu,
            finished,
        )

    def _run(self, model: Model, payloads: list[P]) -> Outcome:
        compute = self.compute
        try:
            return compute(model, payloads), {}, False
        except Exception as exc:
            if len(payloads) == 1:
                return [None], {0: exc}, False
        # Isolate the failure: one call's bad input must not fail its neighbours.
        results: list[R | None] = []
        errors: dict[int, BaseException] = {}
        for position, payload in enumerate(payloads):
            try:
                results.append(compute(model, [payload])[0])
            except Exception as exc:
                results.append(None)
                errors[position] = exc
        return results, errors, True


def _failed(size: int, error: BaseException) -> Outcome:
    return [None] * size, dict.fromkeys(range(size), error), False
