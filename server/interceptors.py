"""Server interceptors: cross-cutting concerns kept out of the servicer.

The access log and the Prometheus call metrics live here; bearer tokens are checked by the
interceptor in ``mfserve.server.auth``, installed after these so that they count its refusals.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import grpc

from mfserve.server import metrics

access_log = logging.getLogger("mfserve.access")
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


def _final_code(context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None) -> str:
    """The status name a call ended with, as the client sees it."""
    if error is None:
        return "OK"
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(error, (grpc.aio.AbortError, grpc.RpcError)):
        return "UNKNOWN"
    # An exception that escaped every handler (the servicer turns its own into INTERNAL), or a
    # cancellation by the client / a deadline.
    return "CANCELLED" if isinstance(error, asyncio.CancelledError) else "UNKNOWN"


class AccessLogInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """One log line per unary RPC: ``access: /mfserve.v1.RecommenderService/TopK OK 0.42ms peer``.

    Streaming RPCs (health Watch, reflection) pass through unlogged: they are long-lived and their
    duration says nothing about the service.
    """

    def __init__(self, logger: logging.Logger = access_log) -> None:
        self._log = logger

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method
        behaviour = handler.unary_unary
        logger = self._log

        async def logged(request: Any, context: Any) -> Any:
            start = time.perf_counter()
            error: BaseException | None = None
            try:
                return await behaviour(request, context)
            except BaseException as exc:
                error = exc
                raise
            finally:
                elapsed_ms = (time.perf_counter() - start) * 1000.0
                code, peer = _final_code(context, error), context.peer()
                # The fields again as fields, for --log-format json; the text line is unchanged.
                fields = {"method": method, "code": code, "ms": round(elapsed_ms, 3), "peer": peer}
                logger.info("access: %s %s %.2fms %s", method, code, elapsed_ms, peer, extra=fields)

        return _with_behaviour(handler, logged)


class MetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """``mfserve_rpcs_total{method, code}``, ``mfserve_rpc_duration_seconds{method}`` and
    ``mfserve_rpcs_in_flight`` for the unary calls of ``service`` (``method``: the bare name,
    ``TopK``). Health checks and reflection are left out: a load balancer's probes would swamp
    the counts and the latency of the calls users make. Installed only with ``--metrics-port``.
    """

    def __init__(self, service: str) -> None:
        metrics.enable()
        self._prefix = f"/{service}/"
        # method -> (the handler grpc found, its wrapped one): grpc looks the handler up per call,
        # and it is the same object every time, so the wrapper is built once per method.
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        if handler is None or handler.unary_unary is None or not method.startswith(self._prefix):
            return handler
        wrapped = self._wrap(handler, method[len(self._prefix) :])
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    @staticmethod
    def _wrap(handler: Handler, name: str) -> Handler:
        behaviour = handler.unary_unary
        assert behaviour is not None
        in_flight, duration, calls = metrics.rpc_recorders(name)
        ok = calls("OK")
        perf_counter = time.perf_counter

        async def measured(request: Any, context: Any) -> Any:
            start = perf_counter()
            in_flight.inc()
            try:
                response = await behaviour(request, context)
            except BaseException as exc:
                calls(_final_code(context, exc)).inc()
                raise
            else:
                ok.inc()
                return response
            finally:
                in_flight.dec()
                duration.observe(perf_counter() - start)

        return _with_behaviour(handler, measured)


def _with_behaviour(handler: Handler, behaviour: Callable[[Any, Any], Awaitable[Any]]) -> Handler:
    """``handler`` with its unary behaviour replaced, keeping how it reads and writes messages."""
    return grpc.unary_unary_rpc_method_handler(
        behaviour,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
