"""Pieces the baseline servers share: the command line, a ready line, and serving until SIGTERM.

A server prints ``PORT <n>`` on stdout once it is bound (port 0 picks a free one); the harness reads
that line, so servers never race for a fixed port.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from mfserve.server.cpu_pinning import PinningError, parse_cpu_list, pin_process
from mfserve.v1 import recommender_pb2_grpc as pb_grpc

READY_PREFIX = "PORT "


def server_args(
    argv: list[str] | None,
    description: str,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    if extra is not None:
        extra(parser)
    parser.add_argument("--model", required=True, help="model version folder (models/NAME/N)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--pin-cpus",
        default="",
        metavar="CPUS",
        help="bind the process to the first CPU of this list, as mfserve serve --pin-cpus does, "
        "so a floor is measured alike (default: off)",
    )
    args = parser.parse_args(argv)
    if args.pin_cpus:
        try:
            cpus = parse_cpu_list(args.pin_cpus)
        except PinningError as exc:
            parser.error(str(exc))
        pin_process(cpus[0])  # before grpc starts its threads, so they inherit it
    return args


def read_ids(version: Path) -> tuple[list[str], list[str]]:
    """The model's user and item ids (plain JSON; no torch needed)."""
    users = json.loads((version / "users.json").read_text(encoding="utf-8"))
    items = json.loads((version / "items.json").read_text(encoding="utf-8"))
    return users, items


async def serve_until_signal(servicer: Any, host: str, port: int) -> None:
    """Serve ``servicer`` with the same grpc.aio defaults as mfserve until SIGTERM or SIGINT."""
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
        ]
    )
    pb_grpc.add_RecommenderServiceServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"{READY_PREFIX}{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(0.5)
    sys.stdout.flush()
