"""``mfserve``, the root package (source: ``protos/mfserve/``): ``__version__``, ``-m mfserve``.

It lives beside the contract because the generated code's import path comes from the proto's
path: ``protos/mfserve/v1/recommender.proto`` makes ``mfserve.v1.recommender_pb2``, so the folder
above ``v1/`` is the package ``mfserve``. Its subpackages come from the other source folders
(docs/architecture.md has the map): ``mfserve.v1`` (``protos/mfserve/v1/``), ``mfserve.client``
(``client/``, the base install), ``mfserve.training`` (``training/``, ``[train]``) and
``mfserve.server`` (``server/``, ``[server]``).

May import: nothing of mfserve here; ``_command`` (the console script, also ``-m mfserve``) runs
``mfserve.client._cli``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mfserve")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
