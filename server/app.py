"""Server assembly: ``ServerConfig``, ``create_server`` -> ``RecommenderServer``, and ``serve``.

``create_server`` builds everything but binds nothing, so tests, benchmarks and the CLI share one
construction path and differ only in how they run it. The pieces it wires together:

* ``ModelHolder``: the swappable model (hot reload swaps it; health follows every swap),
* ``RecommenderService``: the servicer,
* the standard ``grpc.health.v1`` service (NOT_SERVING until a model is loaded) and reflection,
* interceptors (access log today; metrics and auth later),
* channel options: message size limits, the concurrent-RPC limit and ``SO_REUSEPORT`` (off unless
  asked for, so two servers never silently share a port; ``--workers N`` turns it on in its
  worker processes, see ``mfserve.server.workers``),
* dynamic batching (``max_batch_size``, ``max_queue_delay_us``; ``mfserve.server.batching``),
* optionally an approximate index for TopK (``ann``, ``ann_ef_search``, ``ann_nprobe``), loaded
  and swapped together with the model (``mfserve.server.model_holder``).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from mfserve.server.batching import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_QUEUE_DELAY_US,
    INLINE_PREDICT_PAIRS,
)
from mfserve.server.cpu_pinning import pin_process
from mfserve.server.gc_pauses import GcPauses
from mfserve.server.interceptors import AccessLogInterceptor
from mfserve.server.model_holder import ANN_MODES, ModelHolder, ModelSource, describe
from mfserve.server.service import SERVICE_NAME, RecommenderService, add_to_server
from mfserve.server.threads import (
    current_torch_threads,
    init_compute_thread,
    set_faiss_threads,
    set_torch_threads,
)
from mfserve.training.recommender import Recommender

log = logging.getLogger("mfserve.server")

MiB = 1 << 20
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# Health is reported for the whole server ("") and per service, as the gRPC health spec suggests.
HEALTH_SERVICES = ("", SERVICE_NAME)


class BindError(OSError):
    """The server could not bind its address (port in use, bad host, no permission)."""


@dataclass(frozen=True)
class ServerConfig:
    """Everything a server process is configured with. Defaults suit one process on one host."""

    host: str = "127.0.0.1"
    port: int = 50051  # 0 binds a free port; RecommenderServer.port says which
    max_batch_pairs: int = 100_000  # BatchPredict pairs per call
    max_k: int = 1_000  # TopK / SimilarItems k
    max_concurrent_rpcs: int | None = (
        256  # beyond this RPCs get RESOURCE_EXHAUSTED; None: unbounded
    )
    # 100,000 pairs of 36-character ids are ~8 MB on the wire; 64 MiB leaves ample headroom while
    # still bounding what one call can make the server buffer.
    max_receive_message_bytes: int = 64 * MiB
    max_send_message_bytes: int = 64 * MiB
    grace_seconds: float = 5.0  # in-flight calls get this long to finish on shutdown
    access_log: bool = False  # one log line per RPC (method, status, ms)
    so_reuseport: bool = False  # let several processes bind one port (multi-worker mode)
    # Threads that run model calls (batches) so a large TopK never stalls the event loop (health
    # checks, cancellations). 0 runs them inline on the loop.
    compute_threads: int = 1
    # Dynamic batching: at most this many concurrent calls of one kind (Predict/BatchPredict, TopK,
    # SimilarItems) share one tensor operation; 1 turns coalescing off.
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    # How long an idle batcher may hold a call for more to join, only while other calls are inside
    # the server (a lone call never waits); 0: never wait, batches form only behind a busy one.
    max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US
    # Server processes sharing the port with SO_REUSEPORT (serve() only); 0: one per CPU core.
    workers: int = 1
    # torch intra-op threads per process, applied by serve() (process-wide); 0 leaves torch's
    # default (one per core). 1 by default: batching already amortises the work, and idle
    # OpenMP threads spinning on a busy host steal the cores the event loops need.
    torch_threads: int = 1
    # torch intra-op threads for a lone call computed on the event loop, which happens only when no
    # other call is in the server: with 2, its scan of the item table splits across the cores
    # the server leaves idle. Measured on 2 cores (TopK, concurrency 1): p50 ~1.30 -> ~0.97 ms,
    # but p99 ~1.9 -> ~4.1 ms, since now and then the OpenMP helper's core is busy (here with the
    # load client) and the call waits for it; hence off (1) by default. Capped at this process's
    # share of the cores; 0 (or compute_threads 0) uses torch_threads.
    lone_torch_threads: int = 1
    # Predict/BatchPredict calls of up to this many pairs are computed on the event loop even
    # while other calls are in flight, instead of being batched on the compute thread (needs the
    # compiled kernel, i.e. numba). Off (0) by default because it trades the batching the server
    # promises for throughput: with the kernel a pair costs ~25 ns and batching saves nothing,
    # but the hop to the compute thread costs ~0.2-0.3 ms; measured in docs/benchmarks.md.
    predict_on_loop_pairs: int = 0
    # Approximate TopK for known users without an allow-list (SimilarItems and Predict stay
    # exact): "none"; "auto" (an index stored beside the version if there is one); "hnsw" or
    # "ivf" (that index is required: a version without it fails to load).
    ann: str = "none"
    # Per-call search parameters; 0 uses the value stored with the index.
    ann_ef_search: int = 0
    ann_nprobe: int = 0
    # CPUs to bind serving processes to (mfserve.server.cpu_pinning): serve() binds the process
    # to the first, a worker to its own in turn; () leaves the kernel to place threads. Applied
    # by serve() only, as it is process-wide: create_server() leaves the process as it is.
    pin_cpus: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        checks = {
            "port": 0 <= self.port <= 65535,
            "max_batch_pairs": self.max_batch_pairs >= 1,
            "max_k": self.max_k >= 1,
            "max_concurrent_rpcs": self.max_concurrent_rpcs is None
            or self.max_concurrent_rpcs >= 1,
            "max_receive_message_bytes": self.max_receive_message_bytes >= 1024,
            "max_send_message_bytes": self.max_send_message_bytes >= 1024,
            "grace_seconds": self.grace_seconds >= 0,
            "compute_threads": self.compute_threads >= 0,
            "max_batch_size": self.max_batch_size >= 1,
            "max_queue_delay_us": 0 <= self.max_queue_delay_us <= 1_000_000,
            "workers": 0 <= self.workers <= 1024,
            "torch_threads": self.torch_threads >= 0,
            "lone_torch_threads": self.lone_torch_threads >= 0,
            "predict_on_loop_pairs": 0 <= self.predict_on_loop_pairs <= INLINE_PREDICT_PAIRS,
            "ann": self.ann in ANN_MODES,
            "ann_ef_search": self.ann_ef_search >= 0,
            "ann_nprobe": self.ann_nprobe >= 0,
            "pin_cpus": all(cpu >= 0 for cpu in self.pin_cpus),
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"ServerConfig.{name}={getattr(self, name)!r} is out of range")

    def address(self, port: int | None = None) -> str:
        """``host:port`` as gRPC wants it (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port if port is None else port}"

    def ann_search(self) -> dict[str, int]:
        """The search-parameter overrides given (``ef_search``, ``nprobe``)."""
        search = {"ef_search": self.ann_ef_search, "nprobe": self.ann_nprobe}
        return {name: value for name, value in search.items() if value}

    def channel_options(self) -> list[tuple[str, Any]]:
        return [
            ("grpc.so_reuseport", 1 if self.so_reuseport else 0),
            ("grpc.max_receive_message_length", self.max_receive_message_bytes),
            ("grpc.max_send_message_length", self.max_send_message_bytes),
        ]


class RecommenderServer:
    """A grpc.aio server serving one ``ModelHolder``. Create with :func:`create_server`."""

    def __init__(self, holder: ModelHolder, config: ServerConfig) -> None:
        self.holder = holder
        self.config = config
        self.health = HealthServicer()
        self._executor = (
            ThreadPoolExecutor(
                max_workers=config.compute_threads,
                thread_name_prefix="mfserve-compute",
                initializer=init_compute_thread,
                # The count serve() (or a worker) set for this process, read now: start() gives
                # the loop thread its own count, and a thread started later must not take that.
                initargs=(config.ann != "none", current_torch_threads()),
            )
            if config.compute_threads
            else None
        )
        self.service = RecommenderService(
            holder,
            max_batch_pairs=config.max_batch_pairs,
            max_k=config.max_k,
            executor=self._executor,
            max_batch_size=config.max_batch_size,
            max_queue_delay_us=config.max_queue_delay_us,
            predict_on_loop_pairs=config.predict_on_loop_pairs,
        )
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        holder.add_listener(self._on_swap)

    @property
    def address(self) -> str:
        """``host:port`` actually bound (after :meth:`start`)."""
        if self.port is None:
            raise RuntimeError("the server is not started")
        return self.config.address(self.port)

    async def start(self) -> int:
        """Bind and start serving; returns the bound port (the free one chosen for port 0)."""
        if self._server is not None:
            raise RuntimeError("the server is already started")
        self._loop = asyncio.get_running_loop()
        config = self.config
        if config.ann != "none":
            set_faiss_threads(1)  # lone ANN calls are computed on this (the loop's) thread
        lone_threads = lone_torch_threads(config)
        if lone_threads:
            set_torch_threads(lone_threads)  # this (the loop's) thread only: OpenMP is per thread
        interceptors = [AccessLogInterceptor()] if config.access_log else []
        # grpc.aio.server binds to the running loop, so it is built here rather than in __init__.
        server = grpc.aio.server(
            interceptors=interceptors,
            options=config.channel_options(),
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        )
        add_to_server(self.service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        try:
            port = server.add_insecure_port(config.address())
        except RuntimeError as exc:  # grpc reports a failed bind as RuntimeError
            await server.stop(None)
            raise BindError(f"mfserve: cannot bind {config.address()}: {exc}") from exc
        if port == 0:  # older grpc versions return 0 instead of raising
            await server.stop(None)
            raise BindError(f"mfserve: cannot bind {config.address()}")
        await self._publish_health()
        await server.start()
        self._server, self.port = server, port
        log.info("mfserve: serving %s on %s", describe(self.holder.current), self.address)
        return port

    async def load(self, path: str | os.PathLike[str]) -> Recommender:
        """Load an artifact off the event loop and swap it in; health follows before it returns."""
        model = await asyncio.to_thread(self.holder.load, path)
        await self._publish_health()
        return model

    async def set_model(self, model: ModelSource) -> None:
        """Swap in a model (path, artifact, ``Recommender``) or ``None`` to unload."""
        await asyncio.to_thread(self.holder.set, model)
        await self._publish_health()

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: health NOT_SERVING, refuse new RPCs, let in-flight ones finish within
        ``grace`` seconds (default ``config.grace_seconds``), then cancel the rest."""
        if self._server is None or self._stopping:
            return
        self._stopping = True
        grace = self.config.grace_seconds if grace is None else grace
        log.info("mfserve: shutting down (grace %.1fs)", grace)
        # Load balancers watching health stop routing here before the listener closes.
        await self.health.enter_graceful_shutdown()
        await self._server.stop(grace)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        for name, batcher in self.service.batchers.items():
            stats = batcher.stats
            if stats.batches:
                log.info(
                    "mfserve: batching %s: %d calls in %d batches (mean %.1f, max %d), "
                    "%d computed inline, %d dropped before compute",
                    name,
                    stats.computed,
                    stats.batches,
                    stats.computed / stats.batches,
                    stats.max_batch,
                    stats.inline,
                    stats.dropped,
                )
            if stats.executor_batches:
                per_batch = 1e6 / stats.executor_batches
                log.info(
                    "mfserve: batching %s: %d batches on the compute thread, per batch: "
                    "%.0f us to start, %.0f us computing (%.0f us of CPU), %.0f us back to the loop",
                    name,
                    stats.executor_batches,
                    stats.start_wait_s * per_batch,
                    stats.compute_s * per_batch,
                    stats.compute_cpu_s * per_batch,
                    stats.return_wait_s * per_batch,
                )
        log.info("mfserve: stopped")

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until the server stops; True if it did within ``timeout``."""
        if self._server is None:
            return True
        return await self._server.wait_for_termination(timeout)

    async def _publish_health(self) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self.holder.current is not None
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in HEALTH_SERVICES:
            await self.health.set(service, status)

    def _on_swap(self, model: Recommender | None) -> None:
        # Called on whichever thread swapped the model; health lives on the server's loop.
        loop = self._loop
        if loop is not None and not loop.is_closed():
            asyncio.run_coroutine_threadsafe(self._publish_health(), loop)


def lone_torch_threads(config: ServerConfig) -> int:
    """Torch threads for the event loop's lone calls (0: leave them at ``torch_threads``)."""
    if not config.compute_threads or not config.lone_torch_threads:
        return 0  # with compute_threads 0 every batch runs on the loop, under load too
    return min(config.lone_torch_threads, process_cores(config))


def process_cores(config: ServerConfig) -> int:
    """The cores one serving process may count on: 1 when pinned, else its share of them."""
    if config.pin_cpus:
        return 1
    workers = config.workers or os.cpu_count() or 1
    return max(1, (os.cpu_count() or 1) // workers)


def create_server(
    model: ModelSource = None, config: ServerConfig | None = None
) -> RecommenderServer:
    """A server over ``model``, not yet bound (``await server.start()`` binds).

    ``model``: a path (a version folder, or a model folder for its newest version), a
    ``ModelArtifact``, a ``Recommender``, a ``ServingModel`` (its index as is), or ``None``
    (UNAVAILABLE until one is loaded). With ``config.ann`` other than "none", the index stored
    beside the version is loaded with it; raises ``AnnError`` when it is required but missing,
    or found but corrupt or stale.
    """
    config = config or ServerConfig()
    holder = ModelHolder(ann=config.ann, ann_search=config.ann_search())
    if isinstance(model, (str, os.PathLike)):
        holder.load(model)
    else:
        holder.set(model)
    return RecommenderServer(holder, config)


async def run_until_signal(
    server: RecommenderServer, on_started: Callable[[int], None] | None = None
) -> int:
    """Start ``server`` and serve until SIGTERM/SIGINT, then shut down gracefully; returns 0.

    ``on_started(port)`` runs once the server is bound and serving (a worker tells its parent).
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Handlers first: the start line tells supervisors "ready", and a SIGTERM sent right after it
    # must already be a graceful stop, not the default kill.
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # A forked worker starts with these signals blocked (so none is lost or mishandled before the
    # handlers above exist); deliver any that arrived meanwhile. A no-op everywhere else.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        with GcPauses() as pauses:
            await server.start()
            if on_started is not None:
                on_started(server.port or 0)
            # Only a signal ends serving. (Do not race this against wait_for_termination():
            # cancelling that wait cancels grpc's shared shutdown future and breaks stop().)
            await stop.wait()
            log.info("mfserve: signal received")
            await server.stop()
        log.info("mfserve: garbage collection while serving: %s", pauses.summary())
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    return 0


def serve(config: ServerConfig, model_path: str | os.PathLike[str] | None) -> int:
    """Load ``model_path``, serve it per ``config`` until a signal, and return the exit code.

    ``config.workers`` other than 1 forks that many server processes sharing the port
    (``mfserve.server.workers``).
    """
    if config.workers != 1:
        from mfserve.server.workers import serve_workers

        code: int = serve_workers(config, model_path)
        return code
    if config.pin_cpus:
        # Before loading, so that every thread started from here on inherits the binding.
        pin_process(config.pin_cpus[0])
        log.info("mfserve: pinned to CPU %d", config.pin_cpus[0])
    set_torch_threads(config.torch_threads)
    gc.disable()  # nothing to collect while loading, as in serve_workers
    try:
        server = create_server(model_path, config)
    finally:
        # What loading made moves to the permanent generation, so that no collection while
        # serving walks it (measured: mfserve.server.gc_pauses). Done here, the process's entry
        # point, because freezing is process-wide: create_server() alone leaves the heap as it is.
        gc.freeze()
        gc.enable()
    return asyncio.run(run_until_signal(server))
