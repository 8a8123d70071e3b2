"""TopK's pages and diversity, and BatchTopK: many users streamed in order, each exactly what
TopK answers, with flow control that lets a slow reader hold no compute."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from server_harness import ServerThread, running_server_handle
from test_server_errors import call_error, resources, violations

from mfserve.v1 import recommender_pb2 as pb
from mfserve.v1 import recommender_pb2_grpc as pb_grpc

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
MAX_BATCH_USERS = 30_000


@pytest.fixture(scope="module")
def handle(model_dir: Path) -> Iterator[ServerThread]:
    with running_server_handle(model_dir, max_batch_users=MAX_BATCH_USERS) as handle:
        yield handle


@pytest.fixture(scope="module")
def stub(handle: ServerThread) -> Iterator[pb_grpc.RecommenderServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
        yield pb_grpc.RecommenderServiceStub(channel)


def ids_of(response: pb.TopKResponse) -> list[str]:
    return [item.item_id for item in response.items]


def pages(stub: pb_grpc.RecommenderServiceStub, request: pb.TopKRequest, size: int) -> list[Any]:
    """Every page of ``request``, following the tokens."""
    out = []
    paged = pb.TopKRequest()
    paged.CopyFrom(request)
    paged.page_size = size
    while True:
        page = stub.TopK(paged)
        out.append(page)
        if not page.next_page_token:
            return out
        paged.page_token = page.next_page_token


SESSION = [pb.Interaction(item_id="i5", rating=5.0), pb.Interaction(item_id="i9", rating=3.5)]
LISTS = {
    "known user": pb.TopKRequest(user_id="u3", k=100),
    "folded in": pb.TopKRequest(k=100, interactions=SESSION),
    "cold start (tied popularity counts)": pb.TopKRequest(
        user_id="stranger", k=100, allow_cold_start=True
    ),
    "diverse": pb.TopKRequest(user_id="u3", k=100, diversity=0.6),
    "allow-list": pb.TopKRequest(
        user_id="u3", k=100, candidate_item_ids=[f"i{n}" for n in range(0, 400, 3)]
    ),
}


@pytest.mark.parametrize("name", sorted(LISTS))
def test_pages_of_10_concatenate_to_the_whole_list(
    stub: pb_grpc.RecommenderServiceStub, name: str
) -> None:
    request = LISTS[name]
    whole = stub.TopK(request)
    got = pages(stub, request, 10)
    concatenated = [item for page in got for item in ids_of(page)]
    assert concatenated == ids_of(whole)
    assert len(set(concatenated)) == len(concatenated)  # no item repeats across pages
    assert [item.rank for page in got for item in page.items] == list(
        range(1, len(concatenated) + 1)
    )
    assert len(got) == -(-len(concatenated) // 10)
    assert all(len(page.items) == 10 for page in got[:-1])


def test_page_size_may_change_between_pages(stub: pb_grpc.RecommenderServiceStub) -> None:
    request = pb.TopKRequest(user_id="u7", k=30, page_size=5)
    first = stub.TopK(request)
    request.page_size = 25
    request.page_token = first.next_page_token
    rest = stub.TopK(request)
    assert not rest.next_page_token
    whole = stub.TopK(pb.TopKRequest(user_id="u7", k=30))
    assert ids_of(first) + ids_of(rest) == ids_of(whole)


def forged(token: str, version: int) -> str:
    _, offset, fingerprint = base64.urlsafe_b64decode(token).decode().split(":")
    return base64.urlsafe_b64encode(f"{version}:{offset}:{fingerprint}".encode()).decode()


def test_bad_page_tokens_and_sizes_are_invalid_argument(
    stub: pb_grpc.RecommenderServiceStub,
) -> None:
    first = stub.TopK(pb.TopKRequest(user_id="u1", k=30, page_size=10))
    cases = [
        (pb.TopKRequest(user_id="u1", k=30, page_size=31), "page_size", "between 0"),
        (pb.TopKRequest(user_id="u1", k=30, page_size=-1), "page_size", "between 0"),
        (pb.TopKRequest(user_id="u1", k=30, page_token=first.next_page_token), "page_token", ""),
        (
            pb.TopKRequest(user_id="u2", k=30, page_size=10, page_token=first.next_page_token),
            "page_token",
            "other fields",
        ),
        (pb.TopKRequest(user_id="u1", k=30, page_size=10, page_token="%%%"), "page_token", ""),
        (
            pb.TopKRequest(
                user_id="u1", k=30, page_size=10, page_token=forged(first.next_page_token, 99)
            ),
            "page_token",
            "model version 99",
        ),
    ]
    for request, field, words in cases:
        error = call_error(stub.TopK, request)
        assert error.code() == INVALID, (request, error.details())
        assert field in violations(error)
        assert words in error.details()


def similarity(stub: pb_grpc.RecommenderServiceStub, handle: ServerThread, ids: list[str]) -> float:
    """Mean pairwise cosine similarity of items' ranking factors."""
    model = handle.server.holder.serving.recommender
    keys = model.ranking_tables().keys[model.item_rows(ids)]
    keys = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    gram = keys @ keys.T
    n = len(ids)
    return float((gram.sum() - n) / (n * (n - 1)))


def test_diversity_trades_relevance_for_variety(
    stub: pb_grpc.RecommenderServiceStub, handle: ServerThread
) -> None:
    plain = stub.TopK(pb.TopKRequest(user_id="u3", k=20))
    assert ids_of(stub.TopK(pb.TopKRequest(user_id="u3", k=20, diversity=0.0))) == ids_of(plain)
    varied = [
        ids_of(stub.TopK(pb.TopKRequest(user_id="u3", k=20, diversity=d))) for d in (0.5, 0.9)
    ]
    assert varied[0][0] == ids_of(plain)[0]  # the most relevant item always leads
    spread = [similarity(stub, handle, ids) for ids in (ids_of(plain), *varied)]
    assert spread[0] >= spread[1] > spread[2], spread
    assert varied[1] != ids_of(plain)
    for bad in (-0.1, 1.5, float("nan")):
        error = call_error(stub.TopK, pb.TopKRequest(user_id="u3", diversity=bad))
        assert error.code() == INVALID and "diversity" in violations(error)


def test_batch_top_k_streams_what_top_k_answers_in_order(
    stub: pb_grpc.RecommenderServiceStub,
) -> None:
    requests = [pb.TopKRequest(user_id=f"u{n}", k=10) for n in range(60)]
    requests += [
        pb.TopKRequest(k=5, interactions=SESSION),
        pb.TopKRequest(user_id="u4", k=7, diversity=0.5, include_metadata=True),
        pb.TopKRequest(user_id="nobody", allow_cold_start=True),
    ]
    streamed = list(stub.BatchTopK(pb.BatchTopKRequest(requests=requests)))
    assert [list(r.items) for r in streamed] == [list(stub.TopK(r).items) for r in requests]
    assert {r.model_version for r in streamed} == {1}
    assert list(streamed[-1].missing_user_ids) == ["nobody"]


def test_batch_top_k_refuses_a_bad_entry_before_answering_any(
    stub: pb_grpc.RecommenderServiceStub,
) -> None:
    def batch(*requests: pb.TopKRequest) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.BatchTopK(pb.BatchTopKRequest(requests=list(requests))))
        return caught.value

    good = pb.TopKRequest(user_id="u1")
    error = batch(good, good, pb.TopKRequest(user_id="ghost"))
    assert error.code() == NOT_FOUND
    assert ("user", "ghost", "requests[2].user_id") in resources(error)
    error = batch(good, pb.TopKRequest(user_id="u1", k=-1))
    assert error.code() == INVALID and "requests[1].k" in violations(error)
    error = batch(good, pb.TopKRequest(user_id="u1", page_size=5))
    assert error.code() == INVALID and "requests[1].page_size" in violations(error)
    error = batch()
    assert error.code() == INVALID and "requests" in violations(error)
    error = batch(*[good] * (MAX_BATCH_USERS + 1))
    assert error.code() == INVALID and "maximum" in error.details()


def test_a_slow_reader_holds_no_compute(
    stub: pb_grpc.RecommenderServiceStub, handle: ServerThread
) -> None:
    # Flow control: once the transport's windows are full of unread answers the stream pauses,
    # computing nothing more, and other calls are answered meanwhile.
    stats = handle.server.service.top_k_batcher.stats
    before = stats.computed
    entries = [pb.TopKRequest(user_id=f"u{n % 60}", k=50) for n in range(MAX_BATCH_USERS)]
    stream = stub.BatchTopK(pb.BatchTopKRequest(requests=entries))
    assert len(next(stream).items) == 50
    # Wait for the stream to stall (the transport's windows full of unread answers); a loaded
    # machine gets there later, so the test waits for the count to settle, not a fixed time.
    deadline = time.monotonic() + 60
    paused_at = -1
    while time.monotonic() < deadline:
        now = stats.computed - before
        if now == paused_at:
            break
        paused_at = now
        time.sleep(1.0)
    time.sleep(1.0)
    still = stats.computed - before
    assert stub.TopK(pb.TopKRequest(user_id="u1")).items  # the model is not held
    assert still == paused_at, (paused_at, still)  # nothing more computed while paused
    assert still < MAX_BATCH_USERS, still
    assert sum(1 for _ in stream) == MAX_BATCH_USERS - 1


def test_a_diverse_list_is_the_same_in_any_batch(handle: ServerThread) -> None:
    # Another call in the batch may fetch far more items; a diverse row keeps its own pool.
    from mfserve.server.batch_compute import top_k_batch
    from mfserve.training.scoring import RankRequest

    serving = handle.server.holder.serving
    model = serving.recommender
    row = model.user_row("u3")
    diverse = (row, 10, RankRequest(diversity=0.7))
    alone = top_k_batch(serving, [diverse])
    together = top_k_batch(serving, [diverse, (model.user_row("u4"), 400, RankRequest())])
    assert together[0] == alone[0]
    assert len(together[1][0]) > 100  # the batch fetched past the diverse row's pool of 100
