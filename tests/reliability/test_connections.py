"""Thousands of connections opened and dropped against a multi-worker server, under load: every
call of the load succeeds and the workers' memory and descriptors stay bounded.

The hostile-input suite of the security issue (``tests/server/test_hostile_input.py``) is the
other half of "bad input"; ``scripts/soak.sh`` runs it with the suite, with more examples.
"""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

import grpc
from conftest import rss_kib, worker_pids
from grpc_health.v1 import health_pb2, health_pb2_grpc
from reliability_load import SECONDS, Load, report
from server_harness import serve_subprocess, wait_for

Ids = tuple[list[str], list[str]]
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HALF_SENT = [b"", PREFACE[:7], PREFACE, PREFACE + b"\x00\x00\x00\x04", b"GET / HTTP/1.1\r\n\r\n"]


def open_fds(pids: list[int]) -> int:
    return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in pids)


def test_connections_opened_and_dropped_under_load(model_dir: Path, ids: Ids) -> None:
    users, items = ids
    rounds = max(10, int(SECONDS * 5))  # 100 connections a round: 5,000 in CI
    with serve_subprocess(model_dir, "--workers", "2") as server:
        pids = worker_pids(server)
        host, port = server.address.rsplit(":", 1)
        with Load(server.address, users, items, clients=16) as load:
            assert load.wait_calls(200)
            rss_before, fds_before = rss_kib(pids), open_fds(pids)
            for round_ in range(rounds):
                socks = [
                    socket.create_connection((host, int(port)), timeout=10) for _ in range(100)
                ]
                for i, sock in enumerate(socks):
                    sock.sendall(HALF_SENT[(round_ + i) % len(HALF_SENT)])
                for i, sock in enumerate(socks):
                    if i % 2:  # RST instead of FIN
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                    sock.close()
            for _ in range(200):  # a whole gRPC channel per call, closed
                with grpc.insecure_channel(server.address) as channel:
                    stub = health_pb2_grpc.HealthStub(channel)
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
        result = load.stop()
        assert wait_for(lambda: open_fds(pids) <= fds_before + 8, timeout=15)
        rss_after = rss_kib(pids)
        assert server.terminate() == 0, server.log
    report(
        "connections opened and dropped",
        result,
        connections=rounds * 100 + 200,
        rss_before_kib=rss_before,
        rss_after_kib=rss_after,
    )
    assert result.failed == 0, result.summary()
    assert rss_after <= 1.2 * rss_before, (rss_before, rss_after)
