"""Rich gRPC errors: a status code, a message naming the field and value, and a google.rpc detail.

Validation code raises :class:`ServiceError`; one wrapper in the servicer turns it into
``context.abort_with_status(...)``. Keeping the raise sites free of ``context`` means validation is
plain, synchronous, unit-testable code, and a future batcher or another transport can reuse it.

The detail travels in the ``grpc-status-details-bin`` trailer (``grpc_status.rpc_status``), which
every gRPC language decodes, e.g. Python's ``grpc_status.rpc_status.from_call(call)``. ``NOT_FOUND``
adds a ``google.rpc.ResourceInfo`` per unknown id it names, so clients read ids from data, never
from the message, whose quoting and cutting are for people.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from mfserve.server.metrics import count_unknown

__all__ = [
    "MAX_DETAIL_ID_CHARS",
    "MAX_ECHOED_BYTES",
    "MAX_NAMED_IDS",
    "MAX_TRAILER_BYTES",
    "ServiceError",
    "UnknownId",
    "abort",
    "internal",
    "invalid_argument",
    "invalid_fields",
    "malformed",
    "not_found",
    "resource_type",
    "show",
    "unavailable",
    "undecodable",
]

# How many unknown ids a NOT_FOUND message and its detail name; the rest are only counted, so a
# batch of 100,000 unknown ids cannot make a 2 MB error message.
MAX_NAMED_IDS = 5
# Ids are echoed back in messages, cut to this many bytes of (JSON-escaped) UTF-8: a pathological
# 1 MB id must not be, and a byte bound, unlike a character one, also bounds ids of emoji or
# control characters, which the trailer spells in 3 to 12 bytes a character.
MAX_ECHOED_BYTES = 64
# The longest id a ResourceInfo carries, whole (a cut id would name a different resource).
MAX_DETAIL_ID_CHARS = 256
# The status travels in the trailers, and a client (gRPC's default) rejects trailers over 8 KiB:
# the call would fail with "metadata size exceeds soft limit" instead of this error. Named ids are
# sent in ResourceInfo details only while the trailers stay within this estimate, which leaves
# room for the other trailers; what does not fit is still counted in the message.
MAX_TRAILER_BYTES = 7 * 1024
# What gRPC's percent-encoding of grpc-message leaves as one byte; every other byte costs three.
_UNESCAPED = bytes(b for b in range(0x20, 0x7F) if b != ord("%"))
# Per trailer entry, the HTTP/2 size rule adds 32 bytes to the name and value.
_TRAILER_OVERHEAD = sum(
    len(name) + 32 for name in ("grpc-status", "grpc-message", "grpc-status-details-bin")
)


@dataclass(frozen=True)
class UnknownId:
    """One id the model does not know, sent as a ``google.rpc.ResourceInfo``.

    ``resource_type`` is ``user`` or ``item`` (the two id spaces: MovieLens user ``1`` and movie
    ``1`` are different things); ``field`` is the request field that held it, sent as the
    detail's ``description`` so a client can tell ``item_id`` from ``candidate_item_ids``.
    """

    resource_type: str
    id: str
    field: str


class ServiceError(Exception):
    """A failed RPC: the gRPC code, the human message, and structured google.rpc details."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        violations: Sequence[tuple[str, str]] = (),
        unknown_ids: Sequence[UnknownId] = (),
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        # (field path, description) pairs, sent as one google.rpc.BadRequest detail.
        self.violations = tuple(violations)
        self.unknown_ids = tuple(unknown_ids)

    def within(self, prefix: str) -> ServiceError:
        """This error about one part of a larger request (``requests[3]``): its fields become
        ``requests[3].k``, and the message says which part."""
        return ServiceError(
            self.code,
            f"{prefix}: {self.message}",
            [(f"{prefix}.{field}", f"{prefix}: {text}") for field, text in self.violations],
            [UnknownId(u.resource_type, u.id, f"{prefix}.{u.field}") for u in self.unknown_ids],
        )

    def to_status(self) -> grpc.Status:
        """The ``grpc.Status`` to pass to ``context.abort_with_status``: the message, the
        BadRequest, and a ResourceInfo per named id while they fit in :data:`MAX_TRAILER_BYTES`."""
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        if self.violations:
            status.details.add().Pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=field, description=text)
                        for field, text in self.violations
                    ]
                )
            )
        for unknown in self.unknown_ids:
            status.details.add().Pack(
                error_details_pb2.ResourceInfo(
                    resource_type=unknown.resource_type,
                    resource_name=unknown.id,
                    description=unknown.field,
                )
            )
            if trailer_bytes(status) > MAX_TRAILER_BYTES:
                del status.details[-1]  # this one and the rest: the message counts them
                break
        return rpc_status.to_status(status)


def trailer_bytes(status: status_pb2.Status) -> int:
    """The size the status's trailers count for against a client's metadata limit: gRPC counts
    grpc-message percent-encoded and the binary detail decoded, as the sizes a client reports
    when it rejects trailers show."""
    message = status.message.encode()
    escaped = len(message.translate(None, _UNESCAPED))
    size: int = status.ByteSize()
    return _TRAILER_OVERHEAD + 3 + len(message) + 2 * escaped + size


async def abort(context: Any, error: ServiceError) -> NoReturn:
    """End the RPC with ``error``'s status and detail (``context``: a grpc.aio ServicerContext).

    Typed ``Any`` because grpc-stubs predates aio's ``abort_with_status``.
    """
    await context.abort_with_status(error.to_status())
    raise AssertionError("unreachable: abort_with_status raises")  # pragma: no cover


def show(value: object) -> str:
    """A value as messages show it: strings JSON-quoted (so ``""`` for empty, control characters
    escaped), cut after :data:`MAX_ECHOED_BYTES` bytes with a note of the whole length."""
    if not isinstance(value, str):
        return str(value)
    used = kept = 0
    for char in value[:MAX_ECHOED_BYTES]:  # no more characters than bytes can fit
        used += len(json.dumps(char, ensure_ascii=False).encode()) - 2
        if used > MAX_ECHOED_BYTES:
            break
        kept += 1
    if kept == len(value):
        return json.dumps(value, ensure_ascii=False)
    return json.dumps(value[:kept], ensure_ascii=False) + f"... ({len(value)} chars)"


def invalid_argument(field: str, value: object, problem: str) -> ServiceError:
    """``INVALID_ARGUMENT`` for one field: ``"k=-3: must be between 0 and 1000"`` style."""
    description = f"{field}={show(value)}: {problem}"
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, description, [(field, description)])


def invalid_fields(text: str, *fields: str) -> ServiceError:
    """``INVALID_ARGUMENT`` about whole fields (arrays of unequal length...), named in ``text``."""
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, text, [(field, text) for field in fields])


def resource_type(field: str) -> str:
    """The id space of a request field: ``user_id``/``user_ids`` hold users, every other id field
    (``item_id``, ``item_ids``, ``candidate_item_ids``, ...) holds items."""
    return "user" if field.startswith("user_") else "item"


def not_found(
    unknown: dict[str, Sequence[str]],
    *,
    total: dict[str, int] | None = None,
    hint: str = "",
) -> ServiceError:
    """``NOT_FOUND`` naming the unknown ids, per field (e.g. ``{"user_id": ["u9"]}``).

    ``unknown`` lists the distinct unknown ids of each field in order of first appearance; only the
    first :data:`MAX_NAMED_IDS` are named, in the message, in one ``BadRequest`` violation per
    field and in one ``ResourceInfo`` each (unless longer than :data:`MAX_DETAIL_ID_CHARS`, or
    past what the trailers hold: :meth:`ServiceError.to_status`).
    ``total`` overrides the count (when the caller stopped collecting early). ``hint`` is appended
    to the message (e.g. how to get a cold-start answer).
    """
    parts: list[str] = []
    violations: list[tuple[str, str]] = []
    named_ids: list[UnknownId] = []
    for field, ids in unknown.items():
        if not ids:
            continue
        count = (total or {}).get(field, len(ids))
        count_unknown(field, count)  # every NOT_FOUND for unknown ids is built here
        named = ", ".join(show(i) for i in ids[:MAX_NAMED_IDS])
        more = f" and {count - MAX_NAMED_IDS} more" if count > MAX_NAMED_IDS else ""
        text = (
            f"unknown {field} {named}" if count == 1 else f"{count} unknown {field}: {named}{more}"
        )
        parts.append(text)
        violations.append((field, text))
        kind = resource_type(field)
        named_ids.extend(
            UnknownId(kind, i, field) for i in ids[:MAX_NAMED_IDS] if len(i) <= MAX_DETAIL_ID_CHARS
        )
    message = "; ".join(parts) + (f" ({hint})" if hint else "")
    return ServiceError(grpc.StatusCode.NOT_FOUND, message, violations, named_ids)


def unavailable(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, message)


def internal(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INTERNAL, message)


def malformed(request_class: Any, error: DecodeError) -> ServiceError:
    """``INVALID_ARGUMENT`` for request bytes that do not parse as ``request_class``."""
    return undecodable(request_class.DESCRIPTOR.full_name, error)


def undecodable(type_name: str, error: DecodeError) -> ServiceError:
    """``INVALID_ARGUMENT`` for request bytes that do not parse as the message ``type_name``."""
    return invalid_fields(f"the request is not a valid {type_name}: {error}", "request")
