"""Unit tests of the error mapping logic (``_map_error``) on hand-made ``grpc.RpcError`` objects.

These cover only the mapping: which class, which attributes, how rich details are decoded. That
each class is really raised for its status by a real server is tested in ``test_client_errors.py``.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Sequence
from typing import Any

import grpc
import pytest

import mfserve.client as sdk
from mfserve.client import _exceptions
from mfserve.client._exceptions import _map_error, translate_errors

status_pb2 = pytest.importorskip("google.rpc.status_pb2")
error_details_pb2 = pytest.importorskip("google.rpc.error_details_pb2")


class FakeRpcError(grpc.RpcError):
    """What grpc raises from a failed call: an ``RpcError`` that is also a ``grpc.Call``."""

    def __init__(
        self, code: grpc.StatusCode, details: str, trailing: Sequence[tuple[str, Any]] = ()
    ) -> None:
        super().__init__(details)
        self._code, self._details, self._trailing = code, details, tuple(trailing)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:
        return self._trailing


def rich(code: grpc.StatusCode, message: str, *details: Any) -> tuple[tuple[str, bytes], ...]:
    """A ``grpc-status-details-bin`` trailer made with the official googleapis protos."""
    status = status_pb2.Status(code=code.value[0], message=message)
    for detail in details:
        status.details.add().Pack(detail)
    return (("grpc-status-details-bin", status.SerializeToString()),)


def bad_request(*violations: tuple[str, str]) -> Any:
    return error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
            for f, d in violations
        ]
    )


CLASSES = {
    grpc.StatusCode.INVALID_ARGUMENT: sdk.InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: sdk.NotFoundError,
    grpc.StatusCode.UNAUTHENTICATED: sdk.UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: sdk.PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: sdk.ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: sdk.UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: sdk.DeadlineExceededError,
}


@pytest.mark.parametrize(
    "code", [c for c in grpc.StatusCode if c is not grpc.StatusCode.OK], ids=lambda c: c.name
)
def test_every_status_code_maps_to_a_typed_error(code: grpc.StatusCode) -> None:
    error = _map_error(FakeRpcError(code, "went wrong"))
    assert type(error) is CLASSES.get(code, sdk.RpcError)
    assert isinstance(error, sdk.MfserveError)
    assert error.code is code
    assert error.details == "went wrong"
    assert str(error) == f"{code.name}: went wrong"


def test_translate_errors_raises_from_the_grpc_error() -> None:
    original = FakeRpcError(grpc.StatusCode.UNAVAILABLE, "down")
    with pytest.raises(sdk.UnavailableError) as info, translate_errors():
        raise original
    assert info.value.__cause__ is original


def test_invalid_argument_carries_field_violations_from_rich_status() -> None:
    text = "k=-3: must not be negative (0 means the default, 10)"
    trailer = rich(grpc.StatusCode.INVALID_ARGUMENT, text, bad_request(("k", text)))
    error = _map_error(FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, text, trailer))
    assert isinstance(error, sdk.InvalidArgumentError)
    assert error.field_violations == (sdk.FieldViolation("k", text),)


def resource(kind: str, name: str, field: str = "") -> Any:
    return error_details_pb2.ResourceInfo(resource_type=kind, resource_name=name, description=field)


def test_not_found_ids_per_field_from_resource_info_details() -> None:
    # mfserve.server.errors.not_found: a violation per field for people, a ResourceInfo per id.
    message = 'unknown user_id "it\'s"; 2 unknown candidate_item_ids: "a, b", "c"'
    trailer = rich(
        grpc.StatusCode.NOT_FOUND,
        message,
        bad_request(("user_id", "unknown user_id ..."), ("candidate_item_ids", "2 unknown ...")),
        resource("user", "it's", "user_id"),
        resource("item", "a, b", "candidate_item_ids"),
        resource("item", "c", "candidate_item_ids"),
    )
    error = _map_error(FakeRpcError(grpc.StatusCode.NOT_FOUND, message, trailer))
    assert isinstance(error, sdk.NotFoundError)
    assert dict(error.unknown) == {"user_id": ("it's",), "candidate_item_ids": ("a, b", "c")}
    assert error.ids == ("it's", "a, b", "c")
    assert [v.field for v in error.field_violations] == ["user_id", "candidate_item_ids"]


def test_not_found_without_a_field_falls_back_to_the_resource_type() -> None:
    trailer = rich(grpc.StatusCode.NOT_FOUND, "gone", resource("user", "u 1"), resource("", "x"))
    error = _map_error(FakeRpcError(grpc.StatusCode.NOT_FOUND, "gone", trailer))
    assert isinstance(error, sdk.NotFoundError)
    assert dict(error.unknown) == {"user": ("u 1",), "id": ("x",)}


@pytest.mark.parametrize(
    "details",
    [
        (),  # a bare status: the message alone
        (bad_request(("user_id", 'unknown user_id "u9"')),),  # a violation, no ResourceInfo
    ],
)
def test_not_found_ids_are_never_parsed_from_text(details: tuple[Any, ...]) -> None:
    message = 'unknown user_id "u9" (set allow_cold_start ...)'
    trailer = rich(grpc.StatusCode.NOT_FOUND, message, *details) if details else ()
    error = _map_error(FakeRpcError(grpc.StatusCode.NOT_FOUND, message, trailer))
    assert isinstance(error, sdk.NotFoundError)
    assert error.ids == () and dict(error.unknown) == {}
    assert error.details == message


def test_corrupt_or_foreign_details_are_ignored() -> None:
    corrupt = (("grpc-status-details-bin", b"\xff\xff\xff"),)
    error = _map_error(FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "bad", corrupt))
    assert error.field_violations == ()
    foreign = rich(grpc.StatusCode.INVALID_ARGUMENT, "bad", error_details_pb2.RetryInfo())
    assert (
        _map_error(FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "bad", foreign)).details == "bad"
    )


def test_errors_pickle_with_their_attributes() -> None:
    message = 'unknown user_id "u9"'
    trailer = rich(
        grpc.StatusCode.NOT_FOUND,
        message,
        bad_request(("user_id", message)),
        resource("user", "u9", "user_id"),
    )
    error = _map_error(FakeRpcError(grpc.StatusCode.NOT_FOUND, message, trailer))
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is sdk.NotFoundError
    assert (copy.code, copy.details, copy.ids, copy.unknown, str(copy)) == (
        error.code,
        message,
        ("u9",),
        {"user_id": ("u9",)},
        str(error),
    )
    assert copy.field_violations == (sdk.FieldViolation("user_id", message),)


def test_a_bare_rpc_error_maps_to_unknown() -> None:
    error = _map_error(grpc.RpcError("no call attached"))
    assert type(error) is sdk.RpcError
    assert error.code is grpc.StatusCode.UNKNOWN


def test_the_docstring_tree_matches_the_class_hierarchy() -> None:
    """The ASCII tree at the top of ``_exceptions`` is documentation; keep it true."""
    doc = _exceptions.__doc__ or ""
    tree = doc.split("::\n\n", 1)[1].split("\n\n", 1)[0]
    stack: list[str] = []
    named: list[str] = []
    for line in tree.splitlines():
        match = re.match(r"^ {4}((?:[│ ] {3}|[├└]── )*)([A-Z]\w+)", line)
        if not match:
            continue
        depth, name = len(match.group(1)) // 4, match.group(2)
        cls = getattr(sdk, name)
        del stack[depth:]
        if stack:
            assert cls.__bases__ == (getattr(sdk, stack[-1]),), name
        stack.append(name)
        named.append(name)
    errors = {n for n in sdk.__all__ if isinstance(getattr(sdk, n), type)} & {
        n for n in sdk.__all__ if issubclass(getattr(sdk, n), BaseException)
    }
    assert set(named) == errors
