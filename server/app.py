"""Server assembly: ``create_server`` -> ``RecommenderServer``, and ``serve``.

``ServerConfig`` lives in ``mfserve.server.config`` (no heavy imports, for the command line);
it is imported here too, so ``from mfserve.server.app import ServerConfig`` keeps working.

``create_server`` builds everything but binds nothing, so tests, benchmarks and the CLI share one
construction path and differ only in how they run it. The pieces it wires together:

* ``ModelHolder``: the swappable model (hot reload swaps it; health follows every swap),
* ``Reloader``: with a model path, hot reload from it (folder watcher, SIGHUP, ``ReloadModel``;
  ``mfserve.server.reload``),
* ``RecommenderService``: the servicer,
* the standard ``grpc.health.v1`` service (NOT_SERVING until a model is loaded) and reflection
  (``--no-reflection`` turns it off),
* ``Security`` (``mfserve.server.security``): TLS or mTLS on the port and the bearer-token
  interceptor (``mfserve.server.auth``), re-read on every reload,
* interceptors (metrics, the access log, tokens),
* load shedding over ``--max-concurrent-rpcs`` (``mfserve.server.admission``),
* channel options: message size limits, the queue of pending calls and ``SO_REUSEPORT`` (off unless
  asked for, so two servers never silently share a port; ``--workers N`` turns it on in its
  worker processes, see ``mfserve.server.workers``),
* dynamic batching (``max_batch_size``; ``mfserve.server.batching``),
* optionally an approximate index for TopK (``ann``, ``ann_ef_search``, ``ann_nprobe``), loaded
  and swapped together with the model (``mfserve.server.model_holder``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from mfserve.server import admission, metrics
from mfserve.server.auth import AuthInterceptor
from mfserve.server.config import ServerConfig
from mfserve.server.cpu_pinning import pin_process, usable_cpus
from mfserve.server.gc_pauses import GcPauses
from mfserve.server.idle_poll import IdlePoll
from mfserve.server.interceptors import AccessLogInterceptor, MetricsInterceptor
from mfserve.server.log_format import model_fields
from mfserve.server.model_holder import ModelHolder, ModelSource, describe
from mfserve.server.registration import add_standard_services, add_to_server
from mfserve.server.reload import Reloader, ReloadError
from mfserve.server.security import Security
from mfserve.server.service import SERVICE_NAME, RecommenderService
from mfserve.server.threads import (
    current_torch_threads,
    init_compute_thread,
    set_faiss_threads,
    set_torch_threads,
)
from mfserve.training.recommender import Recommender

log = logging.getLogger("mfserve.server")

# Health is reported for the whole server ("") and per service, as the gRPC health spec suggests.
HEALTH_SERVICES = ("", SERVICE_NAME)


class BindError(OSError):
    """The server could not bind its address (port in use, bad host, no permission)."""


class RecommenderServer:
    """A grpc.aio server serving one ``ModelHolder``. Create with :func:`create_server`."""

    def __init__(
        self,
        holder: ModelHolder,
        config: ServerConfig,
        reloader: Reloader | None = None,
        security: Security | None = None,
    ) -> None:
        self.holder = holder
        self.config = config
        self.reloader = reloader
        self.security = security or Security(config)
        if reloader is not None:
            # Every reload (SIGHUP, ReloadModel, a watcher tick) re-reads certificates and tokens.
            reloader.refresh = self.security.reload
        self._watcher: asyncio.Task[None] | None = None
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
            max_interactions=config.max_interactions,
            max_batch_users=config.max_batch_users,
            executor=self._executor,
            max_batch_size=config.max_batch_size,
            reloader=reloader,
        )
        # The service's calls in flight, shed over --max-concurrent-rpcs (health is exempt).
        self.admission = admission.Admission(config.max_concurrent_rpcs)
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        holder.add_listener(self._on_swap)
        self.metrics_port: int | None = None  # /metrics, once bound (config.metrics_port)
        self._metrics: metrics.Exporter | None = None
        if config.metrics_port:
            metrics.enable()
            holder.add_listener(metrics.on_swap)
            metrics.on_swap(holder.current)
            for batcher in self.service.batchers.values():
                batcher.observe = metrics.batch_observer(batcher.name)

    @property
    def address(self) -> str:
        """``host:port`` actually bound (after :meth:`start`)."""
        if self.port is None:
            raise RuntimeError("the server is not started")
        address: str = self.config.address(self.port)
        return address

    async def start(self) -> int:
        """Bind and start serving; returns the bound port (the free one chosen for port 0)."""
        if self._server is not None:
            raise RuntimeError("the server is already started")
        self._loop = asyncio.get_running_loop()
        config = self.config
        if config.ann != "none":
            set_faiss_threads(1)  # lone ANN calls are computed on this (the loop's) thread
        interceptors: list[grpc.aio.ServerInterceptor] = []  # type: ignore[type-arg]
        if config.metrics_port:
            interceptors.append(MetricsInterceptor(SERVICE_NAME))
        if config.access_log:
            interceptors.append(AccessLogInterceptor())
        # Last, so that the metrics and the access log count the calls it refuses.
        if self.security.auth is not None:
            interceptors.append(AuthInterceptor(self.security.auth))
        # grpc.aio.server binds to the running loop, so it is built here rather than in __init__.
        server = grpc.aio.server(
            interceptors=interceptors,
            options=config.channel_options() + admission.channel_options(),
            maximum_concurrent_rpcs=admission.grpc_limit(config.max_concurrent_rpcs),
        )
        add_to_server(self.service, server, self.admission)
        add_standard_services(server, self.health, reflection_on=not config.no_reflection)
        tls = self.security.tls
        try:
            if tls is None:
                port = server.add_insecure_port(config.address())
            else:
                port = server.add_secure_port(config.address(), tls.credentials())
        except RuntimeError as exc:  # grpc reports a failed bind as RuntimeError
            await server.stop(None)
            raise BindError(f"mfserve: cannot bind {config.address()}: {exc}") from exc
        if port == 0:  # older grpc versions return 0 instead of raising
            await server.stop(None)
            raise BindError(f"mfserve: cannot bind {config.address()}")
        # A --workers worker leaves /metrics to its parent, which aggregates all of them.
        if config.metrics_port and metrics.serves_here():
            try:
                self._metrics = metrics.start_http(config.host, config.metrics_port)
            except OSError as exc:
                await server.stop(None)
                where = config.address(config.metrics_port)
                raise BindError(f"mfserve: cannot bind metrics on {where}: {exc}") from exc
            self.metrics_port = self._metrics.port
            log.info("mfserve: metrics on %s", config.address(self.metrics_port))
        if self.reloader is not None:
            self.reloader.check_folder()  # the first look: the gauge and GetModelInfo say so
        await self._publish_health()
        await server.start()
        self._server, self.port = server, port
        current = self.holder.current
        # Before the start line, which supervisors and tests read as "ready".
        log.info("mfserve: port security: %s", self.security.describe())
        log.info(
            "mfserve: serving %s on %s",
            describe(current),
            self.address,
            extra=model_fields(current),
        )
        reloader = self.reloader
        if reloader is not None and reloader.watching:
            self._watcher = asyncio.create_task(reloader.watch(), name="mfserve-reload-watcher")
            log.info(
                "mfserve: watching %s for new versions every %gs",
                reloader.folder,
                reloader.poll_seconds,
            )
        return port

    async def reload_on_signal(self) -> None:
        """SIGHUP: reload the newest version (or the pinned one), logging what happened."""
        if self.reloader is None:
            self.security.reload()
            log.warning(
                "mfserve: SIGHUP: the server was started without a model path; nothing to reload"
            )
            return
        log.info("mfserve: SIGHUP: reloading from %s", self.reloader.folder)
        try:
            version, changed = await self.reloader.reload(reason="SIGHUP")
        except ReloadError as exc:
            if exc.kind != "refused":  # a refusal is logged, with its reason, where it happens
                log.warning("mfserve: SIGHUP: %s", exc)
            return
        if not changed:
            log.info("mfserve: SIGHUP: version %d is already serving", version)

    async def load(self, path: str | os.PathLike[str]) -> Recommender:
        """Load an artifact off the event loop and swap it in; health follows before it returns."""
        model = await asyncio.to_thread(self.holder.load, path)
        await self._publish_health()
        return model

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: health NOT_SERVING, refuse new RPCs, let in-flight ones finish within
        ``grace`` seconds (default ``config.grace_seconds``), then cancel the rest."""
        if self._server is None or self._stopping:
            return
        self._stopping = True
        if self._watcher is not None:
            self._watcher.cancel()
        if self.reloader is not None:
            self.reloader.close()
        grace = self.config.grace_seconds if grace is None else grace
        log.info("mfserve: shutting down (grace %.1fs)", grace)
        # Load balancers watching health stop routing here before the listener closes.
        await self.health.enter_graceful_shutdown()
        await self.admission.drain()  # new calls UNAVAILABLE, not cancelled (Admission.drain)
        await self._server.stop(grace)
        if self._metrics is not None:
            await asyncio.to_thread(self._metrics.close)
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


def process_cores(config: ServerConfig) -> int:
    """The cores one serving process may count on: 1 when pinned, else its share of them."""
    if config.pin_cpus:
        return 1
    cpus: int = usable_cpus()
    share: int = max(1, cpus // (config.workers or cpus))
    return share


def create_server(
    model: ModelSource = None,
    config: ServerConfig | None = None,
    *,
    reload_from: str | os.PathLike[str] | None = None,
) -> RecommenderServer:
    """A server over ``model``, not yet bound (``await server.start()`` binds).

    ``model``: a path (a version folder, or a model folder for its newest version), a
    ``ModelArtifact``, a ``Recommender``, a ``ServingModel`` (its index as is), or ``None``
    (UNAVAILABLE until one is loaded). With ``config.ann`` other than "none", the index stored
    beside the version is loaded with it; raises ``AnnError`` when it is required but missing,
    or found but corrupt or stale. A path is also what the server hot-reloads from; for a model
    given otherwise (a ``--workers`` worker gets its parent's), ``reload_from`` says where.
    """
    config = config or ServerConfig()
    security = Security(config)  # first: a bad certificate or token file fails before the load
    holder = ModelHolder(ann=config.ann, ann_search=config.ann_search())
    reloader = None
    if isinstance(model, (str, os.PathLike)):
        reloader = Reloader.for_path(holder, model, config.poll_seconds)
        reloader.load_first()
    else:
        holder.set(model)
        if reload_from is not None:
            reloader = Reloader.for_path(holder, reload_from, config.poll_seconds)
    return RecommenderServer(holder, config, reloader, security)


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
    # SIGHUP reloads (the default would kill the process with no log line).
    reloads: set[asyncio.Task[None]] = set()
    loop.add_signal_handler(
        signal.SIGHUP, lambda: _track(reloads, loop.create_task(server.reload_on_signal()))
    )
    # A forked worker starts with these signals blocked (so none is lost or mishandled before the
    # handlers above exist); deliver any that arrived meanwhile. A no-op everywhere else.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
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
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
    return 0


def _track(tasks: set[asyncio.Task[None]], task: asyncio.Task[None]) -> None:
    # The loop keeps only weak references to tasks: hold each until it is done.
    tasks.add(task)
    task.add_done_callback(tasks.discard)


def serve(config: ServerConfig, model_path: str | os.PathLike[str] | None) -> int:
    """Load ``model_path``, serve it per ``config`` until a signal, and return the exit code.

    ``config.workers`` other than 1 forks that many server processes sharing the port
    (``mfserve.server.workers``). With ``config.idle_poll`` this process owns the spinners, for
    its workers too; raises ``IdlePollError`` where idle polling is not available.
    """
    with IdlePoll() if config.idle_poll else contextlib.nullcontext():
        return _serve(config, model_path)


def _serve(config: ServerConfig, model_path: str | os.PathLike[str] | None) -> int:
    if config.workers != 1:
        Security(config)  # checked once here, so that a bad file is one error, not one per worker
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
