"""Test harness: real mfserve servers on ephemeral ports, in-process or as a subprocess.

Import from tests as ``from server_harness import ...`` (pytest puts ``tests/`` on ``sys.path``).

* ``running_server(model, **config)`` -> ``"127.0.0.1:PORT"``: ``create_server`` on a background
  thread with its own asyncio loop, stopped on exit. ``running_server_handle`` is the same but
  yields the ``ServerThread`` (the ``RecommenderServer``; ``call()`` runs coroutines on its loop).
* ``serve_subprocess(model_dir, *args)`` -> ``ServerProcess``: ``python -m mfserve.server serve
  --model DIR --port 0 ARGS``, port parsed from the start log line; SIGTERM + wait on exit.
* Fixtures (re-exported by ``tests/conftest.py``): ``model_dir`` (a synthetic artifact saved as
  ``.../synthetic/1``), ``synthetic_model`` (it, loaded), ``server_address`` (a server over it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

HOST = "127.0.0.1"
START_TIMEOUT = 60.0
# The server's start line: "... INFO mfserve: serving syn v1 on 127.0.0.1:43521".
SERVING_LINE = re.compile(r"mfserve: serving (?P<model>.+) on (?P<host>\S+):(?P<port>\d+)\s*$")

# Small but non-trivial: 4 clusters, every user has seen items, titles/genres present.
SYNTHETIC_SHAPE = {"n_users": 60, "n_items": 400, "factors": 8, "clusters": 4, "seen_per_user": 5}


# ---------------------------------------------------------------------------- in-process server
class ServerThread:
    """A ``RecommenderServer`` running on its own event loop in a daemon thread."""

    def __init__(self, model: Any = None, **config: Any) -> None:
        from mfserve.server.app import ServerConfig, create_server

        config.setdefault("host", HOST)
        config.setdefault("port", 0)
        config.setdefault("grace_seconds", 1.0)
        self.server = create_server(model, ServerConfig(**config))
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="mfserve-test-server", daemon=True
        )
        self._thread.start()
        try:
            self.port: int = self.call(self.server.start())
        except BaseException:  # e.g. BindError: do not leak the loop thread
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)
            self.loop.close()
            raise
        self.address = f"{HOST}:{self.port}"

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        """Schedule a coroutine on the server's loop; returns a concurrent future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        """Run a coroutine on the server's loop and wait for it (e.g. ``server.load(path)``)."""
        return self.submit(coro).result(timeout)

    def close(self, grace: float | None = 0.0) -> None:
        """Stop the server (``grace`` seconds for in-flight calls) and its loop; idempotent."""
        if self.loop.is_closed():
            return
        try:
            self.call(self.server.stop(grace))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)
            self.loop.close()


@contextlib.contextmanager
def running_server_handle(model: Any = None, **config: Any) -> Iterator[ServerThread]:
    """A started in-process server (``ServerConfig`` fields as keywords), stopped on exit."""
    handle = ServerThread(model, **config)
    try:
        yield handle
    finally:
        handle.close()


@contextlib.contextmanager
def running_server(model: Any = None, **config: Any) -> Iterator[str]:
    """``"127.0.0.1:PORT"`` of a started in-process server over ``model`` (path, artifact,
    ``Recommender`` or ``None``); keywords are ``ServerConfig`` fields. Stopped on exit."""
    with running_server_handle(model, **config) as handle:
        yield handle.address


# ---------------------------------------------------------------------------- subprocess server
class ServerProcess:
    """A ``mfserve serve`` subprocess; ``lines`` collects its log (stderr + stdout) as it runs."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.port = 0
        self.address = ""
        self.model = ""
        self._started = threading.Event()
        self._reader = threading.Thread(target=self._read, name="mfserve-log-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for (
            line
        ) in self.proc.stdout:  # draining keeps the pipe from filling and blocking the server
            self.lines.append(line.rstrip("\n"))
            match = SERVING_LINE.search(line)
            if match and not self._started.is_set():
                self.model = match["model"]
                self.port = int(match["port"])
                self.address = f"{match['host']}:{self.port}"
                self._started.set()
        self._started.set()  # EOF: wake a waiter; it sees port == 0

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_started(self, timeout: float = START_TIMEOUT) -> None:
        if not self._started.wait(timeout) or not self.port:
            self.proc.kill()
            self.proc.wait(10)
            raise RuntimeError(f"server did not start (exit {self.proc.returncode}):\n{self.log}")

    def terminate(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` and wait for the exit code (killed after ``timeout``)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(10)
        return self.proc.returncode


def serve_command(
    model_dir: str | os.PathLike[str], *args: str, entry: str = "mfserve.server"
) -> list[str]:
    """``python -m ENTRY serve --model DIR --port 0 ARGS``; ``entry="mfserve"`` goes through the
    ``mfserve`` console-script dispatcher, the default runs the server's own CLI directly."""
    return [
        sys.executable,
        "-m",
        entry,
        "serve",
        "--model",
        str(model_dir),
        "--port",
        "0",
        *args,
    ]


@contextlib.contextmanager
def serve_subprocess(
    model_dir: str | os.PathLike[str], *args: str, wait: bool = True, entry: str = "mfserve.server"
) -> Iterator[ServerProcess]:
    """A server subprocess, free port; ``.address`` / ``.port`` once started; SIGTERM on exit."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        serve_command(model_dir, *args, entry=entry),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    handle = ServerProcess(proc)
    try:
        if wait:
            handle.wait_started()
        yield handle
    finally:
        handle.terminate()


# ---------------------------------------------------------------------------- helpers + fixtures
def make_model_dir(root: str | os.PathLike[str], name: str = "synthetic", **shape: Any) -> Path:
    """Save a synthetic artifact as ``root/name/<N>`` and return the version folder."""
    from mfserve.training.artifact import save_artifact
    from mfserve.training.synthetic import synthetic_artifact

    return save_artifact(Path(root) / name, synthetic_artifact(**{**SYNTHETIC_SHAPE, **shape}))


class Gate:
    """A test-only hook: makes ``_predict_rows`` block until released, to hold a call in flight."""

    def __init__(self, handle: ServerThread) -> None:
        self.entered = 0
        self.release = threading.Event()
        service = handle.server.service
        original = service._predict_rows

        async def gated(*args: Any) -> Any:
            self.entered += 1  # only touched on the server's loop
            await asyncio.to_thread(self.release.wait, 30)
            return await original(*args)

        service._predict_rows = gated  # type: ignore[method-assign]

    def wait_entered(self, calls: int) -> bool:
        """Wait until ``calls`` calls are held in the gate."""
        return wait_for(lambda: self.entered >= calls, timeout=30)


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.01) -> bool:
    """Poll ``predicate()`` until true or ``timeout`` (for state changes, not timing asserts)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic model saved and loadable (checksums and all): ``.../models/synthetic/1``."""
    return make_model_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def synthetic_model(model_dir: Path) -> Any:
    """The ``ModelArtifact`` in ``model_dir``, as the server loads it."""
    from mfserve.training.artifact import load_artifact

    return load_artifact(model_dir)


@pytest.fixture(scope="module")
def server_address(model_dir: Path) -> Iterator[str]:
    """``"127.0.0.1:PORT"`` of a server over ``model_dir``, shared by a test module."""
    with running_server(model_dir) as address:
        yield address
