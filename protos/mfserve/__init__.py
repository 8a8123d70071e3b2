"""mfserve: a matrix-factorisation recommender, trained with PyTorch and served over gRPC.

Sub-packages: ``mfserve.client`` (thin SDK, the base install), ``mfserve.training`` (``[train]`` extra),
``mfserve.server`` (``[server]`` extra) and ``mfserve.v1`` (code generated from ``recommender.proto``).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mfserve")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
