"""The in-process model: batched rating prediction, top-k and similar items over a loaded artifact.

The server, ``mfserve evaluate`` and ``mfserve recommend`` all answer through this class, so the
figures a user measures from the outside are the figures training reported.

Every method takes a batch: index tensors in, tensors out, with no per-item Python loop. Ids are
mapped to rows with one dict lookup each; -1 marks an id the model does not know.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mfserve.training.artifact import ModelArtifact

UNKNOWN = -1
# Items scored per matrix product when ranking: bounds the [batch, chunk] score matrix so a
# million-item catalogue never needs a [batch, n_items] one.
DEFAULT_CHUNK = 65_536


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

        similarity_source = tensors.get("rank_item_factors", self.item_factors)
        self._item_unit = torch.nn.functional.normalize(similarity_source, dim=1).contiguous()

        popularity = artifact.item_popularity.to(torch.float32)
        self._popularity_score = popularity / max(float(popularity.sum()), 1.0)
        self._seen_indptr = artifact.seen_indptr
        self._seen_indices = artifact.seen_indices

    # ----------------------------------------------------------------- ids
    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def user_rows(self, ids: Sequence[str]) -> np.ndarray:
        """Row of each user id, -1 where unknown."""
        get = self._user_rows.get
        return np.fromiter((get(i, UNKNOWN) for i in ids), dtype=np.int64, count=len(ids))

    def item_rows(self, ids: Sequence[str]) -> np.ndarray:
        """Row of each item id, -1 where unknown."""
        get = self._item_rows.get
        return np.fromiter((get(i, UNKNOWN) for i in ids), dtype=np.int64, count=len(ids))

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
            self.global_mean
            + self.user_bias[u] * known_user
            + self.item_bias[i] * known_item
            + dot
        )
        return estimate.clamp_(self.rating_min, self.rating_max)

    # ------------------------------------------------------------- ranking
    def top_k(
        self, users: torch.Tensor, k: int, requests: Sequence[RankRequest] | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Best ``k`` items for each user row: a list of (item rows, scores), best first.

        A row of -1 (unknown user) gets the popularity ranking. Fewer than ``k`` come back when
        fewer items are eligible.
        """
        requests = list(requests) if requests is not None else [RankRequest()] * len(users)
        known = users >= 0
        query = self._rank_user[users.clamp(min=0)]
        offset = self._rank_user_offset[users.clamp(min=0)]
        return self._rank(
            query,
            self._rank_item,
            self._rank_item_bias,
            offset,
            k,
            requests,
            seen_users=users,
            popular_rows=~known,
        )

    def similar_items(
        self, items: torch.Tensor, k: int, requests: Sequence[RankRequest] | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Nearest ``k`` items to each query item by cosine similarity; the query item is excluded."""
        base = list(requests) if requests is not None else [RankRequest(exclude_seen=False)] * len(items)
        with_self = [
            RankRequest(
                exclude_seen=False,
                exclude=item.view(1) if r.exclude is None else torch.cat([r.exclude, item.view(1)]),
                candidates=r.candidates,
            )
            for item, r in zip(items, base, strict=True)
        ]
        query = self._item_unit[items]
        zeros = torch.zeros(len(items))
        return self._rank(query, self._item_unit, None, zeros, k, with_self, seen_users=None, popular_rows=None)

    def _rank(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        key_bias: torch.Tensor | None,
        offset: torch.Tensor,
        k: int,
        requests: Sequence[RankRequest],
        *,
        seen_users: torch.Tensor | None,
        popular_rows: torch.Tensor | None,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        batch = len(requests)
        results: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * batch
        # Rows with an allow-list score only their candidates; the rest share chunked full scans.
        full_rows = [r for r in range(batch) if requests[r].candidates is None]
        for row in range(batch):
            if requests[row].candidates is not None:
                results[row] = self._rank_candidates(
                    query[row], keys, key_bias, float(offset[row]), k, requests[row],
                    seen_user=None if seen_users is None else int(seen_users[row]),
                    popular=bool(popular_rows[row]) if popular_rows is not None else False,
                )
        if full_rows:
            rows = torch.tensor(full_rows, dtype=torch.int64)
            banned_rows, banned_cols = self._banned(rows, requests, seen_users)
            popular = popular_rows[rows] if popular_rows is not None else None
            scores, indices = self._chunked_topk(
                query[rows], keys, key_bias, offset[rows], k, banned_rows, banned_cols, popular
            )
            for pos, row in enumerate(full_rows):
                valid = torch.isfinite(scores[pos])
                results[row] = (indices[pos][valid], scores[pos][valid])
        return [r for r in results if r is not None]

    def _banned(
        self, rows: torch.Tensor, requests: Sequence[RankRequest], seen_users: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(row position, item) pairs to mask, as two flat tensors."""
        positions: list[torch.Tensor] = []
        columns: list[torch.Tensor] = []
        for pos, row in enumerate(rows.tolist()):
            request = requests[row]
            if seen_users is not None and request.exclude_seen and int(seen_users[row]) >= 0:
                seen = self.seen_items(int(seen_users[row]))
                positions.append(torch.full((seen.numel(),), pos, dtype=torch.int64))
                columns.append(seen)
            if request.exclude is not None and request.exclude.numel():
                positions.append(torch.full((request.exclude.numel(),), pos, dtype=torch.int64))
                columns.append(request.exclude)
        if not positions:
            empty = torch.empty(0, dtype=torch.int64)
            return empty, empty
        return torch.cat(positions), torch.cat(columns)

    def _chunked_topk(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        key_bias: torch.Tensor | None,
        offset: torch.Tensor,
        k: int,
        banned_rows: torch.Tensor,
        banned_cols: torch.Tensor,
        popular: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n_keys = keys.shape[0]
        best_scores = torch.empty(query.shape[0], 0)
        best_items = torch.empty(query.shape[0], 0, dtype=torch.int64)
        for start in range(0, n_keys, self.chunk_size):
            stop = min(start + self.chunk_size, n_keys)
            scores = query @ keys[start:stop].T
            if key_bias is not None:
                scores += key_bias[start:stop]
            scores += offset.unsqueeze(1)
            if popular is not None and bool(popular.any()):
                scores[popular] = self._popularity_score[start:stop]
            if banned_cols.numel():
                in_chunk = (banned_cols >= start) & (banned_cols < stop)
                scores[banned_rows[in_chunk], banned_cols[in_chunk] - start] = -torch.inf
            top = torch.topk(scores, min(k, stop - start), dim=1)
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
        key_bias: torch.Tensor | None,
        offset: float,
        k: int,
        request: RankRequest,
        *,
        seen_user: int | None,
        popular: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        candidates = torch.unique(request.candidates) if request.candidates is not None else None
        assert candidates is not None
        if popular:
            scores = self._popularity_score[candidates]
        else:
            scores = keys[candidates] @ query + offset
            if key_bias is not None:
                scores += key_bias[candidates]
        drop = torch.zeros(candidates.numel(), dtype=torch.bool)
        if request.exclude is not None and request.exclude.numel():
            drop |= torch.isin(candidates, request.exclude)
        if request.exclude_seen and seen_user is not None and seen_user >= 0:
            drop |= torch.isin(candidates, self.seen_items(seen_user))
        candidates, scores = candidates[~drop], scores[~drop]
        top = torch.topk(scores, min(k, candidates.numel()))
        return candidates[top.indices], top.values
