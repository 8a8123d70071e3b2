"""``mfserve.client`` (source: ``client/``): typed clients for the ``mfserve.v1.RecommenderService``
gRPC API, and the ``mfserve`` console script (``_cli.py``).

::

    from mfserve.client import RecommenderClient

    with RecommenderClient("localhost:50051") as client:
        client.predict("u1", "i7").rating
        [r.item_id for r in client.top_k("u1", k=5)]

This is the base install: it needs only grpcio and protobuf, and importing it loads neither numpy,
pandas nor torch. Everything public is importable from here; the ``_``-prefixed modules are private.

May import: ``mfserve.v1`` and the root ``mfserve`` (for ``__version__``), never ``mfserve.server``
or ``mfserve.training``. The one exception is dynamic: the ``mfserve`` dispatcher registers the
other areas' subcommands by module name at run time (``_cli._AREA_MODULES``).
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
    TlsFileError,
    TlsMismatchError,
    UnauthenticatedError,
    UnavailableError,
)
from ._models import (
    BatchPrediction,
    HealthStatus,
    Interaction,
    ModelInfo,
    Prediction,
    Recommendation,
    ReloadResult,
    TopKResult,
)
from ._tls import TlsConfig

__all__ = [
    "AsyncRecommenderClient",
    "BatchPrediction",
    "DeadlineExceededError",
    "FieldViolation",
    "HealthStatus",
    "Interaction",
    "InvalidArgumentError",
    "MfserveError",
    "ModelInfo",
    "NotFoundError",
    "PermissionDeniedError",
    "Prediction",
    "Recommendation",
    "RecommenderClient",
    "ReloadResult",
    "ResourceExhaustedError",
    "RetryPolicy",
    "RpcError",
    "TlsConfig",
    "TlsFileError",
    "TlsMismatchError",
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
