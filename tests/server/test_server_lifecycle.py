"""Server lifecycle and limits: health, reload, graceful shutdown, SIGTERM, ports, limits, logs."""

from __future__ import annotations

import gc
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from server_harness import (
    Gate,
    ServerThread,
    make_model_dir,
    running_server,
    running_server_handle,
    serve_subprocess,
    wait_for,
)

from mfserve.server.app import BindError, ServerConfig, create_server
from mfserve.server.gc_pauses import GcPauses
from mfserve.v1 import recommender_pb2 as pb
from mfserve.v1 import recommender_pb2_grpc as pb_grpc

SERVICE = "mfserve.v1.RecommenderService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health_of(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status)


@pytest.fixture
def gated_server(model_dir: Path) -> Iterator[tuple[ServerThread, Gate]]:
    with running_server_handle(model_dir, max_concurrent_rpcs=2) as handle:
        gate = Gate(handle)
        yield handle, gate
        gate.release.set()


def test_health_follows_the_model_and_shutdown(model_dir: Path) -> None:
    handle = ServerThread(None)
    try:
        for service in ("", SERVICE):
            assert health_of(handle.address, service) == NOT_SERVING
        handle.call(handle.server.load(model_dir))
        for service in ("", SERVICE):
            assert health_of(handle.address, service) == SERVING
        with grpc.insecure_channel(handle.address) as channel:
            stub = pb_grpc.RecommenderServiceStub(channel)
            assert stub.GetModelInfo(pb.GetModelInfoRequest()).model_version == 1
            # A watcher (a load balancer) sees NOT_SERVING as soon as shutdown starts.
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=SERVICE)
            )
            assert next(watch).status == SERVING
            stopping = handle.submit(handle.server.stop(1.0))
            assert next(watch).status == NOT_SERVING
            stopping.result(30)
            watch.cancel()
    finally:
        handle.close()


def test_reload_swaps_the_version(tmp_path: Path) -> None:
    first = make_model_dir(tmp_path, seed=1)
    second = make_model_dir(tmp_path, seed=2)  # version 2 of the same model
    with running_server_handle(first) as handle, grpc.insecure_channel(handle.address) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)
        request = pb.PredictRequest(user_id="u1", item_id="i1")
        before = stub.Predict(request)
        assert before.model_version == 1
        handle.call(handle.server.load(second))
        after = stub.Predict(request)
        assert after.model_version == 2
        assert after.rating != before.rating
        assert stub.GetModelInfo(pb.GetModelInfoRequest()).model_version == 2


def test_create_server_accepts_artifact_and_recommender(synthetic_model: Any) -> None:
    from mfserve.training.recommender import Recommender

    for model in (synthetic_model, Recommender(synthetic_model)):
        with running_server(model) as address, grpc.insecure_channel(address) as channel:
            stub = pb_grpc.RecommenderServiceStub(channel)
            assert stub.TopK(pb.TopKRequest(user_id="u0", k=1)).items[0].rank == 1


def test_graceful_shutdown_finishes_the_call_in_flight(
    gated_server: tuple[ServerThread, Gate],
) -> None:
    handle, gate = gated_server
    with grpc.insecure_channel(handle.address) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)
        in_flight = stub.Predict.future(pb.PredictRequest(user_id="u1", item_id="i2"), timeout=60)
        assert gate.wait_entered(1)
        stopping = handle.submit(handle.server.stop(30.0))

        def refused() -> bool:
            # A new connection is refused once shutdown has begun.
            with grpc.insecure_channel(handle.address) as fresh:
                try:
                    pb_grpc.RecommenderServiceStub(fresh).GetModelInfo(
                        pb.GetModelInfoRequest(), timeout=2
                    )
                except grpc.RpcError as error:
                    return bool(error.code() == grpc.StatusCode.UNAVAILABLE)
                return False

        assert wait_for(refused, timeout=20)
        assert not in_flight.done()
        gate.release.set()
        response = in_flight.result(30)
        assert response.model_version == 1 and response.rating > 0
        stopping.result(30)


def test_max_concurrent_rpcs_gives_resource_exhausted(
    gated_server: tuple[ServerThread, Gate],
) -> None:
    handle, gate = gated_server  # max_concurrent_rpcs=2
    with grpc.insecure_channel(handle.address) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)
        held = [
            stub.Predict.future(pb.PredictRequest(user_id="u1", item_id=f"i{i}"), timeout=60)
            for i in (1, 2)
        ]
        # Both held before probing, else a probe could take the second slot and bounce a Predict.
        assert gate.wait_entered(2)
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as caught:
                stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-concurrent-rpcs" in caught.value.details()
        # Health is not the service: probes answer while it sheds, so a busy server is not
        # restarted by its orchestrator.
        assert health_of(handle.address) == SERVING
        assert handle.server.admission.shed == 3
        gate.release.set()
        assert all(f.result(30).rating > 0 for f in held)
        # Capacity is back once they finish.
        assert stub.GetModelInfo(pb.GetModelInfoRequest()).model_version == 1
    assert handle.server.admission.active == 0


def test_message_size_limits_give_resource_exhausted(model_dir: Path) -> None:
    with (
        running_server(
            model_dir, max_receive_message_bytes=4096, max_send_message_bytes=4096
        ) as address,
        grpc.insecure_channel(address) as channel,
    ):
        stub = pb_grpc.RecommenderServiceStub(channel)
        big = pb.BatchPredictRequest(user_ids=["u1"] * 1_000, item_ids=["i1"] * 1_000)  # ~8 KB
        with pytest.raises(grpc.RpcError) as received:
            stub.BatchPredict(big)
        assert received.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as sent:  # 400 items with titles: over 4 KB back
            stub.TopK(pb.TopKRequest(user_id="u1", k=400, include_metadata=True))
        assert sent.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Small calls still work.
        assert (
            len(stub.BatchPredict(pb.BatchPredictRequest(user_ids=["u1"], item_ids=["i1"])).ratings)
            == 1
        )


def test_two_servers_cannot_share_a_port(model_dir: Path) -> None:
    with running_server_handle(model_dir) as first:
        with pytest.raises(BindError, match=str(first.port)):
            ServerThread(model_dir, port=first.port)
        assert health_of(first.address) == SERVING  # the first is unaffected


def test_so_reuseport_lets_two_servers_share_a_port(model_dir: Path) -> None:
    with (
        running_server_handle(model_dir, so_reuseport=True) as first,
        running_server_handle(model_dir, port=first.port, so_reuseport=True) as second,
    ):
        assert second.port == first.port


def test_reflection_lists_the_services(server_address: str) -> None:
    with grpc.insecure_channel(server_address) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {
        SERVICE,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= services


def test_start_and_access_logs(model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mfserve")
    with (
        running_server(model_dir, access_log=True) as address,
        grpc.insecure_channel(address) as channel,
    ):
        stub = pb_grpc.RecommenderServiceStub(channel)
        stub.Predict(pb.PredictRequest(user_id="u1", item_id="i1"))
        with pytest.raises(grpc.RpcError):
            stub.Predict(pb.PredictRequest(user_id="nobody", item_id="i1"))
    messages = [r.getMessage() for r in caplog.records]
    assert f"mfserve: serving synthetic v1 on {address}" in messages
    access = [m for m in messages if m.startswith("access: ")]
    assert any(f"/{SERVICE}/Predict OK " in m for m in access), access
    assert any(f"/{SERVICE}/Predict NOT_FOUND " in m for m in access), access
    assert any("shutting down" in m for m in messages) and "mfserve: stopped" in messages


def test_access_log_off_by_default(server_address: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mfserve")
    with grpc.insecure_channel(server_address) as channel:
        pb_grpc.RecommenderServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest())
    assert not [r for r in caplog.records if r.getMessage().startswith("access: ")]


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="max_k"):
        ServerConfig(max_k=0)
    with pytest.raises(ValueError, match="port"):
        ServerConfig(port=70_000)
    assert ServerConfig(host="::1", port=5).address() == "[::1]:5"
    assert create_server(None).holder.current is None


def test_sigterm_on_the_subprocess_exits_0(model_dir: Path) -> None:
    with serve_subprocess(model_dir.parent, "--grace", "2") as server:
        assert server.model == "synthetic v1"
        assert health_of(server.address) == SERVING
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.RecommenderServiceStub(channel)
            assert stub.TopK(pb.TopKRequest(user_id="u1", k=3)).model_version == 1
        assert server.terminate() == 0
    assert "shutting down (grace 2.0s)" in server.log
    assert "mfserve: stopped" in server.log
    # serve() froze what loading made, so collections while serving never walk it.
    frozen = re.search(
        r"garbage collection while serving: young \d+ .*; ([\d,]+) objects frozen", server.log
    )
    assert frozen is not None and int(frozen.group(1).replace(",", "")) > 10_000


def test_gc_pauses_counts_collections_per_generation() -> None:
    with GcPauses() as pauses:
        gc.collect(0)
        gc.collect(2)
    assert pauses.collections[0] >= 1 and pauses.collections[2] >= 1
    assert all(seconds >= 0 for seconds in pauses.seconds)
    counted = list(pauses.collections)
    gc.collect(1)  # after the context: no longer counted
    assert pauses.collections == counted
    pattern = r"young \d+ \([\d.]+ ms\), middle \d+ \([\d.]+ ms\), full \d+ \([\d.]+ ms\); [\d,]+ objects frozen"
    assert re.fullmatch(pattern, pauses.summary())
