"""The usual TopK (known users, no allow- or deny-list) in one compiled pass, GIL released.

Why: a TopK batch through torch is a GEMM, a bias add, a seen-item mask and a ``topk``, each
op giving the GIL back and waiting to win it again from the event loop, which in a loaded server
wants it for every call's gRPC work. On this 2-core host a batch of ~3 calls took ~1 ms of wall
time for ~0.5 ms of CPU. Here the whole batch is one call into numba-compiled code: it streams
the item table once per batch (each item row scored against every user of the batch), masks each
user's seen items, and keeps the best ``k`` per user by insertion, all without the GIL.

The scores are ``Recommender``'s ranking formula (query . key, + the key's bias, + the user's
offset, in float32); only the order of the float additions differs from BLAS's and torch's, so
a score may differ from ``Recommender.top_k``'s in its last bits (1e-5 in the tests) and two
items within that of each other may swap. Each (user, item) score is computed on its own, so a
user's answer does not depend on its batch: within the kernel, batched answers equal unbatched
ones exactly.

Catalogues bigger than one scoring chunk (``Recommender.chunk_size``), users the model does not
know, allow-lists and deny-lists keep the torch path, and so do batches of more than
``batching.RANK_KERNEL_MAX_USERS`` users, where a GEMM is the faster way to score. Without numba
:func:`rank_kernel` returns ``None`` and everything does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mfserve.server.jit import HAVE_NUMBA, compiled
from mfserve.training.recommender import Recommender


# reassoc lets the dot product vectorise (and may regroup the adds: rounding only, the same for a
# user alone or in a batch, since the per-score code is the same); contract allows FMA.
@compiled(fastmath={"reassoc", "contract"})
def _score(
    queries: np.ndarray,
    keys: np.ndarray,
    key_bias: np.ndarray,
    offsets: np.ndarray,
    scores: np.ndarray,
) -> None:
    factors = keys.shape[1]
    for item in range(keys.shape[0]):
        bias = key_bias[item] if key_bias.shape[0] else np.float32(0.0)
        for user in range(queries.shape[0]):
            acc = np.float32(0.0)
            for f in range(factors):
                acc += queries[user, f] * keys[item, f]
            if key_bias.shape[0]:
                acc += bias
            if offsets.shape[0]:
                acc += offsets[user]
            scores[user, item] = acc


@compiled
def _top_k(
    queries: np.ndarray,
    keys: np.ndarray,
    key_bias: np.ndarray,
    offsets: np.ndarray,
    users: np.ndarray,
    exclude_seen: np.ndarray,
    seen_indptr: np.ndarray,
    seen_indices: np.ndarray,
    scores: np.ndarray,
    top_items: np.ndarray,
    top_scores: np.ndarray,
    counts: np.ndarray,
) -> None:
    _score(queries, keys, key_bias, offsets, scores)
    k = top_items.shape[1]
    for row in range(users.shape[0]):
        if exclude_seen[row]:
            user = users[row]
            for j in range(seen_indptr[user], seen_indptr[user + 1]):
                scores[row, seen_indices[j]] = -np.inf
        count = 0
        for item in range(scores.shape[1]):
            score = scores[row, item]
            if not (-np.inf < score < np.inf):  # masked (and any NaN) never ranks
                continue
            if count < k:
                slot = count
                count += 1
            elif score > top_scores[row, k - 1]:
                slot = k - 1
            else:
                continue
            while slot > 0 and top_scores[row, slot - 1] < score:
                top_scores[row, slot] = top_scores[row, slot - 1]
                top_items[row, slot] = top_items[row, slot - 1]
                slot -= 1
            top_scores[row, slot] = score
            top_items[row, slot] = item
        counts[row] = count


@dataclass(frozen=True, eq=False)
class RankKernel:
    """A model's ranking tables as numpy views of the same memory, for :meth:`top_k`."""

    user_queries: np.ndarray
    tables: tuple[Any, ...]  # keys, key bias (or empty), seen indptr, seen indices
    user_offsets: np.ndarray  # empty when the head has none

    @classmethod
    def build(cls, model: Recommender) -> RankKernel:
        empty = np.empty(0, dtype=np.float32)  # numba wants an array: empty means "none"
        source = model.ranking_tables()
        tables = (
            source.keys,
            empty if source.key_bias is None else source.key_bias,
            source.seen_indptr,
            source.seen_indices,
        )
        offsets = empty if source.user_offset is None else source.user_offset
        return cls(source.queries, tables, offsets)

    def top_k(
        self, users: Sequence[int], k: int, exclude_seen: Sequence[bool]
    ) -> list[tuple[list[int], list[float]]]:
        """Best ``k`` items (rows, scores; best first) for each known user row."""
        rows = np.asarray(users, dtype=np.int64)
        keys, key_bias, indptr, indices = self.tables
        size = len(rows)
        k = min(k, keys.shape[0])
        offsets = self.user_offsets[rows] if self.user_offsets.shape[0] else self.user_offsets
        scores = np.empty((size, keys.shape[0]), dtype=np.float32)
        top_items = np.empty((size, k), dtype=np.int64)
        top_scores = np.empty((size, k), dtype=np.float32)
        counts = np.empty(size, dtype=np.int64)
        _top_k(
            self.user_queries[rows],
            keys,
            key_bias,
            offsets,
            rows,
            np.asarray(exclude_seen, dtype=np.bool_),
            indptr,
            indices,
            scores,
            top_items,
            top_scores,
            counts,
        )
        items_lists, score_lists = top_items.tolist(), top_scores.tolist()
        return [
            (items[:n], values[:n])
            for items, values, n in zip(items_lists, score_lists, counts.tolist(), strict=True)
        ]


def rank_kernel(model: Recommender) -> RankKernel | None:
    """The kernel for ``model``, compiled and warmed now; ``None`` without numba, for a
    multi-chunk catalogue, or for tables that are not float32."""
    if not HAVE_NUMBA or model.n_items > model.chunk_size:
        return None
    tables = model.ranking_tables()
    if {tables.queries.dtype, tables.keys.dtype} != {np.dtype(np.float32)}:
        return None
    kernel = RankKernel.build(model)
    if model.n_users:
        kernel.top_k([0], 1, [True])  # compiles (or loads from numba's cache) before any call
    return kernel
