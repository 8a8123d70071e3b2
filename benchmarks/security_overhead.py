"""What TLS, mutual TLS and bearer tokens cost a call, against the same server in plaintext.

    python -m benchmarks.security_overhead --model models/movielens [--rounds 5] [--calls 2000]

Three ``mfserve serve`` processes over one model, default flags but for: none (plaintext), the
tokens (``--auth-tokens``), and mutual TLS with tokens. Certificates are made for the run
(``tests/tls_certs.py``, needs the dev extra's ``cryptography``). Per round, for each server in
turn: ``--calls`` TopK calls one at a time on one channel (the p50 and p99 of each), and
``--connects`` new channels each making one call (the median time to connect and answer: the
TLS handshake's cost). Reported: medians over rounds, and each as a ratio of the plaintext
server's in the same round.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from benchmarks.harness.common import read_ids
from benchmarks.harness.processes import RunningServer, ServerSpec
from mfserve.training.artifact import resolve_version
from mfserve.v1 import recommender_pb2 as pb
from mfserve.v1 import recommender_pb2_grpc as pb_grpc

SERVING = re.compile(r"serving .* on \S+:(\d+)\s*$")
TOKEN = "benchmark-token-0123456789"


def _pki(folder: Path) -> Any:
    # The test helper, not installed: imported from the checkout.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tls_certs import make_pki

    return make_pki(folder)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _channel(port: int, kind: str, pki: Any) -> grpc.Channel:
    if kind in {"plaintext", "tokens"}:
        return grpc.insecure_channel(f"127.0.0.1:{port}")
    credentials = grpc.ssl_channel_credentials(
        pki.ca_cert.read_bytes(), pki.client_key.read_bytes(), pki.client_cert.read_bytes()
    )
    return grpc.secure_channel(f"127.0.0.1:{port}", credentials)


def _measure(
    port: int, kind: str, pki: Any, users: list[str], calls: int, connects: int
) -> dict[str, float]:
    metadata = None if kind == "plaintext" else [("authorization", f"Bearer {TOKEN}")]
    latencies = []
    with _channel(port, kind, pki) as channel:
        topk = pb_grpc.RecommenderServiceStub(channel).TopK
        for i in range(calls // 10):  # warm-up: connection, batcher, caches
            topk(pb.TopKRequest(user_id=users[i % len(users)], k=10), metadata=metadata)
        for i in range(calls):
            request = pb.TopKRequest(user_id=users[i % len(users)], k=10)
            started = time.perf_counter()
            topk(request, timeout=10, metadata=metadata)
            latencies.append(time.perf_counter() - started)
    connect_times = []
    for i in range(connects):
        started = time.perf_counter()
        with _channel(port, kind, pki) as channel:
            request = pb.TopKRequest(user_id=users[i % len(users)], k=10)
            pb_grpc.RecommenderServiceStub(channel).TopK(request, timeout=10, metadata=metadata)
        connect_times.append(time.perf_counter() - started)
    return {
        "p50_us": _percentile(latencies, 0.5) * 1e6,
        "p99_us": _percentile(latencies, 0.99) * 1e6,
        "connect_ms": statistics.median(connect_times) * 1e3,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model or version folder")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000, help="sequential TopK calls per cell")
    parser.add_argument("--connects", type=int, default=50, help="new channels per cell")
    args = parser.parse_args(argv)

    scratch = Path(tempfile.mkdtemp(prefix="mfserve-security-"))
    pki = _pki(scratch / "pki")
    tokens = scratch / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    serve = [sys.executable, "-m", "mfserve.server", "serve", "--model", args.model]
    tls = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    kinds = {
        "plaintext": [],
        "tokens": ["--auth-tokens", str(tokens)],
        "mTLS + tokens": [*tls, "--tls-client-ca", str(pki.ca_cert), "--auth-tokens", str(tokens)],
    }
    servers = {
        kind: RunningServer(ServerSpec(kind, [*serve, *flags], SERVING), timeout=120)
        for kind, flags in kinds.items()
    }
    try:
        users = read_ids(Path(resolve_version(args.model)))[0][:500]
        rows: dict[str, list[dict[str, float]]] = {kind: [] for kind in kinds}
        for round_number in range(args.rounds):
            for kind, server in servers.items():
                rows[kind].append(
                    _measure(server.port, kind, pki, users, args.calls, args.connects)
                )
            print(f"round {round_number + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        for server in servers.values():
            server.stop()

    print(f"TopK k=10, one call at a time, {args.calls} calls x {args.rounds} rounds (medians)\n")
    print("| server | p50 | p99 | p50 vs plaintext | connect + first call | vs plaintext |")
    print("|---|---|---|---|---|---|")
    for kind, cells in rows.items():
        base = rows["plaintext"]
        p50 = statistics.median(cell["p50_us"] for cell in cells)
        p99 = statistics.median(cell["p99_us"] for cell in cells)
        connect = statistics.median(cell["connect_ms"] for cell in cells)
        p50_ratio = statistics.median(
            c["p50_us"] / b["p50_us"] for c, b in zip(cells, base, strict=True)
        )
        connect_ratio = statistics.median(
            c["connect_ms"] / b["connect_ms"] for c, b in zip(cells, base, strict=True)
        )
        print(
            f"| {kind} | {p50:.0f} us | {p99:.0f} us | {p50_ratio:.2f}x | {connect:.2f} ms | "
            f"{connect_ratio:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
