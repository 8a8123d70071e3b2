"""Typed, immutable results: what the client returns instead of protobuf messages.

Protobuf messages are mutable, untyped for most checkers, and tie user code to the wire format;
these dataclasses are frozen, fully typed, and cheap to build (one pass over a response). Scores
and ratings are float32 on the wire, so they print like ``3.609999895095825``; round for display.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, overload


class HealthStatus(str, enum.Enum):
    """A ``grpc.health.v1`` serving status (a ``str``, so it compares equal to its name)."""

    UNKNOWN = "UNKNOWN"
    SERVING = "SERVING"
    NOT_SERVING = "NOT_SERVING"
    SERVICE_UNKNOWN = "SERVICE_UNKNOWN"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Prediction:
    """A predicted rating for one (user, item) pair.

    With ``allow_cold_start=True`` an unknown user or item gets a bias-only estimate and is
    listed in ``missing_user_ids`` / ``missing_item_ids``; ``cold_start`` says whether it did.
    """

    user_id: str
    item_id: str
    rating: float
    model_version: int
    missing_user_ids: tuple[str, ...] = ()
    missing_item_ids: tuple[str, ...] = ()

    @property
    def cold_start(self) -> bool:
        """Whether the answer is a cold-start estimate (an id was unknown)."""
        return bool(self.missing_user_ids or self.missing_item_ids)


@dataclass(frozen=True)
class BatchPrediction(Sequence[float]):
    """Ratings for many pairs, in request order; indexable and iterable like the ratings.

    A batch larger than the server's limit is sent in several calls; if the model was reloaded
    between them, ``model_versions`` lists each call's version (in order) and ``model_version`` is
    the first. ``missing_*_ids`` are the distinct unknown ids (only with ``allow_cold_start``).
    """

    ratings: tuple[float, ...]
    model_version: int
    missing_user_ids: tuple[str, ...] = ()
    missing_item_ids: tuple[str, ...] = ()
    model_versions: tuple[int, ...] = ()

    @property
    def cold_start(self) -> bool:
        """Whether any pair got a cold-start estimate."""
        return bool(self.missing_user_ids or self.missing_item_ids)

    @overload
    def __getitem__(self, index: int) -> float: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[float, ...]: ...
    def __getitem__(self, index: int | slice) -> float | tuple[float, ...]:
        return self.ratings[index]

    def __len__(self) -> int:
        return len(self.ratings)

    def __iter__(self) -> Iterator[float]:
        return iter(self.ratings)


@dataclass(frozen=True)
class Interaction:
    """Something a user did, sent with a call so the server folds the user in: the item, and
    optionally the user's rating of it and how much it counts (default 1, as one training
    rating). Calls also take plain ``item_id`` strings and ``(item_id, rating)`` or
    ``(item_id, rating, weight)`` tuples."""

    item_id: str
    rating: float | None = None
    weight: float | None = None


@dataclass(frozen=True)
class Recommendation:
    """One ranked item. ``score``: the model's ranking score (``top_k``) or cosine similarity
    (``similar_items``); ``rank`` is 1-based. ``title`` / ``genres`` are filled only with
    ``include_metadata=True`` and when the model knows them."""

    item_id: str
    score: float
    rank: int
    title: str = ""
    genres: tuple[str, ...] = ()


@dataclass(frozen=True)
class TopKResult(Sequence[Recommendation]):
    """Ranked items, best first, from ``top_k`` or ``similar_items``; a sequence of them.

    With ``top_k(..., allow_cold_start=True)``, ``missing_user_ids`` holds the user when the model
    did not know it and ``missing_item_ids`` the unknown ``candidate_item_ids`` (skipped), as
    ``Prediction`` and ``BatchPrediction`` report them; both are always empty for similar items.
    ``missing_ids`` is deprecated (it mixes users and items, which may share an id): the user
    first, then the items; kept for one release, as on the wire. A user folded in from
    ``interactions`` is listed in ``missing_user_ids`` when the model does not know the id, and
    the interaction items it does not know (skipped) in ``missing_item_ids``.
    ``next_page_token``: with ``page_size``, the token of the next page ("" after the last).
    """

    items: tuple[Recommendation, ...]
    model_version: int
    missing_ids: tuple[str, ...] = ()
    missing_user_ids: tuple[str, ...] = ()
    missing_item_ids: tuple[str, ...] = ()
    next_page_token: str = ""

    @property
    def cold_start(self) -> bool:
        """Whether the answer is a cold-start one (the user or a candidate item was unknown)."""
        # missing_ids too: a server from before the split fills only that.
        return bool(self.missing_user_ids or self.missing_item_ids or self.missing_ids)

    @property
    def item_ids(self) -> list[str]:
        """The item ids, best first."""
        return [item.item_id for item in self.items]

    @overload
    def __getitem__(self, index: int) -> Recommendation: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[Recommendation, ...]: ...
    def __getitem__(self, index: int | slice) -> Recommendation | tuple[Recommendation, ...]:
        return self.items[index]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Recommendation]:
        return iter(self.items)


@dataclass(frozen=True)
class ModelInfo:
    """What the server says about the model it serves (``GetModelInfo``)."""

    model_name: str
    model_version: int
    create_time: datetime | None
    factors: int
    rank_factors: int
    user_count: int
    item_count: int
    rating_count: int
    rating_min: float
    rating_max: float
    format_version: int
    dataset_fingerprint: str
    metrics: Mapping[str, float] = field(default_factory=dict)
    hyperparameters: Mapping[str, str] = field(default_factory=dict)
    # The last hot-reload attempt (None / 0 / "" before the first): when it ended, the version it
    # tried, and why it was refused ("" when it succeeded).
    last_reload_time: datetime | None = None
    last_reload_version: int = 0
    last_reload_error: str = ""
    # Why the server cannot read its model folder now ("" when it can); it keeps serving.
    model_folder_error: str = ""


@dataclass(frozen=True)
class ReloadResult:
    """What ``reload_model`` did: the version serving now, and whether it changed."""

    model_version: int
    changed: bool


# --------------------------------------------------------------------------- from protobuf
# The generated message classes are untyped (``Any``) for mypy; these functions are where the
# untyped world ends.


def prediction(user_id: str, item_id: str, response: Any) -> Prediction:
    return Prediction(
        user_id=user_id,
        item_id=item_id,
        rating=float(response.rating),
        model_version=int(response.model_version),
        missing_user_ids=tuple(response.missing_user_ids),
        missing_item_ids=tuple(response.missing_item_ids),
    )


def batch_prediction(responses: Sequence[Any]) -> BatchPrediction:
    """Join the answers of the calls one batch was split into, in order."""
    ratings: list[float] = []
    missing_users: dict[str, None] = {}
    missing_items: dict[str, None] = {}
    versions: list[int] = []
    for response in responses:
        ratings.extend(response.ratings)
        missing_users.update(dict.fromkeys(response.missing_user_ids))
        missing_items.update(dict.fromkeys(response.missing_item_ids))
        versions.append(int(response.model_version))
    return BatchPrediction(
        ratings=tuple(ratings),
        model_version=versions[0] if versions else 0,
        missing_user_ids=tuple(missing_users),
        missing_item_ids=tuple(missing_items),
        model_versions=tuple(versions),
    )


def top_k_result(response: Any) -> TopKResult:
    items = tuple(
        Recommendation(
            item_id=str(item.item_id),
            score=float(item.score),
            rank=int(item.rank),
            title=str(item.title),
            genres=tuple(item.genres),
        )
        for item in response.items
    )
    # SimilarItemsResponse has none of the missing fields: it never answers for unknown ids.
    users = tuple(getattr(response, "missing_user_ids", ()))
    unknown_items = tuple(getattr(response, "missing_item_ids", ()))
    return TopKResult(
        items=items,
        model_version=int(response.model_version),
        missing_ids=tuple(getattr(response, "missing_ids", ())),
        missing_user_ids=users,
        missing_item_ids=unknown_items,
        next_page_token=str(getattr(response, "next_page_token", "")),
    )


def model_info(response: Any) -> ModelInfo:
    created = (
        response.create_time.ToDatetime(tzinfo=timezone.utc)
        if response.HasField("create_time")
        else None
    )
    return ModelInfo(
        model_name=str(response.model_name),
        model_version=int(response.model_version),
        create_time=created,
        factors=int(response.factors),
        rank_factors=int(response.rank_factors),
        user_count=int(response.user_count),
        item_count=int(response.item_count),
        rating_count=int(response.rating_count),
        rating_min=float(response.rating_min),
        rating_max=float(response.rating_max),
        format_version=int(response.format_version),
        dataset_fingerprint=str(response.dataset_fingerprint),
        metrics={str(k): float(v) for k, v in sorted(response.metrics.items())},
        hyperparameters={str(k): str(v) for k, v in sorted(response.hyperparameters.items())},
        last_reload_time=(
            response.last_reload_time.ToDatetime(tzinfo=timezone.utc)
            if response.HasField("last_reload_time")
            else None
        ),
        last_reload_version=int(response.last_reload_version),
        last_reload_error=str(response.last_reload_error),
        model_folder_error=str(response.model_folder_error),
    )


def reload_result(response: Any) -> ReloadResult:
    return ReloadResult(model_version=int(response.model_version), changed=bool(response.changed))


def health_status(response: Any) -> HealthStatus:
    names = list(HealthStatus)
    index = int(response.status)
    return names[index] if 0 <= index < len(names) else HealthStatus.UNKNOWN
