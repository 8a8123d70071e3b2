"""``mfserve serve --workers N``: N processes on one port that share the model's memory.

Which worker answered is read from the access log (each worker tags its lines with its pid); the
kernel spreads connections, not calls, so every probe opens a fresh connection.
"""

from __future__ import annotations

import os
import re
import signal
import socket
from pathlib import Path

import grpc
from server_harness import ServerProcess, make_model_dir, serve_subprocess, wait_for

from mfserve.server.config import ServerConfig
from mfserve.server.workers import MAX_FAILED_STARTS, RESTART_BACKOFF, _Supervisor
from mfserve.v1 import recommender_pb2 as pb
from mfserve.v1 import recommender_pb2_grpc as pb_grpc

ACCESS = re.compile(r"\[worker (\d+) pid (\d+)\] access: \S+/(\w+) OK")
READY = re.compile(r"mfserve: (\d+) workers ready on \S+:(\d+) \(pids ([\d, ]+)\)")


def wait_ready(server: ServerProcess) -> list[int]:
    """The worker pids, once the parent says every worker is serving."""
    assert wait_for(lambda: READY.search(server.log) is not None, timeout=120), server.log
    match = READY.search(server.log)
    assert match is not None and int(match[2]) == server.port
    return [int(pid) for pid in match[3].split(", ")]


def call_fresh(address: str, rpcs: tuple[str, ...] = ("TopK",)) -> None:
    # A local subchannel pool: a new TCP connection, not one shared with an earlier channel.
    options = [("grpc.use_local_subchannel_pool", 1)]
    with grpc.insecure_channel(address, options=options) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)
        for rpc in rpcs:
            if rpc == "TopK":
                assert len(stub.TopK(pb.TopKRequest(user_id="u1", k=5), timeout=30).items) == 5
            elif rpc == "SimilarItems":
                request = pb.SimilarItemsRequest(item_id="i7", k=5)
                assert len(stub.SimilarItems(request, timeout=30).items) == 5
            else:
                request = pb.PredictRequest(user_id="u2", item_id="i3")
                assert stub.Predict(request, timeout=30).model_version == 1


def answering_pids(server: ServerProcess) -> set[int]:
    return {int(m[2]) for m in ACCESS.finditer(server.log)}


def reach_every_worker(
    server: ServerProcess, pids: list[int], rpcs: tuple[str, ...] = ("TopK",)
) -> None:
    for _ in range(200):  # each fresh connection lands on either worker: 2 ** -200 to miss one
        call_fresh(server.address, rpcs)
        if answering_pids(server) >= set(pids):
            return
    raise AssertionError(f"not every worker answered: {answering_pids(server)} of {pids}")


def test_two_workers_answer_and_sigterm_exits_0(model_dir: Path) -> None:
    with serve_subprocess(model_dir, "--workers", "2", "--access-log") as server:
        pids = wait_ready(server)
        assert len(set(pids)) == 2 and server.proc.pid not in pids
        reach_every_worker(server, pids)
        assert server.terminate() == 0
    assert "all workers stopped" in server.log
    assert server.log.count("mfserve: stopped") == 2


def test_a_worker_that_dies_is_restarted(model_dir: Path) -> None:
    with serve_subprocess(model_dir, "--workers", "2", "--access-log") as server:
        pids = wait_ready(server)
        os.kill(pids[0], signal.SIGKILL)
        restarted = re.compile(r"mfserve: worker 1 restarted \(pid (\d+)\)")
        assert wait_for(lambda: restarted.search(server.log) is not None, timeout=60), server.log
        match = restarted.search(server.log)
        assert match is not None
        new_pid = int(match[1])
        assert new_pid not in pids and server.proc.poll() is None
        assert f"worker 1 (pid {pids[0]}) exited with -9; restarting it" in server.log
        reach_every_worker(server, [new_pid, pids[1]])
        assert server.terminate() == 0
    assert server.log.count("mfserve: stopped") == 2


def test_a_worker_that_keeps_dying_before_it_serves_stops_the_server() -> None:
    # The restart policy alone (no fork): each death doubles the delay up to its cap, and a
    # worker that dies before serving MAX_FAILED_STARTS times in a row stops the server.
    supervisor = _Supervisor(ServerConfig(), None, 2, socket.socket())
    worker = supervisor.workers[0]
    delays = []
    for _ in range(MAX_FAILED_STARTS):
        worker.restart_at = None  # as _start leaves it
        worker.ready_fd, write_end = os.pipe()  # started, not yet serving
        os.close(write_end)
        supervisor._died(worker, 1)
        if worker.restart_at is not None:
            delays.append(worker.restart_at)
    assert supervisor.failed and supervisor.stopping
    assert len(delays) == MAX_FAILED_STARTS - 1
    assert worker.backoff == min(
        RESTART_BACKOFF[0] * 2 ** (MAX_FAILED_STARTS - 1), RESTART_BACKOFF[1]
    )


def pss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1])
    return total / 1024


def test_workers_share_the_model_memory(tmp_path: Path) -> None:
    # 200,000 items x 64 factors: the factor tables (rating + ranking heads) are ~100 MB, and the
    # ids and metadata are tens of MB of Python objects. Copied per worker, two workers would
    # cost about twice one; shared (memory map + fork after load), little more than one.
    model = make_model_dir(tmp_path, n_users=1000, n_items=200_000, factors=64, clusters=32)
    everything = ("TopK", "SimilarItems", "Predict")
    with serve_subprocess(model, "--access-log") as single:
        for _ in range(3):
            call_fresh(single.address, everything)
        one = pss_mib([single.proc.pid])
    with serve_subprocess(model, "--workers", "2", "--access-log") as server:
        pids = wait_ready(server)
        reach_every_worker(server, pids, everything)
        two = pss_mib([server.proc.pid, *pids])  # the parent too: it holds the loaded model
    assert two < 1.5 * one, (one, two)
