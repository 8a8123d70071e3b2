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
        │   └── TlsMismatchError    the client's TLS settings do not fit the server's (.reason):
        │                           plaintext against TLS or back, an untrusted server
        │                           certificate, a client certificate missing or refused
        └── DeadlineExceededError   DEADLINE_EXCEEDED: the call ran past its timeout
    TlsFileError                    a ValueError: a TLS file a client was given is missing,
                                    unreadable or not PEM (.filename)

Mistakes in how the client itself is called (mismatched batch lengths, a token over an insecure
remote channel, a TLS certificate without its key) raise ``ValueError`` / ``TypeError`` before
anything is sent: they are bugs in the calling code, not failures of the service. A TLS file that
does not work is one too, with its own class (``TlsFileError``) so that the message and
``filename`` say which; the older ``tls="ca.pem"`` still raises ``OSError`` when it cannot read it.

gRPC says "Socket closed" both for a plaintext client at a TLS port and for a mutual-TLS server
refusing the client's certificate, as for a server that went away. When a call fails that way the
mapping sends the address one TLS ClientHello (``_probe``) to tell which; only then, so a working
client never pays for it. The async client runs that probe in a thread.

Rich details come from the ``grpc-status-details-bin`` trailer (a ``google.rpc.Status``), decoded
with the client's own copy of those messages (``_protos``) so the base install needs neither
grpcio-status nor googleapis-common-protos. Unknown ids are read from its ``ResourceInfo`` details
only, never from the message text: the message quotes and cuts ids for people.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import grpc
from google.protobuf.message import DecodeError, Message

from . import _protos
from ._probe import Connection, Speaks, probe, server_name


@dataclass(frozen=True)
class FieldViolation:
    """One ``google.rpc.BadRequest.FieldViolation``: which request field was wrong, and why."""

    field: str
    description: str


class MfserveError(Exception):
    """Base class of every error this package raises on purpose."""


class TlsFileError(ValueError):
    """A TLS file a client was given is missing, unreadable, empty or not PEM, or a key is not its
    certificate's; ``filename`` names it. Raised when the client is created, before any call."""

    def __init__(self, message: str, filename: str | os.PathLike[str]) -> None:
        super().__init__(message)
        self.filename = os.fspath(filename)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.filename))


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


TlsMismatchReason = Literal[
    "server_plaintext",
    "server_tls",
    "server_mutual_tls",
    "server_certificate_untrusted",
    "server_certificate_wrong_name",
    "client_certificate_required",
    "client_certificate_refused",
]


class TlsMismatchError(UnavailableError):
    """``UNAVAILABLE`` because the client's TLS settings do not fit the server's; retrying with
    the same settings cannot help. ``reason`` says how, the message what to change:

    * ``server_plaintext``: the client speaks TLS to a plaintext server;
    * ``server_tls`` / ``server_mutual_tls``: plaintext to a TLS server (one that also wants a
      client certificate);
    * ``server_certificate_untrusted``: the server's certificate is not signed by a CA the
      client trusts; ``server_certificate_wrong_name``: it does not name the host connected to;
    * ``client_certificate_required``: a mutual-TLS server wants a client certificate;
    * ``client_certificate_refused``: it refused the one sent.

    ``problem`` is the message without the remedy, ``target`` the address as the client was
    given it (the ``mfserve`` command words the remedy in its flags).
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        *,
        field_violations: Iterable[FieldViolation] = (),
        reason: TlsMismatchReason = "server_plaintext",
        target: str = "",
        problem: str = "",
    ) -> None:
        super().__init__(code, details, field_violations=field_violations)
        self.reason: TlsMismatchReason = reason
        self.target = target
        self.problem = problem or details


# What to change, by reason, in the SDK's words.
_REMEDIES: Mapping[TlsMismatchReason, str] = {
    "server_plaintext": "connect without TLS (tls=False)",
    "server_tls": "connect with TLS (tls=True, or tls=TlsConfig(ca=FILE) for a private CA)",
    "server_mutual_tls": "connect with tls=TlsConfig(ca=FILE, cert=FILE, key=FILE)",
    "server_certificate_untrusted": "pass the CA that signed it: tls=TlsConfig(ca=FILE)",
    "server_certificate_wrong_name": "connect by a name the certificate lists",
    "client_certificate_required": "pass tls=TlsConfig(ca=FILE, cert=FILE, key=FILE)",
    "client_certificate_refused": "present one signed by a CA the server trusts",
}


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


# How gRPC 1.85 words the connection failures the mapping explains: grpcio's own text, so a
# wording change upstream makes them plain UnavailableError again, never a wrong explanation.
# A failed connect, in pick_first's words and in round_robin's (the clients' own policy).
_CONNECT_FAILED = ("failed to connect to all addresses", "connections to all backends failing")
_SOCKET_CLOSED = "Socket closed"
_NOT_TLS = ("WRONG_VERSION_NUMBER", "HTTP_REQUEST")
_WRONG_NAME = "Hostname Verification Check failed"
# "last error: UNAVAILABLE: ipv4:127.0.0.1:39731: Socket closed": the address that failed.
_FAILED_ADDRESS = re.compile(r"last error: [A-Z_]+: ((?:ipv4|ipv6|unix):.+?): ")
_VERIFY_REASON = re.compile(r"CERTIFICATE_VERIFY_FAILED: ([^:]+)")


def _connect_failed(details: str) -> bool:
    return any(words in details for words in _CONNECT_FAILED)


def _tls_probe(details: str, connection: Connection | None) -> Callable[[], Speaks] | None:
    """The probe that can explain a call that failed with "Socket closed" at connect, or None
    when no probe can help (another failure, or a channel whose security is not known)."""
    if connection is None or connection.tls is None:
        return None
    if not _connect_failed(details) or _SOCKET_CLOSED not in details:
        return None
    match = _FAILED_ADDRESS.search(details)
    address = match.group(1) if match else connection.target
    # The probe presents what the client does, so that a refusal is the refusal of the client.
    cert, key = connection.client_certificate or (None, None)
    name = server_name(connection.target)
    return partial(probe, address, server_name=name, cert=cert, key=key)


def _tls_mismatch(
    details: str, connection: Connection | None, speaks: Speaks | None
) -> tuple[TlsMismatchReason, str] | None:
    """(reason, problem) when a connection failed because of the client's TLS settings."""
    if not _connect_failed(details):
        return None
    target = connection.target if connection is not None else "this address"
    at = f"the server at {target}"
    if "Tls handshake failed" in details and any(word in details for word in _NOT_TLS):
        return "server_plaintext", f"{at} speaks plaintext"
    if "CERTIFICATE_VERIFY_FAILED" in details:
        verify = _VERIFY_REASON.search(details)
        why = f" ({verify.group(1).strip()})" if verify else ""
        return "server_certificate_untrusted", (
            f"{at} presented a certificate this client does not trust{why}"
        )
    if _WRONG_NAME in details:
        return "server_certificate_wrong_name", (
            f"{at} presented a certificate that does not name the host connected to"
        )
    if connection is None or speaks is None:
        return None
    if not connection.tls and speaks is Speaks.TLS:
        return "server_tls", f"{at} speaks TLS"
    if not connection.tls and speaks is Speaks.TLS_REFUSED:
        return "server_mutual_tls", f"{at} speaks mutual TLS (TLS and a client certificate)"
    if connection.tls and speaks is Speaks.TLS_REFUSED:
        if connection.client_certificate is None:
            return "client_certificate_required", (
                f"{at} requires a client certificate (mutual TLS)"
            )
        cert = connection.client_certificate[0]
        return "client_certificate_refused", f"{at} refused the client certificate {cert}"
    return None


def _map_error(
    exc: grpc.RpcError, connection: Connection | None = None, speaks: Speaks | None = None
) -> RpcError:
    """The one place a gRPC status becomes a typed error. Callers ``raise _map_error(e) from e``;
    ``speaks`` is the probe's answer when ``_tls_probe`` asked for one."""
    code = _call_attr(exc, "code")
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    details = _call_attr(exc, "details")
    details = details if isinstance(details, str) else str(exc)
    if code is grpc.StatusCode.UNAVAILABLE:
        mismatch = _tls_mismatch(details, connection, speaks)
        if mismatch is not None:
            reason, problem = mismatch
            return TlsMismatchError(
                code,
                f"{problem}; {_REMEDIES[reason]}",
                reason=reason,
                target=connection.target if connection is not None else "",
                problem=problem,
            )
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


def _details(exc: grpc.RpcError) -> str:
    details = _call_attr(exc, "details")
    return details if isinstance(details, str) else ""


@contextmanager
def translate_errors(connection: Connection | None = None) -> Iterator[None]:
    """Re-raise a ``grpc.RpcError`` from the block as its typed error, chained ``from`` it."""
    try:
        yield
    except grpc.RpcError as exc:
        check = _tls_probe(_details(exc), connection)
        raise _map_error(exc, connection, check() if check else None) from exc


@asynccontextmanager
async def translate_errors_async(connection: Connection | None = None) -> AsyncIterator[None]:
    """:func:`translate_errors` for coroutines: a probe runs in a thread, not on the loop."""
    try:
        yield
    except grpc.RpcError as exc:
        check = _tls_probe(_details(exc), connection)
        speaks = await asyncio.to_thread(check) if check else None
        raise _map_error(exc, connection, speaks) from exc
