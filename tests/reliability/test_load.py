"""Load, overload and reload under load, against real ``mfserve serve`` subprocesses on loopback.

Each test runs for ``MFSERVE_RELIABILITY_SECONDS`` (10 s in CI, 60 s in ``scripts/soak.sh``) and
reports its figures (``reliability_load.report``); docs/reliability.md tabulates the soak's.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from pathlib import Path

import grpc
from conftest import free_port, metric_sum, rss_kib, worker_pids
from reliability_load import SECONDS, Load, report
from server_harness import serve_subprocess, wait_for

from mfserve.training.artifact import save_artifact
from mfserve.training.synthetic import synthetic_artifact
from mfserve.v1 import recommender_pb2 as pb
from mfserve.v1 import recommender_pb2_grpc as pb_grpc

Ids = tuple[list[str], list[str]]
SHAPE = {"n_users": 60, "n_items": 400, "factors": 8, "clusters": 4, "seen_per_user": 5}


def test_64_clients_of_mixed_calls(model_dir: Path, ids: Ids) -> None:
    users, items = ids
    with serve_subprocess(model_dir, "--workers", "2") as server:
        pids = worker_pids(server)
        with Load(server.address, users, items, seconds=SECONDS) as load:
            # Warm first: the first calls' allocations (arenas, caches, 64 connections) are not
            # growth; what must stay bounded is memory while the load runs on.
            assert load.wait_calls(2_000)
            before = rss_kib(pids)
            load._thread.join()
        result = load.stop()
        after = rss_kib(pids)
        assert server.terminate() == 0, server.log
    report("load", result, rss_before_kib=before, rss_after_kib=after)
    assert result.failed == 0, result.summary()
    assert {method for method, _ in result.outcomes} == {
        "Predict",
        "BatchPredict",
        "TopK",
        "SimilarItems",
    }
    assert after <= 1.2 * before, (before, after)


def test_ten_version_swaps_under_load(model_folder: Path, ids: Ids) -> None:
    # A training job drops versions 2..11 into the watched folder while 64 clients call; each is
    # picked up by both workers before the next one lands.
    users, items = ids
    swaps, pause = 10, max(0.2, SECONDS / 12)
    args = ("--workers", "2", "--poll-seconds", "0.1")
    with serve_subprocess(model_folder, *args) as server:
        worker_pids(server)
        with Load(server.address, users, items) as load:
            assert load.wait_calls(200)
            for version in range(2, 2 + swaps):
                save_artifact(model_folder, synthetic_artifact(**SHAPE, seed=version))
                landed = re.compile(rf"reloaded to \S+ v{version} ")
                assert wait_for(lambda p=landed: len(p.findall(server.log)) == 2, timeout=60), (
                    server.log[-3000:]
                )
                time.sleep(pause)
        result = load.stop()
        assert server.terminate() == 0, server.log
    report("reload under load", result, swaps=swaps, versions_seen=sorted(result.versions))
    assert result.failed == 0, result.summary()
    assert 1 + swaps in result.versions and "refused" not in server.log


async def _burst(address: str, calls: int) -> Counter[str]:
    """``calls`` TopK calls at once on one channel, without retries: their raw status codes."""
    options = [("grpc.enable_retries", 0)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)

        async def one(number: int) -> str:
            try:
                await stub.TopK(pb.TopKRequest(user_id=f"u{number % 50 + 1}", k=50), timeout=60)
            except grpc.aio.AioRpcError as error:
                return error.code().name
            return "OK"

        return Counter(await asyncio.gather(*(one(n) for n in range(calls))))


def test_overload_is_resource_exhausted_counted_and_retried(model_dir: Path, ids: Ids) -> None:
    users, items = ids
    # Bursts shorter than the SDK's default retry window (4 attempts, backoffs of up to 0.2, 0.4
    # and 0.8 s): a burst that outlasts it reaches the caller as ResourceExhaustedError. The SDK
    # clients alone stay under the limit; each burst goes far over it.
    metrics_port, limit, bursts, calls = free_port(), 16, 5, 1_500
    args = ("--max-concurrent-rpcs", str(limit), "--metrics-port", str(metrics_port))
    with serve_subprocess(model_dir, *args) as server:
        codes: Counter[str] = Counter()
        # SDK clients with the default retry policy call throughout the bursts.
        with Load(server.address, users, items, clients=8) as load:
            assert load.wait_calls(50)
            for _ in range(bursts):
                codes += asyncio.run(_burst(server.address, calls))
                time.sleep(0.5)
        result = load.stop()
        shed = metric_sum(metrics_port, "mfserve_shed_calls_total")
        assert server.terminate() == 0, server.log
    shed_lines = [line for line in server.lines if "over --max-concurrent-rpcs" in line]
    report(
        "overload",
        result,
        burst_calls=bursts * calls,
        burst_codes=dict(codes),
        shed_metric=shed,
        shed_log_lines=len(shed_lines),
    )
    # Never CANCELLED or a hang: served, or told to back off.
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"} and codes["RESOURCE_EXHAUSTED"] > 0, codes
    # Every shed call is counted (the SDK clients' shed attempts too, which they retried).
    assert shed >= codes["RESOURCE_EXHAUSTED"]
    # ...and logged at a bounded rate: one line, then at most one per 10 s.
    assert 1 <= len(shed_lines) <= 2 + result.seconds / 10
    assert result.failed == 0, result.summary()
