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
   gracefully; if a worker fails to start or dies on its own, stops the others and exits 1 (the
   service manager above decides about restarts).

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
from dataclasses import replace
from types import FrameType

from mfserve.server import metrics
from mfserve.server.app import (
    BindError,
    ServerConfig,
    create_server,
    process_cores,
    run_until_signal,
)
from mfserve.server.cpu_pinning import cpu_for_worker, pin_process
from mfserve.server.log_format import JsonFormatter, model_fields
from mfserve.server.model_holder import ModelHolder, ServingModel, describe
from mfserve.server.threads import set_torch_threads

log = logging.getLogger("mfserve.server")

SIGNALS = {signal.SIGTERM, signal.SIGINT}
READY = b"R"
START_TIMEOUT = 300.0  # seconds for all workers to be serving
_PR_SET_PDEATHSIG = 1


def worker_count(config: ServerConfig) -> int:
    return config.workers or os.cpu_count() or 1


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


class _Supervisor:
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
        self.count = count
        self.reserved = reserved
        self.pids: dict[int, int] = {}  # pid -> worker number
        self.stopping = False
        self.failed = False

    def run(self) -> int:
        # Signals stay blocked across the forks: a worker inherits the mask and unblocks once its
        # own handlers exist (run_until_signal), so an early SIGTERM is a graceful stop there.
        signal.pthread_sigmask(signal.SIG_BLOCK, {*SIGNALS, signal.SIGHUP})
        ready: dict[int, int] = {}  # read end of each worker's ready pipe -> pid
        try:
            for number in range(1, self.count + 1):
                read_end, write_end = os.pipe()
                pid = os.fork()
                if pid == 0:  # the worker: never returns
                    os.close(read_end)
                    _worker_main(
                        self.config, self.model, number, self.reserved, write_end, self.model_path
                    )
                os.close(write_end)
                self.pids[pid] = number
                ready[read_end] = pid
            for signum in SIGNALS:
                signal.signal(signum, self._forward)
            # SIGHUP is passed on as it is: every worker reloads (mfserve.server.reload).
            signal.signal(signal.SIGHUP, self._forward_reload)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {*SIGNALS, signal.SIGHUP})
        if self._wait_ready(ready):
            self.reserved.close()  # every worker holds the port now
            self._start_metrics()
            pids = ", ".join(str(pid) for pid in self.pids)
            log.info(
                "mfserve: %d workers ready on %s (pids %s)",
                self.count,
                self.config.address(),
                pids,
                extra=model_fields(self.model),
            )
        return self._reap()

    def _start_metrics(self) -> None:
        """Serve the workers' aggregated metrics from here (after the forks: no worker inherits
        the listening socket)."""
        if not self.config.metrics_port:
            return
        try:
            exporter = metrics.start_http(
                self.config.host, self.config.metrics_port, lambda: dict(self.pids)
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

    def _wait_ready(self, ready: dict[int, int]) -> bool:
        """Wait until every worker reports serving; False if one failed or a signal came first."""
        deadline = time.monotonic() + START_TIMEOUT
        try:
            while ready and not self.stopping:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    self._stop_all(f"workers not serving after {START_TIMEOUT:.0f}s")
                    return False
                readable, _, _ = select.select(list(ready), [], [], min(timeout, 1.0))
                for fd in readable:
                    pid = ready.pop(fd)
                    message = os.read(fd, 1)
                    os.close(fd)
                    if message != READY:  # EOF: the worker died before serving
                        self._stop_all(f"worker {self.pids[pid]} (pid {pid}) failed to start")
                        return False
            return not self.stopping
        finally:
            for fd in ready:
                os.close(fd)

    def _reap(self) -> int:
        codes: list[int] = []
        while self.pids:
            pid, status = os.waitpid(-1, 0)  # signal handlers run in between (PEP 475 retries)
            number = self.pids.pop(pid, None)
            if number is None:
                continue
            metrics.worker_exited(pid)  # here, not in the worker: a crashed one counts too
            code = os.waitstatus_to_exitcode(status)
            codes.append(code)
            if code != 0 or not self.stopping:
                self._stop_all(f"worker {number} (pid {pid}) exited with {code}")
        ok = not self.failed and all(code == 0 for code in codes)
        log.info("mfserve: all workers stopped")
        return 0 if ok else 1


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
