"""Every error class raised for its real status, by a real server.

NOT_FOUND, INVALID_ARGUMENT, UNAVAILABLE, DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED come from the
mfserve server. UNAUTHENTICATED / PERMISSION_DENIED (and the fallback class) come from a small real
gRPC server defined here, which can answer any code; the mfserve server's own token refusals are
tested through the SDK in test_client_tls.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from server_harness import running_server

from mfserve.client import (
    DeadlineExceededError,
    InvalidArgumentError,
    MfserveError,
    NotFoundError,
    PermissionDeniedError,
    RecommenderClient,
    ResourceExhaustedError,
    RpcError,
    UnauthenticatedError,
    UnavailableError,
)
from mfserve.v1 import recommender_pb2 as pb
from mfserve.v1 import recommender_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def client(server_address: str) -> Iterator[RecommenderClient]:
    with RecommenderClient(server_address) as client:
        yield client


def raised(call: Callable[[], Any], cls: type[RpcError]) -> Any:
    """The typed error ``call`` raises, checked to be chained from the gRPC error."""
    with pytest.raises(cls) as info:
        call()
    assert isinstance(info.value.__cause__, grpc.RpcError)
    assert isinstance(info.value, MfserveError)
    return info.value


def test_not_found_names_the_unknown_ids(client: RecommenderClient) -> None:
    error = raised(lambda: client.predict("nobody", "i1"), NotFoundError)
    assert error.code is grpc.StatusCode.NOT_FOUND
    assert error.ids == ("nobody",)
    assert "nobody" in str(error) and str(error).startswith("NOT_FOUND: ")
    error = raised(
        lambda: client.batch_predict(["u1", "ghost", "u2"], ["i1", "i2", "spook"]), NotFoundError
    )
    assert set(error.ids) == {"ghost", "spook"}
    assert sorted(error.unknown) == ["item_ids", "user_ids"]
    error = raised(lambda: client.similar_items("nothing"), NotFoundError)
    assert error.ids == ("nothing",)


@pytest.mark.parametrize(
    ("call", "unknown"),
    [
        (lambda c: c.predict("x1", "y1"), {"user_id": ("x1",), "item_id": ("y1",)}),
        (lambda c: c.top_k("ghost"), {"user_id": ("ghost",)}),
        (lambda c: c.top_k("u1", candidate_item_ids=["i1", "ph"]), {"candidate_item_ids": ("ph",)}),
        (
            lambda c: c.similar_items("i1", candidate_item_ids=["nah"]),
            {"candidate_item_ids": ("nah",)},
        ),
        # "i5" is an item, not a user: the detail says which field (and id space) was unknown.
        (lambda c: c.top_k("i5", candidate_item_ids=["i5"]), {"user_id": ("i5",)}),
    ],
)
def test_not_found_reads_the_unknown_ids_per_field(
    client: RecommenderClient, call: Callable[[RecommenderClient], Any], unknown: dict[str, Any]
) -> None:
    error = raised(lambda: call(client), NotFoundError)
    assert dict(error.unknown) == unknown
    assert {v.field for v in error.field_violations} == set(unknown)


def test_not_found_ids_come_whole_from_the_detail_not_the_message(
    client: RecommenderClient,
) -> None:
    # Quotes, commas, "and N more" and non-ASCII in an id: the message quotes it for people, the
    # ResourceInfo detail carries it as it was sent.
    odd = 'it\'s "x", and 3 more; été'
    long = "L" * 200  # over the message's 80-character cut, under the detail's 256
    error = raised(
        lambda: client.batch_predict([odd, long, "u1"], ["i1", "i2", "i3"]), NotFoundError
    )
    assert error.unknown == {"user_ids": (odd, long)}
    assert long not in error.details and "(200 chars)" in error.details
    # Too long to send whole: the message and violation name the field, no id is claimed.
    error = raised(lambda: client.predict("z" * 10_000, "i1"), NotFoundError)
    assert error.ids == () and [v.field for v in error.field_violations] == ["user_id"]


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda c: c.top_k("u1", k=-1), "k"),
        (lambda c: c.top_k("u1", k=1_000_000), "k"),
        (lambda c: c.similar_items("i1", k=-2), "k"),
        (lambda c: c.predict("", "i1"), "user_id"),
        (lambda c: c.top_k("u1", exclude_item_ids=["i1", ""]), "exclude_item_ids[1]"),
    ],
)
def test_invalid_argument_carries_field_violations(
    client: RecommenderClient, call: Callable[[RecommenderClient], Any], field: str
) -> None:
    error = raised(lambda: call(client), InvalidArgumentError)
    assert [v.field for v in error.field_violations] == [field]
    assert error.field_violations[0].description


def test_empty_batch_is_the_servers_invalid_argument(client: RecommenderClient) -> None:
    error = raised(lambda: client.batch_predict([], []), InvalidArgumentError)
    assert {v.field for v in error.field_violations} == {"user_ids", "item_ids"}


def test_a_batch_over_the_server_maximum_is_invalid_unless_split(model_dir: Path) -> None:
    users, items = [f"u{n % 60}" for n in range(25)], ["i1"] * 25
    with (
        running_server(model_dir, max_batch_pairs=10) as address,
        RecommenderClient(address) as client,  # believes the default maximum, 100,000
    ):
        raised(lambda: client.batch_predict(users, items), InvalidArgumentError)
        assert len(client.batch_predict(users, items, batch_size=10)) == 25


def test_unavailable_when_no_server_listens(model_dir: Path) -> None:
    with running_server(model_dir) as address:
        pass  # stopped: the port is free again
    with RecommenderClient(address, retries=2) as client:
        raised(client.model_info, UnavailableError)
        raised(client.health, UnavailableError)


def test_unavailable_while_no_model_is_loaded() -> None:
    with running_server(None) as address, RecommenderClient(address, retries=1) as client:
        error = raised(lambda: client.predict("u1", "i1"), UnavailableError)
        assert "no model" in error.details


def test_deadline_exceeded_on_a_big_batch_with_a_tiny_timeout(client: RecommenderClient) -> None:
    users, items = [f"u{n % 60}" for n in range(100_000)], ["i1"] * 100_000
    raised(lambda: client.batch_predict(users, items, timeout=0.001), DeadlineExceededError)


def test_resource_exhausted_when_a_message_is_over_the_size_limit(model_dir: Path) -> None:
    users, items = [f"u{n % 60}" for n in range(500)], ["i1"] * 500
    with (
        running_server(model_dir, max_receive_message_bytes=1024) as address,
        RecommenderClient(address) as client,
    ):
        raised(lambda: client.batch_predict(users, items), ResourceExhaustedError)
    # The client's own receive limit gives the same error class.
    with running_server(model_dir) as address:
        options = [("grpc.max_receive_message_length", 64)]
        with RecommenderClient(address, options=options) as client:
            raised(lambda: client.top_k("u1", k=50), ResourceExhaustedError)


# ----------------------------------------------------------------------------- auth server
TOKENS = {"reader": True, "nobody": False}  # token -> may call GetModelInfo


class _BearerAuth(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """No/unknown token: UNAUTHENTICATED; a known token without the right: PERMISSION_DENIED."""

    def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        headers = dict(details.invocation_metadata or ())
        auth = str(headers.get("authorization", ""))
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
        if token not in TOKENS:
            return _aborting(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown bearer token")
        if not TOKENS[token]:
            return _aborting(
                grpc.StatusCode.PERMISSION_DENIED, f"token may not call {details.method}"
            )
        return continuation(details)


def _aborting(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler[Any, Any]:
    def abort(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(abort)


class _InfoOnly(pb_grpc.RecommenderServiceServicer):  # type: ignore[misc]
    # The generated servicer's method names are CamelCase.
    def GetModelInfo(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return pb.GetModelInfoResponse(model_name="auth-test", item_count=3)

    def TopK(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        context.abort(grpc.StatusCode.INTERNAL, "boom")


@pytest.fixture(scope="module")
def auth_server() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=[_BearerAuth()])
    pb_grpc.add_RecommenderServiceServicer_to_server(_InfoOnly(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None).wait()


def test_unauthenticated_without_a_token(auth_server: str) -> None:
    with RecommenderClient(auth_server) as client:
        error = raised(client.model_info, UnauthenticatedError)
        assert error.details == "missing or unknown bearer token"


def test_permission_denied_for_a_token_without_the_right(auth_server: str) -> None:
    with RecommenderClient(auth_server, token="nobody") as client:
        raised(client.model_info, PermissionDeniedError)


def test_a_good_token_is_sent_as_bearer_metadata(auth_server: str) -> None:
    with RecommenderClient(auth_server, token="reader") as client:
        assert client.model_info().model_name == "auth-test"


def test_codes_without_a_class_fall_back_to_rpc_error(auth_server: str) -> None:
    with RecommenderClient(auth_server, token="reader") as client:
        error = raised(lambda: client.top_k("u1"), RpcError)
        assert type(error) is RpcError and error.code is grpc.StatusCode.INTERNAL
        unimplemented = raised(client.health, RpcError)  # no health service on this server
        assert unimplemented.code is grpc.StatusCode.UNIMPLEMENTED
