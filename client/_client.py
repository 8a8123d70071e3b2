"""``RecommenderClient``: the blocking client over one gRPC channel.

Everything but the I/O (configuration, the channel's plumbing, the requests) is in ``_base``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any, TypeVar

import grpc

from ._base import BaseClient, Call, is_serving, watch_ended
from ._config import BATCH_TOP_K_USERS, ClientSettings
from ._exceptions import translate_errors
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


class RecommenderClient(BaseClient[grpc.Channel]):
    """A blocking client for ``mfserve.v1.RecommenderService``; thread-safe, one channel.

    ``target`` is a gRPC target: ``host:port``, ``dns:///host:port`` (several addresses are used
    round-robin), ``unix:/path``. Create one client and share it: a channel is a connection pool.

    ``timeout`` (seconds, None for none) is every call's deadline unless the call passes its own;
    retries happen inside that deadline. ``tls``: False, True (system roots), a
    CA-certificate PEM path, a :class:`TlsConfig` (a CA, and a client certificate and key for
    mutual TLS), or ``grpc.ChannelCredentials``. ``token`` is sent as ``authorization:
    Bearer ...`` and refused over plaintext unless the target is this machine. ``retries``: the
    attempts per call for ``UNAVAILABLE`` and ``RESOURCE_EXHAUSTED`` (1 disables) or a
    :class:`RetryPolicy`.
    ``wait_for_ready``: calls wait (within their deadline) for a server to come up instead of
    failing fast with ``UNAVAILABLE``. ``options`` are extra gRPC channel options, overriding ours.
    ``max_batch_pairs`` / ``max_batch_bytes``: the largest ``BatchPredict`` call sent (bigger
    batches are split). ``channel``: use this channel instead of making one (``tls``, ``options``
    and ``retries`` then do not apply, and :meth:`close` leaves it open).

    Methods raise :class:`~mfserve.client.MfserveError` subclasses, never ``grpc.RpcError``; TLS
    settings that do not fit the server (plaintext against TLS or back, a certificate missing or
    not trusted) raise :class:`TlsMismatchError` saying what to change.

    gRPC's C core logs a failed TLS handshake to stderr itself, as raw lines (``I1202 ...
    ssl_transport_security.cc:2563] Handshake failed ...``). This package leaves a host program's
    logging alone: to hide them, set ``GRPC_VERBOSITY=ERROR`` in the environment before ``grpc`` is
    first imported (the ``mfserve`` command does so itself).
    """

    def _open_channel(self, settings: ClientSettings) -> grpc.Channel:
        if settings.credentials is None:
            return grpc.insecure_channel(settings.target, options=settings.options)
        return grpc.secure_channel(settings.target, settings.credentials, options=settings.options)

    def _send(self, call: Call[T]) -> T:
        with translate_errors(self._settings.connection):
            response = call.method(
                call.request, timeout=call.timeout, metadata=self._settings.metadata
            )
        return call.result(response)

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

    # ------------------------------------------------------------------ RPCs
    def predict(
        self,
        user_id: object | None,
        item_id: object,
        *,
        interactions: InteractionsLike | None = None,
        allow_cold_start: bool = False,
        timeout: float | None = None,
    ) -> Prediction:
        """Predict the rating ``user_id`` would give ``item_id`` (ids are converted with ``str``).

        Unknown ids raise :class:`NotFoundError` unless ``allow_cold_start``, which answers with a
        bias-only estimate and lists them in the result's ``missing_*_ids``. ``interactions``
        (item ids, ``(item_id, rating)`` tuples or :class:`Interaction`) fold the user in at call
        time: a user the model has never seen (or ``user_id=None``) is predicted from them, a
        known user's are added to what the model knows; only rated ones move a rating.
        """
        call = self._predict(user_id, item_id, allow_cold_start, timeout, interactions)
        return self._send(call)

    def batch_predict(
        self,
        user_ids: IdsLike,
        item_ids: IdsLike,
        *,
        interactions: InteractionsLike | None = None,
        allow_cold_start: bool = False,
        batch_size: int | None = None,
        timeout: float | None = None,
    ) -> BatchPrediction:
        """Predict ratings for parallel arrays of users and items, in order.

        Accepts lists, tuples, iterables, numpy arrays or pandas Series. A batch over ``batch_size``
        (default: the client's ``max_batch_pairs``) is sent as several calls, one after another,
        sharing one ``timeout``; their answers are joined in order. Mismatched lengths raise
        ``ValueError`` before anything is sent. With ``interactions`` every pair is one user's,
        folded in from them (as in :meth:`predict`): ``user_ids`` then repeats one id (or "").
        """
        calls = self._batch_predict(
            user_ids,
            item_ids,
            allow_cold_start=allow_cold_start,
            batch_size=batch_size,
            timeout=timeout,
            interactions=interactions,
        )
        return batch_prediction([self._send(call) for call in calls])

    def top_k(
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
        """The ``k`` best items for ``user_id``, best first.

        ``exclude_seen`` drops the items the user rated in training; ``exclude_item_ids`` is a
        deny-list; a non-empty ``candidate_item_ids`` is an allow-list (only those are ranked).
        ``include_metadata`` fills titles and genres. An unknown user or candidate raises
        :class:`NotFoundError` unless ``allow_cold_start``: popular items are returned for an
        unknown user, unknown candidates are skipped, and the result's ``missing_user_ids`` /
        ``missing_item_ids`` list them.

        ``interactions`` fold the user in at call time, as in :meth:`predict`
        (``top_k(interactions=[("296", 5.0), ("318", 4.5)])`` for a visitor with no id); the
        interacted items are excluded like seen ones. ``diversity`` in [0, 1] re-ranks for
        variety (maximal marginal relevance). ``page_size`` returns the ``k`` items that many at
        a time: pass the result's ``next_page_token`` as ``page_token`` for the next page.
        """
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
        return self._send(call)

    def batch_top_k(
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
    ) -> Iterator[TopKResult]:
        """:meth:`top_k` for many users, streamed: one result per user, in order, as the server
        computes them (``BatchTopK``). Users are ids, interaction lists (one per anonymous user),
        or both in parallel (``None`` where a user has none). Every ``batch_size`` users are one
        stream; ``timeout`` applies to each. Nothing is sent until the iterator is first read.
        """
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
            with translate_errors(self._settings.connection):
                stream = call.method(
                    call.request, timeout=call.timeout, metadata=self._settings.metadata
                )
                try:
                    for response in stream:
                        yield call.result(response)
                finally:  # a reader that stops early ends the stream: the server stops too
                    stream.cancel()

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
        call = self._similar_items(
            item_id,
            k,
            exclude_item_ids=exclude_item_ids,
            candidate_item_ids=candidate_item_ids,
            include_metadata=include_metadata,
            timeout=timeout,
        )
        return self._send(call)

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """Describe the model the server is serving."""
        return self._send(self._model_info(timeout))

    def reload_model(
        self, version: int | None = None, *, timeout: float | None = None
    ) -> ReloadResult:
        """Hot-reload the served model now: ``version`` (default: the newest in its folder) is
        loaded, verified and swapped in. Raises ``NotFoundError`` for a version the folder does
        not hold, and ``RpcError`` with code ``FAILED_PRECONDITION`` when it is refused (the
        message says why; the version served before keeps serving)."""
        return self._send(self._reload_model(version, timeout))

    def health(self, service: str = "", *, timeout: float | None = None) -> HealthStatus:
        """The server's ``grpc.health.v1`` status for ``service`` ("" = the whole server).

        Returns the status (``SERVING``, ``NOT_SERVING`` while no model is loaded, ...) rather than
        raising for it; a server that cannot be reached raises :class:`UnavailableError`.
        """
        return self._send(self._health(service, timeout))

    def wait_until_ready(self, timeout: float | None = None, *, service: str = "") -> None:
        """Block until the server is up and reports ``SERVING`` (e.g. its model is loaded).

        Watches the health status (one streaming call that waits for the connection), so it
        returns as soon as the server is ready instead of polling. Raises
        :class:`DeadlineExceededError` when ``timeout`` (default: the client's) passes first.
        """
        with translate_errors(self._settings.connection):
            call: Any = self._watch_health(service, timeout)
            try:
                if any(is_serving(response) for response in call):
                    return
            finally:
                call.cancel()
        raise watch_ended(service)
