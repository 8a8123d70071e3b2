"""``mfserve serve``: the command line of the server.

The flags are generated from ``ServerConfig``'s fields (``mfserve.server.config``, which imports
nothing heavy), so the ``mfserve`` dispatcher (``mfserve.client._cli``) can build its full
``--help`` on a client-only install, and a bad value is an argparse error before grpc and torch
load. The handler ``run_serve`` imports the server when it runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from mfserve.server.config import add_server_flags, config_from_args, flag_groups

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

# One line per record; the start line is machine-parseable:
#   ... INFO mfserve: serving movielens v1 on 127.0.0.1:43521
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand to an ``argparse`` subparsers object; returns its parser."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="serve a trained model over gRPC",
        description=(
            "Serve a trained model over gRPC, with the standard health service and reflection. "
            "SIGTERM or SIGINT stops it gracefully: health turns NOT_SERVING, in-flight calls get "
            "--grace seconds, the exit code is 0. Needs the [server] extra."
        ),
        epilog="docs/serving.md explains every flag, with the figures behind the tuning ones.",
    )
    groups = flag_groups(parser)
    groups["model"].add_argument(
        "--model",
        required=True,
        metavar="PATH",
        help="model folder (models/NAME: its newest numbered version) or one version folder "
        "(models/NAME/N); required",
    )
    add_server_flags(groups)
    groups["logging"].add_argument(
        "--log-level",
        default="INFO",
        choices=LOG_LEVELS,
        type=str.upper,
        help="logging threshold (default: INFO)",
    )
    # `handler` is what the dispatchers call; `func` is the common argparse idiom, set for either.
    parser.set_defaults(handler=run_serve, func=run_serve)
    return parser


def run_serve(args: argparse.Namespace) -> int:
    """Handler of ``mfserve serve``: build the config, load the model, serve until a signal."""
    logging.basicConfig(level=args.log_level, format=LOG_FORMAT, stream=sys.stderr)
    logging.getLogger("mfserve").setLevel(args.log_level)
    log = logging.getLogger("mfserve.server")
    config = config_from_args(args)  # every value was checked while parsing
    try:
        from mfserve.server.app import BindError, serve
        from mfserve.server.idle_poll import IdlePollError
        from mfserve.training.artifact import ArtifactError
        from mfserve.training.scoring.ann import AnnError
    except ImportError as exc:  # the [server] extra is missing
        print(
            f"mfserve serve: {exc}; install the server extra: pip install 'mfserve[server]'",
            file=sys.stderr,
        )
        return 2
    try:
        code: int = serve(config, args.model)
        return code
    except IdlePollError as exc:
        print(f"mfserve serve: {exc}", file=sys.stderr)
        return 2
    except ArtifactError as exc:
        log.error("mfserve: cannot load the model: %s", exc)
        return 1
    except AnnError as exc:
        log.error("mfserve: cannot load the approximate index: %s", exc)
        return 1
    except BindError as exc:
        log.error("%s", exc)
        return 1
