"""``python -m mfserve.server serve ...``: the server's CLI without the ``mfserve`` dispatcher.

Same flags as ``mfserve serve``; useful where only the server is installed, and for tests.
"""

from __future__ import annotations

import argparse
import os

# gRPC's C core logs every failed TLS handshake at INFO to stderr unless told otherwise: one port
# scan would bury the server's own log. Set before grpc loads; an explicit setting wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from mfserve.server.cli import register


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mfserve.server")
    subparsers = parser.add_subparsers(dest="command", required=True)
    register(subparsers)
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
