"""Server interceptors: cross-cutting concerns kept out of the servicer.

The access log lives here; Prometheus metrics and bearer-token auth have the same shape (wrap the
unary handler; look at the method name, the final status, the elapsed time) and slot in beside it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import grpc

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
                logger.info(
                    "access: %s %s %.2fms %s",
                    method,
                    _final_code(context, error),
                    elapsed_ms,
                    context.peer(),
                )

        return grpc.unary_unary_rpc_method_handler(
            logged,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
