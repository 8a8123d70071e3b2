"""A server killed and restarted on the same port is survived without the caller seeing an error.

Two mechanisms, both gRPC's own: the retry policy in the service config (``UNAVAILABLE`` is retried
with jittered backoff) and ``wait_for_ready`` (a call waits for the channel to reconnect). The
reconnect backoff is shortened so the channel notices the new server quickly; the retry backoff is
long enough that the retries span the restart (each wait is random in [0, 2] s, so four of them
summing to under the ~0.5 s restart has probability (0.25)^4/24, about 1e-4).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from server_harness import ServerThread, running_server_handle

from mfserve.client import AsyncRecommenderClient, RecommenderClient, RetryPolicy, UnavailableError

FAST_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.max_reconnect_backoff_ms", 100)]
PATIENT = RetryPolicy(max_attempts=5, initial_backoff=2.0, max_backoff=2.0, backoff_multiplier=1.0)


class Restart:
    """Starts a new server on ``port`` after ``delay`` seconds, in a thread; stops it on exit."""

    def __init__(self, model_dir: Path, port: int, delay: float = 0.3) -> None:
        self.servers: list[ServerThread] = []
        self._timer = threading.Timer(delay, self._start, (model_dir, port))

    def _start(self, model_dir: Path, port: int) -> None:
        self.servers.append(ServerThread(model_dir, port=port))

    def __enter__(self) -> Restart:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.join()
        for server in self.servers:
            server.close()


def test_retry_policy_survives_a_restart_on_the_same_port(model_dir: Path) -> None:
    with running_server_handle(model_dir) as first:
        port = first.port
        client = RecommenderClient(
            f"127.0.0.1:{port}", retries=PATIENT, options=FAST_RECONNECT, timeout=30
        )
        before = client.predict("u1", "i1")
    # The first server is gone (its handle closed it); a new one starts 0.3 s later.
    with client, Restart(model_dir, port) as restart:
        after = client.predict("u1", "i1")
        assert after == before
        assert restart.servers, "the call succeeded only because the new server answered it"


def test_without_retries_the_same_restart_is_an_error(model_dir: Path) -> None:
    """The control: the tests above pass because of the retry policy, not by luck of timing."""
    with running_server_handle(model_dir) as first:
        port = first.port
        client = RecommenderClient(f"127.0.0.1:{port}", retries=1, options=FAST_RECONNECT)
        client.predict("u1", "i1")
    with client, Restart(model_dir, port, delay=1.0), pytest.raises(UnavailableError):
        client.predict("u1", "i1")


def test_wait_for_ready_survives_a_restart_on_the_same_port(model_dir: Path) -> None:
    with running_server_handle(model_dir) as first:
        port = first.port
        client = RecommenderClient(
            f"127.0.0.1:{port}", retries=1, wait_for_ready=True, options=FAST_RECONNECT, timeout=30
        )
        before = client.top_k("u1", k=3)
    with client, Restart(model_dir, port):
        assert client.top_k("u1", k=3) == before


def test_async_client_survives_a_restart_on_the_same_port(model_dir: Path) -> None:
    with running_server_handle(model_dir) as first:
        port = first.port

    async def main() -> float:
        async with AsyncRecommenderClient(
            f"127.0.0.1:{port}", retries=PATIENT, options=FAST_RECONNECT, timeout=30
        ) as client:
            with Restart(model_dir, port):
                return float((await client.predict("u2", "i2")).rating)

    assert asyncio.run(main()) > 0
