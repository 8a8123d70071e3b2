"""The in-process model: batched rating prediction, top-k and similar items over a loaded artifact.

The server, ``mfserve evaluate`` and ``mfserve recommend`` all answer through this class, so the
figures a user measures from the outside are the figures training reported.

Every method takes a batch: index tensors in, tensors out, with no per-item Python loop. Ids are
mapped to rows with one dict lookup each; -1 marks an id the model does not know.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat

import numpy as np
import torch

from mfserve.training.artifact import ModelArtifact

UNKNOWN = -1
# Items scored per matrix product when ranking: bounds the [batch, chunk] score matrix so a
# million-item catalogue never needs a [batch, n_items] one.
DEFAULT_CHUNK = 65_536
# As torch.nn.functional.normalize: a zero vector stays zero instead of dividing by zero.
_NORM_EPS = 1e-12

Ranked = list[tuple[torch.Tensor, torch.Tensor]]
# The same answer as plain Python lists (what a server writes into a response).
RankedLists = list[tuple[list[int], list[float]]]


@dataclass(frozen=True)
class RankRequest:
    """Per-row options of a batched top-k call (one row per user or query item)."""

    exclude_seen: bool = True
    exclude: torch.Tensor | None = None  # int64 item rows never to return
    candidates: torch.Tensor | None = None  # int64 item rows: rank only these


class Recommender:
    """Scores users against items with the artifact's rating and ranking heads."""

    def __init__(self, artifact: ModelArtifact, *, chunk_size: int = DEFAULT_CHUNK) -> None:
        self.artifact = artifact
        self.chunk_size = chunk_size
        tensors = artifact.tensors
        self.global_mean = float(artifact.global_mean)
        self.rating_min, self.rating_max = artifact.rating_range
        self.user_factors = tensors["user_factors"]
        self.item_factors = tensors["item_factors"]
        self.user_bias = tensors["user_bias"]
        self.item_bias = tensors["item_bias"]
        self._user_rows = {uid: row for row, uid in enumerate(artifact.user_ids)}
        self._item_rows = {iid: row for row, iid in enumerate(artifact.item_ids)}
        self.item_ids = artifact.item_ids
        self.user_ids = artifact.user_ids

        # Ranking: one product of a user query against item keys. Without a ranking head, rank by
        # predicted rating; the user's own bias and the global mean do not change the order but are
        # kept so that scores read as ratings.
        rank_user = tensors.get("rank_user_factors")
        if rank_user is not None:
            rank_item = tensors["rank_item_factors"]
            rank_item_bias = tensors.get("rank_item_bias", torch.zeros(artifact.n_items))
            self._rank_user_offset = torch.zeros(artifact.n_users)
        else:
            rank_user, rank_item = self.user_factors, self.item_factors
            rank_item_bias = self.item_bias
            self._rank_user_offset = self.user_bias + self.global_mean
        self._rank_user = rank_user.contiguous()
        self._rank_item = rank_item.contiguous()
        self._rank_item_bias = rank_item_bias.contiguous()

        # Cosine similarity without a normalised copy of the item table: a copy would be private
        # to each process (256 MB per worker at 1M x 64), while the table itself is a read-only
        # memory map shared through the page cache. Queries are normalised, and each score is
        # scaled by the key's inverse norm (one float per item).
        self._similarity_keys = tensors.get("rank_item_factors", self.item_factors).contiguous()
        norms = torch.linalg.vector_norm(self._similarity_keys, dim=1)
        self._similarity_scale = 1.0 / norms.clamp_min(_NORM_EPS)

        popularity = artifact.item_popularity.to(torch.float32)
        self._popularity_score = popularity / max(float(popularity.sum()), 1.0)
        self._seen_indptr = artifact.seen_indptr
        self._seen_indices = artifact.seen_indices
        # numpy views of the same memory, for per-batch index arithmetic.
        self._seen_indptr_np = self._seen_indptr.numpy()
        self._seen_indices_np = self._seen_indices.numpy()

    # ----------------------------------------------------------------- ids
    @property
    def rating_range(self) -> tuple[float, float]:
        return (self.rating_min, self.rating_max)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def user_rows(self, ids: Sequence[str]) -> np.ndarray:
        """Row of each user id, -1 where unknown."""
        # map() over the bound dict.get avoids a Python generator frame per id (~25% faster).
        rows = map(self._user_rows.get, ids, repeat(UNKNOWN))
        return np.fromiter(rows, dtype=np.int64, count=len(ids))

    def item_rows(self, ids: Sequence[str]) -> np.ndarray:
        """Row of each item id, -1 where unknown."""
        rows = map(self._item_rows.get, ids, repeat(UNKNOWN))
        return np.fromiter(rows, dtype=np.int64, count=len(ids))

    def user_row(self, user_id: str) -> int:
        """Row of one user id, -1 when unknown (one dict lookup: the per-call hot path)."""
        return self._user_rows.get(user_id, UNKNOWN)

    def item_row(self, item_id: str) -> int:
        """Row of one item id, -1 when unknown."""
        return self._item_rows.get(item_id, UNKNOWN)

    def seen_items(self, user_row: int) -> torch.Tensor:
        """The rows of the items a user rated in training."""
        return self._seen_indices[self._seen_indptr[user_row] : self._seen_indptr[user_row + 1]]

    # ------------------------------------------------------------- ratings
    def predict(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Predicted ratings for pairs of rows, clipped to the rating range.

        A row of -1 (unknown id) contributes no factors and no bias: the answer falls back to the
        global mean plus whichever biases are known (the cold-start estimate).
        """
        known_user = users >= 0
        known_item = items >= 0
        u = users.clamp(min=0)
        i = items.clamp(min=0)
        both = known_user & known_item
        dot = (self.user_factors[u] * self.item_factors[i]).sum(dim=1) * both
        estimate = (
            self.global_mean + self.user_bias[u] * known_user + self.item_bias[i] * known_item + dot
        )
        return estimate.clamp_(self.rating_min, self.rating_max)

    # ------------------------------------------------------------- ranking
    def top_k(
        self, users: torch.Tensor, k: int, requests: Sequence[RankRequest] | None = None
    ) -> Ranked:
        """Best ``k`` items for each user row: a list of (item rows, scores), best first.

        A row of -1 (unknown user) gets the popularity ranking. Fewer than ``k`` come back when
        fewer items are eligible.
        """
        return self._top_k(users, k, requests).tensors()

    def top_k_lists(
        self, users: torch.Tensor, k: int, requests: Sequence[RankRequest] | None = None
    ) -> RankedLists:
        """:meth:`top_k` as Python lists, converted with one ``tolist()`` for the whole batch
        rather than a few tensor ops per row (the server's path: it writes lists anyway)."""
        return self._top_k(users, k, requests).lists()

    def similar_items(
        self, items: torch.Tensor, k: int, requests: Sequence[RankRequest] | None = None
    ) -> Ranked:
        """Nearest ``k`` items to each query item by cosine similarity (never the item itself)."""
        return self._similar(items, k, requests).tensors()

    def similar_items_lists(
        self, items: torch.Tensor, k: int, requests: Sequence[RankRequest] | None = None
    ) -> RankedLists:
        """:meth:`similar_items` as Python lists (see :meth:`top_k_lists`)."""
        return self._similar(items, k, requests).lists()

    def _top_k(
        self, users: torch.Tensor, k: int, requests: Sequence[RankRequest] | None
    ) -> _Ranking:
        rows = list(requests) if requests is not None else [_DEFAULT_RANK] * len(users)
        # Row bookkeeping in numpy: a numpy op costs ~1 us, a torch op several; a batch makes
        # about a dozen of them, and a lone call pays them all.
        user_rows = users.numpy()
        unknown = user_rows < 0
        popular = unknown if unknown.any() else None
        clamped = users if popular is None else torch.from_numpy(np.maximum(user_rows, 0))
        return self._rank(
            self._rank_user[clamped],
            self._rank_item,
            key_bias=self._rank_item_bias,
            key_scale=None,
            offset=self._rank_user_offset[clamped],
            k=k,
            requests=rows,
            seen_users=user_rows,
            popular_rows=popular,
            self_items=None,
        )

    def _similar(
        self, items: torch.Tensor, k: int, requests: Sequence[RankRequest] | None
    ) -> _Ranking:
        rows = list(requests) if requests is not None else [_NO_SEEN_RANK] * len(items)
        query = torch.nn.functional.normalize(self._similarity_keys[items], dim=1, eps=_NORM_EPS)
        return self._rank(
            query,
            self._similarity_keys,
            key_bias=None,
            key_scale=self._similarity_scale,
            offset=None,
            k=k,
            requests=rows,
            seen_users=None,  # "seen" means nothing for an item query
            popular_rows=None,
            self_items=items.numpy(),
        )

    def _rank(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        *,
        key_bias: torch.Tensor | None,
        key_scale: torch.Tensor | None,
        offset: torch.Tensor | None,
        k: int,
        requests: list[RankRequest],
        seen_users: np.ndarray | None,
        popular_rows: np.ndarray | None,
        self_items: np.ndarray | None,
    ) -> _Ranking:
        batch = len(requests)
        singles: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # Rows with an allow-list score only their candidates; the rest share chunked full scans.
        for row, request in enumerate(requests):
            if request.candidates is not None:
                singles[row] = self._rank_candidates(
                    query[row],
                    keys,
                    key_bias=key_bias,
                    key_scale=key_scale,
                    offset=0.0 if offset is None else float(offset[row]),
                    k=k,
                    request=request,
                    seen_user=None if seen_users is None else int(seen_users[row]),
                    popular=popular_rows is not None and bool(popular_rows[row]),
                    self_item=None if self_items is None else int(self_items[row]),
                )
        if not singles:  # the common case: no row selection, no copies
            full_rows = list(range(batch))
            full_requests = requests
        else:
            full_rows = [row for row in range(batch) if row not in singles]
            full_requests = [requests[row] for row in full_rows]
            if full_rows:
                pick = np.array(full_rows, dtype=np.int64)
                query = query[torch.from_numpy(pick)]
                offset = None if offset is None else offset[torch.from_numpy(pick)]
                seen_users = None if seen_users is None else seen_users[pick]
                popular_rows = None if popular_rows is None else popular_rows[pick]
                self_items = None if self_items is None else self_items[pick]
        if not full_rows:
            empty = torch.empty(0, 0)
            return _Ranking(batch, [], empty, empty.long(), singles)
        banned_rows, banned_cols = self._banned(full_requests, seen_users, self_items)
        if popular_rows is not None and not popular_rows.any():
            popular_rows = None
        scores, indices = self._chunked_topk(
            query,
            keys,
            key_bias=key_bias,
            key_scale=key_scale,
            offset=offset,
            k=k,
            banned_rows=banned_rows,
            banned_cols=banned_cols,
            popular=None if popular_rows is None else torch.from_numpy(popular_rows),
        )
        return _Ranking(batch, full_rows, scores, indices, singles)

    def _banned(
        self,
        requests: Sequence[RankRequest],
        seen_users: np.ndarray | None,
        self_items: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(row position, item) pairs to mask, as two flat int64 arrays.

        Seen items are gathered for the whole batch at once from the CSR arrays rather than with
        a slice per row, so a batch of 64 rows costs about what one row does.
        """
        positions: list[np.ndarray] = []
        columns: list[np.ndarray] = []
        if seen_users is not None:
            wanted = np.array([r.exclude_seen for r in requests], dtype=bool) & (seen_users >= 0)
            if wanted.any():
                indptr = self._seen_indptr_np
                rows = np.flatnonzero(wanted)
                users = seen_users[rows]
                starts = indptr[users]
                lengths = indptr[users + 1] - starts
                total = int(lengths.sum())
                if total:
                    # Entry j of row r is at starts[r] + j: repeat each start, add j.
                    first = np.cumsum(lengths) - lengths
                    within = np.arange(total) - np.repeat(first, lengths)
                    positions.append(np.repeat(rows, lengths))
                    columns.append(self._seen_indices_np[np.repeat(starts, lengths) + within])
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

    def _chunked_topk(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        *,
        key_bias: torch.Tensor | None,
        key_scale: torch.Tensor | None,
        offset: torch.Tensor | None,
        k: int,
        banned_rows: np.ndarray,
        banned_cols: np.ndarray,
        popular: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n_keys = keys.shape[0]
        one_chunk = n_keys <= self.chunk_size
        best_scores = torch.empty(query.shape[0], 0)
        best_items = torch.empty(query.shape[0], 0, dtype=torch.int64)
        for start in range(0, n_keys, self.chunk_size):
            stop = min(start + self.chunk_size, n_keys)
            chunk = keys if one_chunk else keys[start:stop]
            scores = query @ chunk.T
            if key_scale is not None:
                scores *= key_scale if one_chunk else key_scale[start:stop]
            if key_bias is not None:
                scores += key_bias if one_chunk else key_bias[start:stop]
            if offset is not None:
                scores += offset.unsqueeze(1)
            if popular is not None:
                scores[popular] = self._popularity_score[start:stop]
            if banned_cols.size:
                if one_chunk:
                    rows, cols = banned_rows, banned_cols
                else:
                    in_chunk = (banned_cols >= start) & (banned_cols < stop)
                    rows, cols = banned_rows[in_chunk], banned_cols[in_chunk] - start
                scores[torch.from_numpy(rows), torch.from_numpy(cols)] = -torch.inf
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

    def _rank_candidates(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        *,
        key_bias: torch.Tensor | None,
        key_scale: torch.Tensor | None,
        offset: float,
        k: int,
        request: RankRequest,
        seen_user: int | None,
        popular: bool,
        self_item: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert request.candidates is not None
        candidates = torch.unique(request.candidates)
        if popular:
            scores = self._popularity_score[candidates]
        else:
            scores = keys[candidates] @ query
            if key_scale is not None:
                scores *= key_scale[candidates]
            scores += offset
            if key_bias is not None:
                scores += key_bias[candidates]
        drop = torch.zeros(candidates.numel(), dtype=torch.bool)
        if request.exclude is not None and request.exclude.numel():
            drop |= torch.isin(candidates, request.exclude)
        if request.exclude_seen and seen_user is not None and seen_user >= 0:
            drop |= torch.isin(candidates, self.seen_items(seen_user))
        if self_item is not None:
            drop |= candidates == self_item
        candidates, scores = candidates[~drop], scores[~drop]
        top = torch.topk(scores, min(k, candidates.numel()))
        return candidates[top.indices], top.values


_DEFAULT_RANK = RankRequest()
_NO_SEEN_RANK = RankRequest(exclude_seen=False)


@dataclass(frozen=True)
class _Ranking:
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
            finite = math.isfinite
            for pos, row in enumerate(self.full_rows):
                items, scores = all_items[pos], all_scores[pos]
                # Sorted best first: masked items (-inf) sit at the end, and NaN at the front.
                if scores and not (finite(scores[0]) and finite(scores[-1])):
                    keep = [j for j, score in enumerate(scores) if math.isfinite(score)]
                    items, scores = [items[j] for j in keep], [scores[j] for j in keep]
                out[row] = (items, scores)
        for row, (rows, scores) in self.singles.items():
            out[row] = (rows.tolist(), scores.tolist())
        return [r for r in out if r is not None]
