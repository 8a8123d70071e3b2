"""Faults under load: a worker killed, SIGTERM, an early SIGTERM, the model folder taken away."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from conftest import free_port, metric, worker_pids
from reliability_load import SECONDS, Load, report
from server_harness import serve_subprocess, wait_for

from mfserve.client import RecommenderClient

Ids = tuple[list[str], list[str]]


def test_a_worker_killed_under_load_is_restarted_and_no_call_fails(
    model_dir: Path, ids: Ids
) -> None:
    users, items = ids
    metrics_port = free_port()
    args = ("--workers", "2", "--metrics-port", str(metrics_port))
    with serve_subprocess(model_dir, *args) as server:
        pids = worker_pids(server)
        with Load(server.address, users, items) as load:
            assert load.wait_calls(500)
            os.kill(pids[0], signal.SIGKILL)
            assert wait_for(lambda: "worker 1 restarted" in server.log, timeout=60), server.log
            time.sleep(SECONDS / 2)  # calls reach the new worker too
        result = load.stop()
        restarts = metric(metrics_port, "mfserve_worker_restarts_total", worker="1")
        assert server.terminate() == 0, server.log
    report("worker SIGKILL under load", result, restarts=restarts)
    assert restarts == 1
    assert result.failed == 0, result.summary()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_under_load_finishes_calls_in_flight(
    model_dir: Path, ids: Ids, workers: str
) -> None:
    # SDK clients with the default retry policy: calls in flight when the signal lands complete,
    # new ones are UNAVAILABLE (retried, then reported: there is no other server here), never
    # CANCELLED; the exit code is 0.
    users, items = ids
    with serve_subprocess(model_dir, "--workers", workers) as server:
        if workers != "1":
            worker_pids(server)
        with Load(server.address, users, items) as load:
            assert load.wait_calls(500)
            signalled = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            assert server.proc.wait(60) == 0, server.log
        result = load.stop()
    straddling = [call for call in result.calls if call[0] < signalled < call[1]]
    outcomes = {outcome for _, outcome in result.outcomes}
    report(
        f"SIGTERM under load ({workers} worker(s))",
        result,
        in_flight_at_signal=len(straddling),
        in_flight_ok=sum(outcome == "OK" for *_, outcome in straddling),
        outcomes=sorted(outcomes),
    )
    assert outcomes <= {"OK", "UnavailableError"}, result.summary()
    assert any(outcome == "OK" for *_, outcome in straddling)
    assert "mfserve: stopped" in server.log


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_before_ready_exits_0(model_dir: Path, workers: str) -> None:
    # The signal lands while the model loads, before the port is served: a clean stop.
    with serve_subprocess(model_dir, "--workers", workers, wait=False) as server:
        assert wait_for(lambda: bool(server.lines), timeout=60)  # the process is up
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) == 0, server.log
    assert "Traceback" not in server.log


@pytest.mark.parametrize("fault", ["deleted", "replaced by a file"])
def test_model_folder_taken_away_while_serving(
    model_folder: Path, ids: Ids, tmp_path: Path, fault: str
) -> None:
    users, items = ids
    metrics_port, backup = free_port(), tmp_path / "backup"
    args = ("--poll-seconds", "0.1", "--metrics-port", str(metrics_port))
    with serve_subprocess(model_folder, *args) as server:
        client = RecommenderClient(server.address)
        with Load(server.address, users, items, clients=8) as load:
            assert load.wait_calls(100)
            assert metric(metrics_port, "mfserve_model_folder_readable") == 1
            shutil.copytree(model_folder, backup)
            shutil.rmtree(model_folder)
            if fault == "replaced by a file":
                model_folder.write_text("not a folder")
            assert wait_for(lambda: "cannot be read" in server.log, timeout=30), server.log
            error = client.model_info().model_folder_error
            assert "cannot be read" in error and str(model_folder) in server.log
            assert metric(metrics_port, "mfserve_model_folder_readable") == 0
            time.sleep(1)  # the loaded model keeps serving
            model_folder.unlink(missing_ok=True)
            shutil.copytree(backup, model_folder)
            assert wait_for(lambda: "can be read again" in server.log, timeout=30), server.log
            assert client.model_info().model_folder_error == ""
        result = load.stop()
        client.close()
        assert server.terminate() == 0, server.log
    report(f"model folder {fault}", result)
    assert result.failed == 0, result.summary()
