"""Channel configuration shared by the sync and async clients: retries, keepalive, TLS, auth.

TLS itself (``TlsConfig``, reading and checking certificate files) is in ``_tls``.

Retries are gRPC's own (a ``retryPolicy`` in the channel's service config), never a loop in this
package: gRPC knows whether a request reached the server, retries only what is safe, adds jittered
backoff, and covers every method of the service at once.

Deadlines are NOT in the service config: in grpcio's Python binding a service-config ``timeout``
fires up to ~1.5 s early (grpc/grpc#34547, still so in 1.85), and gRPC takes the *minimum* of it and
a per-call timeout, so a per-call timeout could never lengthen it. Every client method passes an
explicit deadline instead: its ``timeout`` argument, else the client's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from mfserve import __version__

from ._probe import Connection
from ._tls import TlsOption, channel_credentials, connection

SERVICE_NAME = "mfserve.v1.RecommenderService"
HEALTH_SERVICE_NAME = "grpc.health.v1.Health"
DEFAULT_TARGET = "localhost:50051"
# The server's default BatchPredict maximum (pairs per call).
DEFAULT_MAX_BATCH_PAIRS = 100_000
# Users per BatchTopK stream: far under the server's default maximum (100,000) and its message
# limit, and few enough that one failed stream costs little to send again.
BATCH_TOP_K_USERS = 10_000
# Bytes of ids per BatchPredict call, under gRPC's default 4 MiB receive limit on the server, so
# long ids (UUIDs) are split by size before the server would answer RESOURCE_EXHAUSTED.
DEFAULT_MAX_BATCH_BYTES = 3 * 1024 * 1024
# gRPC silently caps maxAttempts at 5; asking for more is refused here instead.
MAX_ATTEMPTS_LIMIT = 5

MetadataPairs = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC's ``retryPolicy``: how often and how patiently a call is retried after ``UNAVAILABLE``
    (no server, or one shutting down) or ``RESOURCE_EXHAUSTED`` (a server shedding load over its
    concurrency limit). gRPC never retries a request larger than its retry buffer (256 KiB), so a
    message refused for its size is not sent again.

    ``max_attempts`` counts the first try (1 disables retries; gRPC allows at most 5). The n-th
    retry waits a random time in ``[0, min(initial_backoff * backoff_multiplier**(n-1),
    max_backoff)]`` seconds. Every RPC of the service is idempotent, so retrying is always safe.
    """

    max_attempts: int = 4
    initial_backoff: float = 0.2
    max_backoff: float = 2.0
    backoff_multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_attempts <= MAX_ATTEMPTS_LIMIT:
            raise ValueError(
                f"max_attempts must be between 1 and {MAX_ATTEMPTS_LIMIT} (gRPC's cap)"
            )
        if self.initial_backoff <= 0 or self.max_backoff <= 0 or self.backoff_multiplier <= 0:
            raise ValueError("initial_backoff, max_backoff and backoff_multiplier must be positive")


def _duration(seconds: float) -> str:
    """A protobuf JSON duration: ``0.2s``."""
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"


def service_config(retry: RetryPolicy, *, wait_for_ready: bool = False) -> dict[str, Any]:
    """The channel's service config: retries for every method, round-robin over all addresses.

    ``round_robin`` matters when the target resolves to several servers (a headless Kubernetes
    service, ``dns:///`` with many A records): the default ``pick_first`` would send everything to
    one of them.
    """
    method: dict[str, Any] = {
        "name": [{"service": SERVICE_NAME}, {"service": HEALTH_SERVICE_NAME, "method": "Check"}],
    }
    if wait_for_ready:
        method["waitForReady"] = True
    if retry.max_attempts > 1:
        method["retryPolicy"] = {
            "maxAttempts": retry.max_attempts,
            "initialBackoff": _duration(retry.initial_backoff),
            "maxBackoff": _duration(retry.max_backoff),
            "backoffMultiplier": retry.backoff_multiplier,
            # RESOURCE_EXHAUSTED: the server sheds calls over --max-concurrent-rpcs, and a burst
            # passes; jittered backoff spreads the retries out.
            "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
        }
    return {"loadBalancingConfig": [{"round_robin": {}}], "methodConfig": [method]}


def channel_options(
    retry: RetryPolicy,
    *,
    wait_for_ready: bool = False,
    extra: Sequence[tuple[str, Any]] = (),
) -> list[tuple[str, Any]]:
    """Channel options: the service config plus keepalive and reconnect tuning; ``extra`` wins."""
    options: dict[str, Any] = {
        "grpc.enable_retries": 1,
        "grpc.service_config": json.dumps(service_config(retry, wait_for_ready=wait_for_ready)),
        # While a call is active, ping a silent connection after 60 s, so a dead peer (a dropped
        # NAT entry) fails the call in ~80 s rather than after the OS's TCP timeout. Never pinging
        # without calls keeps a default server (5 min ping minimum) from answering "too_many_pings".
        "grpc.keepalive_time_ms": 60_000,
        "grpc.keepalive_timeout_ms": 20_000,
        "grpc.keepalive_permit_without_calls": 0,
        # Reconnect quickly after a server restart (gRPC's default starts at 1 s, grows to 120 s).
        "grpc.initial_reconnect_backoff_ms": 200,
        "grpc.max_reconnect_backoff_ms": 5_000,
        "grpc.primary_user_agent": f"mfserve-python/{__version__}",
    }
    options.update(dict(extra))
    return list(options.items())


def _target_hosts(target: str) -> list[str] | None:
    """The hosts a target names; None for a unix socket (always local)."""
    if target.startswith(("unix:", "unix-abstract:")):
        return None
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target[len(scheme) :]
            break
    hosts = []
    for address in target.split(","):
        if address.startswith("["):
            hosts.append(address[1:].partition("]")[0])
        elif address.count(":") == 1:
            hosts.append(address.partition(":")[0])
        else:  # a bare host, or a bare IPv6 address
            hosts.append(address)
    return hosts


def is_local_target(target: str) -> bool:
    """Whether every address of ``target`` is this machine (loopback or a unix socket)."""
    hosts = _target_hosts(target)
    if hosts is None:
        return True
    return all(h.lower() in ("localhost", "::1") or h.startswith("127.") for h in hosts)


@dataclass(frozen=True)
class ClientSettings:
    """Everything both clients need to make calls, resolved and checked once."""

    target: str
    timeout: float | None
    metadata: MetadataPairs
    credentials: grpc.ChannelCredentials | None
    options: list[tuple[str, Any]]
    max_batch_pairs: int
    max_batch_bytes: int
    connection: Connection


def client_settings(
    target: str,
    *,
    timeout: float | None,
    tls: TlsOption,
    token: str | None,
    metadata: Sequence[tuple[str, str]] | Mapping[str, str],
    retries: int | RetryPolicy,
    wait_for_ready: bool,
    options: Sequence[tuple[str, Any]],
    max_batch_pairs: int,
    max_batch_bytes: int,
    own_channel: bool,
) -> ClientSettings:
    """Check either client's constructor arguments; resolve them into :class:`ClientSettings`."""
    if timeout is not None and timeout <= 0:
        raise ValueError("timeout must be positive, or None for no deadline")
    if max_batch_pairs < 1 or max_batch_bytes < 1:
        raise ValueError("max_batch_pairs and max_batch_bytes must be at least 1")
    retry = retries if isinstance(retries, RetryPolicy) else RetryPolicy(max_attempts=retries)
    credentials = channel_credentials(tls)
    pairs = tuple(metadata.items()) if isinstance(metadata, Mapping) else tuple(metadata)
    if token is not None:
        # A bearer token over plaintext to another machine can be read by anyone on the path. With a
        # caller-built channel we cannot see its security, so the caller answers for it.
        if own_channel and credentials is None and not is_local_target(target):
            raise ValueError(
                f"refusing to send a token in plaintext to {target!r}: pass tls=True (or "
                "tls=TlsConfig(ca=FILE)), or connect to localhost / a unix socket"
            )
        pairs = (*pairs, ("authorization", f"Bearer {token}"))
    return ClientSettings(
        target=target,
        timeout=timeout,
        metadata=pairs,
        credentials=credentials,
        options=channel_options(retry, wait_for_ready=wait_for_ready, extra=options),
        max_batch_pairs=max_batch_pairs,
        max_batch_bytes=max_batch_bytes,
        connection=connection(target, tls, own_channel=own_channel),
    )
