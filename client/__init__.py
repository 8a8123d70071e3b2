"""mfserve's Python SDK: typed clients for the ``mfserve.v1.RecommenderService`` gRPC API.

::

    from mfserve.client import RecommenderClient

    with RecommenderClient("localhost:50051") as client:
        client.predict("u1", "i7").rating
        [r.item_id for r in client.top_k("u1", k=5)]

This is the base install: it needs only grpcio and protobuf, and importing it loads neither numpy,
pandas nor torch. Everything public is importable from here; the ``_``-prefixed modules are private.
"""

from ._async_client import AsyncRecommenderClient
from ._client import RecommenderClient
from ._config import RetryPolicy
from ._exceptions import (
    DeadlineExceededError,
    FieldViolation,
    InvalidArgumentError,
    MfserveError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    RpcError,
    UnauthenticatedError,
    UnavailableError,
)
from ._models import (
    BatchPrediction,
    HealthStatus,
    ModelInfo,
    Prediction,
    Recommendation,
    TopKResult,
)

__all__ = [
    "AsyncRecommenderClient",
    "BatchPrediction",
    "DeadlineExceededError",
    "FieldViolation",
    "HealthStatus",
    "InvalidArgumentError",
    "MfserveError",
    "ModelInfo",
    "NotFoundError",
    "PermissionDeniedError",
    "Prediction",
    "Recommendation",
    "RecommenderClient",
    "ResourceExhaustedError",
    "RetryPolicy",
    "RpcError",
    "TopKResult",
    "UnauthenticatedError",
    "UnavailableError",
]

# Public classes report ``mfserve.client`` as their home (reprs, tracebacks, docs), not the private
# module that defines them; like httpx.
for _name in __all__:
    _value = globals()[_name]
    if isinstance(_value, type):
        _value.__module__ = __name__
del _name, _value
