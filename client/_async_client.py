"""``AsyncRecommenderClient``: the asyncio client on ``grpc.aio``, with the blocking client's API.

Each method does what the :class:`~mfserve.client.RecommenderClient` method of the same name does
(same arguments, same results, same errors); only the I/O differs, so the docstrings here are short.
Create the client inside a running event loop: a ``grpc.aio`` channel belongs to the loop it was
made in.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from types import TracebackType
from typing import TypeVar

import grpc

from ._base import BaseClient, Call, is_serving, watch_ended
from ._config import BATCH_TOP_K_USERS, ClientSettings
from ._exceptions import translate_errors_async
from ._models import (
    BatchPrediction,
    HealthStatus,
    ModelInfo,
    Prediction,
    ReloadResult,
    TopKResult,
    batch_prediction,
)
from ._requests import IdsLike, InteractionsLike

T = TypeVar("T")


class AsyncRecommenderClient(BaseClient[grpc.aio.Channel]):
    """An asyncio client for ``mfserve.v1.RecommenderService``; see :class:`RecommenderClient`.

    Use ``async with AsyncRecommenderClient(target) as client:`` or ``await client.close()``.
    """

    def _open_channel(self, settings: ClientSettings) -> grpc.aio.Channel:
        if settings.credentials is None:
            return grpc.aio.insecure_channel(settings.target, options=settings.options)
        return grpc.aio.secure_channel(
            settings.target, settings.credentials, options=settings.options
        )

    async def _send(self, call: Call[T]) -> T:
        async with translate_errors_async(self._settings.connection):
            response = await call.method(
                call.request, timeout=call.timeout, metadata=self._settings.metadata
            )
        return call.result(response)

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

    # ------------------------------------------------------------------ RPCs
    async def predict(
        self,
        user_id: object | None,
        item_id: object,
        *,
        interactions: InteractionsLike | None = None,
        allow_cold_start: bool = False,
        timeout: float | None = None,
    ) -> Prediction:
        """See :meth:`RecommenderClient.predict`."""
        call = self._predict(user_id, item_id, allow_cold_start, timeout, interactions)
        return await self._send(call)

    async def batch_predict(
        self,
        user_ids: IdsLike,
        item_ids: IdsLike,
        *,
        interactions: InteractionsLike | None = None,
        allow_cold_start: bool = False,
        batch_size: int | None = None,
        timeout: float | None = None,
    ) -> BatchPrediction:
        """See :meth:`RecommenderClient.batch_predict` (chunks are sent one after another)."""
        calls = self._batch_predict(
            user_ids,
            item_ids,
            allow_cold_start=allow_cold_start,
            batch_size=batch_size,
            timeout=timeout,
            interactions=interactions,
        )
        return batch_prediction([await self._send(call) for call in calls])

    async def top_k(
        self,
        user_id: object | None = None,
        k: int = 10,
        *,
        interactions: InteractionsLike | None = None,
        exclude_seen: bool = True,
        exclude_item_ids: IdsLike = (),
        candidate_item_ids: IdsLike = (),
        include_metadata: bool = False,
        allow_cold_start: bool = False,
        diversity: float = 0.0,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> TopKResult:
        """See :meth:`RecommenderClient.top_k`."""
        call = self._top_k(
            user_id,
            k,
            exclude_seen=exclude_seen,
            exclude_item_ids=exclude_item_ids,
            candidate_item_ids=candidate_item_ids,
            include_metadata=include_metadata,
            allow_cold_start=allow_cold_start,
            timeout=timeout,
            interactions=interactions,
            page_size=page_size,
            page_token=page_token,
            diversity=diversity,
        )
        return await self._send(call)

    async def batch_top_k(
        self,
        user_ids: IdsLike = (),
        k: int = 10,
        *,
        interactions: Iterable[InteractionsLike | None] | None = None,
        exclude_seen: bool = True,
        include_metadata: bool = False,
        allow_cold_start: bool = False,
        diversity: float = 0.0,
        batch_size: int = BATCH_TOP_K_USERS,
        timeout: float | None = None,
    ) -> AsyncIterator[TopKResult]:
        """See :meth:`RecommenderClient.batch_top_k`: ``async for result in ...``."""
        calls = self._batch_top_k(
            user_ids,
            interactions,
            batch_size=batch_size,
            timeout=timeout,
            k=k,
            exclude_seen=exclude_seen,
            include_metadata=include_metadata,
            allow_cold_start=allow_cold_start,
            diversity=diversity,
        )
        for call in calls:
            async with translate_errors_async(self._settings.connection):
                stream = call.method(
                    call.request, timeout=call.timeout, metadata=self._settings.metadata
                )
                try:
                    async for response in stream:
                        yield call.result(response)
                finally:  # a reader that stops early ends the stream: the server stops too
                    stream.cancel()

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
        call = self._similar_items(
            item_id,
            k,
            exclude_item_ids=exclude_item_ids,
            candidate_item_ids=candidate_item_ids,
            include_metadata=include_metadata,
            timeout=timeout,
        )
        return await self._send(call)

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """See :meth:`RecommenderClient.model_info`."""
        return await self._send(self._model_info(timeout))

    async def reload_model(
        self, version: int | None = None, *, timeout: float | None = None
    ) -> ReloadResult:
        """See :meth:`RecommenderClient.reload_model`."""
        return await self._send(self._reload_model(version, timeout))

    async def health(self, service: str = "", *, timeout: float | None = None) -> HealthStatus:
        """See :meth:`RecommenderClient.health`."""
        return await self._send(self._health(service, timeout))

    async def wait_until_ready(self, timeout: float | None = None, *, service: str = "") -> None:
        """See :meth:`RecommenderClient.wait_until_ready`."""
        async with translate_errors_async(self._settings.connection):
            call = self._watch_health(service, timeout)
            try:
                async for response in call:
                    if is_serving(response):
                        return
            finally:
                call.cancel()
        raise watch_ended(service)
