"""Hot reload: a new version is loaded off the serving path and swapped in under load with no
failed call; a bad version is refused while the old one keeps serving, and a good one after it is
still picked up; SIGHUP and ReloadModel reload at once; a pinned version is never watched."""

from __future__ import annotations

import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
from server_harness import (
    make_model_dir,
    running_server_handle,
    serve_subprocess,
    wait_for,
)

from mfserve.training.artifact import MANIFEST, MODEL_TENSORS, save_artifact
from mfserve.training.synthetic import synthetic_artifact
from mfserve.v1 import recommender_pb2 as pb
from mfserve.v1 import recommender_pb2_grpc as pb_grpc

SHAPE = {"n_users": 60, "n_items": 400, "factors": 8, "clusters": 4, "seen_per_user": 5}
POLL = 0.1


def new_version(folder: Path, seed: int) -> Path:
    return save_artifact(folder, synthetic_artifact(**SHAPE, seed=seed))


def info(stub: Any) -> Any:
    return stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_model_dir(tmp_path, "hot").parent


class CallStream:
    """TopK calls from ``threads`` client threads, each on a connection of its own, until closed:
    the ``model_version`` of every answer, in order, and every failed call."""

    def __init__(self, address: str, threads: int = 8) -> None:
        self.address = address
        self.versions: list[int] = []
        self.failures: list[BaseException] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client) for _ in range(threads)]

    def __enter__(self) -> CallStream:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _client(self) -> None:
        options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own
        with grpc.insecure_channel(self.address, options=options) as channel:
            stub = pb_grpc.RecommenderServiceStub(channel)
            while not self._stop.is_set():
                try:
                    answer = stub.TopK(pb.TopKRequest(user_id="u3", k=5), timeout=10)
                except grpc.RpcError as exc:
                    self.failures.append(exc)
                    continue
                self.versions.append(answer.model_version)


def test_versions_swap_under_a_stream_of_calls_with_no_failed_call(folder: Path) -> None:
    with (
        running_server_handle(folder, poll_seconds=POLL) as handle,
        CallStream(handle.address) as calls,
        grpc.insecure_channel(handle.address) as channel,
    ):
        stub = pb_grpc.RecommenderServiceStub(channel)
        for seed in (2, 3):
            wanted = int(new_version(folder, seed).name)
            assert wait_for(lambda w=wanted: info(stub).model_version == w, timeout=60)
        seen = len(calls.versions)
        assert wait_for(lambda: len(calls.versions) > seen + 50, timeout=30)
    assert not calls.failures
    assert set(calls.versions) <= {1, 2, 3} and {1, 3} <= set(calls.versions)
    assert calls.versions[-1] == 3  # the last answers come from the newest version
    assert 3 in calls.versions[-8:]


def corrupt_truncated_tensor(version: Path) -> None:
    path = version / MODEL_TENSORS
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def corrupt_checksum(version: Path) -> None:
    path = version / "users.json"
    path.write_text(path.read_text(encoding="utf-8").replace('"u1"', '"uX"'), encoding="utf-8")


def corrupt_pickle(version: Path) -> None:
    (version / MODEL_TENSORS).write_bytes(b"\x80\x04\x95" + b"\x00" * 64)  # a pickle stream


def corrupt_missing_file(version: Path) -> None:
    (version / "items.json").unlink()


def corrupt_half_copied(version: Path) -> None:
    # A copy in progress: the manifest is there, most of the files not yet.
    for path in version.iterdir():
        if path.name != MANIFEST:
            path.unlink()


@pytest.mark.parametrize(
    "corrupt",
    [
        corrupt_truncated_tensor,
        corrupt_checksum,
        corrupt_pickle,
        corrupt_missing_file,
        corrupt_half_copied,
    ],
    ids=lambda f: f.__name__.removeprefix("corrupt_"),
)
def test_a_bad_version_is_refused_and_a_later_good_one_is_picked_up(
    folder: Path, tmp_path: Path, corrupt: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="mfserve.server")
    with (
        running_server_handle(folder, poll_seconds=POLL) as handle,
        grpc.insecure_channel(handle.address) as channel,
    ):
        stub = pb_grpc.RecommenderServiceStub(channel)
        # Built aside and moved in whole, as a deployment would copy a broken version.
        staged = new_version(tmp_path / "staging", seed=5)
        corrupt(staged)
        shutil.move(staged, folder / "2")
        assert wait_for(lambda: info(stub).last_reload_version == 2, timeout=30)
        refused = info(stub)
        assert refused.model_version == 1  # the old version keeps serving
        assert f"{folder.name}/2" in refused.last_reload_error  # names the refused version
        assert refused.last_reload_time.seconds > 0
        assert len(stub.TopK(pb.TopKRequest(user_id="u1", k=3), timeout=10).items) == 3
        good = new_version(folder, seed=6)
        assert wait_for(lambda: info(stub).model_version == int(good.name), timeout=30)
        assert info(stub).last_reload_error == ""
    assert "mfserve: reload refused (new version in the model folder)" in caplog.text


def test_a_half_copied_version_is_picked_up_once_the_copy_completes(
    folder: Path, tmp_path: Path
) -> None:
    complete = new_version(tmp_path / "staging", seed=7)
    with (
        running_server_handle(folder, poll_seconds=POLL) as handle,
        grpc.insecure_channel(handle.address) as channel,
    ):
        stub = pb_grpc.RecommenderServiceStub(channel)
        target = folder / "2"
        target.mkdir()
        shutil.copy2(complete / MANIFEST, target / MANIFEST)
        assert wait_for(lambda: info(stub).last_reload_version == 2, timeout=30)
        assert info(stub).model_version == 1
        for path in complete.iterdir():
            shutil.copy2(path, target / path.name)
        assert wait_for(lambda: info(stub).model_version == 2, timeout=30)


def test_reload_model_rpc(folder: Path) -> None:
    with (
        running_server_handle(folder, poll_seconds=0) as handle,
        grpc.insecure_channel(handle.address) as channel,
    ):
        stub = pb_grpc.RecommenderServiceStub(channel)
        same = stub.ReloadModel(pb.ReloadModelRequest(), timeout=30)
        assert (same.model_version, same.changed) == (1, False)
        new_version(folder, seed=8)
        assert info(stub).model_version == 1  # the watcher is off: only the call reloads
        reloaded = stub.ReloadModel(pb.ReloadModelRequest(), timeout=60)
        assert (reloaded.model_version, reloaded.changed) == (2, True)
        assert info(stub).model_version == 2
        back = stub.ReloadModel(pb.ReloadModelRequest(version=1), timeout=60)
        assert (back.model_version, back.changed) == (1, True)
        with pytest.raises(grpc.RpcError) as missing:
            stub.ReloadModel(pb.ReloadModelRequest(version=9), timeout=30)
        assert missing.value.code() is grpc.StatusCode.NOT_FOUND
        assert "version 9" in missing.value.details()
        with pytest.raises(grpc.RpcError) as negative:
            stub.ReloadModel(pb.ReloadModelRequest(version=-1), timeout=30)
        assert negative.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        corrupt_checksum(new_version(folder, seed=9))
        with pytest.raises(grpc.RpcError) as refused:
            stub.ReloadModel(pb.ReloadModelRequest(), timeout=60)
        assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "version 3 was refused" in refused.value.details()
        assert info(stub).model_version == 1


def test_a_pinned_version_is_never_watched(folder: Path) -> None:
    with (
        running_server_handle(folder / "1", poll_seconds=POLL) as handle,
        grpc.insecure_channel(handle.address) as channel,
    ):
        stub = pb_grpc.RecommenderServiceStub(channel)
        new_version(folder, seed=10)
        assert not wait_for(lambda: info(stub).model_version == 2, timeout=1.0)
        with pytest.raises(grpc.RpcError) as pinned:
            stub.ReloadModel(pb.ReloadModelRequest(version=2), timeout=30)
        assert pinned.value.code() is grpc.StatusCode.FAILED_PRECONDITION


def test_the_newest_version_that_loads_is_served_at_start(folder: Path) -> None:
    corrupt_missing_file(new_version(folder, seed=11))
    with (
        running_server_handle(folder, poll_seconds=0) as handle,
        grpc.insecure_channel(handle.address) as channel,
    ):
        got = info(pb_grpc.RecommenderServiceStub(channel))
    assert got.model_version == 1
    assert got.last_reload_version == 2 and "items.json" in got.last_reload_error


def test_sighup_reloads_and_the_server_keeps_serving(folder: Path) -> None:
    with serve_subprocess(folder, "--poll-seconds", "0") as server:
        new_version(folder, seed=12)
        server.proc.send_signal(signal.SIGHUP)
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.RecommenderServiceStub(channel)
            assert wait_for(lambda: info(stub).model_version == 2, timeout=60)
        assert server.proc.poll() is None
        assert server.terminate() == 0
    assert "SIGHUP: reloading" in server.log and "reloaded to hot v2" in server.log


def fresh_channel_versions(address: str, count: int = 8) -> set[int]:
    """The versions that ``count`` new connections see (the kernel spreads them over workers)."""
    versions = set()
    for _ in range(count):
        with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            versions.add(info(pb_grpc.RecommenderServiceStub(ch)).model_version)
    return versions


@pytest.mark.parametrize("trigger", ["watcher", "SIGHUP"])
def test_every_worker_reloads_under_calls_with_no_failed_call(folder: Path, trigger: str) -> None:
    poll = "0.2" if trigger == "watcher" else "0"
    with serve_subprocess(folder, "--workers", "2", "--poll-seconds", poll) as server:
        assert wait_for(lambda: "workers ready" in server.log, timeout=60)
        with CallStream(server.address) as calls:
            new_version(folder, seed=13)
            if trigger == "SIGHUP":
                server.proc.send_signal(signal.SIGHUP)
            assert wait_for(lambda: fresh_channel_versions(server.address) == {2}, timeout=60)
        assert server.log.count("reloaded to hot v2") == 2  # both workers
        assert server.terminate() == 0
    assert not calls.failures
    assert set(calls.versions) <= {1, 2} and calls.versions[-1] == 2


def test_the_sdk_reloads_and_reports_the_last_attempt(folder: Path) -> None:
    from mfserve.client import NotFoundError, RecommenderClient, RpcError

    with (
        running_server_handle(folder, poll_seconds=0) as handle,
        RecommenderClient(handle.address, timeout=60) as client,
    ):
        assert client.model_info().last_reload_time is None  # nothing tried since the start
        new_version(folder, seed=14)
        result = client.reload_model()
        assert (result.model_version, result.changed) == (2, True)
        info_after = client.model_info()
        assert info_after.model_version == 2 and info_after.last_reload_version == 2
        assert info_after.last_reload_time is not None and info_after.last_reload_error == ""
        with pytest.raises(NotFoundError):
            client.reload_model(7)
        corrupt_pickle(new_version(folder, seed=15))
        with pytest.raises(RpcError) as refused:
            client.reload_model()
        assert refused.value.code is grpc.StatusCode.FAILED_PRECONDITION
        assert client.model_info().last_reload_error
        assert client.model_info().model_version == 2


def test_reloads_are_counted_and_the_version_gauge_follows(folder: Path) -> None:
    from test_metrics import free_port, moved, scrape, value

    with (
        running_server_handle(folder, poll_seconds=0, metrics_port=free_port()) as handle,
        grpc.insecure_channel(handle.address) as channel,
    ):
        stub = pb_grpc.RecommenderServiceStub(channel)
        port = handle.server.metrics_port
        before = scrape(port)
        assert value(before, "mfserve_model_version", name="hot") == 1
        new_version(folder, seed=16)
        stub.ReloadModel(pb.ReloadModelRequest(), timeout=60)
        corrupt_checksum(new_version(folder, seed=17))
        with pytest.raises(grpc.RpcError):
            stub.ReloadModel(pb.ReloadModelRequest(), timeout=60)
        after = scrape(port)
    assert moved(before, after, "mfserve_model_reloads_total", result="success") == 1
    assert moved(before, after, "mfserve_model_reloads_total", result="failure") == 1
    assert value(after, "mfserve_model_version", name="hot") == 2
