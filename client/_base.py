"""``BaseClient``: everything the blocking and asyncio clients share, as httpx's ``BaseClient``.

The constructor (checking and resolving the configuration, opening or adopting the channel), the
plumbing properties, and every call the clients make, built as a :class:`Call` here, so both send
the same bytes with the same deadline and metadata and read the answer the same way. A subclass
adds only the I/O: how to open its kind of channel and how to send a :class:`Call` (``_send``,
plain in :class:`~mfserve.client.RecommenderClient`, awaited in the async one), plus the methods
that must be written twice because one kind is a coroutine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc

from mfserve.v1 import recommender_pb2 as pb
from mfserve.v1 import recommender_pb2_grpc as pb_grpc

from . import _models, _protos, _requests
from ._config import (
    DEFAULT_MAX_BATCH_BYTES,
    DEFAULT_MAX_BATCH_PAIRS,
    ClientSettings,
    RetryPolicy,
    client_settings,
)
from ._exceptions import MfserveError
from ._models import HealthStatus, ModelInfo, Prediction, ReloadResult, TopKResult
from ._requests import IdsLike, InteractionsLike, ids_list, interactions_list
from ._tls import TlsOption

ChannelT = TypeVar("ChannelT", grpc.Channel, grpc.aio.Channel)
ResultT = TypeVar("ResultT")


def _raw(response: Any) -> Any:
    return response


def _user(user_id: object) -> str:
    """A user id for the wire; None is no user (a call that folds its user in)."""
    return "" if user_id is None else str(user_id)


@dataclass(frozen=True)
class Call(Generic[ResultT]):
    """One unary call, ready to send: the stub method, its request and deadline, and how to turn
    its response into the typed result."""

    method: Any
    request: Any
    timeout: float | None
    result: Callable[[Any], ResultT]


class BaseClient(Generic[ChannelT]):
    """The shared part of both clients; see :class:`~mfserve.client.RecommenderClient`."""

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
        channel: ChannelT | None = None,
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
        self._owns_channel = channel is None
        self._channel: ChannelT = self._open_channel(self._settings) if channel is None else channel
        self._stub: Any = pb_grpc.RecommenderServiceStub(self._channel)
        self._health_check, self._health_watch = _protos.health_methods(self._channel)

    def _open_channel(self, settings: ClientSettings) -> ChannelT:
        """A new channel to ``settings.target``, secure when ``settings.credentials`` is set."""
        raise NotImplementedError

    # ------------------------------------------------------------------ plumbing
    @property
    def target(self) -> str:
        return self._settings.target

    @property
    def channel(self) -> ChannelT:
        """The underlying channel (``grpc.aio`` for the async client), e.g. for other services on
        the same server."""
        return self._channel

    @property
    def stub(self) -> Any:
        """The generated ``RecommenderServiceStub``, for what the client does not wrap.

        Raw stub calls get the channel's retry policy but no default deadline and raise plain
        ``grpc.RpcError``.
        """
        return self._stub

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r})"

    def _timeout(self, timeout: float | None) -> float | None:
        return self._settings.timeout if timeout is None else timeout

    # ------------------------------------------------------------------ calls
    def _predict(
        self,
        user_id: object,
        item_id: object,
        allow_cold_start: bool,
        timeout: float | None,
        interactions: InteractionsLike | None = None,
    ) -> Call[Prediction]:
        request = pb.PredictRequest(
            user_id=_user(user_id),
            item_id=str(item_id),
            allow_cold_start=allow_cold_start,
            interactions=interactions_list(interactions),
        )

        def result(response: Any) -> Prediction:
            return _models.prediction(request.user_id, request.item_id, response)

        return Call(self._stub.Predict, request, self._timeout(timeout), result)

    def _batch_predict(
        self,
        user_ids: IdsLike,
        item_ids: IdsLike,
        *,
        allow_cold_start: bool,
        batch_size: int | None,
        timeout: float | None,
        interactions: InteractionsLike | None = None,
    ) -> Iterator[Call[Any]]:
        """One call per chunk, each given what is left of one shared deadline when it is sent.

        The requests are built (and mismatched lengths refused) here, before anything is sent;
        the generator makes each call's timeout as the previous one has come back.
        """
        requests = _requests.batch_requests(
            user_ids,
            item_ids,
            allow_cold_start=allow_cold_start,
            max_pairs=self._settings.max_batch_pairs if batch_size is None else batch_size,
            max_bytes=self._settings.max_batch_bytes,
            interactions=interactions_list(interactions),
        )
        deadline = _requests.Deadline(self._timeout(timeout))
        return (Call(self._stub.BatchPredict, r, deadline.remaining(), _raw) for r in requests)

    def _top_k(
        self,
        user_id: object,
        k: int,
        *,
        exclude_seen: bool,
        exclude_item_ids: IdsLike,
        candidate_item_ids: IdsLike,
        include_metadata: bool,
        allow_cold_start: bool,
        timeout: float | None,
        interactions: InteractionsLike | None = None,
        page_size: int = 0,
        page_token: str = "",
        diversity: float = 0.0,
    ) -> Call[TopKResult]:
        request = pb.TopKRequest(
            user_id=_user(user_id),
            k=k,
            exclude_seen=exclude_seen,
            exclude_item_ids=ids_list(exclude_item_ids, "exclude_item_ids"),
            candidate_item_ids=ids_list(candidate_item_ids, "candidate_item_ids"),
            include_metadata=include_metadata,
            allow_cold_start=allow_cold_start,
            interactions=interactions_list(interactions),
            page_size=page_size,
            page_token=page_token,
            diversity=diversity,
        )
        return Call(self._stub.TopK, request, self._timeout(timeout), _models.top_k_result)

    def _batch_top_k(
        self,
        user_ids: IdsLike,
        interactions: Iterable[InteractionsLike | None] | None,
        *,
        batch_size: int,
        timeout: float | None,
        **options: Any,
    ) -> Iterator[Call[Any]]:
        """One ``BatchTopK`` stream per ``batch_size`` users, built as the previous one ends; each
        stream gets the whole ``timeout``."""
        for request in _requests.batch_top_k_requests(
            user_ids, interactions, batch_size=batch_size, **options
        ):
            yield Call(self._stub.BatchTopK, request, self._timeout(timeout), _models.top_k_result)

    def _similar_items(
        self,
        item_id: object,
        k: int,
        *,
        exclude_item_ids: IdsLike,
        candidate_item_ids: IdsLike,
        include_metadata: bool,
        timeout: float | None,
    ) -> Call[TopKResult]:
        request = pb.SimilarItemsRequest(
            item_id=str(item_id),
            k=k,
            exclude_item_ids=ids_list(exclude_item_ids, "exclude_item_ids"),
            candidate_item_ids=ids_list(candidate_item_ids, "candidate_item_ids"),
            include_metadata=include_metadata,
        )
        return Call(self._stub.SimilarItems, request, self._timeout(timeout), _models.top_k_result)

    def _model_info(self, timeout: float | None) -> Call[ModelInfo]:
        request = pb.GetModelInfoRequest()
        return Call(self._stub.GetModelInfo, request, self._timeout(timeout), _models.model_info)

    def _reload_model(self, version: int | None, timeout: float | None) -> Call[ReloadResult]:
        request = pb.ReloadModelRequest(version=version or 0)
        return Call(self._stub.ReloadModel, request, self._timeout(timeout), _models.reload_result)

    def _health(self, service: str, timeout: float | None) -> Call[HealthStatus]:
        request = _protos.HealthCheckRequest(service=service)
        return Call(self._health_check, request, self._timeout(timeout), _models.health_status)

    def _watch_health(self, service: str, timeout: float | None) -> Any:
        """The started health ``Watch`` stream: it waits for the connection (``wait_for_ready``)
        and yields each status change; iterate it (``for`` or ``async for``), then cancel it."""
        return self._health_watch(
            _protos.HealthCheckRequest(service=service),
            timeout=self._timeout(timeout),
            metadata=self._settings.metadata,
            wait_for_ready=True,
        )


def is_serving(response: Any) -> bool:
    """Whether a health ``Watch`` answer says ``SERVING`` (what ``wait_until_ready`` waits for)."""
    return _models.health_status(response) is HealthStatus.SERVING


def watch_ended(service: str) -> MfserveError:
    """The error for a health watch the server ended before it said ``SERVING``."""
    return MfserveError(f"the health watch of {service!r} ended before the server was SERVING")
