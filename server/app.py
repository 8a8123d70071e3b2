"""Server assembly: ``ServerConfig``, ``create_server`` -> ``RecommenderServer``, and ``serve``.

``create_server`` builds everything but binds nothing, so tests, benchmarks and the CLI share one
construction path and differ only in how they run it. The pieces it wires together:

* ``ModelHolder``: the swappable model (hot reload swaps it; health follows every swap),
* ``RecommenderService``: the servicer,
* the standard ``grpc.health.v1`` service (NOT_SERVING until a model is loaded) and reflection,
* interceptors (access log today; metrics and auth later),
* channel options: message size limits, the concurrent-RPC limit and ``SO_REUSEPORT`` (off unless
  asked for, so two servers never silently share a port; ``--workers N`` will turn it on).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from mfserve.server.interceptors import AccessLogInterceptor
from mfserve.server.model_holder import ModelHolder, ModelSource, describe
from mfserve.server.service import SERVICE_NAME, RecommenderService
from mfserve.training.recommender import Recommender
from mfserve.v1 import recommender_pb2_grpc as pb_grpc

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
    # Threads that run model calls so a large TopK never stalls the event loop (health checks,
    # cancellations). 0 runs them inline on the loop.
    compute_threads: int = 1

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
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"ServerConfig.{name}={getattr(self, name)!r} is out of range")

    def address(self, port: int | None = None) -> str:
        """``host:port`` as gRPC wants it (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port if port is None else port}"

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
                max_workers=config.compute_threads, thread_name_prefix="mfserve-compute"
            )
            if config.compute_threads
            else None
        )
        self.service = RecommenderService(
            holder,
            max_batch_pairs=config.max_batch_pairs,
            max_k=config.max_k,
            executor=self._executor,
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
        interceptors = [AccessLogInterceptor()] if config.access_log else []
        # grpc.aio.server binds to the running loop, so it is built here rather than in __init__.
        server = grpc.aio.server(
            interceptors=interceptors,
            options=config.channel_options(),
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        )
        pb_grpc.add_RecommenderServiceServicer_to_server(self.service, server)
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


def create_server(
    model: ModelSource = None, config: ServerConfig | None = None
) -> RecommenderServer:
    """A server over ``model``, not yet bound (``await server.start()`` binds).

    ``model``: a path (a version folder, or a model folder for its newest version), a
    ``ModelArtifact``, a ``Recommender``, or ``None`` (UNAVAILABLE until one
    is loaded).
    """
    holder = ModelHolder()
    if isinstance(model, (str, os.PathLike)):
        holder.load(model)
    else:
        holder.set(model)
    return RecommenderServer(holder, config or ServerConfig())


async def run_until_signal(server: RecommenderServer) -> int:
    """Start ``server`` and serve until SIGTERM/SIGINT, then shut down gracefully; returns 0."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Handlers first: the start line tells supervisors "ready", and a SIGTERM sent right after it
    # must already be a graceful stop, not the default kill.
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await server.start()
        # Only a signal ends serving. (Do not race this against wait_for_termination(): cancelling
        # that wait cancels grpc's shared shutdown future and breaks the later stop().)
        await stop.wait()
        log.info("mfserve: signal received")
        await server.stop()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    return 0


def serve(config: ServerConfig, model_path: str | os.PathLike[str] | None) -> int:
    """Load ``model_path``, serve it per ``config`` until a signal, and return the exit code."""
    server = create_server(model_path, config)
    return asyncio.run(run_until_signal(server))
