"""The usual TopK (known users, no allow- or deny-list) in compiled code: exact, and pruned
where the model allows.

Why compiled: a TopK batch through torch is a GEMM, a bias add, a seen-item mask and a ``topk``,
each op giving the GIL back and waiting to win it again from the event loop, which in a loaded
server wants it for every call's gRPC work. Here a whole batch is one call into numba-compiled
code that runs without the GIL.

Why pruned: a trained factor model's best items for a user are nearly always among the items with
the longest key vectors, and Cauchy-Schwarz bounds every other item's score:
``query . key + bias <= |query| |key| + bias``. So the items are put in order of key norm,
longest first, with each position's suffix maximum of the bias; a user's scan walks that order,
keeps the best ``k`` by insertion, and stops as soon as the bound of everything left is below its
k-th best score. On ml-latest-small a usual query visits ~6% of the catalogue. Where the norms
are all alike (synthetic clustered data: ~95%), the pruned scan loses to a plain one, so
:meth:`RankKernel.build` measures it on a sample of users and keeps the full, item-major scan
(each key row scored against every user of the batch while it is in cache) unless pruning pays.

Both scans give exactly the same answer:

* every score is computed by the same code whatever the user's batch or the scan order
  (query . key, + the key's bias, + the user's offset, in float32), and only an item that provably
  cannot reach the k-th best score is skipped: the bound is widened by ``scans.BOUND_SLACK`` of its
  magnitude, above float32's worst rounding of a 64-term dot product and two adds (~4e-6), and
  the stop test is strict, so an item that could tie is still scanned;
* ties are ordered by item row, as a scan in row order ranks them;
* a non-finite score never ranks, as in ``ExactRanker``; a non-finite key or bias voids the bound,
  and that model gets full scans.

The scores are ``ExactRanker``'s formula; only the order of the float additions differs
from BLAS's and torch's, so a score may differ from ``ExactRanker.top_k``'s in its last bits (1e-5
in the tests) and two items within that of each other may swap. Within the kernel, batched
answers equal unbatched ones exactly.

Catalogues bigger than one scoring chunk (``ExactRanker.chunk_size``), users the model does not
know, allow-lists and deny-lists keep the torch path. Without numba :func:`rank_kernel` returns
``None`` and :class:`~mfserve.training.scoring.exact.ExactRanker` answers everything.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mfserve.training.scoring.exact import ExactRanker
from mfserve.training.scoring.jit import HAVE_NUMBA
from mfserve.training.scoring.scans import top_k_full, top_k_pruned
from mfserve.training.scoring.types import RankedLists, RankingTables, RankRequest

# The pruned scan is used when, measured on the model at load, a usual query visits at most this
# share of the catalogue: past it, the full scan's item-major order (a batch shares each key row)
# wins. ml-latest-small visits ~6%; synthetic clustered data, whose key norms are all alike, ~95%.
PRUNED_SCAN_MAX_FRACTION = 0.25
# With full scans, a GEMM through torch is faster past this many users (benchmarks.compiled_paths:
# the kernel is ~0.6-0.8x of torch's time alone or for 3 users, 0.8-1.2x for 8).
FULL_SCAN_MAX_USERS = 8


@dataclass(frozen=True, eq=False)
class ScanOrder:
    """Items longest key first, with what the pruned scan's bound needs at each position."""

    items: np.ndarray  # item rows
    norms: np.ndarray  # float64 key norms, descending
    tail_bias: np.ndarray  # float64: the largest key bias from each position on
    slack_bias: float  # the largest |bias|, for the bound's rounding margin

    @classmethod
    def of(cls, keys: np.ndarray, key_bias: np.ndarray | None) -> ScanOrder | None:
        """The order for these tables, or ``None`` when a non-finite key or bias voids the bound."""
        bias = np.zeros(keys.shape[0]) if key_bias is None else key_bias.astype(np.float64)
        norms = np.linalg.norm(keys.astype(np.float64), axis=1)
        if not (np.isfinite(norms).all() and np.isfinite(bias).all()):
            return None
        items = np.argsort(-norms, kind="stable").astype(np.int64)
        tail_bias = np.maximum.accumulate(bias[items][::-1])[::-1]
        return cls(
            items,
            np.ascontiguousarray(norms[items]),
            np.ascontiguousarray(tail_bias),
            float(np.abs(bias).max(initial=0.0)),
        )


@dataclass(frozen=True, eq=False)
class RankKernel:
    """A model's ranking tables as numpy views of the same memory, and how to scan them.

    ``order`` is set when the pruned scan pays on this model (measured at build: on a sample of
    users it visits at most :data:`PRUNED_SCAN_MAX_FRACTION` of the catalogue); batches of any
    size then go through the kernel. Otherwise every user scans the whole catalogue, item-major
    so a batch shares each key row, and :attr:`max_users` sends batches past 8 users to torch's
    GEMM, which is faster there.
    """

    user_queries: np.ndarray
    tables: tuple[Any, ...]  # keys, key bias (or empty), seen indptr, seen indices
    user_offsets: np.ndarray  # empty when the head has none
    user_query_norms: np.ndarray  # float64
    order: ScanOrder | None = None  # None: full scans
    # The share of the catalogue a usual query visited with pruning, measured at build (None:
    # not measured, the scan was forced or no bound holds).
    visit_share: float | None = None

    @property
    def max_users(self) -> int | None:
        """The largest batch worth ranking here rather than through torch (None: any)."""
        return None if self.order is not None else FULL_SCAN_MAX_USERS

    @classmethod
    def from_tables(cls, source: RankingTables, *, pruned: bool | None = None) -> RankKernel:
        """The kernel over ``source``. ``pruned``: None measures whether pruning pays (a usual
        query, k=10 with seen items excluded, on up to 64 users spread across the table, visiting
        at most ``PRUNED_SCAN_MAX_FRACTION`` of the catalogue on average); True or False forces
        the scan, where the bound allows one."""
        empty = np.empty(0, dtype=np.float32)  # numba wants an array: empty means "none"
        tables = (
            source.keys,
            empty if source.key_bias is None else source.key_bias,
            source.seen_indptr,
            source.seen_indices,
        )
        offsets = empty if source.user_offset is None else source.user_offset
        query_norms = np.linalg.norm(source.queries.astype(np.float64), axis=1)
        full = cls(source.queries, tables, offsets, query_norms)
        n_users, n_items = source.queries.shape[0], source.keys.shape[0]
        order = ScanOrder.of(source.keys, source.key_bias) if pruned is not False else None
        if order is None or not n_users or not n_items:
            return full
        with_order = cls(source.queries, tables, offsets, query_norms, order)
        if pruned:
            return with_order
        users = np.linspace(0, n_users - 1, min(64, n_users)).astype(np.int64)
        _, scanned = with_order.top_k_scanned(users.tolist(), 10, [True] * len(users))
        share = float(np.mean(scanned)) / n_items
        chosen = with_order if share <= PRUNED_SCAN_MAX_FRACTION else full
        return dataclasses.replace(chosen, visit_share=share)

    def describe(self) -> str:
        """Which scan serves, and why, for the load log."""
        n_items = self.tables[0].shape[0]
        if self.visit_share is None:
            scan = "pruned" if self.order is not None else "full"
            return f"{scan} scan of {n_items:,} items"
        measured = f"pruning visits {self.visit_share:.1%} of {n_items:,} items"
        if self.order is not None:
            return f"pruned scan ({measured})"
        return f"full scan ({measured}, above {PRUNED_SCAN_MAX_FRACTION:.0%})"

    def top_k(
        self, users: Sequence[int], k: int, exclude_seen: Sequence[bool]
    ) -> list[tuple[list[int], list[float]]]:
        """Best ``k`` items (rows, scores; best first) for each known user row."""
        return self.top_k_scanned(users, k, exclude_seen)[0]

    def top_k_queries(
        self,
        queries: np.ndarray,
        offsets: np.ndarray | None,
        k: int,
        excluded: Sequence[np.ndarray],
    ) -> list[tuple[list[int], list[float]]]:
        """Best ``k`` items for query vectors solved at call time (folded-in users), each row
        never returning the item rows of its ``excluded`` array: the same scan as :meth:`top_k`,
        with the batch's own exclusions standing in for the seen items."""
        size = len(queries)
        lengths = np.fromiter((len(e) for e in excluded), dtype=np.int64, count=size)
        indptr = np.zeros(size + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        indices = (
            np.concatenate([np.asarray(e, dtype=np.int64) for e in excluded])
            if indptr[-1]
            else np.empty(0, dtype=np.int64)
        )
        query = np.ascontiguousarray(queries, dtype=np.float32)
        if self.user_offsets.shape[0]:
            assert offsets is not None, "this head scores with a user offset"
            offset = np.ascontiguousarray(offsets, dtype=np.float32)
        else:
            offset = self.user_offsets
        norms = np.linalg.norm(query.astype(np.float64), axis=1)
        return self._scan(
            query, offset, norms, np.arange(size, dtype=np.int64), k,
            np.ones(size, dtype=np.bool_), indptr, indices,
        )[0]  # fmt: skip

    def top_k_scanned(
        self, users: Sequence[int], k: int, exclude_seen: Sequence[bool]
    ) -> tuple[list[tuple[list[int], list[float]]], list[int]]:
        """:meth:`top_k`, and how many items each user's scan visited."""
        rows = np.asarray(users, dtype=np.int64)
        offsets = self.user_offsets[rows] if self.user_offsets.shape[0] else self.user_offsets
        _, _, indptr, indices = self.tables
        return self._scan(
            self.user_queries[rows], offsets, self.user_query_norms[rows], rows, k,
            np.asarray(exclude_seen, dtype=np.bool_), indptr, indices,
        )  # fmt: skip

    def _scan(
        self,
        queries: np.ndarray,
        offsets: np.ndarray,
        query_norms: np.ndarray,
        rows: np.ndarray,
        k: int,
        seen: np.ndarray,
        indptr: np.ndarray,
        indices: np.ndarray,
    ) -> tuple[list[tuple[list[int], list[float]]], list[int]]:
        """The scan itself: ``rows[j]`` indexes the CSR ``indptr`` / ``indices`` of items that
        row ``j`` must not return (when ``seen[j]``)."""
        keys, key_bias, _, _ = self.tables
        size = len(rows)
        k = max(1, min(k, keys.shape[0]))
        top_items = np.empty((size, k), dtype=np.int64)
        top_scores = np.empty((size, k), dtype=np.float32)
        counts = np.empty(size, dtype=np.int64)
        order = self.order
        if order is None:
            scores = np.empty((size, keys.shape[0]), dtype=np.float32)
            top_k_full(
                queries, keys, key_bias, offsets, rows, seen, indptr, indices,
                scores, top_items, top_scores, counts,
            )  # fmt: skip
            scanned = [keys.shape[0]] * size
        else:
            visited = np.empty(size, dtype=np.int64)
            top_k_pruned(
                queries, keys, key_bias, offsets, rows, seen, indptr, indices,
                order.items, order.norms, order.tail_bias, order.slack_bias,
                query_norms,
                np.zeros(keys.shape[0], dtype=np.uint8),  # the scanned user's seen items
                top_items, top_scores, counts, visited,
            )  # fmt: skip
            scanned = visited.tolist()
        items_lists, score_lists = top_items.tolist(), top_scores.tolist()
        ranked = [
            (items[:n], values[:n])
            for items, values, n in zip(items_lists, score_lists, counts.tolist(), strict=True)
        ]
        return ranked, scanned


def rank_kernel(tables: RankingTables, *, chunk_size: int) -> RankKernel | None:
    """The kernel for ``tables``, compiled, warmed and with its scan chosen now; ``None`` without
    numba, for a catalogue past one scoring chunk, or for tables that are not float32."""
    if not HAVE_NUMBA or tables.keys.shape[0] > chunk_size:
        return None
    if {tables.queries.dtype, tables.keys.dtype} != {np.dtype(np.float32)}:
        return None
    kernel = RankKernel.from_tables(tables)
    if tables.queries.shape[0]:
        kernel.top_k([0], 1, [True])  # compiles (or loads from numba's cache) before any call
    return kernel


class CompiledRanker:
    """The kernel for known users without allow- or deny-lists (nearly every call), the exact
    torch ranker for the rest and for similar items. A user's answer does not depend on its
    batch: plain rows go through the kernel whether alone or batched, except that a full-scan
    kernel hands batches past :attr:`RankKernel.max_users` to torch's GEMM, which is faster there.
    """

    def __init__(self, kernel: RankKernel, exact: ExactRanker) -> None:
        self.kernel = kernel
        self.exact = exact

    def describe(self) -> str:
        return f"compiled {self.kernel.describe()}"

    def visits(self, user: int, request: RankRequest) -> int:
        return int(self.exact.visits(user, request))

    def top_k(self, users: Sequence[int], k: int, requests: Sequence[RankRequest]) -> RankedLists:
        plain = [
            n
            for n, (user, r) in enumerate(zip(users, requests, strict=True))
            if user >= 0 and r.plain
        ]
        limit = self.kernel.max_users
        if not plain or (limit is not None and len(plain) > limit):
            return self.exact.top_k(users, k, requests)
        if len(plain) == len(users):
            return self.kernel.top_k(users, k, [r.exclude_seen for r in requests])
        answers: list[tuple[list[int], list[float]]] = [([], [])] * len(users)
        ranked = self.kernel.top_k(
            [users[n] for n in plain], k, [requests[n].exclude_seen for n in plain]
        )
        for n, answer in zip(plain, ranked, strict=True):
            answers[n] = answer
        rest = sorted(set(range(len(users))) - set(plain))
        general = self.exact.top_k([users[n] for n in rest], k, [requests[n] for n in rest])
        for n, answer in zip(rest, general, strict=True):
            answers[n] = answer
        return answers

    def similar(self, items: Sequence[int], k: int, requests: Sequence[RankRequest]) -> RankedLists:
        return self.exact.similar(items, k, requests)
