"""How the services are registered: every handler takes the request's bytes, so that BatchPredict
can decode them in compiled code and bytes that do not parse are ``INVALID_ARGUMENT`` for every
method (gRPC's own deserializer would answer UNKNOWN).

The standard services (health, reflection) come with grpcio's own servicers and registration
functions, whose handlers deserialize with protobuf. They are registered through
:class:`_ParsingServer`, which hands the real server the same handlers taking bytes, parsed by
:func:`_decoded`: the same ``INVALID_ARGUMENT`` as ours, at the cost of one extra frame on those
calls only (a server interceptor would cost every call).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeAlias

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

from mfserve.server.admission import Admission
from mfserve.server.errors import ServiceError, abort, malformed, undecodable
from mfserve.server.service import SERVICE_NAME, RecommenderService
from mfserve.v1 import recommender_pb2 as pb

SHUTTING_DOWN = "the server is shutting down; retry on another"
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Start: TypeAlias = Callable[[bytes, Context], Awaitable[Any]]


def _parsing(method: Callable[[Any, Context], Awaitable[Any]], request_class: Any) -> Start:
    """``method``'s call from the request's bytes: parsed here, so that bytes which do not parse
    get ``INVALID_ARGUMENT`` like any other bad request (gRPC's own deserializer answers UNKNOWN).
    Not a coroutine itself: it returns the call's, and keeps nothing of the request."""

    def start(raw: bytes, context: Context) -> Awaitable[Any]:
        try:
            request = request_class.FromString(raw)
        except DecodeError as exc:
            refusal: Awaitable[Any] = abort(context, malformed(request_class, exc))
            return refusal
        return method(request, context)

    return start


def _releasing(start: Start) -> Callable[[bytes, Context], Awaitable[Any]]:
    """The handler gRPC calls: ``start``'s call, whose abort exception holds nothing of the
    request (:func:`_unchained`)."""

    @functools.wraps(start)
    async def handler(raw: bytes, context: Context) -> Any:
        call = start(raw, context)
        del raw  # this frame stays referenced by an abort's exception (_unchained)
        try:
            return await call
        except grpc.aio.AbortError as exc:
            raise _unchained(exc) from None

    return handler


def _unchained(error: BaseException) -> BaseException:
    """``error``, an abort's exception, cut free of the frames it was raised through, to be raised
    again from a handler's own frame.

    grpc.aio keeps that exception in a reference cycle with the call's state (which every frame's
    ``context`` holds) until the next full garbage collection, and with it each frame it passed
    through, their locals included: the request, or an exception whose frames hold it. Refused
    4 MB requests were each kept that long (+150 MiB of RSS for 60 of them, measured); cut free,
    the exception holds only the handler's frame, and that holds nothing of the request.
    """
    error.__context__ = None
    return error.with_traceback(None)


def _admitted(start: Start, method: str, admission: Admission) -> Callable[..., Awaitable[Any]]:
    """:func:`_releasing`'s handler, admitted through ``admission`` first: over the limit, the
    call is ``RESOURCE_EXHAUSTED`` before its request is even parsed."""

    @functools.wraps(start)
    async def handler(raw: bytes, context: Context) -> Any:
        if not admission.enter(method):
            del raw  # the abort's traceback keeps this frame (_unchained)
            if admission.draining:
                await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, admission.refusal)
        try:
            call = start(raw, context)
            del raw
            try:
                return await call
            except grpc.aio.AbortError as exc:
                raise _unchained(exc) from None
        finally:
            admission.leave()

    return handler


def _admitted_stream(
    method: Callable[[Any, Context], AsyncIterator[Any]],
    request_class: Any,
    name: str,
    admission: Admission,
) -> Callable[[bytes, Context], AsyncIterator[Any]]:
    """A server-streaming handler from the request's bytes, admitted like a unary call: the
    whole stream is one call in flight, from its first response to its last."""

    async def handler(raw: bytes, context: Context) -> AsyncIterator[Any]:
        if not admission.enter(name):
            del raw
            if admission.draining:
                await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, admission.refusal)
        try:
            try:
                request = request_class.FromString(raw)
            except DecodeError as exc:
                refusal = malformed(request_class, exc)
            else:
                refusal = None
            del raw  # an abort's traceback keeps this frame (_unchained)
            try:
                if refusal is not None:
                    await abort(context, refusal)
                stream = method(request, context)
                del request
                async for response in stream:
                    yield response
            except grpc.aio.AbortError as exc:
                raise _unchained(exc) from None
        finally:
            admission.leave()

    return handler


def add_to_server(
    service: RecommenderService, server: grpc.aio.Server, admission: Admission | None = None
) -> None:
    """Register ``service`` as the generated ``add_RecommenderServiceServicer_to_server`` does,
    but with every handler taking the request's bytes: BatchPredict decodes them itself
    (:meth:`RecommenderService.batch_predict_bytes`), the others parse them with protobuf
    (:func:`_parsing`), and bytes that do not parse are ``INVALID_ARGUMENT`` for all of them.
    Every call is admitted through ``admission`` (``--max-concurrent-rpcs``; none: unbounded).

    Built from the service descriptor, so an RPC added to the proto is registered here too.
    """
    admission = admission or Admission(None)
    descriptor = pb.DESCRIPTOR.services_by_name["RecommenderService"]
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in descriptor.methods:
        request_class = getattr(pb, method.input_type.name)
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _admitted_stream(
                    getattr(service, method.name), request_class, method.name, admission
                ),
                request_deserializer=None,
                response_serializer=_serialized,
            )
            continue
        start: Start
        if method.name == "BatchPredict":
            start = service.batch_predict_bytes
        else:
            start = _parsing(getattr(service, method.name), request_class)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _admitted(start, method.name, admission),
            request_deserializer=None,  # the bytes as received
            response_serializer=_serialized,
        )
    generic = grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)
    server.add_generic_rpc_handlers((generic,))
    # As generated code does since grpcio 1.63 (grpc-stubs predates the method).
    server.add_registered_method_handlers(SERVICE_NAME, handlers)  # type: ignore[attr-defined]


def _serialized(response: bytes | Message) -> bytes:
    """A response as bytes: BatchPredict's decoded answers already are."""
    return response if isinstance(response, bytes) else response.SerializeToString()


def add_standard_services(
    server: grpc.aio.Server, health: HealthServicer, *, reflection_on: bool = True
) -> None:
    """The standard ``grpc.health.v1`` service and (``reflection_on``) server reflection, both
    answering bytes that do not parse with ``INVALID_ARGUMENT`` (:class:`_ParsingServer`)."""
    parsing = _ParsingServer(server)
    health_pb2_grpc.add_HealthServicer_to_server(health, parsing)
    if reflection_on:
        # What enable_server_reflection does for a grpc.aio server; it tells aio from sync by the
        # server's type, which the proxy is not.
        names = (SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            ReflectionServicer(names), parsing
        )


Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class _ParsingServer:
    """The two registration methods generated ``add_*_to_server`` functions call, passing every
    handler on to ``server`` rebuilt by :func:`_parsing_handler`."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(
        self, handlers: Sequence[grpc.GenericRpcHandler[Any, Any]]
    ) -> None:
        self._server.add_generic_rpc_handlers(tuple(_ParsingGenericHandler(h) for h in handlers))

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, Handler]) -> None:
        rebuilt = {name: _parsing_handler(h, f"/{service}/{name}") for name, h in handlers.items()}
        self._server.add_registered_method_handlers(service, rebuilt)  # type: ignore[attr-defined]


class _ParsingGenericHandler(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """A generic handler whose method handlers are rebuilt by :func:`_parsing_handler`.

    grpc prefers the registered handlers, so this answers only if those are ever bypassed; each
    method's rebuilt handler is kept, so a call allocates nothing here. The cache holds only
    methods ``inner`` serves: an unknown path (a client's choice) is never stored.
    """

    def __init__(self, inner: grpc.GenericRpcHandler[Any, Any]) -> None:
        self._inner = inner
        self._rebuilt: dict[str, Handler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        method = handler_call_details.method
        rebuilt = self._rebuilt.get(method)
        if rebuilt is None:
            handler = self._inner.service(handler_call_details)
            if handler is None:
                return None
            rebuilt = self._rebuilt[method] = _parsing_handler(handler, method)
        return rebuilt


def _parsing_handler(handler: Handler, method: str) -> Handler:
    """``handler`` taking its request bytes, parsed by :func:`_decoded` before its behaviour runs."""
    deserialize = handler.request_deserializer
    if deserialize is None:  # already takes bytes
        return handler
    request_class = getattr(deserialize, "__self__", None)  # FromString is bound to its class
    descriptor = getattr(request_class, "DESCRIPTOR", None)
    type_name = descriptor.full_name if descriptor is not None else f"request of {method}"
    parse = functools.partial(_decoded, deserialize, type_name)
    serialize = handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _unary(handler.unary_unary, parse), response_serializer=serialize
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _unary(handler.unary_stream, parse), response_serializer=serialize
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            _streaming(handler.stream_unary, parse), response_serializer=serialize
        )
    assert handler.stream_stream is not None
    return grpc.stream_stream_rpc_method_handler(
        _streaming(handler.stream_stream, parse), response_serializer=serialize
    )


Parse = Callable[[bytes], Any]


def _decoded(deserialize: Callable[[bytes], Any], type_name: str, raw: bytes) -> Any:
    """The request ``raw`` encodes, or the :class:`ServiceError` to abort the call with."""
    try:
        return deserialize(raw)
    except DecodeError as exc:
        return undecodable(type_name, exc)


def _unary(behaviour: Callable[..., Any], parse: Parse) -> Callable[..., Any]:
    """A unary-request behaviour taking bytes."""

    def start(raw: bytes, context: Context) -> Any:
        request = parse(raw)
        if isinstance(request, ServiceError):
            return abort(context, request)
        return behaviour(request, context)

    return _released(behaviour, start)


def _streaming(behaviour: Callable[..., Any], parse: Parse) -> Callable[..., Any]:
    """A stream-request behaviour reading bytes: each request is parsed as it is read, so the
    first bad one aborts the call (the behaviour sees the abort raised from its iterator)."""

    async def requests(raw_requests: AsyncIterator[bytes], context: Context) -> AsyncIterator[Any]:
        async for raw in raw_requests:
            request = parse(raw)
            del raw
            if isinstance(request, ServiceError):
                await abort(context, request)
            yield request

    def start(raw_requests: AsyncIterator[bytes], context: Context) -> Any:
        return behaviour(requests(raw_requests, context), context)

    return _released(behaviour, start)


def _released(behaviour: Callable[..., Any], start: Callable[..., Any]) -> Callable[..., Any]:
    """The handler gRPC calls for ``start``, of ``behaviour``'s kind: grpc.aio iterates an async
    generator and awaits anything else (a response stream then goes by ``context.write``)."""
    if not inspect.isasyncgenfunction(behaviour):
        return _releasing(lambda first, context: _answer(start(first, context)))

    async def stream(first: Any, context: Context) -> AsyncIterator[Any]:
        responses = start(first, context)
        del first  # as in _releasing
        try:
            if inspect.isawaitable(responses):  # refused before the behaviour started
                await responses
                return
            async for response in responses:
                yield response
                del response  # an abort's traceback keeps this frame: no answer may stay in it
        except grpc.aio.AbortError as exc:
            raise _unchained(exc) from None

    return stream


async def _answer(result: Any) -> Any:
    """A behaviour's result, awaited if it is a coroutine. The servicers registered here are
    grpc.aio ones; the exception is a generated base class's stub for a method a servicer lacks
    (health's List), which only sets UNIMPLEMENTED and raises, so calling it here blocks nothing."""
    return await result if inspect.isawaitable(result) else result
