"""How the servicer is registered: every handler takes the request's bytes, so that BatchPredict
can decode them in compiled code and bytes that do not parse are ``INVALID_ARGUMENT`` for every
method (gRPC's own deserializer would answer UNKNOWN)."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from mfserve.server.errors import abort, malformed
from mfserve.server.service import SERVICE_NAME, RecommenderService
from mfserve.v1 import recommender_pb2 as pb


def _parsed(
    method: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]],
    request_class: Any,
) -> Callable[[bytes, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
    """``method`` taking the request's bytes: parsed here, so that bytes which do not parse get
    ``INVALID_ARGUMENT`` like any other bad request (gRPC's own deserializer answers UNKNOWN)."""

    @functools.wraps(method)
    async def handler(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            request = request_class.FromString(raw)
        except DecodeError as exc:
            await abort(context, malformed(request_class, exc))
        return await method(request, context)

    return handler


def add_to_server(service: RecommenderService, server: grpc.aio.Server) -> None:
    """Register ``service`` as the generated ``add_RecommenderServiceServicer_to_server`` does,
    but with every handler taking the request's bytes: BatchPredict decodes them itself
    (:meth:`RecommenderService.batch_predict_bytes`), the others parse them with protobuf
    (:func:`_parsed`), and bytes that do not parse are ``INVALID_ARGUMENT`` for all of them.

    Built from the service descriptor, so an RPC added to the proto is registered here too.
    """
    descriptor = pb.DESCRIPTOR.services_by_name["RecommenderService"]
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in descriptor.methods:
        request_class = getattr(pb, method.input_type.name)
        if method.name == "BatchPredict":
            behaviour = service.batch_predict_bytes
        else:
            behaviour = _parsed(getattr(service, method.name), request_class)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            behaviour,
            request_deserializer=None,  # the bytes as received
            response_serializer=_serialized,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    # As generated code does since grpcio 1.63 (grpc-stubs predates the method).
    server.add_registered_method_handlers(SERVICE_NAME, handlers)  # type: ignore[attr-defined]


def _serialized(response: bytes | Message) -> bytes:
    """A response as bytes: BatchPredict's decoded answers already are."""
    return response if isinstance(response, bytes) else response.SerializeToString()
