"""``mfserve serve``: the command line of the server.

The flags are generated from ``ServerConfig``'s fields (``mfserve.server.config``, which imports
nothing heavy), so the ``mfserve`` dispatcher (``mfserve.client._cli``) can build its full
``--help`` on a client-only install, and a bad value is an argparse error before grpc and torch
load. The handler ``run_serve`` imports the server when it runs.

Every option also comes from an environment variable and a TOML file (``--config``), with the
precedence flag > env > file > default (``mfserve.server.config_sources``); a bad value there
exits 2 naming its source, as argparse does for a bad flag.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Any

from mfserve.server.config import add_server_flags, flag_groups
from mfserve.server.config_sources import (
    SourceError,
    defer_defaults,
    render,
    resolve,
    server_config,
)
from mfserve.server.log_format import LOG_FORMATS, json_handler

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
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file of settings named after the flags (max_k = 500), also from "
        "MFSERVE_CONFIG; flags and MFSERVE_* variables (MFSERVE_MAX_K) override it",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved settings and where each came from, then exit",
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
    groups["logging"].add_argument(
        "--log-format",
        default="text",
        choices=LOG_FORMATS,
        help="json: one JSON object per line (default: text)",
    )
    defer_defaults(parser)
    # `handler` is what the dispatchers call; `func` is the common argparse idiom, set for either.
    parser.set_defaults(handler=run_serve, func=run_serve)
    return parser


def run_serve(args: argparse.Namespace) -> int:
    """Handler of ``mfserve serve``: build the config, load the model, serve until a signal."""
    try:
        settings = resolve(args, os.environ)
        config = server_config(settings)
    except SourceError as exc:
        print(f"mfserve serve: error: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "print_config", False):
        print(render(settings))
        return 0
    model_path = settings["model"].value
    if not model_path:
        print(
            "mfserve serve: error: no model: give --model, MFSERVE_MODEL or model in --config",
            file=sys.stderr,
        )
        return 2
    level = settings["log_level"].value
    if settings["log_format"].value == "json":
        logging.basicConfig(level=level, handlers=[json_handler(sys.stderr)])
        logging.captureWarnings(True)  # a warning would otherwise be the one line not JSON
    else:
        logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)
    logging.getLogger("mfserve").setLevel(level)
    log = logging.getLogger("mfserve.server")
    # Stop signals wait, blocked, until the server's handlers exist (run_until_signal, or the
    # --workers parent, unblock them), so a SIGTERM during the load is a graceful stop rather
    # than the default kill. Blocked here, before grpc, torch or numba start a thread: a thread
    # started unblocked would take the process's signal with the default action.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    try:
        from mfserve.server.app import BindError, serve
        from mfserve.server.idle_poll import IdlePollError
        from mfserve.server.security import SecurityError
        from mfserve.training.artifact import ArtifactError
        from mfserve.training.scoring.ann import AnnError
    except ImportError as exc:  # the [server] extra is missing
        print(
            f"mfserve serve: {exc}; install the server extra: pip install 'mfserve[server]'",
            file=sys.stderr,
        )
        return 2
    try:
        code: int = serve(config, model_path)
        return code
    except IdlePollError as exc:
        log.error("mfserve serve: %s", exc)
        return 2
    except SecurityError as exc:
        log.error("mfserve serve: %s", exc)
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
