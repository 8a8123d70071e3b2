"""``mfserve serve --pin-cpus``: CPU lists checked with clear errors, and real processes whose every
thread is bound to the CPU asked for (read back from ``/proc``), still answering calls."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from server_harness import serve_command, serve_subprocess
from test_workers import call_fresh, reach_every_worker, wait_ready

from mfserve.server.app import ServerConfig
from mfserve.server.cpu_pinning import (
    PinningError,
    cpu_for_worker,
    parse_cpu_list,
    usable_cpus,
)

pytestmark = pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity"), reason="CPU pinning is Linux-only"
)

ALLOWED = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
LAST = ALLOWED[-1]


def thread_cpus(pid: int) -> dict[int, set[int]]:
    """Each thread of ``pid`` -> the CPUs it may run on."""
    cpus = {}
    for name in os.listdir(f"/proc/{pid}/task"):
        try:
            cpus[int(name)] = os.sched_getaffinity(int(name))
        except ProcessLookupError:  # a thread that ended meanwhile
            continue
    return cpus


def test_auto_is_every_allowed_cpu_in_order() -> None:
    assert parse_cpu_list("auto") == tuple(ALLOWED)


def test_lists_and_ranges_keep_their_order() -> None:
    assert parse_cpu_list(str(LAST)) == (LAST,)
    if list(range(ALLOWED[0], LAST + 1)) == ALLOWED:
        assert parse_cpu_list(f"{ALLOWED[0]}-{LAST}") == tuple(ALLOWED)
    if len(ALLOWED) >= 2:
        assert parse_cpu_list(f"{ALLOWED[1]},{ALLOWED[0]}") == (ALLOWED[1], ALLOWED[0])


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("two", "'two' is not a CPU number"),
        ("0,,1", "'' is not a CPU number"),
        ("3-1", "'3-1' is not a valid range"),
        ("-1", "'-1' is not"),
        (f"{LAST},{LAST}", f"CPU {LAST} is listed twice"),
        ("4096", "CPU 4096 is not one this process may use"),
    ],
)
def test_bad_lists_are_refused_naming_the_value(text: str, names: str) -> None:
    with pytest.raises(PinningError, match="--pin-cpus") as error:
        parse_cpu_list(text)
    assert names in str(error.value)


def test_workers_take_the_cpus_in_turn() -> None:
    assert [cpu_for_worker((3, 1), n) for n in range(5)] == [3, 1, 3, 1, 3]


def test_config_refuses_a_negative_cpu() -> None:
    with pytest.raises(ValueError, match="pin_cpus"):
        ServerConfig(pin_cpus=(-1,))


def test_threads_started_before_and_after_are_bound(tmp_path: Path) -> None:
    # A thread that exists before pinning is bound too (binding only the caller would miss it),
    # and one started after inherits the binding.
    code = (
        "import os, threading, time\n"
        "from mfserve.server.cpu_pinning import pin_process\n"
        "stop = threading.Event()\n"
        "early = threading.Thread(target=stop.wait); early.start()\n"
        f"pin_process({LAST})\n"
        "late = threading.Thread(target=stop.wait); late.start()\n"
        "print(sorted({c for t in os.listdir('/proc/self/task') "
        "for c in os.sched_getaffinity(int(t))}), len(os.listdir('/proc/self/task')))\n"
        "stop.set()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.split() == [f"[{LAST}]", "3"]


def test_a_pinned_server_binds_every_thread_and_answers(model_dir: Path) -> None:
    with serve_subprocess(model_dir, "--pin-cpus", str(LAST), "--access-log") as server:
        call_fresh(server.address, ("TopK", "Predict"))
        cpus = thread_cpus(server.proc.pid)
        assert len(cpus) > 3  # gRPC's threads and the compute thread, not just the main one
        assert all(allowed == {LAST} for allowed in cpus.values()), cpus
        assert f"pinned to CPU {LAST}" in server.log
        assert server.terminate() == 0


@pytest.mark.skipif(len(ALLOWED) < 2, reason="needs two CPUs")
def test_pinned_workers_take_a_cpu_each(model_dir: Path) -> None:
    args = ("--workers", "2", "--pin-cpus", "auto", "--access-log")
    with serve_subprocess(model_dir, *args) as server:
        pids = wait_ready(server)
        reach_every_worker(server, pids)
        bound = [{cpu for cpus in thread_cpus(pid).values() for cpu in cpus} for pid in pids]
        assert sorted(map(sorted, bound)) == [[ALLOWED[0]], [ALLOWED[1]]]
        # The supervising parent is left as it was.
        assert os.sched_getaffinity(server.proc.pid) == set(ALLOWED)
        assert server.terminate() == 0


def test_a_bad_list_exits_2_naming_it(model_dir: Path) -> None:
    result = subprocess.run(
        serve_command(model_dir, "--pin-cpus", "0-x"),
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "--pin-cpus '0-x'" in result.stderr and "not a CPU number" in result.stderr


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [("max 100000\n", None), ("150000 100000\n", 2), ("50000 100000\n", 1)],
)
def test_usable_cpus_follow_a_cgroup_quota(tmp_path: Path, cpu_max: str, expected: int) -> None:
    # A container's CPU limit is a CFS quota, invisible to os.cpu_count(): 1.5 CPUs of time is
    # 2 workers' worth, never more than the affinity mask allows.
    allowed = len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text(cpu_max)
    assert usable_cpus(str(tmp_path)) == (allowed if expected is None else min(allowed, expected))
    assert usable_cpus(str(tmp_path / "absent")) == allowed
