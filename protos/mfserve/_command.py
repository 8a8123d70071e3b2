"""The ``mfserve`` console script (and ``python -m mfserve``): quiet gRPC's C core, then dispatch.

A failed TLS handshake makes gRPC's C core print raw lines (``I1202 ... ssl_transport_security.cc
... Handshake failed``) before the error the command explains; it reads ``GRPC_VERBOSITY`` once,
when grpc is imported. This module lives in the root package, which imports nothing, so it can
set the variable before ``mfserve.client`` brings grpc in. A program that imports the SDK keeps
its own gRPC logging. ``setdefault``: an operator's ``GRPC_VERBOSITY=INFO`` still shows everything.
"""

from __future__ import annotations

import os


def main() -> int:
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from mfserve.client._cli import main as dispatch

    return dispatch()
