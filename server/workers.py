"""``mfserve serve --workers N``: N server processes on one port, sharing one loaded model.

One grpc.aio process is bound to one core by the GIL. To use all cores, the parent:

1. reserves the port: binds a socket with ``SO_REUSEPORT`` (for ``--port 0`` this picks the free
   port) and keeps it, unlistened, until every worker is serving, so the port cannot be taken in
   between;
2. loads and verifies the model (and with ``--ann`` its approximate index) ONCE, with one torch thread (no OpenMP pool exists to be broken by
   ``fork``), then ``gc.freeze()``\\ s the heap so that the workers' garbage collections never write
   to the millions of id and metadata objects (a write would copy their pages into each worker);
3. forks the workers before any gRPC object exists (gRPC's documented multiprocessing pattern).
   Each binds itself to its CPU (``--pin-cpus``, optional), sets its torch threads, binds the port with ``grpc.so_reuseport`` and serves. The factor
   tables are read-only memory maps of the artifact, and everything else was built before the
   fork: all of it is shared between the workers (page cache and copy-on-write) instead of copied;
4. supervises: forwards SIGTERM/SIGINT to the workers and exits 0 once all of them have stopped
   gracefully. A worker that dies on its own (a crash, the OOM killer, SIGKILL) is forked again
   from the same loaded model after a backoff (0.5 s, doubling to 30 s; counted in
   ``mfserve_worker_restarts_total``); the other workers keep serving meanwhile, so a client
   that retries UNAVAILABLE sees no error. A worker that fails to start (at first, or
   ``MAX_FAILED_STARTS`` times in a row after) stops the server with exit code 1: that fault is
   not transient, and the service manager above should see it.

The kernel spreads new connections over the workers (per connection, not per call: a client
with one channel talks to one worker).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from types import FrameType

from mfserve.server import metrics
from mfserve.server.app import (
    BindError,
    ServerConfig,
    create_server,
    process_cores,
    run_until_signal,
)
from mfserve.server.cpu_pinning import cpu_for_worker, pin_process, usable_cpus
from mfserve.server.log_format import JsonFormatter, model_fields
from mfserve.server.model_holder import ModelHolder, ServingModel, describe
from mfserve.server.threads import set_torch_threads

log = logging.getLogger("mfserve.server")

SIGNALS = {signal.SIGTERM, signal.SIGINT}
HANDLED = {*SIGNALS, signal.SIGHUP}
READY = b"R"
START_TIMEOUT = 300.0  # seconds for all workers to be serving
# A worker that dies is started again after a delay that doubles from the first figure to the
# second, and falls back to the first once a worker has served for STABLE_SECONDS.
RESTART_BACKOFF = (0.5, 30.0)
STABLE_SECONDS = 60.0
# A worker that dies before serving this many times in a row will not start (its port, its
# model): the parent stops and exits 1, for the service manager above to see.
MAX_FAILED_STARTS = 5
TICK_SECONDS = 0.05  # how often the parent looks at its workers while they serve
_PR_SET_PDEATHSIG = 1


def worker_count(config: ServerConfig) -> int:
    count: int = config.workers or usable_cpus()
    return count


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound (not listening) ``SO_REUSEPORT`` socket on ``host:port``; port 0 picks one."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise BindError(f"mfserve: cannot bind {host}:{port}: {exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise BindError(f"mfserve: cannot bind {host}:{port}: {exc}") from exc
    return sock


def serve_workers(config: ServerConfig, model_path: str | os.PathLike[str] | None) -> int:
    """Serve with ``config.workers`` processes (see module doc); returns the exit code."""
    count = worker_count(config)
    # Blocked from here until the supervisor's handlers exist: a SIGTERM while the model loads
    # stays pending, and the supervisor then exits 0 without starting anything.
    with _signals_blocked():
        return _serve_workers(config, model_path, count)


def _serve_workers(
    config: ServerConfig, model_path: str | os.PathLike[str] | None, count: int
) -> int:
    reserved = reserve_port(config.host, config.port)
    port = reserved.getsockname()[1]
    try:
        if config.metrics_port:  # before any metric exists: the workers write to shared files
            metrics.prepare_multiprocess()
            metrics.enable()
        # One thread while loading: torch ops here must not start an OpenMP pool before fork.
        set_torch_threads(1)
        gc.disable()  # nothing to collect while loading; avoids pointless full passes
        # The approximate index too (--ann): loaded once here, shared by the workers like the rest
        # (faiss searches only read it), instead of one private copy per worker.
        holder = ModelHolder(ann=config.ann, ann_search=config.ann_search())
        model = holder.prepare(model_path) if model_path is not None else None
        log.info(
            "mfserve: loaded %s; starting %d workers on port %d",
            describe(model),
            count,
            port,
            extra=model_fields(model),
        )
        gc.freeze()  # everything loaded moves to the permanent generation: never scanned again
        gc.enable()
        worker_config = replace(config, port=port, so_reuseport=True)
        return _Supervisor(worker_config, model, count, reserved, model_path).run()
    finally:
        reserved.close()
        metrics.cleanup_multiprocess()


@dataclass
class _Worker:
    """One worker number's process, and what its restarts have been."""

    number: int
    pid: int = 0
    ready_fd: int | None = None  # the read end of its ready pipe, until it reports or dies
    serving_since: float | None = None
    failed_starts: int = 0  # in a row: died before serving
    restarts: int = 0
    backoff: float = RESTART_BACKOFF[0]
    restart_at: float | None = None  # dead, to be started again then


class _Supervisor:
    """Forks the workers, forwards signals, and restarts a worker that dies (module doc, 4)."""

    def __init__(
        self,
        config: ServerConfig,
        model: ServingModel | None,
        count: int,
        reserved: socket.socket,
        model_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.config = config
        self.model = model
        self.model_path = model_path  # each worker hot-reloads from it on its own
        self.reserved = reserved
        self.workers = [_Worker(number) for number in range(1, count + 1)]
        self.pids: dict[int, int] = {}  # live pid -> worker number (read by the metrics thread)
        self.stopping = False
        self.failed = False

    def run(self) -> int:
        """Start the workers and supervise them; returns the exit code. Called with the signals
        blocked (serve_workers), so that one sent while the model loaded is still pending."""
        if signal.sigtimedwait(SIGNALS, 0) is not None:  # consumed: told to stop before starting
            log.info("mfserve: signal received before the workers started; not starting them")
            return 0
        for worker in self.workers:
            self._start(worker)
        # Installed after the first forks (a worker must not inherit them); a signal that came
        # during the forks is delivered to them as the mask is lifted.
        for signum in SIGNALS:
            signal.signal(signum, self._forward)
        # SIGHUP is passed on as it is: every worker reloads (mfserve.server.reload).
        signal.signal(signal.SIGHUP, self._forward_reload)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
        if self._wait_ready():
            self.reserved.close()  # every worker holds the port now
            self._start_metrics()
            pids = ", ".join(str(worker.pid) for worker in self.workers)
            log.info(
                "mfserve: %d workers ready on %s (pids %s)",
                len(self.workers),
                self.config.address(),
                pids,
                extra=model_fields(self.model),
            )
        return self._supervise()

    def _start(self, worker: _Worker) -> None:
        """Fork ``worker``'s process. Signals stay blocked across the fork: the worker inherits the
        mask and unblocks once its own handlers exist (run_until_signal), so an early SIGTERM is
        a graceful stop there, and the parent's handlers never run in it."""
        read_end, write_end = os.pipe()
        with _signals_blocked():
            pid = os.fork()
            if pid == 0:  # the worker: never returns
                os.close(read_end)
                _worker_main(
                    self.config,
                    self.model,
                    worker.number,
                    self.reserved,
                    write_end,
                    self.model_path,
                )
        os.close(write_end)
        worker.pid, worker.ready_fd, worker.restart_at = pid, read_end, None
        worker.serving_since = None
        self.pids[pid] = worker.number

    def _start_metrics(self) -> None:
        """Serve the workers' aggregated metrics from here (after the forks: no worker inherits
        the listening socket; a restarted one closes its copy)."""
        if not self.config.metrics_port:
            return
        try:
            exporter = metrics.start_http(
                self.config.host,
                self.config.metrics_port,
                lambda: dict(self.pids),
                lambda: {worker.number: worker.restarts for worker in self.workers},
            )
        except OSError as exc:
            self._stop_all(f"cannot bind metrics on port {self.config.metrics_port}: {exc}")
            return
        log.info("mfserve: metrics on %s", self.config.address(exporter.port))

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _forward_reload(self, signum: int, frame: FrameType | None) -> None:
        log.info("mfserve: SIGHUP: every worker reloads")
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _stop_all(self, reason: str) -> None:
        if not self.stopping:
            log.error("mfserve: %s; stopping the other workers", reason)
            self.failed = True
            self._forward(signal.SIGTERM, None)

    def _wait_ready(self) -> bool:
        """Wait until every worker reports serving; False if one failed or a signal came first."""
        deadline = time.monotonic() + START_TIMEOUT
        while not self.stopping:
            starting = [worker for worker in self.workers if worker.ready_fd is not None]
            if not starting:
                return True
            if time.monotonic() > deadline:
                self._stop_all(f"workers not serving after {START_TIMEOUT:.0f}s")
                return False
            for worker in self._poll_ready(starting, 1.0):
                if worker.serving_since is None:  # EOF: it died before serving
                    self._stop_all(f"worker {worker.number} (pid {worker.pid}) failed to start")
                    return False
        return False

    def _poll_ready(self, starting: list[_Worker], timeout: float) -> list[_Worker]:
        """Those of ``starting`` whose ready pipe spoke within ``timeout`` s: serving, or (EOF)
        dead before serving."""
        by_fd = {worker.ready_fd: worker for worker in starting if worker.ready_fd is not None}
        readable, _, _ = select.select(list(by_fd), [], [], timeout)
        done = []
        for fd in readable:
            worker = by_fd[fd]
            if os.read(fd, 1) == READY:
                worker.serving_since = time.monotonic()
            os.close(fd)
            worker.ready_fd = None
            done.append(worker)
        return done

    def _supervise(self) -> int:
        """Reap workers until all have stopped, restarting those that die while serving."""
        codes: list[int] = []
        while self.pids or (not self.stopping and self._restarts_due()):
            for worker, code in self._reap():
                if self.stopping:
                    codes.append(code)
                else:
                    self._died(worker, code)
            if not self.stopping:
                now = time.monotonic()
                for worker in self.workers:
                    if worker.restart_at is not None and worker.restart_at <= now:
                        worker.restarts += 1
                        self._start(worker)
            self._tick()
        for worker in self.workers:
            if worker.ready_fd is not None:
                os.close(worker.ready_fd)
        ok = not self.failed and all(code == 0 for code in codes)
        log.info("mfserve: all workers stopped")
        return 0 if ok else 1

    def _restarts_due(self) -> bool:
        return any(worker.restart_at is not None for worker in self.workers)

    def _reap(self) -> list[tuple[_Worker, int]]:
        """The workers that exited since the last look, with their exit codes."""
        exited = []
        while self.pids:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            number = self.pids.pop(pid, None)
            if number is None:
                continue
            metrics.worker_exited(pid)  # here, not in the worker: a crashed one counts too
            exited.append((self.workers[number - 1], os.waitstatus_to_exitcode(status)))
        return exited

    def _died(self, worker: _Worker, code: int) -> None:
        """``worker`` exited on its own: start it again after its backoff, unless it keeps dying
        before it serves (then the fault is not transient: stop, exit 1)."""
        now = time.monotonic()
        if worker.ready_fd is not None:  # died before serving
            os.close(worker.ready_fd)
            worker.ready_fd = None
            worker.failed_starts += 1
        else:
            worker.failed_starts = 0
            if worker.serving_since is not None and now - worker.serving_since > STABLE_SECONDS:
                worker.backoff = RESTART_BACKOFF[0]
        if worker.failed_starts >= MAX_FAILED_STARTS:
            self._stop_all(
                f"worker {worker.number} exited with {code} before serving, "
                f"{worker.failed_starts} times in a row"
            )
            return
        log.error(
            "mfserve: worker %d (pid %d) exited with %d; restarting it in %.1fs",
            worker.number,
            worker.pid,
            code,
            worker.backoff,
            extra={"worker": worker.number, "exit_code": code},
        )
        worker.restart_at = now + worker.backoff
        worker.backoff = min(worker.backoff * 2, RESTART_BACKOFF[1])

    def _tick(self) -> None:
        """Wait a little (for a ready pipe, a child's exit or a signal), logging restarts that
        become ready."""
        starting = [worker for worker in self.workers if worker.ready_fd is not None]
        if not starting:
            time.sleep(TICK_SECONDS)
            return
        for worker in self._poll_ready(starting, TICK_SECONDS):
            if worker.serving_since is not None:
                log.info(
                    "mfserve: worker %d restarted (pid %d)",
                    worker.number,
                    worker.pid,
                    extra={"worker": worker.number, "restarts": worker.restarts},
                )


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """The handled signals blocked inside, and the mask as it was restored after."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _worker_main(
    config: ServerConfig,
    model: ServingModel | None,
    number: int,
    reserved: socket.socket,
    ready_fd: int,
    model_path: str | os.PathLike[str] | None = None,
) -> None:
    """A forked worker: serve until a signal, then exit with the server's code (never return)."""
    code = 1
    try:
        reserved.close()  # the parent's reservation; the worker binds its own socket
        _die_with_parent()
        for signum in SIGNALS:  # the parent's forwarding handlers mean nothing here
            signal.signal(signum, signal.SIG_DFL)
        _tag_log_lines(number)
        if config.pin_cpus:  # first, so every thread this worker starts inherits it
            cpu = cpu_for_worker(config.pin_cpus, number - 1)
            pin_process(cpu)
            log.info("mfserve: pinned to CPU %d", cpu)
        # 0 ("torch's default") becomes this worker's share of the cores: the default of one per
        # core in every worker would oversubscribe them N times over.
        set_torch_threads(config.torch_threads or process_cores(config))

        def started(port: int) -> None:
            os.write(ready_fd, READY)
            os.close(ready_fd)

        server = create_server(model, config, reload_from=model_path)
        code = asyncio.run(run_until_signal(server, on_started=started))
    except BindError as exc:
        log.error("%s", exc)
    except BaseException:
        log.exception("mfserve: worker %d failed", number)
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _die_with_parent() -> None:
    """Linux: SIGTERM this worker if the parent dies (even by SIGKILL), so none is orphaned."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _tag_log_lines(number: int) -> None:
    """Prefix this worker's log lines with ``[worker N pid P]`` (the message itself is kept)."""
    tag = f"[worker {number} pid {os.getpid()}] "
    for handler in logging.getLogger().handlers:
        formatter = handler.formatter or logging.Formatter()
        if isinstance(formatter, JsonFormatter):  # fields, not a prefix, keep each line JSON
            handler.setFormatter(formatter.with_fields(worker=number, pid=os.getpid()))
            continue
        fmt = formatter._fmt or "%(message)s"
        if "%(message)s" in fmt:
            handler.setFormatter(logging.Formatter(fmt.replace("%(message)s", tag + "%(message)s")))
