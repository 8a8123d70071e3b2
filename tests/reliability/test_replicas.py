"""Replicas: several ``mfserve serve`` processes behind the SDK's client-side ``round_robin``.

The SDK's service config balances over every address a target resolves to and retries
UNAVAILABLE, so a replica that dies mid-call costs a retry on another replica, not an error. Each
replica logs its calls (``--access-log``), which is how the tests see where the calls went.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path

from reliability_load import SECONDS, Load, report
from server_harness import ServerProcess, serve_subprocess, wait_for

from mfserve.client import RecommenderClient

Ids = tuple[list[str], list[str]]
REPLICAS = 3


@contextlib.contextmanager
def replicas(model_dir: Path, count: int = REPLICAS) -> Iterator[list[ServerProcess]]:
    with contextlib.ExitStack() as stack:
        servers = [
            stack.enter_context(serve_subprocess(model_dir, "--access-log")) for _ in range(count)
        ]
        yield servers


def round_robin_target(servers: list[ServerProcess]) -> str:
    """gRPC's static address list: one channel, one subchannel per replica."""
    return "ipv4:" + ",".join(server.address for server in servers)


def calls_logged(server: ServerProcess, method: str) -> int:
    return sum(f"access: /mfserve.v1.RecommenderService/{method} " in line for line in server.lines)


def test_calls_spread_across_three_replicas(model_dir: Path, ids: Ids) -> None:
    users, _ = ids
    calls = 300
    with replicas(model_dir) as servers, RecommenderClient(round_robin_target(servers)) as client:
        client.wait_until_ready(timeout=30)
        for number in range(calls):
            client.top_k(users[number % len(users)], k=5)
        # A replica logs a call after answering it; give the last lines time to arrive.
        wait_for(lambda: sum(calls_logged(s, "TopK") for s in servers) == calls, timeout=10)
        shares = [calls_logged(server, "TopK") for server in servers]
    report("round_robin over 3 replicas", shares=shares)
    assert sum(shares) == calls, shares
    assert min(shares) >= calls * 0.20, shares


def test_a_replica_killed_under_load_fails_no_call(model_dir: Path, ids: Ids) -> None:
    users, items = ids
    with replicas(model_dir) as servers:
        with Load(round_robin_target(servers), users, items, clients=16) as load:
            assert load.wait_calls(500)
            servers[1].terminate(signal.SIGKILL)
            killed_at = time.monotonic()
            served_before = [calls_logged(server, "TopK") for server in servers]
            time.sleep(SECONDS / 2)
        result = load.stop()
        served_after = [calls_logged(server, "TopK") for server in servers]
    after_kill = sum(1 for started, _, _ in result.calls if started > killed_at)
    report("a replica SIGKILLed under load", result, calls_after_kill=after_kill)
    assert result.failed == 0, result.summary()
    assert after_kill > 100, result.summary()
    for survivor in (0, 2):  # the load went on, on both survivors
        assert served_after[survivor] > served_before[survivor], (served_before, served_after)


def test_max_connection_age_moves_clients_to_new_connections_without_errors(
    model_dir: Path, ids: Ids
) -> None:
    # A client re-resolves its target when a connection closes: the age is what makes clients
    # that connected before a scale-up reach the new replicas. Closing must cost no call.
    users, _ = ids
    args = ("--access-log", "--max-connection-age", "0.5")
    with serve_subprocess(model_dir, *args) as server, RecommenderClient(server.address) as client:
        deadline = time.monotonic() + 3.0
        calls = 0
        while time.monotonic() < deadline:
            client.top_k(users[calls % len(users)], k=5)
            calls += 1
        peers = {line.rsplit(" ", 1)[-1] for line in server.lines if "access: " in line}
    report("max connection age 0.5 s", calls=calls, connections=len(peers))
    assert len(peers) >= 3, peers
