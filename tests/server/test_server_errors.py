"""Every error status in the proto comments: code, message (field and value), BadRequest detail,
and for unknown ids a ResourceInfo detail per id, all read off the wire with the official protos."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from server_harness import running_server, running_server_handle

from mfserve.v1 import recommender_pb2 as pb
from mfserve.v1 import recommender_pb2_grpc as pb_grpc

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND


@pytest.fixture(scope="module")
def stub(model_dir: Path) -> Iterator[pb_grpc.RecommenderServiceStub]:
    # A small max_batch_pairs and max_k so the limits are cheap to exceed.
    with (
        running_server(model_dir, max_batch_pairs=50, max_k=100) as address,
        grpc.insecure_channel(address) as channel,
    ):
        yield pb_grpc.RecommenderServiceStub(channel)


def call_error(method: Callable[[Any], Any], request: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        method(request)
    return caught.value


def details(error: grpc.RpcError) -> list[Any]:
    """The ``Any`` details of the error's google.rpc.Status trailer."""
    status = rpc_status.from_call(error)  # also checks code and message agree with the trailer
    assert status is not None, "no google.rpc.Status in the trailers"
    return list(status.details)


def violations(error: grpc.RpcError) -> dict[str, str]:
    """The google.rpc.BadRequest field violations of an error, as {field: description}."""
    found: dict[str, str] = {}
    for detail in details(error):
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            found.update({v.field: v.description for v in bad_request.field_violations})
    return found


def resources(error: grpc.RpcError) -> list[tuple[str, str, str]]:
    """The google.rpc.ResourceInfo details, as (resource_type, resource_name, description)."""
    found: list[tuple[str, str, str]] = []
    for detail in details(error):
        info = error_details_pb2.ResourceInfo()
        if detail.Unpack(info):
            found.append((info.resource_type, info.resource_name, info.description))
    return found


def test_every_detail_is_a_bad_request_or_a_resource_info(stub: Any) -> None:
    error = call_error(stub.Predict, pb.PredictRequest(user_id="x1", item_id="y1"))
    names = [d.TypeName() for d in details(error)]
    assert names == ["google.rpc.BadRequest"] + ["google.rpc.ResourceInfo"] * 2


def check(error: grpc.RpcError, code: grpc.StatusCode, field: str, *in_message: str) -> None:
    assert error.code() == code, error.details()
    message = error.details()
    for text in (field, *in_message):
        assert text in message, f"{text!r} not in {message!r}"
    assert field in violations(error), violations(error)


# (rpc, request, code, violated field, texts the message must contain)
CASES: list[tuple[str, Any, grpc.StatusCode, str, tuple[str, ...]]] = [
    ("Predict", pb.PredictRequest(user_id="", item_id="i1"), INVALID, "user_id", ('user_id=""',)),
    ("Predict", pb.PredictRequest(user_id="u1", item_id=""), INVALID, "item_id", ('item_id=""',)),
    ("Predict", pb.PredictRequest(user_id="who", item_id="i1"), NOT_FOUND, "user_id", ('"who"',)),
    ("Predict", pb.PredictRequest(user_id="u1", item_id="what"), NOT_FOUND, "item_id", ('"what"',)),
    (
        "BatchPredict",
        pb.BatchPredictRequest(user_ids=["u1", "u2"], item_ids=["i1"]),
        INVALID,
        "item_ids",
        ("user_ids has 2", "item_ids has 1"),
    ),
    ("BatchPredict", pb.BatchPredictRequest(), INVALID, "user_ids", ("empty",)),
    (
        "BatchPredict",
        pb.BatchPredictRequest(user_ids=["u1", "u2"], item_ids=["i1", ""]),
        INVALID,
        "item_ids[1]",
        ('item_ids[1]=""',),
    ),
    (
        "BatchPredict",
        pb.BatchPredictRequest(user_ids=["u1"] * 51, item_ids=["i1"] * 51),
        INVALID,
        "user_ids",
        ("51", "maximum of 50"),
    ),
    (
        "BatchPredict",
        pb.BatchPredictRequest(user_ids=["u1", "stranger"], item_ids=["i1", "i2"]),
        NOT_FOUND,
        "user_ids",
        ('"stranger"',),
    ),
    ("TopK", pb.TopKRequest(user_id=""), INVALID, "user_id", ('user_id=""',)),
    ("TopK", pb.TopKRequest(user_id="u1", k=-1), INVALID, "k", ("k=-1",)),
    ("TopK", pb.TopKRequest(user_id="u1", k=101), INVALID, "k", ("k=101", "maximum of 100")),
    (
        "TopK",
        pb.TopKRequest(user_id="u1", exclude_item_ids=["i1", ""]),
        INVALID,
        "exclude_item_ids[1]",
        ('exclude_item_ids[1]=""',),
    ),
    (
        "TopK",
        pb.TopKRequest(user_id="u1", candidate_item_ids=["", "i1"]),
        INVALID,
        "candidate_item_ids[0]",
        ('candidate_item_ids[0]=""',),
    ),
    ("TopK", pb.TopKRequest(user_id="ghost"), NOT_FOUND, "user_id", ('"ghost"',)),
    (
        "TopK",
        pb.TopKRequest(user_id="u1", candidate_item_ids=["i1", "phantom"]),
        NOT_FOUND,
        "candidate_item_ids",
        ('"phantom"',),
    ),
    ("SimilarItems", pb.SimilarItemsRequest(item_id=""), INVALID, "item_id", ('item_id=""',)),
    ("SimilarItems", pb.SimilarItemsRequest(item_id="i1", k=-5), INVALID, "k", ("k=-5",)),
    ("SimilarItems", pb.SimilarItemsRequest(item_id="i1", k=1000), INVALID, "k", ("k=1000",)),
    (
        "SimilarItems",
        pb.SimilarItemsRequest(item_id="i1", exclude_item_ids=[""]),
        INVALID,
        "exclude_item_ids[0]",
        (),
    ),
    ("SimilarItems", pb.SimilarItemsRequest(item_id="nope"), NOT_FOUND, "item_id", ('"nope"',)),
    (
        "SimilarItems",
        pb.SimilarItemsRequest(item_id="i1", candidate_item_ids=["i2", "nah"]),
        NOT_FOUND,
        "candidate_item_ids",
        ('"nah"',),
    ),
]


@pytest.mark.parametrize(
    ("rpc", "request_", "code", "field", "texts"),
    CASES,
    ids=[f"{c[0]}-{c[2].name}-{c[3]}-{i}" for i, c in enumerate(CASES)],
)
def test_error(
    stub: Any, rpc: str, request_: Any, code: grpc.StatusCode, field: str, texts: tuple[str, ...]
) -> None:
    error = call_error(getattr(stub, rpc), request_)
    check(error, code, field, *texts)
    if code == INVALID:
        assert resources(error) == []  # no resource is missing; the request is malformed


# (rpc, request, the ResourceInfo details: (resource_type, id, request field), in order)
UNKNOWN: list[tuple[str, Any, list[tuple[str, str, str]]]] = [
    ("Predict", pb.PredictRequest(user_id="who", item_id="i1"), [("user", "who", "user_id")]),
    (
        "Predict",
        pb.PredictRequest(user_id="x1", item_id="y1"),
        [("user", "x1", "user_id"), ("item", "y1", "item_id")],
    ),
    (
        "BatchPredict",
        pb.BatchPredictRequest(user_ids=["u1", "st", "st"], item_ids=["i1", "i2", "no"]),
        [("user", "st", "user_ids"), ("item", "no", "item_ids")],
    ),
    ("TopK", pb.TopKRequest(user_id="ghost"), [("user", "ghost", "user_id")]),
    (
        "TopK",
        pb.TopKRequest(user_id="u1", candidate_item_ids=["i1", "phantom", "i2", "boo"]),
        [("item", "phantom", "candidate_item_ids"), ("item", "boo", "candidate_item_ids")],
    ),
    # An item id as the user and a user id as a candidate: the resource types tell them apart.
    (
        "TopK",
        pb.TopKRequest(user_id="i5", candidate_item_ids=["u3"]),
        [("user", "i5", "user_id"), ("item", "u3", "candidate_item_ids")],
    ),
    ("SimilarItems", pb.SimilarItemsRequest(item_id="nope"), [("item", "nope", "item_id")]),
    (
        "SimilarItems",
        pb.SimilarItemsRequest(item_id="i1", candidate_item_ids=["i2", "nah"]),
        [("item", "nah", "candidate_item_ids")],
    ),
]


@pytest.mark.parametrize(
    ("rpc", "request_", "expected"), UNKNOWN, ids=[f"{c[0]}-{i}" for i, c in enumerate(UNKNOWN)]
)
def test_not_found_sends_a_resource_info_per_unknown_id(
    stub: Any, rpc: str, request_: Any, expected: list[tuple[str, str, str]]
) -> None:
    error = call_error(getattr(stub, rpc), request_)
    assert error.code() == NOT_FOUND
    assert resources(error) == expected
    assert set(violations(error)) == {field for _, _, field in expected}


def test_cold_start_does_not_cover_similar_items_candidates(stub: Any) -> None:
    # SimilarItems has no allow_cold_start: unknown candidates are always NOT_FOUND, while unknown
    # ids in the deny-list are ignored.
    response = stub.SimilarItems(pb.SimilarItemsRequest(item_id="i1", exclude_item_ids=["nobody"]))
    assert len(response.items) == 10


def test_batch_not_found_names_the_first_few_and_counts(stub: Any) -> None:
    users = [f"ghost{i}" for i in range(8)] + ["u1", "ghost0"]
    error = call_error(
        stub.BatchPredict, pb.BatchPredictRequest(user_ids=users, item_ids=["i1"] * 10)
    )
    check(error, NOT_FOUND, "user_ids", "8 unknown user_ids", '"ghost0"', '"ghost4"', "and 3 more")
    assert '"ghost5"' not in error.details()
    assert "allow_cold_start" in error.details()
    assert [name for _, name, _ in resources(error)] == [f"ghost{i}" for i in range(5)]


def test_not_found_names_both_fields(stub: Any) -> None:
    error = call_error(stub.Predict, pb.PredictRequest(user_id="x1", item_id="y1"))
    check(error, NOT_FOUND, "user_id", '"x1"', '"y1"')
    assert set(violations(error)) == {"user_id", "item_id"}


def test_long_ids_are_cut_in_messages(stub: Any) -> None:
    error = call_error(stub.Predict, pb.PredictRequest(user_id="z" * 10_000, item_id="i1"))
    assert error.code() == NOT_FOUND
    assert "10000 chars" in error.details()
    assert len(error.details()) < 400
    # A cut id would name another resource, and a whole one could overflow the trailer: none.
    assert resources(error) == [] and set(violations(error)) == {"user_id"}
    error = call_error(stub.Predict, pb.PredictRequest(user_id="y" * 256, item_id="i1"))
    assert "256 chars" in error.details()
    assert resources(error) == [("user", "y" * 256, "user_id")]  # whole in the detail


def test_the_most_named_ids_fit_in_the_trailer(stub: Any) -> None:
    # Five named per field, two fields, each at the longest a detail carries: still NOT_FOUND, not
    # a call failed on gRPC's metadata size limit.
    users = [f"{n}".ljust(256, "u") for n in range(7)]
    items = [f"{n}".ljust(256, "i") for n in range(7)]
    error = call_error(stub.BatchPredict, pb.BatchPredictRequest(user_ids=users, item_ids=items))
    assert error.code() == NOT_FOUND
    named = resources(error)
    assert [n for t, n, _ in named if t == "user"] == users[:5]
    assert [n for t, n, _ in named if t == "item"] == items[:5]


def test_unavailable_without_a_model() -> None:
    requests = {
        "Predict": pb.PredictRequest(user_id="u1", item_id="i1"),
        "BatchPredict": pb.BatchPredictRequest(user_ids=["u1"], item_ids=["i1"]),
        "TopK": pb.TopKRequest(user_id="u1"),
        "SimilarItems": pb.SimilarItemsRequest(item_id="i1"),
        "GetModelInfo": pb.GetModelInfoRequest(),
    }
    with running_server(None) as address, grpc.insecure_channel(address) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)
        for name, request in requests.items():
            error = call_error(getattr(stub, name), request)
            assert error.code() == grpc.StatusCode.UNAVAILABLE, name
            assert "no model" in error.details()
        # A bad request is still a bad request without a model: the client must not retry it.
        assert call_error(stub.TopK, pb.TopKRequest(user_id="")).code() == INVALID


def test_unexpected_exception_is_internal_and_the_server_survives(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with running_server_handle(model_dir) as handle:

        async def broken(*args: Any) -> Any:
            raise RuntimeError("boom: a bug in the handler")

        handle.server.service._predict_rows = broken  # type: ignore[method-assign]
        with grpc.insecure_channel(handle.address) as channel:
            stub = pb_grpc.RecommenderServiceStub(channel)
            with caplog.at_level("ERROR", logger="mfserve.server"):
                error = call_error(stub.Predict, pb.PredictRequest(user_id="u1", item_id="i1"))
            assert error.code() == grpc.StatusCode.INTERNAL
            assert "Predict" in error.details()
            assert "boom" not in error.details()  # internals stay in the server log
            assert any("boom" in (r.exc_text or "") or r.exc_info for r in caplog.records)
            # Still serving.
            assert len(stub.TopK(pb.TopKRequest(user_id="u1", k=2)).items) == 2
