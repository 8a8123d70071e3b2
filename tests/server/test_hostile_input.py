"""Hostile input against a live server subprocess (issue 17): whatever a client sends, every call
ends in a deliberate status (never UNKNOWN or INTERNAL), and afterwards the server is still
SERVING, gives the same TopK as before, and holds no more than 1.2x the memory it held warm.

One server serves the whole module, so the last test sees what every other test sent; each test
also checks the server still answers before it ends. ``Live.tally`` counts every hostile call by
kind and status; the last test prints it (``pytest -s``).
"""

from __future__ import annotations

import functools
import json
import operator
import os
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_harness import serve_subprocess, wait_for

from mfserve.server.admission import grpc_limit
from mfserve.server.errors import show
from mfserve.server.service import SERVICE_NAME
from mfserve.v1 import recommender_pb2 as pb
from mfserve.v1 import recommender_pb2_grpc as pb_grpc

MiB = 1 << 20
MESSAGE_MB = 4  # the server's message limit: small, so that going over it is cheap
MAX_K, MAX_PAIRS = 1_000, 100_000  # the server's defaults
MAX_RPCS = 64  # low, so that a burst goes over it
GRPC_LIMIT = grpc_limit(MAX_RPCS)  # what gRPC itself admits: health, reflection and the rest
OK, INVALID = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXHAUSTED, UNIMPLEMENTED = grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED
CANCELLED, DEADLINE = grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
TIMEOUT = 10.0
FUZZ = settings(  # scripts/soak.sh runs more
    max_examples=int(os.environ.get("MFSERVE_FUZZ_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@dataclass(frozen=True)
class Method:
    path: str
    request: Any  # the request message class; None for a path the server does not serve
    streams_requests: bool = False
    streams_responses: bool = False


def _methods() -> list[Method]:
    found = []
    for file, name in (
        (pb.DESCRIPTOR, "RecommenderService"),
        (health_pb2.DESCRIPTOR, "Health"),
        (reflection_pb2.DESCRIPTOR, "ServerReflection"),
    ):
        service = file.services_by_name[name]
        for m in service.methods:
            request = message_factory.GetMessageClass(m.input_type)
            path = f"/{service.full_name}/{m.name}"
            found.append(Method(path, request, m.client_streaming, m.server_streaming))
    return found


METHODS = _methods()
# Not served: reflection v1 (only v1alpha is registered), an unknown method and unknown service.
UNSERVED = [
    Method("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", None, True, True),
    Method(f"/{SERVICE_NAME}/Nope", None),
    Method("/" + "x" * 1000 + "/\x7f", None),
]
# Bytes no message type parses: a cut varint, a length past the end, an 11-byte varint, wire type 7.
UNDECODABLE = [b"\xff", b"\x80", b"\x0a\x7f", b"\x08" + b"\xff" * 10 + b"\x01", b"\x0f", b"\x00"]
# Bytes some types refuse: invalid UTF-8 in field 1, groups nested past the recursion limit.
NASTY = [*UNDECODABLE, b"\x0a\x02\xc3\x28", b"\x0b" * 200 + b"\x0c" * 200, b"\x12\x01"]


class Live:
    """The server subprocess, a channel to it, and the tally of what the hostile calls got."""

    def __init__(self, pid: int, address: str, users: list[str], items: list[str]) -> None:
        self.pid, self.address, self.users, self.items = pid, address, users, items
        # No client-side limits: the server's are the ones under test.
        options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
        self.channel = grpc.insecure_channel(address, options=options)
        self.stub = pb_grpc.RecommenderServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.reflection = reflection_pb2_grpc.ServerReflectionStub(self.channel)
        self.tally: Counter[tuple[str, str]] = Counter()
        self.topk = pb.TopKRequest(user_id=users[0], k=20, include_metadata=True)
        self.answer = self.stub.TopK(self.topk)
        self.rss_before = self.fds_before = 0  # once warm

    def outcome(
        self, kind: str, call: Callable[..., Any], *args: Any
    ) -> tuple[grpc.StatusCode, Any]:
        """``call(*args)``: its status (checked deliberate), and its response or error."""
        try:
            result = call(*args)
        except grpc.RpcError as error:
            code = error.code()
            self.tally[kind, code.name] += 1
            assert code not in FORBIDDEN, f"{kind}: {code.name}: {error.details()!r:.500}"
            assert len(error.details() or "") < 4_000, f"{kind}: {len(error.details())} chars"
            rpc_status.from_call(error)  # the detail, if any, decodes and agrees with the status
            return code, error
        self.tally[kind, "OK"] += 1
        return OK, result

    def code(self, kind: str, call: Callable[..., Any], *args: Any) -> grpc.StatusCode:
        return self.outcome(kind, call, *args)[0]

    def settled(self, kind: str, future: Any) -> grpc.StatusCode:
        """How a call made as a future ended (a cancelled one has no result to raise)."""
        code: grpc.StatusCode = future.code()
        self.tally[kind, code.name] += 1
        assert code not in FORBIDDEN, f"{kind}: {code.name}: {future.details()!r:.500}"
        return code

    def rpc(
        self, kind: str, rpc: str, request: Any, timeout: float = TIMEOUT
    ) -> tuple[grpc.StatusCode, Any]:
        """The RecommenderService call ``rpc`` with ``request``."""
        return self.outcome(
            kind, functools.partial(getattr(self.stub, rpc), timeout=timeout), request
        )

    def raw(self, method: Method, raw: bytes) -> tuple[grpc.StatusCode, Any]:
        """``raw`` as the request of ``method``, through a call of its own shape."""
        path, kind = method.path, f"bytes {method.path.rsplit('/', 1)[-1][:20]}"
        if method.streams_requests:
            responses = self.channel.stream_stream(path)(iter([raw]), timeout=TIMEOUT)
            return self.outcome(kind, list, responses)
        if method.streams_responses:  # health Watch: the first answer, then hang up
            stream = self.channel.unary_stream(path)(raw, timeout=TIMEOUT)
            try:
                return self.outcome(kind, next, stream)
            finally:
                stream.cancel()
        return self.outcome(kind, self.channel.unary_unary(path), raw, TIMEOUT)

    def check_serving(self) -> None:
        for service in ("", SERVICE_NAME):
            response = self.health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT
            )
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        assert self.stub.TopK(self.topk, timeout=TIMEOUT) == self.answer


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture(scope="module")
def live(model_dir: Path, synthetic_model: Any) -> Iterator[Live]:
    with serve_subprocess(
        model_dir, "--max-message-mb", str(MESSAGE_MB), "--max-concurrent-rpcs", str(MAX_RPCS)
    ) as process:
        target = Live(
            process.proc.pid, process.address, synthetic_model.user_ids, synthetic_model.item_ids
        )
        warm_up(target)
        target.rss_before, target.fds_before = rss_kib(target.pid), open_fds(target.pid)
        yield target
        target.channel.close()


def warm_up(live: Live) -> None:
    """Normal calls of every kind, a full batch among them, until memory settles."""
    users, items = live.users, live.items
    full = pb.BatchPredictRequest(
        user_ids=[users[i % len(users)] for i in range(MAX_PAIRS)],
        item_ids=[items[i % len(items)] for i in range(MAX_PAIRS)],
    )
    for round_ in range(3):
        for user, item in zip(users, items, strict=False):
            live.stub.Predict(pb.PredictRequest(user_id=user, item_id=item))
            live.stub.TopK(pb.TopKRequest(user_id=user, k=MAX_K, exclude_item_ids=items[:9]))
            live.stub.SimilarItems(pb.SimilarItemsRequest(item_id=item, candidate_item_ids=items))
        live.stub.BatchPredict(full)
        live.stub.GetModelInfo(pb.GetModelInfoRequest())
        with pytest.raises(grpc.RpcError):  # the error paths too
            live.stub.TopK(pb.TopKRequest(user_id=f"stranger{round_}"))
        live.check_serving()


def example(method: Method, live_users: list[str], live_items: list[str]) -> bytes:
    """A valid request for ``method``, for the fuzzer to mutate."""
    user, item = live_users[1], live_items[1]
    valid = {
        "PredictRequest": pb.PredictRequest(user_id=user, item_id=item),
        "BatchPredictRequest": pb.BatchPredictRequest(user_ids=[user] * 3, item_ids=[item] * 3),
        "TopKRequest": pb.TopKRequest(user_id=user, k=5, candidate_item_ids=[item]),
        "SimilarItemsRequest": pb.SimilarItemsRequest(item_id=item, k=5),
        "ReloadModelRequest": pb.ReloadModelRequest(version=1),
        "HealthCheckRequest": health_pb2.HealthCheckRequest(service=SERVICE_NAME),
        "ServerReflectionRequest": reflection_pb2.ServerReflectionRequest(list_services=""),
    }
    request = valid.get(method.request.DESCRIPTOR.name) if method.request else None
    return b"" if request is None else request.SerializeToString()


def mutated(valid: bytes) -> st.SearchStrategy[bytes]:
    at = st.integers(0, len(valid))
    return st.builds(
        lambda i, junk, cut: valid[:i] + junk + valid[i + cut :],
        at,
        st.binary(max_size=12),
        st.integers(0, 4),
    )


# ------------------------------------------------------------------------------- bytes
def parses(method: Method, raw: bytes) -> bool:
    try:
        method.request.FromString(raw)
    except DecodeError:
        return False
    return True


def check_bytes_outcome(method: Method, raw: bytes, code: grpc.StatusCode, answer: Any) -> None:
    if method.request is None:
        assert code == UNIMPLEMENTED
    elif not parses(method, raw):
        assert code == INVALID, (method.path, raw[:20])
        assert f"not a valid {method.request.DESCRIPTOR.full_name}" in answer.details()
    elif code == INVALID:  # about a field, then: bytes that parse are never called malformed
        assert "not a valid" not in answer.details()


@pytest.mark.parametrize("method", METHODS + UNSERVED, ids=lambda m: m.path[-40:])
def test_undecodable_bytes_on_every_method_are_invalid_argument(live: Live, method: Method) -> None:
    for raw in NASTY:
        check_bytes_outcome(method, raw, *live.raw(method, raw))
    live.check_serving()


@FUZZ
@given(data=st.data())
def test_any_bytes_to_any_method(live: Live, data: st.DataObject) -> None:
    method = data.draw(st.sampled_from(METHODS + UNSERVED))
    valid = example(method, live.users, live.items)
    raw = data.draw(st.one_of(st.binary(max_size=300), st.sampled_from(NASTY), mutated(valid)))
    check_bytes_outcome(method, raw, *live.raw(method, raw))


# ------------------------------------------------------------------------------- ids
def hostile_ids(known: list[str]) -> st.SearchStrategy[str]:
    odd = st.characters(categories=("Cc", "Cf", "Co", "Cn", "Zl", "Zp", "Zs", "So", "Mn"))
    with_tail = st.builds(
        operator.add, st.sampled_from(known), st.text(odd, min_size=1, max_size=3)
    )
    return st.one_of(
        st.sampled_from(known),
        st.just(""),
        st.text(max_size=40),
        st.text(odd, max_size=40),
        with_tail,
    )


def expected_code(rpc: str, request: Any, users: set[str], items: set[str]) -> grpc.StatusCode:
    """What the proto comments say ``request`` gets: the oracle of the id tests."""
    cold = getattr(request, "allow_cold_start", False)
    if rpc == "BatchPredict":
        if len(request.user_ids) != len(request.item_ids) or not request.user_ids:
            return INVALID
        if "" in request.user_ids or "" in request.item_ids:
            return INVALID
        unknown = set(request.user_ids) - users or set(request.item_ids) - items
        return NOT_FOUND if unknown and not cold else OK
    if rpc == "Predict":
        if not request.user_id or not request.item_id:
            return INVALID
        unknown = request.user_id not in users or request.item_id not in items
        return NOT_FOUND if unknown and not cold else OK
    query, known = (request.user_id, users) if rpc == "TopK" else (request.item_id, items)
    if not query or "" in request.exclude_item_ids or "" in request.candidate_item_ids:
        return INVALID
    if not 0 <= request.k <= MAX_K:
        return INVALID
    unknown = query not in known or set(request.candidate_item_ids) - items
    return NOT_FOUND if unknown and (rpc == "SimilarItems" or not cold) else OK


def request_ids(request: Any) -> set[str]:
    ids: set[str] = set()
    for field, value in request.ListFields():
        if field.type == field.TYPE_STRING:
            ids.update([value] if isinstance(value, str) else value)
    return ids


def resource_names(error: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(error)
    names = []
    for detail in status.details if status else ():
        info = error_details_pb2.ResourceInfo()
        if detail.Unpack(info):
            names.append(info.resource_name)
    return names


def check_ids(live: Live, kind: str, rpc: str, request: Any) -> tuple[grpc.StatusCode, Any]:
    """``request``'s status is the oracle's; unknown ids named are ids it sent."""
    code, answer = live.rpc(kind, rpc, request)
    assert code == expected_code(rpc, request, set(live.users), set(live.items)), (rpc, answer)
    sent = request_ids(request)
    if code == NOT_FOUND:
        assert set(resource_names(answer)) <= sent
    elif code == OK:
        missing = {
            *getattr(answer, "missing_user_ids", ()),
            *getattr(answer, "missing_item_ids", ()),
        }
        assert missing <= sent
    return code, answer


@FUZZ
@given(data=st.data())
def test_hostile_ids(live: Live, data: st.DataObject) -> None:
    users, items = hostile_ids(live.users), hostile_ids(live.items)
    draw, some_items, cold = data.draw, st.lists(items, max_size=8), st.booleans()
    rpc = draw(st.sampled_from(["Predict", "BatchPredict", "TopK", "SimilarItems"]))
    request: Any
    if rpc == "Predict":
        request = pb.PredictRequest(
            user_id=draw(users), item_id=draw(items), allow_cold_start=draw(cold)
        )
    elif rpc == "BatchPredict":
        n, extra = draw(st.integers(0, 8)), draw(st.sampled_from([0, 0, 0, 1]))  # 1: mismatched
        request = pb.BatchPredictRequest(
            user_ids=draw(st.lists(users, min_size=n + extra, max_size=n + extra)),
            item_ids=draw(st.lists(items, min_size=n, max_size=n)),
            allow_cold_start=draw(cold),
        )
    else:
        request = getattr(pb, f"{rpc}Request")(
            k=draw(st.integers(-3, MAX_K + 3)),
            exclude_item_ids=draw(some_items),
            candidate_item_ids=draw(some_items),
        )
        if rpc == "TopK":
            request.user_id, request.allow_cold_start = draw(users), draw(cold)
        else:
            request.item_id = draw(items)
    code, answer = check_ids(live, f"ids {rpc}", rpc, request)
    if code == NOT_FOUND:
        # Control characters, emoji, line separators: the message shows an id as the server
        # quoted it, through gRPC's percent-encoding and back.
        named = resource_names(answer)
        assert named and any(show(i) in answer.details() for i in named)


LONG_IDS = {
    "ascii": "x" * MiB,
    "control": "\x00\r\n\x1b" * (MiB // 4),
    "emoji": "\U0001f600" * (MiB // 4),
    "known-prefix": "u1" + "\u2028" * (MiB // 3),
    "percent": "%" * MiB,
}


@pytest.mark.parametrize("long_id", LONG_IDS.values(), ids=LONG_IDS.keys())
def test_one_megabyte_ids(live: Live, long_id: str) -> None:
    user, item, cold = live.users[0], live.items[0], {"allow_cold_start": True}
    for rpc, request in [
        ("Predict", pb.PredictRequest(user_id=long_id, item_id=item)),
        ("Predict", pb.PredictRequest(user_id=user, item_id=long_id)),
        ("Predict", pb.PredictRequest(user_id=long_id, item_id=long_id, **cold)),
        ("BatchPredict", batch([long_id, user], [item, long_id])),
        ("BatchPredict", batch([long_id], [item], **cold)),
        ("TopK", pb.TopKRequest(user_id=long_id)),
        ("TopK", pb.TopKRequest(user_id=long_id, **cold)),
        ("TopK", pb.TopKRequest(user_id=user, candidate_item_ids=[long_id, item])),
        ("TopK", pb.TopKRequest(user_id=user, exclude_item_ids=[long_id])),
        ("SimilarItems", pb.SimilarItemsRequest(item_id=long_id)),
        ("SimilarItems", pb.SimilarItemsRequest(item_id=item, candidate_item_ids=[long_id])),
        ("SimilarItems", pb.SimilarItemsRequest(item_id=item, exclude_item_ids=[long_id])),
    ]:
        code, answer = check_ids(live, f"1 MB ids {rpc}", rpc, request)
        if code == NOT_FOUND:
            assert f"({len(long_id)} chars)" in answer.details() and len(answer.details()) < 1_000
            assert long_id not in resource_names(answer)  # too long to name whole: counted
        elif getattr(request, "allow_cold_start", False):
            assert long_id in (*answer.missing_user_ids, *answer.missing_item_ids)
    live.check_serving()


@pytest.mark.parametrize("char", ["a", "%", "\x00", "\U0001f600", "\u2028"])
def test_the_most_named_ids_fit_in_the_trailer(live: Live, char: str) -> None:
    # Five ids a field, as long as a detail names, of the characters the trailer spells longest:
    # still NOT_FOUND naming ids, not a call cut off by the client's 8 KiB metadata limit.
    ids = [char * 250 + f"{n:06d}" for n in range(7)]
    for rpc, request in (
        ("BatchPredict", batch(ids, ids)),
        ("TopK", pb.TopKRequest(user_id=ids[0], candidate_item_ids=ids)),
        ("Predict", pb.PredictRequest(user_id=ids[0], item_id=ids[1])),
    ):
        code, error = check_ids(live, f"long ids {rpc}", rpc, request)
        assert code == NOT_FOUND and resource_names(error)


# ------------------------------------------------------------------------------- limits
INT32 = (-(2**31), 2**31 - 1)


@pytest.mark.parametrize("k", [INT32[0], -1, 0, 1, MAX_K, MAX_K + 1, INT32[1]])
def test_k_at_the_limits(live: Live, k: int) -> None:
    user, item = live.users[0], live.items[0]
    for rpc, request in (
        ("TopK", pb.TopKRequest(user_id=user, k=k)),
        ("TopK", pb.TopKRequest(user_id="stranger", k=k, allow_cold_start=True)),
        ("SimilarItems", pb.SimilarItemsRequest(item_id=item, k=k)),
    ):
        code, answer = check_ids(live, f"k {rpc}", rpc, request)
        if code == OK:  # as many as asked, or every item the user may get
            assert len(answer.items) == (k or 10) or 300 < len(answer.items) < (k or 10)


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


@pytest.mark.parametrize("k", [2**31, 2**32 - 1, 2**32 + 5, 2**63 - 1, 2**64 - 1])
def test_k_past_int32_on_the_wire(live: Live, k: int) -> None:
    # A varint too wide for int32: protobuf keeps its low 32 bits, and the server judges those.
    raw = pb.TopKRequest(user_id=live.users[0]).SerializeToString() + b"\x10" + varint(k)
    method = next(m for m in METHODS if m.path.endswith("/TopK"))
    parsed = pb.TopKRequest.FromString(raw).k
    assert live.raw(method, raw)[0] == (OK if 0 <= parsed <= MAX_K else INVALID), parsed


def batch(users: list[str], items: list[str], **fields: Any) -> pb.BatchPredictRequest:
    return pb.BatchPredictRequest(user_ids=users, item_ids=items, **fields)


def test_batches_at_and_over_the_limits(live: Live) -> None:
    user, item, n, cold = live.users[0], live.items[0], MAX_PAIRS, {"allow_cold_start": True}
    distinct = [f"stranger-{i:07d}" for i in range(n)]
    rating = live.stub.Predict(pb.PredictRequest(user_id=user, item_id=item)).rating
    cases: dict[str, tuple[Callable[[], Any], set[grpc.StatusCode]]] = {
        "at max pairs": (lambda: batch([user] * n, [item] * n), {OK}),
        "over max pairs": (lambda: batch([user] * (n + 1), [item] * (n + 1)), {INVALID}),
        "empty": (lambda: batch([], []), {INVALID}),
        "empty, cold start": (lambda: batch([], [], **cold), {INVALID}),
        "one user, no item": (lambda: batch([user], []), {INVALID}),
        "no user, one item": (lambda: batch([], [item]), {INVALID}),
        "n against n+1": (lambda: batch([user] * n, [item] * (n + 1)), {INVALID}),
        "max against 1": (lambda: batch([user] * n, [item]), {INVALID}),
        "empty ids": (lambda: batch([""] * n, [""] * n), {INVALID}),
        "an unknown id, repeated": (lambda: batch(["ghost"] * n, [item] * n), {NOT_FOUND}),
        "distinct unknown": (lambda: batch(distinct, [item] * n), {NOT_FOUND}),
        "distinct unknown, both": (lambda: batch(distinct, distinct), {NOT_FOUND}),
        "repeated, cold start": (lambda: batch(["ghost"] * n, [item] * n, **cold), {OK}),
        # Its answer lists 200,000 unknown ids: past the message limit, so refused, never cut.
        "distinct, cold start": (lambda: batch(distinct, distinct, **cold), {OK, EXHAUSTED}),
    }
    for name, (build, expected) in cases.items():
        code, answer = live.rpc("batch limits", "BatchPredict", build(), timeout=30)
        assert code in expected, (name, code)
        if name == "at max pairs":
            assert len(answer.ratings) == n and set(answer.ratings) == {answer.ratings[0]}
            assert answer.ratings[0] == pytest.approx(rating)
        elif name == "an unknown id, repeated":
            assert resource_names(answer) == ["ghost"] and "unknown user_ids" in answer.details()
        elif name.startswith("distinct unknown"):
            assert f"{n} unknown user_ids" in answer.details()
            assert 0 < len(resource_names(answer)) <= 10
        elif name == "repeated, cold start":
            assert list(answer.missing_user_ids) == ["ghost"]
    live.check_serving()


def sized(size: int) -> pb.PredictRequest:
    """A request exactly ``size`` bytes long (a long unknown user id)."""
    request = pb.PredictRequest(user_id="u" * size, item_id="i0")
    request.user_id = request.user_id[: size - (request.ByteSize() - size)]
    while request.ByteSize() > size:  # the length prefix shrank by less than the id
        request.user_id = request.user_id[:-1]
    assert request.ByteSize() == size
    return request


def test_messages_at_and_over_the_size_limit(live: Live) -> None:
    limit = MESSAGE_MB * MiB
    for size, expected in ((limit, NOT_FOUND), (limit + 1, EXHAUSTED), (3 * limit, EXHAUSTED)):
        assert live.rpc("message size", "Predict", sized(size), timeout=30)[0] == expected, size
    # An answer over the limit (it echoes unknown ids, twice in TopK) is refused, never cut.
    candidates = [f"c{i:011d}" for i in range(250_000)]
    request = pb.TopKRequest(
        user_id="stranger", candidate_item_ids=candidates, allow_cold_start=True
    )
    assert live.rpc("message size", "TopK", request, timeout=30)[0] == EXHAUSTED
    live.check_serving()


# ------------------------------------------------------------------------------- calls cut short
def test_calls_cancelled_mid_batch(live: Live) -> None:
    # Concurrent calls of a kind share a batch: cancelling some, at any point of their life,
    # must neither fail the others nor change their answers.
    users, items, pairs = live.users, live.items, 20_000
    request = batch(
        [users[i % len(users)] for i in range(pairs)], [items[i % 7] for i in range(pairs)]
    )
    ratings = live.stub.BatchPredict(request).ratings
    ranked = [pb.TopKRequest(user_id=u, k=50) for u in users[:8]]
    answers = [live.stub.TopK(r) for r in ranked]
    for delay in (0.0, 0.0005, 0.002, 0.01, 0.03):
        batches = [live.stub.BatchPredict.future(request, timeout=30) for _ in range(12)]
        tops = [live.stub.TopK.future(ranked[i % 8], timeout=30) for i in range(24)]
        time.sleep(delay)
        for future in batches[::2] + tops[::2]:
            future.cancel()
            assert live.settled("cancelled", future) in {CANCELLED, OK}
        assert all(f.result().ratings == ratings for f in batches[1::2])
        assert all(f.result() == answers[i % 8] for i, f in enumerate(tops) if i % 2)
    for timeout in (0.0001, 0.001, 0.005, 0.02):  # the deadline passes mid-batch
        for future in [live.stub.BatchPredict.future(request, timeout=timeout) for _ in range(6)]:
            assert live.settled("deadline", future) in {DEADLINE, OK}
    live.check_serving()


def test_a_burst_over_the_concurrency_limit(live: Live) -> None:
    # Service calls over --max-concurrent-rpcs are shed with RESOURCE_EXHAUSTED naming the flag;
    # none is CANCELLED by gRPC's queue of pending calls, and health answers throughout.
    request = pb.TopKRequest(user_id=live.users[0], k=MAX_K)
    calls = [live.stub.TopK.future(request, timeout=60) for _ in range(3_000)]
    assert live.code("burst health", live.health.Check, health_pb2.HealthCheckRequest()) == OK
    codes = Counter(live.settled("burst", call) for call in calls)
    assert set(codes) <= {OK, EXHAUSTED}, codes
    shed = [call for call in calls if call.code() == EXHAUSTED]
    assert all("--max-concurrent-rpcs" in call.details() for call in shed)
    live.check_serving()


def test_more_open_calls_than_grpc_admits(live: Live) -> None:
    # Health watches hold a call each until cancelled: past gRPC's own bound, RESOURCE_EXHAUSTED;
    # once they are gone, the server answers again.
    watches = [
        live.health.Watch(health_pb2.HealthCheckRequest(), timeout=60)
        for _ in range(GRPC_LIMIT + 40)
    ]
    codes = Counter(live.code("over the limit", next, watch) for watch in watches)
    assert codes[EXHAUSTED] >= 40 and set(codes) <= {OK, EXHAUSTED}, codes
    for watch in watches:
        watch.cancel()
    assert wait_for(lambda: live.rpc("after the limit", "TopK", live.topk)[0] == OK)
    live.check_serving()


def test_unary_calls_with_no_request_or_two(live: Live) -> None:
    # A unary call half-closed with no request never reaches a handler (grpc.aio waits for the
    # message): it ends at the client's deadline and must give its slot back, so more of them
    # than the limit leave the server answering.
    unary = [m for m in METHODS if not m.streams_requests and not m.streams_responses]
    calls = [
        live.channel.stream_unary(unary[i % len(unary)].path).future(iter(()), timeout=1.0)
        for i in range(GRPC_LIMIT + 44)
    ]
    codes = Counter(live.settled("no request", call) for call in calls)
    assert codes[DEADLINE] >= GRPC_LIMIT - 10 and set(codes) <= {DEADLINE, EXHAUSTED}, codes
    for method in unary:  # a unary call sent two requests
        raw = example(method, live.users, live.items)
        live.code("two requests", live.channel.stream_unary(method.path), iter([raw, raw]), TIMEOUT)
    live.check_serving()


# ------------------------------------------------------------------------------- connections
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # an empty SETTINGS frame
HEADERS = b"\x00\x00\x40\x01\x04\x00\x00\x00\x01\x82\x86"  # a HEADERS frame, cut short
HALF_SENT = [
    b"",
    PREFACE[:1],
    PREFACE[:10],
    PREFACE[:-1],
    PREFACE,
    PREFACE + SETTINGS[:4],
    PREFACE + SETTINGS,
    PREFACE + SETTINGS + HEADERS,
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    bytes(range(256)),
]


def test_thousands_of_connections_opened_and_dropped(live: Live) -> None:
    host, port = live.address.rsplit(":", 1)
    for round_ in range(20):  # 2,000 connections, 100 open at a time
        socks = [socket.create_connection((host, int(port)), timeout=TIMEOUT) for _ in range(100)]
        for i, sock in enumerate(socks):
            sock.sendall(HALF_SENT[(round_ + i) % len(HALF_SENT)])
        # While they hang half-open, calls are answered.
        assert live.stub.TopK(live.topk, timeout=TIMEOUT) == live.answer
        for i, sock in enumerate(socks):
            if i % 2:  # an RST instead of a FIN
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        live.tally["raw connection", "dropped"] += len(socks)
    for _ in range(300):  # a channel, one call, closed
        with grpc.insecure_channel(live.address) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            live.code("channel per call", check, health_pb2.HealthCheckRequest(), TIMEOUT)
    # Every connection's descriptor is given back (a few may linger a moment).
    assert wait_for(lambda: open_fds(live.pid) <= live.fds_before + 8, timeout=15)
    live.check_serving()


# ------------------------------------------------------------------------------- standard services
def reflection_requests() -> st.SearchStrategy[Any]:
    request, names = (
        reflection_pb2.ServerReflectionRequest,
        st.one_of(
            st.text(max_size=60), st.sampled_from([SERVICE_NAME, "mfserve/v1/recommender.proto"])
        ),
    )
    extension = st.builds(
        reflection_pb2.ExtensionRequest, containing_type=names, extension_number=st.integers(*INT32)
    )
    return st.one_of(
        st.builds(request, host=st.text(max_size=10), file_by_filename=names),
        st.builds(request, file_containing_symbol=names),
        st.builds(request, file_containing_extension=extension),
        st.builds(request, all_extension_numbers_of_type=names),
        st.builds(request, list_services=names),
        st.just(request()),
    )


@settings(FUZZ, max_examples=100)
@given(requests=st.lists(reflection_requests(), min_size=1, max_size=20))
def test_reflection_answers_every_request(live: Live, requests: list[Any]) -> None:
    stream = live.reflection.ServerReflectionInfo(iter(requests), timeout=TIMEOUT)
    code, responses = live.outcome("reflection", list, stream)
    assert code == OK and len(responses) == len(requests)


@settings(FUZZ, max_examples=100)
@given(service=st.one_of(st.text(max_size=60), st.sampled_from(["", SERVICE_NAME])))
def test_health_with_any_service_name(live: Live, service: str) -> None:
    request, known = health_pb2.HealthCheckRequest(service=service), service in ("", SERVICE_NAME)
    code = live.code("health Check", live.health.Check, request, TIMEOUT)
    assert code == (OK if known else NOT_FOUND)
    watch = live.health.Watch(request, timeout=TIMEOUT)
    code, first = live.outcome("health Watch", next, watch)
    watch.cancel()
    assert code == OK and (first.status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN) != known


def test_health_and_reflection_with_one_megabyte_names(live: Live) -> None:
    name = "\x00\U0001f600" * (MiB // 5)
    request = health_pb2.HealthCheckRequest(service=name)
    assert live.code("1 MB health", live.health.Check, request, TIMEOUT) == NOT_FOUND
    watch = live.health.Watch(request, timeout=TIMEOUT)
    assert live.code("1 MB health", next, watch) == OK
    watch.cancel()
    lookups = [reflection_pb2.ServerReflectionRequest(file_containing_symbol=name)] * 3
    stream = live.reflection.ServerReflectionInfo(iter(lookups), timeout=TIMEOUT)
    assert live.code("1 MB reflection", list, stream) == OK  # each answer echoes its request
    live.check_serving()


def test_refused_large_requests_are_not_kept(live: Live) -> None:
    # An aborted call's exception used to keep the frames it passed through, and the request
    # they held, until the next full garbage collection: 4 MB a refused call.
    big, item = "x" * (MESSAGE_MB * MiB - 64), live.items[0]
    reflection = next(m for m in METHODS if m.streams_requests)
    lookup = reflection_pb2.ServerReflectionRequest(file_by_filename=big).SerializeToString()
    before = rss_kib(live.pid)
    for _ in range(30):
        live.rpc("refused 4 MB", "Predict", pb.PredictRequest(user_id=big, item_id=item))
        live.rpc("refused 4 MB", "BatchPredict", batch([big], [item]))
        live.code("refused 4 MB", live.health.Check, health_pb2.HealthCheckRequest(service=big))
        stream = live.channel.stream_stream(reflection.path)(
            iter([lookup, b"\xff"]), timeout=TIMEOUT
        )
        assert live.code("refused 4 MB", list, stream) == INVALID
    assert rss_kib(live.pid) - before < 64 * 1024, (before, rss_kib(live.pid))  # not 480 MB
    live.check_serving()


# ------------------------------------------------------------------------------- afterwards
def test_the_server_survived_all_of_it(live: Live) -> None:
    live.check_serving()
    rss_after = rss_kib(live.pid)
    table = "\n".join(
        f"  {kind:<28} {code:<20} {n}" for (kind, code), n in sorted(live.tally.items())
    )
    print(f"\nhostile calls ({sum(live.tally.values())}):\n{table}")
    print(
        f"RSS warm {live.rss_before} KiB, after {rss_after} KiB ({rss_after / live.rss_before:.3f}x)"
    )
    report = os.environ.get("MFSERVE_RELIABILITY_REPORT")  # scripts/soak.sh's figures
    if report:
        codes: Counter[str] = Counter()
        for (_, code), n in live.tally.items():
            codes[code] += n
        calls = sum(n for (_, code), n in live.tally.items() if code != "dropped")
        row = {"test": "hostile input", "calls": calls, "codes": codes}
        row["unknown_or_internal"] = codes["UNKNOWN"] + codes["INTERNAL"]
        row.update(rss_before_kib=live.rss_before, rss_after_kib=rss_after)
        with Path(report).open("a") as out:
            out.write(json.dumps(row) + "\n")
    assert not [key for key in live.tally if key[1] in {code.name for code in FORBIDDEN}]
    assert rss_after <= 1.2 * live.rss_before, (live.rss_before, rss_after)
