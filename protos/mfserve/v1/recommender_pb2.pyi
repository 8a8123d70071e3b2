import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Interaction(_message.Message):
    __slots__ = ("item_id", "rating", "weight")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    RATING_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    rating: float
    weight: float
    def __init__(self, item_id: _Optional[str] = ..., rating: _Optional[float] = ..., weight: _Optional[float] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("user_id", "item_id", "allow_cold_start", "interactions")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    ALLOW_COLD_START_FIELD_NUMBER: _ClassVar[int]
    INTERACTIONS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    item_id: str
    allow_cold_start: bool
    interactions: _containers.RepeatedCompositeFieldContainer[Interaction]
    def __init__(self, user_id: _Optional[str] = ..., item_id: _Optional[str] = ..., allow_cold_start: _Optional[bool] = ..., interactions: _Optional[_Iterable[_Union[Interaction, _Mapping]]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("rating", "model_version", "missing_user_ids", "missing_item_ids")
    RATING_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MISSING_USER_IDS_FIELD_NUMBER: _ClassVar[int]
    MISSING_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    rating: float
    model_version: int
    missing_user_ids: _containers.RepeatedScalarFieldContainer[str]
    missing_item_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, rating: _Optional[float] = ..., model_version: _Optional[int] = ..., missing_user_ids: _Optional[_Iterable[str]] = ..., missing_item_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class BatchPredictRequest(_message.Message):
    __slots__ = ("user_ids", "item_ids", "allow_cold_start", "interactions")
    USER_IDS_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    ALLOW_COLD_START_FIELD_NUMBER: _ClassVar[int]
    INTERACTIONS_FIELD_NUMBER: _ClassVar[int]
    user_ids: _containers.RepeatedScalarFieldContainer[str]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    allow_cold_start: bool
    interactions: _containers.RepeatedCompositeFieldContainer[Interaction]
    def __init__(self, user_ids: _Optional[_Iterable[str]] = ..., item_ids: _Optional[_Iterable[str]] = ..., allow_cold_start: _Optional[bool] = ..., interactions: _Optional[_Iterable[_Union[Interaction, _Mapping]]] = ...) -> None: ...

class BatchPredictResponse(_message.Message):
    __slots__ = ("ratings", "model_version", "missing_user_ids", "missing_item_ids")
    RATINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MISSING_USER_IDS_FIELD_NUMBER: _ClassVar[int]
    MISSING_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    ratings: _containers.RepeatedScalarFieldContainer[float]
    model_version: int
    missing_user_ids: _containers.RepeatedScalarFieldContainer[str]
    missing_item_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ratings: _Optional[_Iterable[float]] = ..., model_version: _Optional[int] = ..., missing_user_ids: _Optional[_Iterable[str]] = ..., missing_item_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class TopKRequest(_message.Message):
    __slots__ = ("user_id", "k", "exclude_seen", "exclude_item_ids", "candidate_item_ids", "include_metadata", "allow_cold_start", "interactions", "page_size", "page_token", "diversity")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_SEEN_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_METADATA_FIELD_NUMBER: _ClassVar[int]
    ALLOW_COLD_START_FIELD_NUMBER: _ClassVar[int]
    INTERACTIONS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DIVERSITY_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    k: int
    exclude_seen: bool
    exclude_item_ids: _containers.RepeatedScalarFieldContainer[str]
    candidate_item_ids: _containers.RepeatedScalarFieldContainer[str]
    include_metadata: bool
    allow_cold_start: bool
    interactions: _containers.RepeatedCompositeFieldContainer[Interaction]
    page_size: int
    page_token: str
    diversity: float
    def __init__(self, user_id: _Optional[str] = ..., k: _Optional[int] = ..., exclude_seen: _Optional[bool] = ..., exclude_item_ids: _Optional[_Iterable[str]] = ..., candidate_item_ids: _Optional[_Iterable[str]] = ..., include_metadata: _Optional[bool] = ..., allow_cold_start: _Optional[bool] = ..., interactions: _Optional[_Iterable[_Union[Interaction, _Mapping]]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., diversity: _Optional[float] = ...) -> None: ...

class ScoredItem(_message.Message):
    __slots__ = ("item_id", "score", "rank", "title", "genres")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    GENRES_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    rank: int
    title: str
    genres: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ..., rank: _Optional[int] = ..., title: _Optional[str] = ..., genres: _Optional[_Iterable[str]] = ...) -> None: ...

class TopKResponse(_message.Message):
    __slots__ = ("items", "model_version", "missing_ids", "missing_user_ids", "missing_item_ids", "next_page_token")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MISSING_IDS_FIELD_NUMBER: _ClassVar[int]
    MISSING_USER_IDS_FIELD_NUMBER: _ClassVar[int]
    MISSING_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    model_version: int
    missing_ids: _containers.RepeatedScalarFieldContainer[str]
    missing_user_ids: _containers.RepeatedScalarFieldContainer[str]
    missing_item_ids: _containers.RepeatedScalarFieldContainer[str]
    next_page_token: str
    def __init__(self, items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., model_version: _Optional[int] = ..., missing_ids: _Optional[_Iterable[str]] = ..., missing_user_ids: _Optional[_Iterable[str]] = ..., missing_item_ids: _Optional[_Iterable[str]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class BatchTopKRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[TopKRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[TopKRequest, _Mapping]]] = ...) -> None: ...

class SimilarItemsRequest(_message.Message):
    __slots__ = ("item_id", "k", "exclude_item_ids", "candidate_item_ids", "include_metadata")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_METADATA_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    k: int
    exclude_item_ids: _containers.RepeatedScalarFieldContainer[str]
    candidate_item_ids: _containers.RepeatedScalarFieldContainer[str]
    include_metadata: bool
    def __init__(self, item_id: _Optional[str] = ..., k: _Optional[int] = ..., exclude_item_ids: _Optional[_Iterable[str]] = ..., candidate_item_ids: _Optional[_Iterable[str]] = ..., include_metadata: _Optional[bool] = ...) -> None: ...

class SimilarItemsResponse(_message.Message):
    __slots__ = ("items", "model_version")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    model_version: int
    def __init__(self, items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., model_version: _Optional[int] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("model_name", "model_version", "create_time", "factors", "rank_factors", "user_count", "item_count", "rating_count", "rating_min", "rating_max", "metrics", "format_version", "dataset_fingerprint", "hyperparameters", "last_reload_time", "last_reload_version", "last_reload_error", "model_folder_error")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class HyperparametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    FACTORS_FIELD_NUMBER: _ClassVar[int]
    RANK_FACTORS_FIELD_NUMBER: _ClassVar[int]
    USER_COUNT_FIELD_NUMBER: _ClassVar[int]
    ITEM_COUNT_FIELD_NUMBER: _ClassVar[int]
    RATING_COUNT_FIELD_NUMBER: _ClassVar[int]
    RATING_MIN_FIELD_NUMBER: _ClassVar[int]
    RATING_MAX_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    DATASET_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    LAST_RELOAD_TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_RELOAD_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_RELOAD_ERROR_FIELD_NUMBER: _ClassVar[int]
    MODEL_FOLDER_ERROR_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: int
    create_time: _timestamp_pb2.Timestamp
    factors: int
    rank_factors: int
    user_count: int
    item_count: int
    rating_count: int
    rating_min: float
    rating_max: float
    metrics: _containers.ScalarMap[str, float]
    format_version: int
    dataset_fingerprint: str
    hyperparameters: _containers.ScalarMap[str, str]
    last_reload_time: _timestamp_pb2.Timestamp
    last_reload_version: int
    last_reload_error: str
    model_folder_error: str
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., factors: _Optional[int] = ..., rank_factors: _Optional[int] = ..., user_count: _Optional[int] = ..., item_count: _Optional[int] = ..., rating_count: _Optional[int] = ..., rating_min: _Optional[float] = ..., rating_max: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ..., format_version: _Optional[int] = ..., dataset_fingerprint: _Optional[str] = ..., hyperparameters: _Optional[_Mapping[str, str]] = ..., last_reload_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_reload_version: _Optional[int] = ..., last_reload_error: _Optional[str] = ..., model_folder_error: _Optional[str] = ...) -> None: ...

class ReloadModelRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class ReloadModelResponse(_message.Message):
    __slots__ = ("model_version", "changed")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    model_version: int
    changed: bool
    def __init__(self, model_version: _Optional[int] = ..., changed: _Optional[bool] = ...) -> None: ...
