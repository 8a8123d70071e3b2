"""The compiled loops of the exact TopK kernel (:mod:`.compiled` says why and how they are
used): the per-item score, the full item-major scan and the norm-bounded pruned scan. Each runs
a whole batch in one call without the GIL."""

from __future__ import annotations

from typing import Any

import numpy as np

from mfserve.training.scoring.jit import compiled

# The bound's relative widening: float32's worst-case rounding of a 64-term dot product (about
# 64 * 2**-24 = 3.8e-6 of sum |q_f k_f| <= |q||k|) and of the two adds after it, with room to spare.
BOUND_SLACK = 1e-5


# reassoc lets the dot product vectorise (and may regroup the adds: rounding only, the same for
# every call, since every score goes through this one function); contract allows FMA.
@compiled(fastmath={"reassoc", "contract"})
def _dot(queries: np.ndarray, row: int, keys: np.ndarray, item: int) -> Any:
    acc = np.float32(0.0)
    for f in range(keys.shape[1]):
        acc += queries[row, f] * keys[item, f]
    return acc


# The full scan: item by item, each item row scored against every user of the batch while it is
# in cache (a batch of 8 costs ~4.5x one user, not 8x). Same reassoc/contract as _dot.
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
def top_k_full(
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


@compiled
def top_k_pruned(
    queries: np.ndarray,
    keys: np.ndarray,
    key_bias: np.ndarray,
    offsets: np.ndarray,
    users: np.ndarray,
    exclude_seen: np.ndarray,
    seen_indptr: np.ndarray,
    seen_indices: np.ndarray,
    order: np.ndarray,
    norms: np.ndarray,
    tail_bias: np.ndarray,
    slack_bias: float,
    query_norms: np.ndarray,
    masked: np.ndarray,
    top_items: np.ndarray,
    top_scores: np.ndarray,
    counts: np.ndarray,
    scanned: np.ndarray,
) -> None:
    k = top_items.shape[1]
    n = order.shape[0]
    for row in range(users.shape[0]):
        user = users[row]
        if exclude_seen[row]:
            for j in range(seen_indptr[user], seen_indptr[user + 1]):
                masked[seen_indices[j]] = 1
        offset = offsets[row] if offsets.shape[0] else np.float32(0.0)
        query_norm = query_norms[row]
        count = 0
        position = 0
        while position < n:
            if count == k:
                # Nothing from here on can reach the k-th best (a NaN bound never stops the scan).
                reach = query_norm * norms[position] + tail_bias[position] + offset
                margin = BOUND_SLACK * (query_norm * norms[position] + slack_bias + abs(offset))
                if reach + margin < top_scores[row, k - 1]:
                    break
            item = order[position]
            position += 1
            if masked[item]:
                continue
            score = _dot(queries, row, keys, item)
            if key_bias.shape[0]:
                score += key_bias[item]
            if offsets.shape[0]:
                score += offset
            if not (-np.inf < score < np.inf):  # a non-finite score never ranks
                continue
            if count < k:
                slot = count
                count += 1
            elif score > top_scores[row, k - 1] or (
                score == top_scores[row, k - 1] and item < top_items[row, k - 1]
            ):
                slot = k - 1
            else:
                continue
            # Best first; equal scores by item row, as a scan in row order would rank them. Spelled
            # out here and in _top_k_full (which needs no tie test: it offers items in row order):
            # one shared helper, even inlined by numba, made this scan 2-3x slower (measured).
            while slot > 0 and (
                top_scores[row, slot - 1] < score
                or (top_scores[row, slot - 1] == score and top_items[row, slot - 1] > item)
            ):
                top_scores[row, slot] = top_scores[row, slot - 1]
                top_items[row, slot] = top_items[row, slot - 1]
                slot -= 1
            top_scores[row, slot] = score
            top_items[row, slot] = item
        counts[row] = count
        scanned[row] = position
        if exclude_seen[row]:
            for j in range(seen_indptr[user], seen_indptr[user + 1]):
                masked[seen_indices[j]] = 0
