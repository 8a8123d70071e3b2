"""The reliability suite's load: concurrent SDK clients calling a real server, every outcome kept.

Each client is an ``AsyncRecommenderClient`` with its own connection (a local subchannel pool, so
that ``--workers`` spreads them) and the SDK's default retry policy unless told otherwise; they
cycle through Predict, BatchPredict, TopK and SimilarItems until stopped. ``LoadResult`` holds
every call's outcome and latency; ``report()`` appends its figures to ``MFSERVE_RELIABILITY_REPORT``
(a JSON-lines file, written by ``scripts/soak.sh``) when that is set.

Durations: ``MFSERVE_RELIABILITY_SECONDS`` (default 10, as in CI; the soak runs 60).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mfserve.client import AsyncRecommenderClient, MfserveError, RetryPolicy

SECONDS = float(os.environ.get("MFSERVE_RELIABILITY_SECONDS", "10"))
CLIENTS = 64
METHODS = ("Predict", "BatchPredict", "TopK", "SimilarItems")
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


@dataclass
class LoadResult:
    """What the clients saw: outcome counts by (method, outcome), latencies, the first errors."""

    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    versions: Counter[int] = field(default_factory=Counter)
    # (start, end, outcome) of every call, monotonic seconds: who was in flight when.
    calls: list[tuple[float, float, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.outcomes.values())

    @property
    def failed(self) -> int:
        return sum(n for (_, outcome), n in self.outcomes.items() if outcome != "OK")

    def percentiles_ms(self) -> dict[str, dict[str, float]]:
        table = {}
        for method, values in sorted(self.latencies.items()):
            if len(values) < 2:
                continue
            cuts = statistics.quantiles(values, n=100, method="inclusive")
            table[method] = {
                "p50": round(cuts[49] * 1e3, 2),
                "p99": round(cuts[98] * 1e3, 2),
                "max": round(max(values) * 1e3, 2),
            }
        return table

    def summary(self) -> str:
        rows = [f"{self.total} calls in {self.seconds:.1f} s, {self.failed} failed"]
        for method, cut in self.percentiles_ms().items():
            rows.append(f"  {method:<13} p50 {cut['p50']} ms  p99 {cut['p99']} ms")
        rows.extend(f"  error: {error}" for error in self.errors[:5])
        return "\n".join(rows)


def report(name: str, result: LoadResult | None = None, **figures: Any) -> None:
    """Print ``name``'s figures, and append them to the soak's report file when one is set."""
    row: dict[str, Any] = {"test": name, **figures}
    if result is not None:
        row.update(
            calls=result.total,
            failed=result.failed,
            seconds=round(result.seconds, 1),
            latency_ms=result.percentiles_ms(),
        )
        print(f"\n{name}: {result.summary()}")
    print(f"{name}: {json.dumps(figures)}")
    path = os.environ.get("MFSERVE_RELIABILITY_REPORT")
    if path:
        with Path(path).open("a") as out:
            out.write(json.dumps(row) + "\n")


async def _client_loop(
    number: int,
    address: str,
    users: Sequence[str],
    items: Sequence[str],
    stop: threading.Event,
    result: LoadResult,
    retries: int | RetryPolicy,
    timeout: float,
) -> None:
    pairs = 100
    async with AsyncRecommenderClient(
        address, retries=retries, options=OWN_CONNECTION, timeout=timeout
    ) as client:
        step = number
        while not stop.is_set():
            method = METHODS[step % len(METHODS)]
            user, item = users[step % len(users)], items[step % len(items)]
            step += 1
            started = time.monotonic()
            try:
                if method == "Predict":
                    version = (await client.predict(user, item)).model_version
                elif method == "BatchPredict":
                    batch_users = [users[(step + i) % len(users)] for i in range(pairs)]
                    batch_items = [items[(step * 7 + i) % len(items)] for i in range(pairs)]
                    version = (await client.batch_predict(batch_users, batch_items)).model_version
                elif method == "TopK":
                    version = (await client.top_k(user, k=10)).model_version
                else:
                    version = (await client.similar_items(item, k=10)).model_version
                outcome = "OK"
                result.versions[version] += 1
            except MfserveError as error:
                outcome = type(error).__name__
                if len(result.errors) < 20:
                    result.errors.append(f"{method}: {outcome}: {error}"[:300])
            ended = time.monotonic()
            result.outcomes[method, outcome] += 1
            result.latencies.setdefault(method, []).append(ended - started)
            result.calls.append((started, ended, outcome))


class Load:
    """``clients`` SDK clients calling ``address`` on a thread of their own, until :meth:`stop`
    (or ``seconds``). Use as a context manager; ``result`` once stopped."""

    def __init__(
        self,
        address: str,
        users: Sequence[str],
        items: Sequence[str],
        *,
        clients: int = CLIENTS,
        seconds: float | None = None,
        retries: int | RetryPolicy = 4,
        timeout: float = 30.0,
    ) -> None:
        self.result = LoadResult()
        self._stop = threading.Event()
        self._seconds = seconds
        self._done: Future[None] = Future()
        args = (address, users, items, self._stop, self.result, retries, timeout)
        self._thread = threading.Thread(
            target=self._run, args=(clients, args), name="reliability-load", daemon=True
        )

    def _run(self, clients: int, args: tuple[Any, ...]) -> None:
        async def main() -> None:
            loops = [_client_loop(number, *args) for number in range(clients)]
            if self._seconds is not None:
                asyncio.get_running_loop().call_later(self._seconds, self._stop.set)
            await asyncio.gather(*loops)

        started = time.monotonic()
        try:
            asyncio.run(main())
            self._done.set_result(None)
        except BaseException as exc:  # surfaced by stop()
            self._done.set_exception(exc)
        finally:
            self.result.seconds = time.monotonic() - started

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_calls(self, calls: int, timeout: float = 60.0) -> bool:
        """Wait until the clients have made ``calls`` calls (the load is up)."""
        deadline = time.monotonic() + timeout
        while self.result.total < calls and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.result.total >= calls

    def stop(self, timeout: float = 120.0) -> LoadResult:
        self._stop.set()
        self._done.result(timeout)
        self._thread.join(timeout)
        return self.result
