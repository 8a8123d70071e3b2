"""``RecommenderClient``: the blocking client over one gRPC channel."""

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


class RecommenderClient:
    """A blocking client for ``mfserve.v1.RecommenderService``; thread-safe, one channel.

    ``target`` is a gRPC target: ``host:port``, ``dns:///host:port`` (several addresses are used
    round-robin), ``unix:/path``. Create one client and share it: a channel is a connection pool.

    ``timeout`` (seconds, None for none) is every call's deadline unless the call passes its own;
    retries of ``UNAVAILABLE`` happen inside that deadline. ``tls``: False, True (system roots), a
    CA-certificate PEM path, or ``grpc.ChannelCredentials``. ``token`` is sent as ``authorization:
    Bearer ...`` and refused over plaintext unless the target is this machine. ``retries``: the
    attempts per call for ``UNAVAILABLE`` (1 disables) or a :class:`RetryPolicy`.
    ``wait_for_ready``: calls wait (within their deadline) for a server to come up instead of
    failing fast with ``UNAVAILABLE``. ``options`` are extra gRPC channel options, overriding ours.
    ``max_batch_pairs`` / ``max_batch_bytes``: the largest ``BatchPredict`` call sent (bigger
    batches are split). ``channel``: use this channel instead of making one (``tls``, ``options``
    and ``retries`` then do not apply, and :meth:`close` leaves it open).

    Methods raise :class:`~mfserve.client.MfserveError` subclasses, never ``grpc.RpcError``.
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
        channel: grpc.Channel | None = None,
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
            self._channel = grpc.insecure_channel(target, options=settings.options)
        else:
            self._channel = grpc.secure_channel(
                target, settings.credentials, options=settings.options
            )
        self._stub: Any = pb_grpc.RecommenderServiceStub(self._channel)
        self._health_check, self._health_watch = _protos.health_methods(self._channel)

    # ------------------------------------------------------------------ plumbing
    @property
    def target(self) -> str:
        return self._settings.target

    @property
    def channel(self) -> grpc.Channel:
        """The underlying channel, e.g. for other services on the same server."""
        return self._channel

    @property
    def stub(self) -> Any:
        """The generated ``RecommenderServiceStub``, for what the client does not wrap.

        Raw stub calls get the channel's retry policy but no default deadline and raise plain
        ``grpc.RpcError``.
        """
        return self._stub

    def _timeout(self, timeout: float | None) -> float | None:
        return self._settings.timeout if timeout is None else timeout

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        with translate_errors():
            return method(request, timeout=timeout, metadata=self._settings.metadata)

    def close(self) -> None:
        """Close the channel (unless it was passed in); calls in flight are cancelled."""
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> RecommenderClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r})"

    # ------------------------------------------------------------------ RPCs
    def predict(
        self,
        user_id: object,
        item_id: object,
        *,
        allow_cold_start: bool = False,
        timeout: float | None = None,
    ) -> Prediction:
        """Predict the rating ``user_id`` would give ``item_id`` (ids are converted with ``str``).

        Unknown ids raise :class:`NotFoundError` unless ``allow_cold_start``, which answers with a
        bias-only estimate and lists them in the result's ``missing_*_ids``.
        """
        request = _requests.predict_request(user_id, item_id, allow_cold_start)
        response = self._call(self._stub.Predict, request, self._timeout(timeout))
        return _models.prediction(request.user_id, request.item_id, response)

    def batch_predict(
        self,
        user_ids: IdsLike,
        item_ids: IdsLike,
        *,
        allow_cold_start: bool = False,
        batch_size: int | None = None,
        timeout: float | None = None,
    ) -> BatchPrediction:
        """Predict ratings for parallel arrays of users and items, in order.

        Accepts lists, tuples, iterables, numpy arrays or pandas Series. A batch over ``batch_size``
        (default: the client's ``max_batch_pairs``) is sent as several calls, one after another,
        sharing one ``timeout``; their answers are joined in order. Mismatched lengths raise
        ``ValueError`` before anything is sent.
        """
        requests = _requests.batch_requests(
            user_ids,
            item_ids,
            allow_cold_start=allow_cold_start,
            max_pairs=self._settings.max_batch_pairs if batch_size is None else batch_size,
            max_bytes=self._settings.max_batch_bytes,
        )
        deadline = _requests.Deadline(self._timeout(timeout))
        responses = [
            self._call(self._stub.BatchPredict, request, deadline.remaining())
            for request in requests
        ]
        return _models.batch_prediction(responses)

    def top_k(
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
        """The ``k`` best items for ``user_id``, best first.

        ``exclude_seen`` drops the items the user rated in training; ``exclude_item_ids`` is a
        deny-list; a non-empty ``candidate_item_ids`` is an allow-list (only those are ranked).
        ``include_metadata`` fills titles and genres. An unknown user raises
        :class:`NotFoundError` unless ``allow_cold_start`` (popular items are returned instead).
        """
        request = _requests.top_k_request(
            user_id,
            k,
            exclude_seen=exclude_seen,
            exclude_item_ids=exclude_item_ids,
            candidate_item_ids=candidate_item_ids,
            include_metadata=include_metadata,
            allow_cold_start=allow_cold_start,
        )
        return _models.top_k_result(self._call(self._stub.TopK, request, self._timeout(timeout)))

    def similar_items(
        self,
        item_id: object,
        k: int = 10,
        *,
        exclude_item_ids: IdsLike = (),
        candidate_item_ids: IdsLike = (),
        include_metadata: bool = False,
        timeout: float | None = None,
    ) -> TopKResult:
        """The ``k`` items most similar to ``item_id`` (cosine similarity), most similar first.

        The item itself is never returned. There is no cold start: an unknown item is
        :class:`NotFoundError`.
        """
        request = _requests.similar_items_request(
            item_id,
            k,
            exclude_item_ids=exclude_item_ids,
            candidate_item_ids=candidate_item_ids,
            include_metadata=include_metadata,
        )
        response = self._call(self._stub.SimilarItems, request, self._timeout(timeout))
        return _models.top_k_result(response)

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """Describe the model the server is serving."""
        response = self._call(
            self._stub.GetModelInfo, pb.GetModelInfoRequest(), self._timeout(timeout)
        )
        return _models.model_info(response)

    def health(self, service: str = "", *, timeout: float | None = None) -> HealthStatus:
        """The server's ``grpc.health.v1`` status for ``service`` ("" = the whole server).

        Returns the status (``SERVING``, ``NOT_SERVING`` while no model is loaded, ...) rather than
        raising for it; a server that cannot be reached raises :class:`UnavailableError`.
        """
        request = _protos.HealthCheckRequest(service=service)
        return _models.health_status(
            self._call(self._health_check, request, self._timeout(timeout))
        )

    def wait_until_ready(self, timeout: float | None = None, *, service: str = "") -> None:
        """Block until the server is up and reports ``SERVING`` (e.g. its model is loaded).

        Watches the health status (one streaming call that waits for the connection), so it
        returns as soon as the server is ready instead of polling. Raises
        :class:`DeadlineExceededError` when ``timeout`` (default: the client's) passes first.
        """
        request = _protos.HealthCheckRequest(service=service)
        with translate_errors():
            call: Any = self._health_watch(
                request,
                timeout=self._timeout(timeout),
                metadata=self._settings.metadata,
                wait_for_ready=True,
            )
            try:
                for response in call:
                    if _models.health_status(response) is HealthStatus.SERVING:
                        return
            finally:
                call.cancel()
        raise MfserveError(f"the health watch of {service!r} ended before the server was SERVING")
