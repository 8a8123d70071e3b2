"""``mfserve.server`` (source: ``server/``): the gRPC server over a loaded artifact (``[server]``).

It owns transport, batching and processes; the model and its scoring are ``mfserve.training``'s.
May import: ``mfserve.training``, ``mfserve.v1`` and the root ``mfserve``, never ``mfserve.client``.

Public API: ``create_server``, ``ServerConfig``, ``RecommenderServer``, ``serve``, ``ModelHolder``.
They are imported lazily so that ``mfserve.server.cli`` (argparse only) stays importable, and
``mfserve --help`` fast, without grpc or torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mfserve.server.app import RecommenderServer, create_server, serve
    from mfserve.server.config import ServerConfig
    from mfserve.server.model_holder import ModelHolder

_EXPORTS = {
    "create_server": "mfserve.server.app",
    "serve": "mfserve.server.app",
    "ServerConfig": "mfserve.server.config",
    "RecommenderServer": "mfserve.server.app",
    "ModelHolder": "mfserve.server.model_holder",
}

__all__ = ["ModelHolder", "RecommenderServer", "ServerConfig", "create_server", "serve"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mfserve.server' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
