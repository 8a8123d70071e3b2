"""``--metrics-port``: a real server, real calls, and a real HTTP scrape of its Prometheus text."""

from __future__ import annotations

import re
import socket
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_harness import Gate, running_server_handle, serve_subprocess, wait_for

from mfserve.server import metrics
from mfserve.v1 import recommender_pb2 as pb
from mfserve.v1 import recommender_pb2_grpc as pb_grpc

METRICS_LINE = re.compile(r"mfserve: metrics on (?P<host>\S+):(?P<port>\d+)\s*$", re.M)
ACCESS = re.compile(r"\[worker (\d+) pid (\d+)\] access: \S+/(\w+) OK")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    return samples.get((metric, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, metric: str, /, **labels: str) -> float:
    return value(after, metric, **labels) - value(before, metric, **labels)


def expect_code(call: object, code: grpc.StatusCode) -> None:
    with pytest.raises(grpc.RpcError) as error:
        call()  # type: ignore[operator]
    assert error.value.code() == code


def test_every_metric_moves(model_dir: Path) -> None:
    with running_server_handle(model_dir, metrics_port=free_port()) as handle:
        port = handle.server.metrics_port
        assert port == handle.server.config.metrics_port
        before = scrape(port)
        with grpc.insecure_channel(handle.address) as channel:
            stub = pb_grpc.RecommenderServiceStub(channel)
            for _ in range(3):
                stub.Predict(pb.PredictRequest(user_id="u1", item_id="i2"), timeout=30)
            stub.BatchPredict(
                pb.BatchPredictRequest(user_ids=["u1", "u2"], item_ids=["i1", "i2"]), timeout=30
            )
            stub.TopK(pb.TopKRequest(user_id="u3", k=5), timeout=30)
            expect_code(
                lambda: stub.Predict(pb.PredictRequest(user_id="who", item_id="i1"), timeout=30),
                grpc.StatusCode.NOT_FOUND,
            )
            expect_code(
                lambda: stub.BatchPredict(
                    pb.BatchPredictRequest(user_ids=["u1", "x", "y"], item_ids=["i1", "i2", "z"]),
                    timeout=30,
                ),
                grpc.StatusCode.NOT_FOUND,
            )
            expect_code(
                lambda: stub.TopK(pb.TopKRequest(user_id="u1", k=-3), timeout=30),
                grpc.StatusCode.INVALID_ARGUMENT,
            )
        metrics.record_reload(False)  # what the reloader calls when it refuses a version

        def settled() -> bool:
            # grpc.aio sends an aborted call's status from inside abort(), before the
            # interceptor above the handler counts it: the client can see it first.
            samples = scrape(port)
            total = sum(
                value - before.get((name, labels), 0.0)
                for (name, labels), value in samples.items()
                if name == "mfserve_rpcs_total"
            )
            return total == 8

        assert wait_for(settled, timeout=10)
        after = scrape(port)

    def rpcs(method: str, code: str) -> float:
        return moved(before, after, "mfserve_rpcs_total", method=method, code=code)

    assert rpcs("Predict", "OK") == 3
    assert rpcs("Predict", "NOT_FOUND") == 1
    assert rpcs("BatchPredict", "OK") == 1
    assert rpcs("BatchPredict", "NOT_FOUND") == 1
    assert rpcs("TopK", "OK") == 1
    assert rpcs("TopK", "INVALID_ARGUMENT") == 1
    count = "mfserve_rpc_duration_seconds_count"
    assert moved(before, after, count, method="Predict") == 4
    assert moved(before, after, count, method="TopK") == 2
    assert moved(before, after, "mfserve_rpc_duration_seconds_sum", method="TopK") > 0
    assert value(after, "mfserve_rpcs_in_flight") == 0
    # Health checks and reflection are not counted.
    assert not any(name == "mfserve_rpcs_total" and ("method", "Check") in labels
                   for name, labels in after)  # fmt: skip
    # One Predict batch per good call (each alone), the BatchPredict, the TopK.
    assert moved(before, after, "mfserve_batch_size_count", kind="predict") >= 4
    assert moved(before, after, "mfserve_batch_size_count", kind="top_k") == 1
    assert moved(before, after, "mfserve_batch_queue_seconds_count", kind="top_k") == 1
    assert value(after, "mfserve_model_version", name="synthetic") == 1
    assert moved(before, after, "mfserve_unknown_ids_total", field="user_id") == 1
    assert moved(before, after, "mfserve_unknown_ids_total", field="user_ids") == 2
    assert moved(before, after, "mfserve_unknown_ids_total", field="item_ids") == 1
    assert moved(before, after, "mfserve_model_reloads_total", result="failure") == 1
    assert value(after, "process_resident_memory_bytes") > 0
    assert value(after, "process_cpu_seconds_total") > 0


def test_off_by_default_binds_nothing(model_dir: Path) -> None:
    with running_server_handle(model_dir) as handle:
        assert handle.server.metrics_port is None
        assert all(b.observe is None for b in handle.server.service.batchers.values())


def test_two_workers_are_aggregated(model_dir: Path) -> None:
    with serve_subprocess(
        model_dir, "--workers", "2", "--access-log", "--metrics-port", str(free_port())
    ) as server:
        assert wait_for(lambda: METRICS_LINE.search(server.log) is not None, timeout=120), (
            server.log
        )
        match = METRICS_LINE.search(server.log)
        assert match is not None and match["host"] == "127.0.0.1"
        port = int(match["port"])
        calls = 0
        # The kernel spreads connections, not calls: a fresh connection per call reaches both.
        options = [("grpc.use_local_subchannel_pool", 1)]
        for _ in range(200):
            with grpc.insecure_channel(server.address, options=options) as channel:
                stub = pb_grpc.RecommenderServiceStub(channel)
                stub.TopK(pb.TopKRequest(user_id="u1", k=5), timeout=30)
                calls += 1
            if calls >= 4 and len({m[2] for m in ACCESS.finditer(server.log)}) == 2:
                break
        assert len({m[2] for m in ACCESS.finditer(server.log)}) == 2, server.log
        samples = scrape(port)
        assert value(samples, "mfserve_rpcs_total", method="TopK", code="OK") == calls
        assert value(samples, "mfserve_rpc_duration_seconds_count", method="TopK") == calls
        assert value(samples, "mfserve_batch_size_count", kind="top_k") == calls
        assert value(samples, "mfserve_model_version", name="synthetic") == 1
        assert value(samples, "mfserve_rpcs_in_flight") == 0
        workers = {
            dict(labels)["worker"]
            for name, labels in samples
            if name == "mfserve_worker_resident_memory_bytes"
        }
        assert workers == {"1", "2"}
        assert value(samples, "mfserve_worker_cpu_seconds_total", worker="1") > 0
    assert server.proc.returncode == 0, server.log


def test_calls_refused_for_their_token_are_counted(model_dir: Path, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("the-token\n")
    config = {"metrics_port": free_port(), "auth_tokens": str(tokens)}
    calls = "mfserve_rpcs_total"
    refused, ok = {"method": "GetModelInfo", "code": "UNAUTHENTICATED"}, {"method": "GetModelInfo"}
    with running_server_handle(model_dir, **config) as handle:
        # The counters are the process's: other tests' servers may have counted calls before.
        before = scrape(handle.server.config.metrics_port)
        with grpc.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
            info = pb_grpc.RecommenderServiceStub(channel).GetModelInfo
            for metadata in (None, [("authorization", "Bearer wrong")]):
                with pytest.raises(grpc.RpcError):
                    info(pb.GetModelInfoRequest(), metadata=metadata, timeout=10)
            info(pb.GetModelInfoRequest(), metadata=[("authorization", "Bearer the-token")])
        port = handle.server.config.metrics_port
        # An aborted call's status reaches the client before the interceptor counts it.
        assert wait_for(
            lambda: value(scrape(port), calls, **refused) - value(before, calls, **refused) == 2
        )
        after = scrape(port)
    assert value(after, calls, **refused) - value(before, calls, **refused) == 2
    assert value(after, calls, **ok, code="OK") - value(before, calls, **ok, code="OK") == 1


def test_shed_calls_are_counted_and_logged(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # With the limit at 1 and one Predict held in flight, every other call is shed.
    config = {"metrics_port": free_port(), "max_concurrent_rpcs": 1}
    with running_server_handle(model_dir, **config) as handle:
        gate = Gate(handle)
        before = scrape(handle.server.config.metrics_port)
        with grpc.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
            stub = pb_grpc.RecommenderServiceStub(channel)
            predict = pb.PredictRequest(user_id="u1", item_id="i1")
            held = stub.Predict.future(predict, timeout=60)
            assert gate.wait_entered(1)
            for _ in range(4):
                expect_code(lambda: stub.Predict(predict), grpc.StatusCode.RESOURCE_EXHAUSTED)
            gate.release.set()
            held.result(60)
        after = scrape(handle.server.config.metrics_port)
    assert moved(before, after, "mfserve_shed_calls_total", method="Predict") == 4
    shed = [r for r in caplog.records if "over --max-concurrent-rpcs" in r.getMessage()]
    assert 1 <= len(shed) <= 2  # one line per 10 s, however many calls
