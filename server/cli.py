"""``mfserve serve``: the command line of the server.

``register`` only touches argparse, so the ``mfserve`` dispatcher (``mfserve.client._cli``) can
build its full ``--help`` on a client-only install. The handler ``run_serve`` imports grpc, torch
and the server when it runs.

The defaults below repeat ``ServerConfig``'s (importing it here would pull in grpc and torch);
``tests/test_server_cli.py`` checks that the two agree.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from typing import Any

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50051
DEFAULT_MAX_BATCH_PAIRS = 100_000
DEFAULT_MAX_K = 1_000
DEFAULT_MAX_CONCURRENT_RPCS = 256
DEFAULT_MAX_MESSAGE_MB = 64
DEFAULT_GRACE = 5.0
DEFAULT_COMPUTE_THREADS = 1
DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_MAX_QUEUE_DELAY_US = 0
DEFAULT_WORKERS = 1
DEFAULT_TORCH_THREADS = 1
DEFAULT_LONE_TORCH_THREADS = 1
MAX_PREDICT_ON_LOOP_PAIRS = 16_384  # batching.INLINE_PREDICT_PAIRS (not imported: no torch here)
DEFAULT_ANN = "none"
ANN_MODES = ("none", "auto", "hnsw", "ivf")
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
            "Serve a trained model over gRPC (mfserve.v1.RecommenderService, plus the standard "
            "grpc.health.v1 health service and server reflection). Stops gracefully on SIGTERM or "
            "SIGINT: health turns NOT_SERVING, new calls are refused, in-flight calls get --grace "
            "seconds to finish, and the exit code is 0. Requires the [server] extra."
        ),
    )
    parser.add_argument(
        "--model",
        required=True,
        metavar="PATH",
        help="model folder (models/NAME: its newest numbered version is served) or one version "
        "folder (models/NAME/N). Required.",
    )
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to listen on; 0.0.0.0 for all interfaces (default: {DEFAULT_HOST})",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"port to listen on; 0 picks a free one and logs it (default: {DEFAULT_PORT})",
    )
    parser.add_argument(
        "--max-batch-pairs",
        type=int,
        default=DEFAULT_MAX_BATCH_PAIRS,
        metavar="N",
        help="most (user, item) pairs one BatchPredict may hold "
        f"(default: {DEFAULT_MAX_BATCH_PAIRS})",
    )
    parser.add_argument(
        "--max-k",
        type=int,
        default=DEFAULT_MAX_K,
        metavar="K",
        help=f"largest k for TopK and SimilarItems (default: {DEFAULT_MAX_K})",
    )
    parser.add_argument(
        "--max-concurrent-rpcs",
        type=int,
        default=DEFAULT_MAX_CONCURRENT_RPCS,
        metavar="N",
        help="calls served at once; more get RESOURCE_EXHAUSTED; 0 means unbounded "
        f"(default: {DEFAULT_MAX_CONCURRENT_RPCS})",
    )
    parser.add_argument(
        "--max-message-mb",
        type=int,
        default=DEFAULT_MAX_MESSAGE_MB,
        metavar="MB",
        help="largest request or response message in MiB; larger ones get RESOURCE_EXHAUSTED "
        f"(default: {DEFAULT_MAX_MESSAGE_MB})",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=DEFAULT_GRACE,
        metavar="SECONDS",
        help=f"on shutdown, how long in-flight calls may take to finish (default: {DEFAULT_GRACE})",
    )
    parser.add_argument(
        "--compute-threads",
        type=int,
        default=DEFAULT_COMPUTE_THREADS,
        metavar="N",
        help="threads running model calls off the event loop; 0 runs them on the loop "
        f"(default: {DEFAULT_COMPUTE_THREADS})",
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=DEFAULT_MAX_BATCH_SIZE,
        metavar="N",
        help="dynamic batching: at most N concurrent calls of one kind (Predict and BatchPredict, "
        "TopK, SimilarItems) are answered by one tensor operation; 1 turns batching off "
        f"(default: {DEFAULT_MAX_BATCH_SIZE})",
    )
    parser.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=DEFAULT_MAX_QUEUE_DELAY_US,
        metavar="US",
        help="dynamic batching: how long an idle batcher may hold a call, in microseconds, for "
        "more calls to join its batch; it waits only while other calls are in the server, never "
        "for a lone call. 0: calls are batched only while a batch is computing "
        f"(default: {DEFAULT_MAX_QUEUE_DELAY_US})",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=DEFAULT_WORKERS,
        metavar="N",
        help="server processes sharing the port (SO_REUSEPORT), forked after the model is loaded "
        "so they share its memory; the parent supervises them and forwards SIGTERM/SIGINT. "
        f"0: one per CPU core (default: {DEFAULT_WORKERS})",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=DEFAULT_TORCH_THREADS,
        metavar="N",
        help="torch intra-op threads per server process; 0: torch's default, one per core "
        f"(default: {DEFAULT_TORCH_THREADS})",
    )
    parser.add_argument(
        "--lone-torch-threads",
        type=int,
        default=DEFAULT_LONE_TORCH_THREADS,
        metavar="N",
        help="torch intra-op threads for a call computed alone on the event loop (only when no "
        "other call is in the server): 2 lowers TopK p50 at low load but raises p99 when the "
        "helper thread's core is busy; capped at the process's share of the cores; 0: "
        f"--torch-threads (default: {DEFAULT_LONE_TORCH_THREADS})",
    )
    parser.add_argument(
        "--predict-on-loop-pairs",
        type=int,
        default=0,
        metavar="N",
        help="compute Predict/BatchPredict calls of up to N pairs on the event loop even under "
        "load instead of batching them on the compute thread (needs numba's compiled kernel): "
        f"more throughput, no coalescing; at most {MAX_PREDICT_ON_LOOP_PAIRS} (default: 0, off)",
    )
    parser.add_argument(
        "--ann",
        default=DEFAULT_ANN,
        choices=ANN_MODES,
        help="approximate TopK for known users without an allow-list, through a faiss index stored "
        "beside the version (mfserve index --model DIR --kind KIND); unknown users, allow-lists, "
        "SimilarItems and Predict stay exact. auto: the index if there is one, else exact; hnsw "
        "or ivf: that index is required, and a version without it fails to load. A corrupt or "
        f"stale index is always refused (default: {DEFAULT_ANN})",
    )
    parser.add_argument(
        "--ann-ef-search",
        type=int,
        default=0,
        metavar="N",
        help="HNSW efSearch per query: higher is more exact and slower; a user with more "
        "than 128 seen or denied items walks with N plus one candidate per excluded item, "
        "up to 1024 (default: the value stored with the index)",
    )
    parser.add_argument(
        "--ann-nprobe",
        type=int,
        default=0,
        metavar="N",
        help="IVF lists probed per query: higher is more exact and slower "
        "(default: the value stored with the index)",
    )
    parser.add_argument(
        "--idle-poll",
        action="store_true",
        help="keep every CPU busy between calls with a SCHED_IDLE spinner process per CPU, so "
        "that wake-ups do not wait for a halted CPU: lower latency on virtual machines, at the "
        "price of CPUs that always look busy (Linux; default: off)",
    )
    parser.add_argument(
        "--pin-cpus",
        nargs="?",
        const="auto",
        default="",
        metavar="CPUS",
        help="bind each server process to one CPU, so the hand-offs between its threads stay on "
        "that CPU: lower latency, above all on virtual machines, but one core per process. The "
        "process takes the first CPU of the list, a --workers worker the next in turn. CPUS: "
        "auto (the CPUs this process may use) or a list like 0,2-3; the flag alone means auto "
        "(Linux; default: off)",
    )
    parser.add_argument(
        "--access-log",
        action="store_true",
        help="log one line per call: method, status, milliseconds, peer (default: off)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=LOG_LEVELS,
        type=str.upper,
        help="logging threshold (default: INFO)",
    )
    # `handler` is what the dispatchers call; `func` is the common argparse idiom, set for either.
    parser.set_defaults(handler=run_serve, func=run_serve)
    _register_bench(subparsers)
    return parser


def _register_bench(subparsers: Any) -> None:
    # The harness owns its flags (`mfserve bench --help` prints them); everything after `bench`
    # is handed to it untouched.
    bench = subparsers.add_parser(
        "bench",
        help="closed-loop load benchmark: mfserve beside an empty handler and a naive server",
        add_help=False,
        prefix_chars="\0",
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(handler=run_bench, func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from mfserve.server.bench.harness import main

    code: int = main(list(args.bench_args))
    return code


def run_serve(args: argparse.Namespace) -> int:
    """Handler of ``mfserve serve``: build the config, load the model, serve until a signal."""
    logging.basicConfig(level=args.log_level, format=LOG_FORMAT, stream=sys.stderr)
    logging.getLogger("mfserve").setLevel(args.log_level)
    log = logging.getLogger("mfserve.server")
    try:
        from mfserve.server.app import BindError, MiB, ServerConfig, serve
        from mfserve.server.cpu_pinning import parse_cpu_list
        from mfserve.server.idle_poll import IdlePoll, IdlePollError
        from mfserve.training.ann import AnnError
        from mfserve.training.artifact import ArtifactError
    except ImportError as exc:  # the [server] extra is missing
        print(
            f"mfserve serve: {exc}; install the server extra: pip install 'mfserve[server]'",
            file=sys.stderr,
        )
        return 2
    try:
        pin_cpus = parse_cpu_list(args.pin_cpus) if args.pin_cpus else ()
        config = ServerConfig(
            host=args.host,
            port=args.port,
            max_batch_pairs=args.max_batch_pairs,
            max_k=args.max_k,
            max_concurrent_rpcs=args.max_concurrent_rpcs or None,
            max_receive_message_bytes=args.max_message_mb * MiB,
            max_send_message_bytes=args.max_message_mb * MiB,
            grace_seconds=args.grace,
            access_log=args.access_log,
            compute_threads=args.compute_threads,
            max_batch_size=args.max_batch_size,
            max_queue_delay_us=args.max_queue_delay_us,
            workers=args.workers,
            torch_threads=args.torch_threads,
            lone_torch_threads=args.lone_torch_threads,
            predict_on_loop_pairs=args.predict_on_loop_pairs,
            ann=args.ann,
            ann_ef_search=args.ann_ef_search,
            ann_nprobe=args.ann_nprobe,
            pin_cpus=pin_cpus,
        )
    except ValueError as exc:  # a bad --pin-cpus list (PinningError) too
        print(f"mfserve serve: {exc}", file=sys.stderr)
        return 2
    try:
        with IdlePoll() if args.idle_poll else contextlib.nullcontext():
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
