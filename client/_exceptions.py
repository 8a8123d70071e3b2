"""Every error the client raises, mapped from gRPC status codes in one place.

Our exception hierarchy::

    MfserveError                    anything this package raises on purpose
    └── RpcError                    an RPC failed: .code, .details, .field_violations; the
        │                           grpc.RpcError is its __cause__; also the fallback for
        │                           codes without a class (INTERNAL, CANCELLED, ...)
        ├── InvalidArgumentError    INVALID_ARGUMENT: the request is wrong; do not retry
        ├── NotFoundError           NOT_FOUND: unknown ids (.ids, and .unknown per field)
        ├── UnauthenticatedError    UNAUTHENTICATED: no token, or a bad one
        ├── PermissionDeniedError   PERMISSION_DENIED: the token may not make this call
        ├── ResourceExhaustedError  RESOURCE_EXHAUSTED: server busy, or a message too large
        ├── UnavailableError        UNAVAILABLE: no server or no model, even after retries
        └── DeadlineExceededError   DEADLINE_EXCEEDED: the call ran past its timeout

Mistakes in how the client itself is called (mismatched batch lengths, a token over an insecure
remote channel) raise ``ValueError`` / ``TypeError`` before anything is sent: they are bugs in the
calling code, not failures of the service.

Rich details come from the ``grpc-status-details-bin`` trailer (a ``google.rpc.Status``), decoded
with the client's own copy of those messages (``_protos``) so the base install needs neither
grpcio-status nor googleapis-common-protos. Unknown ids are read from its ``ResourceInfo`` details
only, never from the message text: the message quotes and cuts ids for people.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from . import _protos


@dataclass(frozen=True)
class FieldViolation:
    """One ``google.rpc.BadRequest.FieldViolation``: which request field was wrong, and why."""

    field: str
    description: str


class MfserveError(Exception):
    """Base class of every error this package raises on purpose."""


class RpcError(MfserveError):
    """An RPC failed with a non-OK status; the ``grpc.RpcError`` is the ``__cause__``.

    ``details`` is the server's message; ``field_violations`` holds the ``google.rpc.BadRequest``
    detail when the server attached one (it does for every error caused by the request).
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        *,
        field_violations: Iterable[FieldViolation] = (),
    ) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.field_violations: tuple[FieldViolation, ...] = tuple(field_violations)

    def __reduce__(self) -> tuple[Any, ...]:
        # Picklable (process pools, multiprocessing): rebuild from the two positional arguments,
        # then restore every attribute.
        return (type(self), (self.code, self.details), self.__dict__)


class InvalidArgumentError(RpcError):
    """``INVALID_ARGUMENT``: the request is malformed (empty id, bad ``k``, batch too large).

    ``field_violations`` names each offending field; retrying the same request cannot succeed.
    """


class NotFoundError(RpcError):
    """``NOT_FOUND``: the model does not know some ids.

    ``unknown`` maps each request field (``user_id``, ``item_ids``, ``candidate_item_ids``, ...) to
    the ids the server named in ``google.rpc.ResourceInfo`` details (at most a few per field; the
    message counts the rest, and an id too long to send whole is not named); ``ids`` is all of
    them in order. Pass ``allow_cold_start=True`` to get a cold-start answer instead.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        *,
        field_violations: Iterable[FieldViolation] = (),
        unknown: Mapping[str, Iterable[str]] | None = None,
    ) -> None:
        super().__init__(code, details, field_violations=field_violations)
        self.unknown: Mapping[str, tuple[str, ...]] = {
            field: tuple(ids) for field, ids in (unknown or {}).items()
        }
        self.ids: tuple[str, ...] = tuple(
            dict.fromkeys(i for ids in self.unknown.values() for i in ids)
        )


class UnauthenticatedError(RpcError):
    """``UNAUTHENTICATED``: the call carried no token, or one the server does not accept."""


class PermissionDeniedError(RpcError):
    """``PERMISSION_DENIED``: the token is valid but may not make this call."""


class ResourceExhaustedError(RpcError):
    """``RESOURCE_EXHAUSTED``: the server is at its concurrency limit, or a message is too large."""


class UnavailableError(RpcError):
    """``UNAVAILABLE``: no server answered, or it has no model loaded, even after the retries."""


class DeadlineExceededError(RpcError):
    """``DEADLINE_EXCEEDED``: the call (all its retries included) ran past its timeout."""


_BY_CODE: Mapping[grpc.StatusCode, type[RpcError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


def _status_details(trailing_metadata: Any) -> list[Message]:
    """The ``Any`` details of the ``grpc-status-details-bin`` trailer ([] if absent or corrupt)."""
    for key, value in trailing_metadata or ():
        if key == _protos.STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = _protos.Status()
            try:
                status.ParseFromString(value)
            except DecodeError:
                return []
            return list(getattr(status, "details", ()))
    return []


def _unpack(details: list[Message], cls: type[Message]) -> list[Message]:
    """The details of type ``cls`` (matched on the type URL's full name), decoded."""
    name = cls.DESCRIPTOR.full_name
    out: list[Message] = []
    for packed in details:
        if str(getattr(packed, "type_url", "")).rpartition("/")[2] == name:
            message = cls()
            try:
                message.ParseFromString(getattr(packed, "value", b""))
            except DecodeError:
                continue
            out.append(message)
    return out


def _unknown_ids(resources: list[Message]) -> dict[str, list[str]]:
    """Unknown ids per request field, from the ``ResourceInfo`` details (the server's contract:
    ``resource_name`` is the id, ``description`` the field; ``resource_type`` names the field when
    a server leaves ``description`` empty)."""
    unknown: dict[str, list[str]] = {}
    for info in resources:
        field = str(getattr(info, "description", "")) or str(getattr(info, "resource_type", ""))
        unknown.setdefault(field or "id", []).append(str(getattr(info, "resource_name", "")))
    return unknown


def _call_attr(exc: grpc.RpcError, name: str) -> Any:
    """``exc.code()`` etc.: a ``grpc.RpcError`` raised by a call is also a ``grpc.Call``."""
    method = getattr(exc, name, None)
    return method() if callable(method) else None


def _map_error(exc: grpc.RpcError) -> RpcError:
    """The one place a gRPC status becomes a typed error. Callers ``raise _map_error(e) from e``."""
    code = _call_attr(exc, "code")
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    details = _call_attr(exc, "details")
    details = details if isinstance(details, str) else str(exc)
    rich = _status_details(_call_attr(exc, "trailing_metadata"))
    violations = tuple(
        FieldViolation(str(getattr(v, "field", "")), str(getattr(v, "description", "")))
        for request in _unpack(rich, _protos.BadRequest)
        for v in getattr(request, "field_violations", ())
    )
    cls = _BY_CODE.get(code, RpcError)
    if cls is NotFoundError:
        unknown = _unknown_ids(_unpack(rich, _protos.ResourceInfo))
        return NotFoundError(code, details, field_violations=violations, unknown=unknown)
    return cls(code, details, field_violations=violations)


@contextmanager
def translate_errors() -> Iterator[None]:
    """Re-raise a ``grpc.RpcError`` from the block as its typed error, chained ``from`` it."""
    try:
        yield
    except grpc.RpcError as exc:
        raise _map_error(exc) from exc
