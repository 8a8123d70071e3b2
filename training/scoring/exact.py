"""Exact ranking through torch: the implementation every other one falls back to and is tested
against, and the only one without optional dependencies.

A batch is one matrix product against the item keys per chunk of ``chunk_size`` items (a
million-item catalogue never needs a [batch, n_items] score matrix), a mask of the pairs it must
not return, and a ``topk``. Two shapes of batch skip the general bookkeeping with the same tensor
ops in the same order, so their answers are the general path's bit for bit: a lone known user, and
a batch of known users without allow- or deny-lists over a one-chunk catalogue (the usual batch).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mfserve.training.scoring.torch_ops import (
    Ranking,
    banned_pairs,
    chunked_topk,
    finite_lists,
    seen_pairs,
)
from mfserve.training.scoring.types import Ranked, RankedLists, RankingTables, RankRequest

# Items scored per matrix product (module doc).
DEFAULT_CHUNK = 65_536
# As torch.nn.functional.normalize: a zero vector stays zero instead of dividing by zero.
NORM_EPS = 1e-12

_DEFAULT_RANK = RankRequest()
_NO_SEEN_RANK = RankRequest(exclude_seen=False)


class ExactRanker:
    """Exact top-k and similar items over one model's :class:`RankingTables`."""

    def __init__(
        self, tables: RankingTables, popularity: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK
    ) -> None:
        self.tables = tables
        self.chunk_size = chunk_size
        self.n_items = tables.keys.shape[0]
        self._queries = torch.from_numpy(tables.queries)
        self._keys = torch.from_numpy(tables.keys)
        self._key_bias = None if tables.key_bias is None else torch.from_numpy(tables.key_bias)
        self._offset = None if tables.user_offset is None else torch.from_numpy(tables.user_offset)
        # Cosine similarity without a normalised copy of the item table: a copy would be private
        # to each process (256 MB per worker at 1M x 64), while the table itself is a read-only
        # memory map shared through the page cache. Queries are normalised, and each score is
        # scaled by the key's inverse norm (one float per item).
        norms = torch.linalg.vector_norm(self._keys, dim=1)
        self._similarity_scale = 1.0 / norms.clamp_min(NORM_EPS)
        popularity = popularity.to(torch.float32)
        self._popularity_score = popularity / max(float(popularity.sum()), 1.0)
        # An unknown user's ranking, the same for everyone: most rated first, ties by item row,
        # so it never depends on k or on the batch.
        self._popular_order = np.argsort(-popularity.numpy(), kind="stable")

    def describe(self) -> str:
        return f"exact torch scan of {self.n_items:,} items"

    def visits(self, user: int, request: RankRequest) -> int:
        return self.n_items if request.candidates is None else len(request.candidates)

    def seen_rows(self, user: int) -> np.ndarray:
        rows: np.ndarray = self.tables.seen_rows(user)
        return rows

    # ------------------------------------------------------------- top-k
    def top_k(
        self, users: Sequence[int], k: int, requests: Sequence[RankRequest] | None = None
    ) -> RankedLists:
        rows = np.asarray(users, dtype=np.int64)
        reqs = list(requests) if requests is not None else [_DEFAULT_RANK] * len(rows)
        if len(rows) > 1 and rows.min() >= 0 and all(r.plain for r in reqs):
            known = self._top_k_known(rows, k, reqs)
            if known is not None:
                return known
        return self._top_k(rows, k, reqs).lists()

    def top_k_tensors(
        self, users: Sequence[int], k: int, requests: Sequence[RankRequest] | None = None
    ) -> Ranked:
        """:meth:`top_k` as tensors (no list conversion: the evaluation's path)."""
        rows = np.asarray(users, dtype=np.int64)
        reqs = list(requests) if requests is not None else [_DEFAULT_RANK] * len(rows)
        return self._top_k(rows, k, reqs).tensors()

    def _top_k(self, user_rows: np.ndarray, k: int, requests: list[RankRequest]) -> Ranking:
        # Row bookkeeping in numpy: a numpy op costs ~1 us, a torch op several; a batch makes
        # about a dozen of them, and a lone call pays them all.
        if len(requests) == 1:
            alone = self._top_one(int(user_rows[0]), k, requests[0])
            if alone is not None:
                return Ranking(1, [0], alone.values, alone.indices, {})
        unknown = user_rows < 0
        popular = unknown if unknown.any() else None
        query_rows = user_rows if popular is None else np.maximum(user_rows, 0)
        # Gathered in numpy: a torch op releases the GIL and must win it back, and under load a
        # batch on the compute thread would queue behind the event loop once per op (see
        # mfserve.server.batching). Only the product and the top-k, worth the hand-off, are torch.
        offsets = self.tables.user_offset
        return self._rank(
            torch.from_numpy(self.tables.queries[query_rows]),
            key_scale=None,
            key_bias=self._key_bias,
            offset=None if offsets is None else torch.from_numpy(offsets[query_rows]),
            k=k,
            requests=requests,
            seen_users=user_rows,
            popular_rows=popular,
            self_items=None,
        )

    def top_k_queries(
        self,
        queries: np.ndarray,
        offsets: np.ndarray | None,
        users: Sequence[int],
        k: int,
        requests: Sequence[RankRequest],
    ) -> RankedLists:
        """Best ``k`` items for query vectors solved at call time (a folded-in user), through the
        general path; ``users[j]`` (-1: none) is whose seen items ``exclude_seen`` drops."""
        return self._rank(
            torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)),
            key_scale=None,
            key_bias=self._key_bias,
            offset=None if offsets is None else torch.from_numpy(offsets),
            k=k,
            requests=list(requests),
            seen_users=np.asarray(users, dtype=np.int64),
            popular_rows=None,
            self_items=None,
        ).lists()

    def _top_k_known(
        self, user_rows: np.ndarray, k: int, requests: list[RankRequest]
    ) -> RankedLists | None:
        """Known users without allow or deny lists over a one-chunk catalogue: the general path's
        tensor ops in its order, in a handful of steps (on a server's compute thread every Python
        step holds the GIL the event loop needs). None for a multi-chunk catalogue."""
        if self.n_items > self.chunk_size:
            return None
        scores = torch.from_numpy(self.tables.queries[user_rows]) @ self._keys.T
        if self._key_bias is not None:
            scores += self._key_bias
        if self.tables.user_offset is not None:
            scores += torch.from_numpy(self.tables.user_offset[user_rows]).unsqueeze(1)
        wanted = np.flatnonzero(np.array([r.exclude_seen for r in requests], dtype=bool))
        if wanted.size:
            rows, cols = seen_pairs(
                wanted, user_rows[wanted], self.tables.seen_indptr, self.tables.seen_indices
            )
            scores.numpy()[rows, cols] = -np.inf
        top = torch.topk(scores, min(k, self.n_items), dim=1)
        return list(map(finite_lists, top.indices.tolist(), top.values.tolist()))

    def _top_one(self, user: int, k: int, request: RankRequest) -> torch.return_types.topk | None:
        """One known user without allow/deny lists over a one-chunk catalogue (a lone TopK): the
        full scan's own tensor ops, in its order, without the batch bookkeeping around them."""
        if user < 0 or not request.plain or self.n_items > self.chunk_size:
            return None
        scores = self._queries[user : user + 1] @ self._keys.T
        if self._key_bias is not None:
            scores += self._key_bias
        if self._offset is not None:
            scores += self._offset[user : user + 1].unsqueeze(1)
        if request.exclude_seen:
            seen = self.tables.seen_rows(user)
            if seen.size:  # the user's CSR slice: no index arrays to build
                scores.numpy()[0, seen] = -np.inf
        return torch.topk(scores, min(k, self.n_items), dim=1)

    # ------------------------------------------------------------- similar items
    def similar(
        self, items: Sequence[int], k: int, requests: Sequence[RankRequest] | None = None
    ) -> RankedLists:
        return self._similar(items, k, requests).lists()

    def _similar(
        self, items: Sequence[int], k: int, requests: Sequence[RankRequest] | None
    ) -> Ranking:
        rows = np.asarray(items, dtype=np.int64)
        reqs = list(requests) if requests is not None else [_NO_SEEN_RANK] * len(rows)
        query = torch.nn.functional.normalize(
            self._keys.index_select(0, torch.from_numpy(rows)), dim=1, eps=NORM_EPS
        )
        return self._rank(
            query,
            key_scale=self._similarity_scale,
            key_bias=None,
            offset=None,
            k=k,
            requests=reqs,
            seen_users=None,  # "seen" means nothing for an item query
            popular_rows=None,
            self_items=rows,
        )

    # ------------------------------------------------------------- the general path
    def _rank(
        self,
        query: torch.Tensor,
        *,
        key_bias: torch.Tensor | None,
        key_scale: torch.Tensor | None,
        offset: torch.Tensor | None,
        k: int,
        requests: list[RankRequest],
        seen_users: np.ndarray | None,
        popular_rows: np.ndarray | None,
        self_items: np.ndarray | None,
    ) -> Ranking:
        batch = len(requests)
        singles: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # Rows with an allow-list score only their candidates, unknown users read the popularity
        # order; the rest share chunked full scans.
        for row, request in enumerate(requests):
            popular = popular_rows is not None and bool(popular_rows[row])
            if request.candidates is None and popular:
                singles[row] = self._most_popular(k, request)
            elif request.candidates is not None:
                singles[row] = self._rank_candidates(
                    query[row],
                    key_bias=key_bias,
                    key_scale=key_scale,
                    offset=0.0 if offset is None else float(offset[row]),
                    k=k,
                    request=request,
                    seen_user=None if seen_users is None else int(seen_users[row]),
                    popular=popular,
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
                self_items = None if self_items is None else self_items[pick]
        if not full_rows:
            empty = torch.empty(0, 0)
            return Ranking(batch, [], empty, empty.long(), singles)
        banned_rows, banned_cols = banned_pairs(
            full_requests,
            seen_users,
            self_items,
            self.tables.seen_indptr,
            self.tables.seen_indices,
        )
        scores, indices = chunked_topk(
            query,
            self._keys,
            key_bias=key_bias,
            key_scale=key_scale,
            offset=offset,
            k=k,
            banned_rows=banned_rows,
            banned_cols=banned_cols,
            chunk_size=self.chunk_size,
        )
        return Ranking(batch, full_rows, scores, indices, singles)

    def _rank_candidates(
        self,
        query: torch.Tensor,
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
            scores = self._keys[candidates] @ query
            if key_scale is not None:
                scores *= key_scale[candidates]
            scores += offset
            if key_bias is not None:
                scores += key_bias[candidates]
        drop = torch.zeros(candidates.numel(), dtype=torch.bool)
        if request.exclude is not None and request.exclude.numel():
            drop |= torch.isin(candidates, request.exclude)
        if request.exclude_seen and seen_user is not None and seen_user >= 0:
            drop |= torch.isin(candidates, torch.from_numpy(self.tables.seen_rows(seen_user)))
        if self_item is not None:
            drop |= candidates == self_item
        candidates, scores = candidates[~drop], scores[~drop]
        # A stable sort, not topk: candidates are in row order, so tied scores (popularity counts
        # often tie) rank by item row whatever k the batch asked for.
        ranked = torch.sort(scores, descending=True, stable=True)
        keep = ranked.indices[: min(k, candidates.numel())]
        return candidates[keep], ranked.values[: keep.numel()]

    def _most_popular(self, k: int, request: RankRequest) -> tuple[torch.Tensor, torch.Tensor]:
        """An unknown user's best ``k``: the popularity order without the deny-list."""
        order = self._popular_order
        if request.exclude is not None and request.exclude.numel():
            denied = request.exclude.numpy()
            head = order[: k + denied.size]
            order = head[~np.isin(head, denied)]
        rows = torch.from_numpy(order[:k].copy())
        return rows, self._popularity_score[rows]
