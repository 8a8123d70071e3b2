"""``--idle-poll``: one SCHED_IDLE spinner process per CPU, gone when the server stops or dies."""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import grpc
import pytest
from server_harness import serve_subprocess, wait_for

from mfserve.server.idle_poll import IdlePoll, IdlePollError
from mfserve.v1 import recommender_pb2 as pb
from mfserve.v1 import recommender_pb2_grpc as pb_grpc

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="idle polling needs Linux's SCHED_IDLE"
)


def _alive(pid: int) -> bool:
    """Running, and not a zombie waiting for its parent to reap it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _spinning_idle(pid: int, cpu: int) -> bool:
    """``pid`` has switched itself to SCHED_IDLE on ``cpu`` alone (it does so right after start)."""
    try:
        return os.sched_getscheduler(pid) == os.SCHED_IDLE and os.sched_getaffinity(pid) == {cpu}
    except ProcessLookupError:
        return False


def test_one_idle_priority_spinner_per_cpu_until_the_context_closes() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    with IdlePoll() as poll:
        assert poll.cpus == cpus
        pids = [spinner.pid for spinner in poll.spinners]
        assert len(pids) == len(cpus)
        for pid, cpu in zip(pids, cpus, strict=True):
            assert wait_for(lambda pid=pid, cpu=cpu: _spinning_idle(pid, cpu))
    assert not poll.spinners
    assert not any(_alive(pid) for pid in pids)


def test_a_cpu_this_process_may_not_use_is_refused() -> None:
    with pytest.raises(IdlePollError, match=r"CPUs \[100000\]"):
        IdlePoll(cpus=[100_000])


def _spinner_pids(log: str) -> list[int]:
    match = re.search(r"idle polling on CPUs [\d,]+ \(SCHED_IDLE spinners, pids ([\d, ]+)\)", log)
    assert match is not None, log
    return [int(pid) for pid in match.group(1).split(", ")]


def test_serve_with_idle_poll_answers_and_leaves_no_spinner(model_dir: Path) -> None:
    with serve_subprocess(model_dir.parent, "--idle-poll") as server:
        pids = _spinner_pids(server.log)
        assert len(pids) == len(os.sched_getaffinity(0))
        for pid in pids:
            assert int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) == (
                server.proc.pid
            )
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.RecommenderServiceStub(channel)
            assert stub.TopK(pb.TopKRequest(user_id="u1", k=3)).model_version == 1
        assert server.terminate() == 0
    assert wait_for(lambda: not any(_alive(pid) for pid in pids))


def test_spinners_die_with_a_killed_server(model_dir: Path) -> None:
    with serve_subprocess(model_dir.parent, "--idle-poll") as server:
        pids = _spinner_pids(server.log)
        server.terminate(signal.SIGKILL)  # no cleanup runs: the kernel's parent-death signal
    assert wait_for(lambda: not any(_alive(pid) for pid in pids))
