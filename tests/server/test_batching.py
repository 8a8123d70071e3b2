"""Dynamic batching: batched answers equal unbatched ones; cancellation, deadlines and errors stay
with their own call; a lone call does not wait; batches form under concurrency.

Exactness: a batch of >= 3 rows is a GEMM while a lone row is a GEMV, and MKL rounds the two
differently (up to ~1e-5 on these scores; measured, see the batching docs). So scores are compared
to 1e-5 and items exactly, except where two scores are within 1e-5 of each other (a near-tie may
come back in either order). Predict is an element-wise product and sum: compared to 1e-6.

Batches are made deterministic with a gate: the first call's compute is held on the worker thread
until the test has queued the others, which then form one batch. No test asserts wall time.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from server_harness import ServerThread, make_model_dir, running_server_handle, wait_for

from mfserve.server.batching import Batcher
from mfserve.training.recommender import RankRequest, Recommender
from mfserve.v1 import recommender_pb2 as pb
from mfserve.v1 import recommender_pb2_grpc as pb_grpc

TOL = 1e-5


class Gate:
    """Holds a batcher's compute on its worker thread until released; can fail chosen payloads."""

    def __init__(self, batcher: Batcher[Any, Any], fail: Any = None) -> None:
        self.batcher = batcher
        # Every batch on the worker thread: a cheap one computed on the loop would hold the loop.
        batcher.inline_limit = None
        self.release = threading.Event()
        self.entered = threading.Event()
        self.batches: list[int] = []
        original = batcher.compute

        def gated(model: Any, payloads: list[Any]) -> list[Any]:
            self.batches.append(len(payloads))
            self.entered.set()
            assert self.release.wait(30)
            if fail is not None and any(fail(p) for p in payloads):
                raise RuntimeError("boom: a compute bug for one call")
            return original(model, payloads)

        batcher.compute = gated

    def hold_first(self, call: Any) -> Any:
        """Start ``call()`` (a grpc future) and wait until its batch is computing (held)."""
        future = call()
        assert self.entered.wait(30)
        return future

    def wait_queued(self, calls: int) -> None:
        assert wait_for(lambda: self.batcher.waiting >= calls, timeout=30), self.batcher.waiting


@pytest.fixture
def server(model_dir: Path) -> Iterator[ServerThread]:
    with running_server_handle(model_dir, max_batch_size=64) as handle:
        yield handle


@pytest.fixture
def stub(server: ServerThread) -> Iterator[Any]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.RecommenderServiceStub(channel)


@pytest.fixture(scope="module")
def rec(synthetic_model: Any) -> Recommender:
    return Recommender(synthetic_model)


def assert_same_ranking(
    got: Any, want_items: list[int], want_scores: list[float], rec: Recommender
) -> None:
    items = [rec.item_rows([i.item_id])[0] for i in got.items]
    scores = [i.score for i in got.items]
    assert len(items) == len(want_items)
    assert scores == pytest.approx(want_scores, abs=TOL)
    assert [i.rank for i in got.items] == list(range(1, len(items) + 1))
    for pos, (item, want) in enumerate(zip(items, want_items, strict=True)):
        if item != want:  # only where the reference has a near-tie at this position
            near = [
                j for j in (pos - 1, pos + 1) if 0 <= j < len(want_scores)
                and abs(want_scores[j] - want_scores[pos]) <= TOL
            ]  # fmt: skip
            assert near or pos == len(want_items) - 1, (pos, item, want, want_scores)


def top_k_cases(rec: Recommender) -> list[tuple[pb.TopKRequest, list[int], list[float]]]:
    """Mixed requests (k, seen, deny/allow lists, cold start) with their one-at-a-time answers."""
    cases = []
    for n in range(40):
        user = n % rec.n_users
        k = (1, 5, 10, 25)[n % 4]
        options: dict[str, Any] = {}
        fields: dict[str, Any] = {"user_id": f"u{user}", "k": k}
        if n % 5 == 1:
            fields["exclude_seen"] = False
            options["exclude_seen"] = False
        if n % 7 == 2:
            fields["exclude_item_ids"] = ["i1", "i2", "i3", "nope"]
            options["exclude"] = torch.tensor([1, 2, 3])
        if n % 9 == 3:
            fields["candidate_item_ids"] = [f"i{j}" for j in range(0, 60, 3)]
            options["candidates"] = torch.arange(0, 60, 3)
        row = user
        if n % 11 == 4:  # cold start: the popularity ranking (full of exact ties)
            fields.update(user_id="stranger", allow_cold_start=True)
            row = -1
        [(items, scores)] = rec.top_k(torch.tensor([row]), k, [RankRequest(**options)])
        cases.append((pb.TopKRequest(**fields), items.tolist(), scores.tolist()))
    return cases


def test_batched_top_k_equals_unbatched(server: ServerThread, stub: Any, rec: Recommender) -> None:
    batcher = server.server.service.top_k_batcher
    gate = Gate(batcher)
    cases = top_k_cases(rec)
    first = gate.hold_first(lambda: stub.TopK.future(cases[0][0], timeout=60))
    futures = [stub.TopK.future(request, timeout=60) for request, _, _ in cases[1:]]
    gate.wait_queued(len(futures))
    gate.release.set()
    for future, (_, items, scores) in zip([first, *futures], cases, strict=True):
        assert_same_ranking(future.result(), items, scores, rec)
    # One held batch of 1, then everyone else together: batches form behind a busy worker.
    assert gate.batches[:2] == [1, len(futures)]
    assert batcher.stats.max_batch == len(futures)
    assert batcher.stats.computed == len(cases)


def test_batched_similar_items_equals_unbatched(
    server: ServerThread, stub: Any, rec: Recommender
) -> None:
    batcher = server.server.service.similar_batcher
    gate = Gate(batcher)
    cases = [(n, (3, 10, 20)[n % 3]) for n in range(20)]
    requests = [pb.SimilarItemsRequest(item_id=f"i{item}", k=k) for item, k in cases]
    first = gate.hold_first(lambda: stub.SimilarItems.future(requests[0], timeout=60))
    futures = [stub.SimilarItems.future(r, timeout=60) for r in requests[1:]]
    gate.wait_queued(len(futures))
    gate.release.set()
    for future, (item, k) in zip([first, *futures], cases, strict=True):
        [(items, scores)] = rec.similar_items(torch.tensor([item]), k)
        assert_same_ranking(future.result(), items.tolist(), scores.tolist(), rec)
    assert gate.batches[:2] == [1, len(futures)]


def test_batched_predict_equals_unbatched(
    server: ServerThread, stub: Any, rec: Recommender
) -> None:
    batcher = server.server.service.predict_batcher
    gate = Gate(batcher)
    pairs = [(f"u{n % 60}", f"i{(7 * n) % 400}") for n in range(30)]
    first = gate.hold_first(
        lambda: stub.Predict.future(pb.PredictRequest(user_id="u0", item_id="i0"), timeout=60)
    )
    futures = [
        stub.Predict.future(pb.PredictRequest(user_id=u, item_id=i), timeout=60) for u, i in pairs
    ]
    batch = pb.BatchPredictRequest(user_ids=[u for u, _ in pairs], item_ids=[i for _, i in pairs])
    batch_future = stub.BatchPredict.future(batch, timeout=60)
    gate.wait_queued(len(futures) + 1)
    gate.release.set()
    want = float(rec.predict(*_rows(rec, "u0", "i0"))[0])
    assert first.result().rating == pytest.approx(want, abs=1e-6)
    for future, (user, item) in zip(futures, pairs, strict=True):
        want = float(rec.predict(*_rows(rec, user, item))[0])
        assert future.result().rating == pytest.approx(want, abs=1e-6)
    want_all = rec.predict(*_rows_many(rec, pairs)).tolist()
    assert list(batch_future.result().ratings) == pytest.approx(want_all, abs=1e-6)
    # Predict and BatchPredict calls share one batch (pairs concatenated).
    assert gate.batches[:2] == [1, len(futures) + 1]


def _rows(rec: Recommender, user: str, item: str) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(rec.user_rows([user])), torch.from_numpy(rec.item_rows([item]))


def _rows_many(rec: Recommender, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    users = rec.user_rows([u for u, _ in pairs])
    return torch.from_numpy(users), torch.from_numpy(rec.item_rows([i for _, i in pairs]))


def test_cancelled_call_is_dropped_and_neighbours_succeed(server: ServerThread, stub: Any) -> None:
    batcher = server.server.service.top_k_batcher
    gate = Gate(batcher)
    first = gate.hold_first(lambda: stub.TopK.future(pb.TopKRequest(user_id="u1"), timeout=60))
    doomed = stub.TopK.future(pb.TopKRequest(user_id="u2"), timeout=60)
    neighbours = [
        stub.TopK.future(pb.TopKRequest(user_id=f"u{n}"), timeout=60) for n in range(3, 8)
    ]
    gate.wait_queued(6)
    doomed.cancel()
    # The server cancels the handler, which cancels its queued future.
    assert wait_for(lambda: batcher.waiting == 5, timeout=30)
    gate.release.set()
    assert len(first.result().items) == 10
    for future in neighbours:
        assert len(future.result().items) == 10
    assert doomed.cancelled()
    assert batcher.stats.dropped == 1
    assert gate.batches[:2] == [1, 5]  # the cancelled call never reached compute


def test_expired_deadline_is_deadline_exceeded_and_neighbours_succeed(
    server: ServerThread, stub: Any
) -> None:
    batcher = server.server.service.top_k_batcher
    gate = Gate(batcher)
    first = gate.hold_first(lambda: stub.TopK.future(pb.TopKRequest(user_id="u1"), timeout=60))
    hurried = stub.TopK.future(pb.TopKRequest(user_id="u2"), timeout=0.5)
    neighbours = [
        stub.TopK.future(pb.TopKRequest(user_id=f"u{n}"), timeout=60) for n in range(3, 6)
    ]
    with pytest.raises(grpc.RpcError) as error:
        hurried.result()
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for(lambda: batcher.waiting == 3, timeout=30)  # dropped server-side too
    gate.release.set()
    assert len(first.result().items) == 10
    for future in neighbours:
        assert len(future.result().items) == 10
    assert batcher.stats.dropped == 1
    assert gate.batches[:2] == [1, 3]


def test_bad_request_fails_alone(server: ServerThread, stub: Any) -> None:
    batcher = server.server.service.top_k_batcher
    gate = Gate(batcher)
    first = gate.hold_first(lambda: stub.TopK.future(pb.TopKRequest(user_id="u1"), timeout=60))
    bad = {
        grpc.StatusCode.INVALID_ARGUMENT: pb.TopKRequest(user_id="u2", k=-1),
        grpc.StatusCode.NOT_FOUND: pb.TopKRequest(user_id="nobody"),
    }
    good = [stub.TopK.future(pb.TopKRequest(user_id=f"u{n}"), timeout=60) for n in range(3, 7)]
    failing = {code: stub.TopK.future(request, timeout=60) for code, request in bad.items()}
    for code, future in failing.items():  # validated before queueing: answered while held
        with pytest.raises(grpc.RpcError) as error:
            future.result()
        assert error.value.code() == code
    gate.wait_queued(len(good))
    gate.release.set()
    assert len(first.result().items) == 10
    for future in good:
        assert len(future.result().items) == 10
    assert batcher.stats.computed == 1 + len(good)


def test_compute_error_is_isolated(server: ServerThread, stub: Any) -> None:
    batcher = server.server.service.top_k_batcher
    user_three = server.server.holder.current.user_row("u3")  # type: ignore[union-attr]
    gate = Gate(batcher, fail=lambda payload: payload[0] == user_three)
    gate.release.set()  # no hold: just fail every batch that holds u3
    futures = {
        n: stub.TopK.future(pb.TopKRequest(user_id=f"u{n}"), timeout=60) for n in range(1, 9)
    }
    for n, future in futures.items():
        if n == 3:
            with pytest.raises(grpc.RpcError) as error:
                future.result()
            assert error.value.code() == grpc.StatusCode.INTERNAL
        else:
            assert len(future.result().items) == 10
    assert batcher.stats.errors == 1


def test_batches_form_under_concurrency(server: ServerThread, stub: Any) -> None:
    futures = [
        stub.TopK.future(pb.TopKRequest(user_id=f"u{n % 60}"), timeout=60) for n in range(200)
    ]
    for future in futures:
        assert len(future.result().items) == 10
    stats = server.server.service.top_k_batcher.stats
    assert stats.computed == 200
    assert stats.batches < 200 and stats.max_batch > 1
    # The timing counters cover exactly the batches that went to the compute thread.
    assert stats.executor_batches == stats.batches - stats.inline > 0
    assert stats.compute_s > 0 and stats.compute_cpu_s > 0
    assert stats.start_wait_s >= 0 and stats.return_wait_s >= 0


def test_a_batch_holds_one_model(tmp_path: Path) -> None:
    first_version = make_model_dir(tmp_path)  # .../synthetic/1
    second = make_model_dir(tmp_path, seed=5)  # .../synthetic/2: swapped in mid-queue
    with (
        running_server_handle(first_version) as handle,
        grpc.insecure_channel(handle.address) as channel,
    ):
        stub = pb_grpc.RecommenderServiceStub(channel)
        batcher = handle.server.service.top_k_batcher
        gate = Gate(batcher)
        first = gate.hold_first(lambda: stub.TopK.future(pb.TopKRequest(user_id="u1"), timeout=60))
        old = [stub.TopK.future(pb.TopKRequest(user_id=f"u{n}"), timeout=60) for n in range(2, 5)]
        gate.wait_queued(3)
        handle.call(handle.server.load(second))
        new = [stub.TopK.future(pb.TopKRequest(user_id=f"u{n}"), timeout=60) for n in range(5, 7)]
        gate.wait_queued(5)
        gate.release.set()
        assert {f.result().model_version for f in [first, *old]} == {1}
        assert {f.result().model_version for f in new} == {2}
        assert gate.batches[:3] == [1, 3, 2]


# ------------------------------------------------------------------ lone calls on the event loop
class Where:
    """Records which thread each batch of a batcher is computed on."""

    def __init__(self, batcher: Batcher[Any, Any]) -> None:
        self.threads: list[str] = []
        original = batcher.compute

        def recorded(model: Any, payloads: list[Any]) -> list[Any]:
            self.threads.append(threading.current_thread().name)
            return original(model, payloads)

        batcher.compute = recorded


def test_lone_calls_are_computed_on_the_event_loop(server: ServerThread, stub: Any) -> None:
    # One call at a time: no thread hop; the answer is ready when submit returns.
    batchers = server.server.service.batchers
    where = {name: Where(batcher) for name, batcher in batchers.items()}
    for n in range(3):
        assert len(stub.TopK(pb.TopKRequest(user_id=f"u{n}"), timeout=60).items) == 10
        assert len(stub.SimilarItems(pb.SimilarItemsRequest(item_id=f"i{n}"), timeout=60).items)
        batch = pb.BatchPredictRequest(user_ids=["u1", "u2"], item_ids=["i1", "i2"])
        assert len(stub.BatchPredict(batch, timeout=60).ratings) == 2
    for name, batcher in batchers.items():
        assert set(where[name].threads) == {"mfserve-test-server"}, name  # the loop's thread
        assert batcher.stats.inline == batcher.stats.batches == batcher.stats.computed == 3


def test_expensive_lone_call_goes_to_the_executor(server: ServerThread, stub: Any) -> None:
    batcher = server.server.service.top_k_batcher
    where = Where(batcher)
    batcher.inline_limit = server.server.holder.current.n_items - 1  # type: ignore[union-attr]
    assert len(stub.TopK(pb.TopKRequest(user_id="u1"), timeout=60).items) == 10
    assert where.threads == ["mfserve-compute_0"]
    assert batcher.stats.inline == 0


def _batcher(in_flight: int, limit: int | None = 10) -> Batcher[int, int]:
    return Batcher(
        "double",
        lambda model, payloads: [2 * p for p in payloads],
        executor=None,
        in_flight=lambda: in_flight,
        cost=lambda model, payload: payload,
        inline_limit=limit,
    )


def test_submit_answers_a_lone_cheap_call_at_once() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        model: Any = object()
        alone = _batcher(in_flight=1)
        assert alone.submit(model, 3).result() == 6  # answered before submit returned
        assert alone.stats.inline == 1
        # Not alone: another call in the server, or a callback due in this loop turn (a handler
        # for a call that just arrived), or too costly: queued for the next turn's batch.
        crowded = _batcher(in_flight=2)
        due = _batcher(in_flight=1)
        costly = _batcher(in_flight=1, limit=2)
        off = _batcher(in_flight=1, limit=None)
        futures = [crowded.submit(model, 3), costly.submit(model, 3), off.submit(model, 3)]
        loop.call_soon(lambda: None)
        futures.append(due.submit(model, 3))
        futures.append(due.submit(model, 4))  # joins the queued call: one batch of two
        assert not any(f.done() for f in futures)
        assert await asyncio.gather(*futures) == [6, 6, 6, 6, 8]
        assert due.stats.sizes == {2: 1}

    asyncio.run(scenario())


# ------------------------------------------------------------------ torch threads per thread
def test_the_compute_thread_keeps_the_process_torch_threads(model_dir: Path) -> None:
    # OpenMP keeps the count per thread: without its initializer the compute thread would start
    # at one per core and spin up a team for every batch.
    torch.set_num_threads(1)
    with running_server_handle(model_dir, torch_threads=1) as handle:
        executor = handle.server._executor
        assert executor is not None
        assert executor.submit(torch.get_num_threads).result(30) == 1
