"""The processes of a benchmark run: one server subprocess and the load clients attached to it."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any


@dataclass(frozen=True)
class ServerSpec:
    name: str
    argv: list[str]
    ready: re.Pattern[str]  # group 1 is the bound port; matched against stdout and stderr lines


BASE_SERVERS = ("empty", "empty-hop", "naive", "mfserve", "baseline")
# benchmarks/ is not installed: the floors and load clients import it from the repository root,
# whatever directory the harness was started from.
_REPO_ROOT = Path(__file__).resolve().parents[2]


def child_env(**extra: str) -> dict[str, str]:
    """The environment of every process the harness starts: ours, with the repository root first
    on ``PYTHONPATH`` so ``python -m benchmarks.harness.<module>`` resolves."""
    path = os.pathsep.join(p for p in (str(_REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def server_specs(
    version: Path,
    mfserve_args: list[str],
    variants: dict[str, list[str]] | None = None,
    *,
    pin_cpus: str = "",
    baseline: str = "",
) -> dict[str, ServerSpec]:
    """How to start each server; ``variants`` are more mfserve servers (name -> extra args);
    ``pin_cpus``: every server gets ``--pin-cpus`` with it; ``baseline``: the interpreter of
    another install (an earlier release) whose mfserve runs as the server ``baseline``."""
    specs = _specs(version, mfserve_args, variants)
    if baseline:
        command = [baseline, "-m", "mfserve.server", "serve", "--model", str(version)]
        specs["baseline"] = ServerSpec(
            "baseline", [*command, *mfserve_args], specs["mfserve"].ready
        )
    if not pin_cpus:
        return specs
    return {
        name: ServerSpec(name, [*spec.argv, "--pin-cpus", pin_cpus], spec.ready)
        for name, spec in specs.items()
    }


def _specs(
    version: Path, mfserve_args: list[str], variants: dict[str, list[str]] | None
) -> dict[str, ServerSpec]:
    py = sys.executable
    plain = re.compile(r"^PORT (\d+)\s*$")
    # The real server logs "mfserve: serving NAME vN on HOST:PORT" once it is bound.
    serving = re.compile(r"serving .* on \S+:(\d+)\s*$")
    mfserve = [py, "-m", "mfserve.server", "serve", "--model", str(version), *mfserve_args]
    extra = {
        name: ServerSpec(name, [*mfserve, *args], serving)
        for name, args in (variants or {}).items()
    }
    return extra | {
        "empty": ServerSpec(
            "empty", [py, "-m", "benchmarks.harness.empty_server", "--model", str(version)], plain
        ),
        "empty-hop": ServerSpec(
            "empty-hop",
            [py, "-m", "benchmarks.harness.empty_server", "--model", str(version), "--hop"],
            plain,
        ),
        "naive": ServerSpec(
            "naive", [py, "-m", "benchmarks.harness.naive_server", "--model", str(version)], plain
        ),
        "mfserve": ServerSpec("mfserve", mfserve, serving),
    }


class RunningServer:
    """A server subprocess; its output is drained by threads so a chatty server never blocks."""

    def __init__(self, spec: ServerSpec, timeout: float) -> None:
        self.spec = spec
        self.tail: deque[str] = deque(maxlen=40)
        self.proc = subprocess.Popen(
            [*spec.argv, "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(PYTHONUNBUFFERED="1"),
        )
        ports: queue.Queue[int] = queue.Queue()
        self._drains: list[threading.Thread] = []
        for stream in (self.proc.stdout, self.proc.stderr):
            assert stream is not None
            drain = threading.Thread(target=self._drain, args=(stream, ports), daemon=True)
            drain.start()
            self._drains.append(drain)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.port = ports.get(timeout=0.2)
                return
            except queue.Empty:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                output = "\n".join(self.tail)
                raise RuntimeError(
                    f"server {spec.name} did not start (exit {self.proc.returncode}):\n{output}"
                )

    def _drain(self, stream: IO[str], ports: queue.Queue[int]) -> None:
        for line in stream:
            self.tail.append(line.rstrip())
            match = self.spec.ready.search(line)
            if match:
                ports.put(int(match.group(1)))

    def cpu_seconds(self) -> float:
        """User + system CPU time so far of the server process and of its ``--workers`` (forked
        children running the same command; not ``--idle-poll``'s spinners, which are not server
        work). Linux /proc; 0 elsewhere."""
        return sum(_cpu_seconds(pid) for pid in self._server_pids())

    def _server_pids(self) -> list[int]:
        pid = self.proc.pid
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return [pid]
        workers = []
        for child in map(int, children):
            try:
                if Path(f"/proc/{child}/cmdline").read_bytes() == command:
                    workers.append(child)
            except OSError:  # exited meanwhile
                continue
        return [pid, *workers]

    def rss_mb(self) -> float:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for drain in self._drains:  # the last lines (the shutdown log) are read before we return
            drain.join(timeout=5)

    def shutdown_log(self) -> list[str]:
        """mfserve's shutdown lines about its batches and garbage collections (after
        :meth:`stop`); none for baselines."""
        wanted = ("mfserve: batching", "mfserve: garbage collection")
        return [
            line[line.index("mfserve: ") + len("mfserve: ") :]
            for line in self.tail
            if any(prefix in line for prefix in wanted)
        ]


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ClientPool:
    """Load-generating processes (``benchmarks.harness.loadgen``) kept connected to one server."""

    def __init__(
        self, server: RunningServer, version: Path, *, procs: int, batch: int, k: int
    ) -> None:
        command = [
            sys.executable,
            "-m",
            "benchmarks.harness.loadgen",
            "--target",
            f"127.0.0.1:{server.port}",
        ]
        command += ["--model", str(version), "--batch", str(batch), "--k", str(k)]
        self.procs = [
            subprocess.Popen(
                [*command, "--seed", str(p)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=child_env(),
            )
            for p in range(max(1, procs))
        ]

    def run(self, cell: dict[str, Any]) -> list[dict[str, Any]]:
        """Run one cell, ``cell["concurrency"]`` in-flight calls split over the processes."""
        total, n = int(cell["concurrency"]), len(self.procs)
        shares = [total // n + (1 if p < total % n else 0) for p in range(n)]
        busy = [(proc, share) for proc, share in zip(self.procs, shares, strict=True) if share]
        for proc, share in busy:
            assert proc.stdin is not None
            proc.stdin.write(json.dumps({**cell, "concurrency": share}) + "\n")
            proc.stdin.flush()
        results = []
        for proc, _share in busy:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"load client exited with {proc.wait()} (see its stderr above)")
            results.append(json.loads(line))
        return results

    def close(self) -> None:
        for proc in self.procs:
            if proc.stdin is not None:
                proc.stdin.close()  # EOF ends the client
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
