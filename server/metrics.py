"""Prometheus metrics, served on ``--metrics-port`` (prometheus-client's text format).

Off by default, and then free: prometheus_client is not even imported, no interceptor is
installed, the batchers' hook is ``None`` and every public function here returns at its first
line. The metric objects live in this module (one set per process), created by :func:`enable`.

With ``--workers N`` each worker is its own process, so the parent turns on prometheus-client's
multiprocess mode before forking (:func:`prepare_multiprocess`): every worker writes its values to
memory-mapped files in a fresh directory, and the parent alone serves ``/metrics``, aggregating
them (counters and histograms summed; the in-flight gauge summed over live workers; the model
version gauge the lowest any live worker serves, so it reads the new version once all of them
do). The parent marks each worker dead as it reaps it (also when one crashes, which a worker's own
exit hook would miss). prometheus-client's ``process_*`` metrics describe only the process that
answers the scrape, so the parent adds ``mfserve_worker_cpu_seconds_total`` and
``mfserve_worker_resident_memory_bytes`` per worker.

The series are listed in docs/serving.md ("Metrics").
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

log = logging.getLogger("mfserve.server")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# A lone call is ~1 ms, a 100,000-pair BatchPredict tens of ms; a deadline-bound call seconds.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0
)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Queue delay: ~0 for a lone call, one batch's compute (~0.1-10 ms) under load.
QUEUE_BUCKETS = (0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25)

BatchObserver = Callable[[int, Sequence[float]], None]


class _Metrics:
    """The metric objects of this process."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        # Our own registry, not the global one: nothing else a host application registers leaks
        # into the scrape, and tests can build servers side by side in one process.
        self.registry = registry = CollectorRegistry()
        self.rpcs = Counter(
            "mfserve_rpcs_total",
            "RecommenderService calls finished, by method and gRPC status code",
            ("method", "code"),
            registry=registry,
        )
        self.rpc_duration = Histogram(
            "mfserve_rpc_duration_seconds",
            "RecommenderService call latency in the server, by method",
            ("method",),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "mfserve_rpcs_in_flight",
            "RecommenderService calls being served now",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.batch_size = Histogram(
            "mfserve_batch_size",
            "calls answered by one batched tensor operation, by kind",
            ("kind",),
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self.batch_queue = Histogram(
            "mfserve_batch_queue_seconds",
            "per call, time from joining the batch queue to its batch's compute start, by kind",
            ("kind",),
            buckets=QUEUE_BUCKETS,
            registry=registry,
        )
        self.model_version = Gauge(
            "mfserve_model_version",
            "the model version serving (the value), by model name",
            ("name",),
            multiprocess_mode="livemin",
            registry=registry,
        )
        self.reloads = Counter(
            "mfserve_model_reloads_total",
            "model loads and reloads, by result (success or failure)",
            ("result",),
            registry=registry,
        )
        self.unknown_ids = Counter(
            "mfserve_unknown_ids_total",
            "ids answered NOT_FOUND, by request field",
            ("field",),
            registry=registry,
        )
        self.folder_readable = Gauge(
            "mfserve_model_folder_readable",
            "1 while the model folder and the serving version's files can be read, else 0",
            multiprocess_mode="livemin",
            registry=registry,
        )
        self.shed_calls = Counter(
            "mfserve_shed_calls_total",
            "calls answered RESOURCE_EXHAUSTED over --max-concurrent-rpcs, by method",
            ("method",),
            registry=registry,
        )
        self.version_name: str | None = None
        self.lock = threading.Lock()  # label caches are filled from the loop and load threads
        self.method_children: dict[str, tuple[Any, dict[str, Any]]] = {}


class _Process:
    """This process's metrics (None: off), and with ``--workers`` the directory of the value files
    and the parent's pid (the one process that serves the aggregate)."""

    state: _Metrics | None = None
    multiproc_dir: str | None = None
    parent_pid: int | None = None


_here = _Process()


def enabled() -> bool:
    return _here.state is not None


def enable() -> None:
    """Create this process's metrics (idempotent); until then every function here is a no-op."""
    if _here.state is None:
        _here.state = _Metrics()


def prepare_multiprocess() -> str:
    """Multiprocess mode (``--workers``), in the parent before it forks and before :func:`enable`:
    a fresh directory for the workers' value files. Returns it; :func:`cleanup_multiprocess`
    removes it."""
    path = _here.multiproc_dir = tempfile.mkdtemp(prefix="mfserve-metrics-")
    _here.parent_pid = os.getpid()
    os.environ[MULTIPROC_ENV] = path
    # prometheus_client picks its value class when first imported; pick again in case it was.
    from prometheus_client import values

    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    return path


def cleanup_multiprocess() -> None:
    path = _here.multiproc_dir
    if path is not None and os.getpid() == _here.parent_pid:
        shutil.rmtree(path, ignore_errors=True)
        os.environ.pop(MULTIPROC_ENV, None)
        _here.multiproc_dir = None


def worker_exited(pid: int) -> None:
    """The parent reaped worker ``pid``: its live gauges (in flight, version) stop counting."""
    if _here.multiproc_dir is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, _here.multiproc_dir)  # type: ignore[no-untyped-call]


# --------------------------------------------------------------------------- recording
def record_reload(ok: bool) -> None:
    """Count one model load or reload (``ok``: swapped in; else refused, the old one serving)."""
    state = _here.state
    if state is not None:
        state.reloads.labels("success" if ok else "failure").inc()


def set_folder_readable(readable: bool) -> None:
    """The reloader's last look at the model folder (``mfserve.server.reload``)."""
    state = _here.state
    if state is not None:
        state.folder_readable.set(1 if readable else 0)


def count_unknown(field: str, count: int) -> None:
    """``count`` unknown ids in request field ``field`` (a NOT_FOUND answer)."""
    state = _here.state
    if state is not None and count:
        state.unknown_ids.labels(field).inc(count)


def count_shed(method: str) -> None:
    """One call of ``method`` shed over the concurrency limit (``mfserve.server.admission``)."""
    state = _here.state
    if state is not None:
        state.shed_calls.labels(method).inc()


def on_swap(model: Any) -> None:
    """A ``ModelHolder`` listener: the version gauge follows every swap (``model``: a
    ``Recommender`` or ``None``)."""
    state = _here.state
    if state is None or model is None:
        return
    artifact = model.artifact
    name = artifact.name or "unnamed"
    with state.lock:
        if state.version_name not in (None, name):
            # A different model now serves here: the old name's series must not linger.
            with contextlib.suppress(KeyError):
                state.model_version.remove(state.version_name)
        state.version_name = name
        state.model_version.labels(name).set(artifact.version)


def batch_observer(kind: str) -> BatchObserver | None:
    """The hook a ``Batcher`` calls per batch with its size and each call's queue delay (seconds);
    ``None`` while metrics are off, so the batcher skips it."""
    state = _here.state
    if state is None:
        return None
    size = state.batch_size.labels(kind)
    queue = state.batch_queue.labels(kind)

    def observe(calls: int, waits: Sequence[float]) -> None:
        size.observe(calls)
        for wait in waits:
            queue.observe(wait)

    return observe


def rpc_recorders(method: str) -> tuple[Any, Any, Callable[[str], Any]]:
    """For the metrics interceptor: (in-flight gauge, the method's latency histogram, code -> its
    call counter), label children cached so that a call costs no label lookups."""
    state = _here.state
    assert state is not None, "metrics.enable() first"
    with state.lock:
        cached = state.method_children.get(method)
        if cached is None:
            cached = state.method_children[method] = (state.rpc_duration.labels(method), {})
    duration, counters = cached

    def counter(code: str) -> Any:
        child = counters.get(code)
        if child is None:
            child = counters[code] = state.rpcs.labels(method, code)
        return child

    return state.in_flight, duration, counter


# --------------------------------------------------------------------------- exposition
class Exporter:
    """The running ``/metrics`` HTTP server; ``port`` is the bound one."""

    def __init__(self, httpd: Any, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        self.port: int = httpd.server_port

    def close(self) -> None:
        """Stop serving (blocks up to prometheus's poll interval, 0.5 s)."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


def serves_here() -> bool:
    """Whether this process serves ``/metrics``: not a forked worker, whose parent does."""
    return _here.multiproc_dir is None or os.getpid() == _here.parent_pid


def start_http(
    host: str,
    port: int,
    workers: Callable[[], dict[int, int]] | None = None,
    restarts: Callable[[], dict[int, int]] | None = None,
) -> Exporter:
    """Serve ``/metrics`` on ``host:port`` (0: a free port) from a daemon thread.

    In multiprocess mode the workers' files aggregated, ``workers()`` (pid -> worker number)
    names the processes whose CPU and memory are added, and ``restarts()`` (worker number ->
    count) how often each was restarted. Raises ``OSError`` when it cannot bind.
    """
    from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server

    enable()
    assert _here.state is not None
    if _here.multiproc_dir is not None:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(  # type: ignore[no-untyped-call]
            registry, path=_here.multiproc_dir
        )
        if workers is not None:
            registry.register(_WorkerProcesses(workers, restarts or dict))
    else:
        registry = _here.state.registry
    # CPU and memory of the process answering (every worker's, separately, above).
    with contextlib.suppress(ValueError):  # already registered: a second server in this process
        ProcessCollector(registry=registry)
    httpd, thread = start_http_server(port, addr=host.strip("[]"), registry=registry)
    return Exporter(httpd, thread)


class _WorkerProcesses:
    """``process_cpu_seconds_total`` and ``process_resident_memory_bytes`` of every worker, as
    ``mfserve_worker_*{worker}`` (read from /proc by prometheus-client's ProcessCollector), and
    the parent's count of each worker's restarts."""

    def __init__(
        self, workers: Callable[[], dict[int, int]], restarts: Callable[[], dict[int, int]]
    ) -> None:
        self._workers = workers
        self._restarts = restarts

    def collect(self) -> Iterator[Any]:
        from prometheus_client import ProcessCollector
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        cpu = CounterMetricFamily(
            "mfserve_worker_cpu_seconds", "CPU seconds used by each worker", labels=("worker",)
        )
        memory = GaugeMetricFamily(
            "mfserve_worker_resident_memory_bytes",
            "resident memory of each worker (shared model pages count in each)",
            labels=("worker",),
        )
        for pid, number in sorted(self._workers().items()):
            families = ProcessCollector(pid=_constant(pid), registry=None).collect()
            for family in families:
                for sample in family.samples:
                    if sample.name == "process_cpu_seconds_total":
                        cpu.add_metric((str(number),), sample.value)
                    elif sample.name == "process_resident_memory_bytes":
                        memory.add_metric((str(number),), sample.value)
        yield cpu
        yield memory
        restarts = CounterMetricFamily(
            "mfserve_worker_restarts",
            "times each worker was started again after it died",
            labels=("worker",),
        )
        for number, count in sorted(self._restarts().items()):
            restarts.add_metric((str(number),), count)
        yield restarts


def _constant(pid: int) -> Callable[[], int]:
    return lambda: pid
