"""Batch-level pieces of the exact torch ranking, kept apart from :mod:`.exact` (which owns the
tensors and the entry points) so that each module stays small: the (row, item) pairs a batch must
never return (:func:`banned_pairs`), the chunked score-and-select loop (:func:`chunked_topk`) and
a batch's answer before it is split per row (:class:`Ranking`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mfserve.training.scoring.types import Ranked, RankedLists, RankRequest


def banned_pairs(
    requests: Sequence[RankRequest],
    seen_users: np.ndarray | None,
    self_items: np.ndarray | None,
    seen_indptr: np.ndarray,
    seen_indices: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """(row position, item) pairs to mask, as two flat int64 arrays.

    Seen items (the CSR ``seen_indptr`` / ``seen_indices``) are gathered for the whole batch at once
    rather than with a slice per row, so a batch of 64 rows costs about what one row does.
    """
    positions: list[np.ndarray] = []
    columns: list[np.ndarray] = []
    if seen_users is not None:
        wanted = np.array([r.exclude_seen for r in requests], dtype=bool) & (seen_users >= 0)
        if wanted.any():
            rows = np.flatnonzero(wanted)
            seen_rows, seen_cols = seen_pairs(rows, seen_users[rows], seen_indptr, seen_indices)
            positions.append(seen_rows)
            columns.append(seen_cols)
    for pos, request in enumerate(requests):
        if request.exclude is not None and request.exclude.numel():
            positions.append(np.full(request.exclude.numel(), pos, dtype=np.int64))
            columns.append(request.exclude.numpy())
    if self_items is not None:  # a query item is never its own neighbour
        positions.append(np.arange(len(requests), dtype=np.int64))
        columns.append(self_items)
    if not positions:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty
    if len(positions) == 1:
        return positions[0], columns[0]
    return np.concatenate(positions), np.concatenate(columns)


def seen_pairs(
    rows: np.ndarray, users: np.ndarray, seen_indptr: np.ndarray, seen_indices: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(batch row, item) pairs for the items each user rated (``users[j]`` sits at ``rows[j]``),
    gathered from the CSR arrays in a few whole-batch operations, with no slice per row."""
    starts = seen_indptr[users]
    lengths = seen_indptr[users + 1] - starts
    total = int(lengths.sum())
    # Entry j of row r is at starts[r] + j: repeat each start, add j.
    first = np.cumsum(lengths) - lengths
    within = np.arange(total) - np.repeat(first, lengths)
    return np.repeat(rows, lengths), seen_indices[np.repeat(starts, lengths) + within]


def finite_lists(items: list[int], scores: list[float]) -> tuple[list[int], list[float]]:
    """One ranked row without its masked (-inf) items, which sort last: only a row that has fewer
    eligible items than k has any, so the common row is returned as it is."""
    if scores and not (math.isfinite(scores[0]) and math.isfinite(scores[-1])):
        keep = [j for j, score in enumerate(scores) if math.isfinite(score)]
        return [items[j] for j in keep], [scores[j] for j in keep]
    return items, scores


def chunked_topk(
    query: torch.Tensor,
    keys: torch.Tensor,
    *,
    key_bias: torch.Tensor | None,
    key_scale: torch.Tensor | None,
    offset: torch.Tensor | None,
    k: int,
    banned_rows: np.ndarray,
    banned_cols: np.ndarray,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ``k`` keys per query row, scoring ``chunk_size`` keys per matrix product.

    Banned pairs score -inf.
    """
    n_keys = keys.shape[0]
    one_chunk = n_keys <= chunk_size
    best_scores = torch.empty(query.shape[0], 0)
    best_items = torch.empty(query.shape[0], 0, dtype=torch.int64)
    for start in range(0, n_keys, chunk_size):
        stop = min(start + chunk_size, n_keys)
        chunk = keys if one_chunk else keys[start:stop]
        scores = query @ chunk.T
        if key_scale is not None:
            scores *= key_scale if one_chunk else key_scale[start:stop]
        if key_bias is not None:
            scores += key_bias if one_chunk else key_bias[start:stop]
        if offset is not None:
            scores += offset.unsqueeze(1)
        if banned_cols.size:
            if one_chunk:
                rows, cols = banned_rows, banned_cols
            else:
                in_chunk = (banned_cols >= start) & (banned_cols < stop)
                rows, cols = banned_rows[in_chunk], banned_cols[in_chunk] - start
            # Through numpy: an in-place numpy write keeps the GIL, a torch op hands it over
            # (see ExactRanker.top_k).
            scores.numpy()[rows, cols] = -np.inf
        top = torch.topk(scores, min(k, stop - start), dim=1)
        if start == 0:
            best_scores, best_items = top.values, top.indices
            continue
        best_scores = torch.cat([best_scores, top.values], dim=1)
        best_items = torch.cat([best_items, top.indices + start], dim=1)
        if best_scores.shape[1] > k:
            keep = torch.topk(best_scores, k, dim=1)
            best_scores = keep.values
            best_items = torch.gather(best_items, 1, keep.indices)
    return best_scores, best_items


@dataclass(frozen=True)
class Ranking:
    """A batch's ranking before it is split per row: full scans share one [rows, k] result."""

    size: int
    full_rows: list[int]  # batch rows ranked by the full scan, in order
    scores: torch.Tensor  # [len(full_rows), <= k], best first; -inf marks an ineligible item
    indices: torch.Tensor  # item rows, same shape
    singles: dict[int, tuple[torch.Tensor, torch.Tensor]]  # rows ranked over an allow-list

    def tensors(self) -> Ranked:
        out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * self.size
        if self.full_rows:
            valid = torch.isfinite(self.scores)
            every = bool(valid.all())
            for pos, row in enumerate(self.full_rows):
                if every:
                    out[row] = (self.indices[pos], self.scores[pos])
                else:
                    out[row] = (self.indices[pos][valid[pos]], self.scores[pos][valid[pos]])
        for row, ranked in self.singles.items():
            out[row] = ranked
        return [r for r in out if r is not None]

    def lists(self) -> RankedLists:
        out: list[tuple[list[int], list[float]] | None] = [None] * self.size
        if self.full_rows:
            all_items: list[list[int]] = self.indices.tolist()
            all_scores: list[list[float]] = self.scores.tolist()
            for pos, row in enumerate(self.full_rows):
                # Sorted best first: masked items (-inf) sit at the end, and NaN at the front.
                out[row] = finite_lists(all_items[pos], all_scores[pos])
        for row, (found, found_scores) in self.singles.items():
            out[row] = (found.tolist(), found_scores.tolist())
        return [r for r in out if r is not None]
