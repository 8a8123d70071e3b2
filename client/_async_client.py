"""``AsyncRecommenderClient``: the asyncio client on ``grpc.aio``, with the blocking client's API.

Each method does what the :class:`~mfserve.client.RecommenderClient` method of the same name does
(same arguments, same results, same errors); only the I/O differs, so the docstrings here are short.
Create the client inside a running event loop: a ``grpc.aio`` channel belongs to the loop it was
made in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc

from mfserve.v1 import recommender_pb2 as pb
from mfserve.v1 import recommender_pb2_grpc as pb_grpc

from . import _models, _protos, _requests
from ._config import (
    DEFAULT_MAX_BATCH_BYTES,
    DEFAULT_MAX_BATCH_PAIRS,
    RetryPolicy,
    TlsOption,
    client_settings,
)
from ._exceptions import MfserveError, translate_errors
from ._models import BatchPrediction, HealthStatus, ModelInfo, Prediction, TopKResult
from ._requests import IdsLike


class AsyncRecommenderClient:
    """An asyncio client for ``mfserve.v1.RecommenderService``; see :class:`RecommenderClient`.

    Use ``async with AsyncRecommenderClient(target) as client:`` or ``await client.close()``.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = 10.0,
        tls: TlsOption = False,
        token: str | None = None,
        metadata: Sequence[tuple[str, str]] | Mapping[str, str] = (),
        retries: int | RetryPolicy = 4,
        wait_for_ready: bool = False,
        options: Sequence[tuple[str, Any]] = (),
        max_batch_pairs: int = DEFAULT_MAX_BATCH_PAIRS,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        self._settings = client_settings(
            target,
            timeout=timeout,
            tls=tls,
            token=token,
            metadata=metadata,
            retries=retries,
            wait_for_ready=wait_for_ready,
            options=options,
            max_batch_pairs=max_batch_pairs,
            max_batch_bytes=max_batch_bytes,
            own_channel=channel is None,
        )
        settings = self._settings
        self._owns_channel = channel is None
        if channel is not None:
            self._channel = channel
        elif settings.credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=settings.options)
        else:
            self._channel = grpc.aio.secure_channel(
                target, settings.credentials, options=settings.options
            )
        self._stub: Any = pb_grpc.RecommenderServiceStub(self._channel)
        self._health_check, self._health_watch = _protos.health_methods(self._channel)

    # ------------------------------------------------------------------ plumbing
    @property
    def target(self) -> str:
        return self._settings.target

    @property
    def channel(self) -> grpc.aio.Channel:
        """The underlying ``grpc.aio`` channel."""
        return self._channel

    @property
    def stub(self) -> Any:
        """The generated stub on the aio channel (no default deadline, plain ``grpc.RpcError``)."""
        return self._stub

    def _timeout(self, timeout: float | None) -> float | None:
        return self._settings.timeout if timeout is None else timeout

    async def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        with translate_errors():
            return await method(request, timeout=timeout, metadata=self._settings.metadata)

    async def close(self) -> None:
        """Close the channel (unless it was passed in); calls in flight are cancelled."""
        if self._owns_channel:
            await self._channel.close(None)

    async def __aenter__(self) -> AsyncRecommenderClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r})"

    # ------------------------------------------------------------------ RPCs
    async def predict(
        self,
        user_id: object,
        item_id: object,
        *,
        allow_cold_start: bool = False,
        timeout: float | None = None,
    ) -> Prediction:
        """See :meth:`RecommenderClient.predict`."""
        request = _requests.predict_request(user_id, item_id, allow_cold_start)
        response = await self._call(self._stub.Predict, request, self._timeout(timeout))
        return _models.prediction(request.user_id, request.item_id, response)

    async def batch_predict(
        self,
        user_ids: IdsLike,
        item_ids: IdsLike,
        *,
        allow_cold_start: bool = False,
        batch_size: int | None = None,
        timeout: float | None = None,
    ) -> BatchPrediction:
        """See :meth:`RecommenderClient.batch_predict` (chunks are sent one after another)."""
        requests = _requests.batch_requests(
            user_ids,
            item_ids,
            allow_cold_start=allow_cold_start,
            max_pairs=self._settings.max_batch_pairs if batch_size is None else batch_size,
            max_bytes=self._settings.max_batch_bytes,
        )
        deadline = _requests.Deadline(self._timeout(timeout))
        responses = [
            await self._call(self._stub.BatchPredict, request, deadline.remaining())
            for request in requests
        ]
        return _models.batch_prediction(responses)

    async def top_k(
        self,
        user_id: object,
        k: int = 10,
        *,
        exclude_seen: bool = True,
        exclude_item_ids: IdsLike = (),
        candidate_item_ids: IdsLike = (),
        include_metadata: bool = False,
        allow_cold_start: bool = False,
        timeout: float | None = None,
    ) -> TopKResult:
        """See :meth:`RecommenderClient.top_k`."""
        request = _requests.top_k_request(
            user_id,
            k,
            exclude_seen=exclude_seen,
            exclude_item_ids=exclude_item_ids,
            candidate_item_ids=candidate_item_ids,
            include_metadata=include_metadata,
            allow_cold_start=allow_cold_start,
        )
        response = await self._call(self._stub.TopK, request, self._timeout(timeout))
        return _models.top_k_result(response)

    async def similar_items(
        self,
        item_id: object,
        k: int = 10,
        *,
        exclude_item_ids: IdsLike = (),
        candidate_item_ids: IdsLike = (),
        include_metadata: bool = False,
        timeout: float | None = None,
    ) -> TopKResult:
        """See :meth:`RecommenderClient.similar_items`."""
        request = _requests.similar_items_request(
            item_id,
            k,
            exclude_item_ids=exclude_item_ids,
            candidate_item_ids=candidate_item_ids,
            include_metadata=include_metadata,
        )
        response = await self._call(self._stub.SimilarItems, request, self._timeout(timeout))
        return _models.top_k_result(response)

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """See :meth:`RecommenderClient.model_info`."""
        request = pb.GetModelInfoRequest()
        response = await self._call(self._stub.GetModelInfo, request, self._timeout(timeout))
        return _models.model_info(response)

    async def health(self, service: str = "", *, timeout: float | None = None) -> HealthStatus:
        """See :meth:`RecommenderClient.health`."""
        request = _protos.HealthCheckRequest(service=service)
        response = await self._call(self._health_check, request, self._timeout(timeout))
        return _models.health_status(response)

    async def wait_until_ready(self, timeout: float | None = None, *, service: str = "") -> None:
        """See :meth:`RecommenderClient.wait_until_ready`."""
        request = _protos.HealthCheckRequest(service=service)
        with translate_errors():
            call = self._health_watch(
                request,
                timeout=self._timeout(timeout),
                metadata=self._settings.metadata,
                wait_for_ready=True,
            )
            try:
                async for response in call:
                    if _models.health_status(response) is HealthStatus.SERVING:
                        return
            finally:
                call.cancel()
        raise MfserveError(f"the health watch of {service!r} ended before the server was SERVING")
