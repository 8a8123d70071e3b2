"""The in-process model: batched rating prediction, top-k and similar items over a loaded artifact.

The server, ``mfserve evaluate`` and ``mfserve recommend`` all answer through this class, so the
figures a user measures from the outside are the figures training reported.

Every method takes a batch: index tensors in, tensors out, with no per-item Python loop. Ids are
mapped to rows with one dict lookup each; -1 marks an id the model does not know.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import repeat

import numpy as np
import torch

from mfserve.training.artifact import ModelArtifact
from mfserve.training.ranking import (
    Ranked,
    RankedLists,
    Ranking,
    RankingTables,
    RankRequest,
    banned_pairs,
    chunked_topk,
    finite_lists,
    seen_pairs,
)

__all__ = ["UNKNOWN", "RankRequest", "Ranked", "RankedLists", "Recommender"]

UNKNOWN = -1
# Items scored per matrix product when ranking: bounds the [batch, chunk] score matrix so a
# million-item catalogue never needs a [batch, n_items] one.
DEFAULT_CHUNK = 65_536
# As torch.nn.functional.normalize: a zero vector stays zero instead of dividing by zero.
_NORM_EPS = 1e-12


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
        # "" is never an id (training refuses it): keeping it out of the maps lets a lookup's -1
        # stand for "empty or unknown", so the server validates only batches that have a -1.
        self._user_rows.pop("", None)
        self._item_rows.pop("", None)
        self.item_ids = artifact.item_ids
        self.user_ids = artifact.user_ids

        # Ranking: one product of a user query against item keys. Without a ranking head, rank by
        # predicted rating; the user's own bias and the global mean do not change the order but are
        # kept so that scores read as ratings.
        rank_user = tensors.get("rank_user_factors")
        if rank_user is not None:
            rank_item = tensors["rank_item_factors"]
            # The default iALS head has no item bias: None skips an add of zeros on every call.
            rank_item_bias: torch.Tensor | None = tensors.get("rank_item_bias")
            self._rank_user_offset = torch.zeros(artifact.n_users)
            self._rank_offset: torch.Tensor | None = None  # all zero: no add per call
        else:
            rank_user, rank_item = self.user_factors, self.item_factors
            rank_item_bias = self.item_bias
            self._rank_user_offset = self.user_bias + self.global_mean
            self._rank_offset = self._rank_user_offset
        self._rank_user = rank_user.contiguous()
        self._rank_user_np = self._rank_user.numpy()  # the same memory, for batch gathers
        self._rank_item = rank_item.contiguous()
        self._rank_item_bias = None if rank_item_bias is None else rank_item_bias.contiguous()

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

    @property
    def user_index(self) -> Mapping[str, int]:
        """Row of each user id (read-only by contract: the lookups below share it)."""
        return self._user_rows

    @property
    def item_index(self) -> Mapping[str, int]:
        """Row of each item id (read-only by contract)."""
        return self._item_rows

    def ranking_tables(self) -> RankingTables:
        """The exact ranking's tables as numpy views (no copies), in :meth:`top_k`'s formula."""
        return RankingTables(
            self._rank_user_np,
            self._rank_item.numpy(),
            None if self._rank_item_bias is None else self._rank_item_bias.numpy(),
            None if self._rank_offset is None else self._rank_offset.numpy(),
            self._seen_indptr_np,
            self._seen_indices_np,
        )

    def user_rows(self, ids: Sequence[str]) -> np.ndarray:
        """Row of each user id, -1 where unknown."""
        return _rows(self._user_rows, ids)

    def item_rows(self, ids: Sequence[str]) -> np.ndarray:
        """Row of each item id, -1 where unknown."""
        return _rows(self._item_rows, ids)

    def user_row(self, user_id: str) -> int:
        """Row of one user id, -1 when unknown (one dict lookup: the per-call hot path)."""
        return self._user_rows.get(user_id, UNKNOWN)

    def item_row(self, item_id: str) -> int:
        """Row of one item id, -1 when unknown."""
        return self._item_rows.get(item_id, UNKNOWN)

    def seen_items(self, user_row: int) -> torch.Tensor:
        """The rows of the items a user rated in training."""
        seen: torch.Tensor = self._seen_indices[
            self._seen_indptr[user_row] : self._seen_indptr[user_row + 1]
        ]
        return seen

    def seen_rows(self, user_row: int) -> np.ndarray:
        """The item rows a user rated in training (a numpy view of the CSR arrays, no copy)."""
        indptr = self._seen_indptr_np
        rows: np.ndarray = self._seen_indices_np[indptr[user_row] : indptr[user_row + 1]]
        return rows

    def seen_count(self, user_row: int) -> int:
        """How many items a user rated in training (numpy, no tensor: the server asks per call)."""
        indptr = self._seen_indptr_np
        return int(indptr[user_row + 1] - indptr[user_row])

    # ------------------------------------------------------------- ratings
    def predict(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Predicted ratings for pairs of rows, clipped to the rating range.

        A row of -1 (unknown id) contributes no factors and no bias: the answer falls back to the
        global mean plus whichever biases are known (the cold-start estimate).
        """
        # index_select gathers rows ~3x faster than advanced indexing; a batch of known rows (the
        # common case: the server refuses unknown ids unless asked) skips the masks. Both paths
        # add in the same order, so a pair gets the same rating whichever path it takes.
        user_rows, item_rows = users.numpy(), items.numpy()
        known = not user_rows.size or (user_rows.min() >= 0 and item_rows.min() >= 0)
        if known:
            u, i = users, items
        else:
            known_user, known_item = users >= 0, items >= 0
            u, i = users.clamp(min=0), items.clamp(min=0)
        estimate: torch.Tensor = torch.linalg.vecdot(
            self.user_factors.index_select(0, u), self.item_factors.index_select(0, i)
        )
        if known:
            estimate += self.user_bias.index_select(0, u)
            estimate += self.item_bias.index_select(0, i)
        else:
            estimate *= known_user & known_item
            estimate += self.user_bias.index_select(0, u) * known_user
            estimate += self.item_bias.index_select(0, i) * known_item
        estimate += self.global_mean
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
    ) -> Ranking:
        rows = list(requests) if requests is not None else [_DEFAULT_RANK] * len(users)
        # Row bookkeeping in numpy: a numpy op costs ~1 us, a torch op several; a batch makes
        # about a dozen of them, and a lone call pays them all.
        user_rows = users.numpy()
        if len(rows) == 1:
            alone = self._top_one(int(user_rows[0]), k, rows[0])
            if alone is not None:
                return Ranking(1, [0], alone.values, alone.indices, {})
        unknown = user_rows < 0
        popular = unknown if unknown.any() else None
        query_rows = user_rows if popular is None else np.maximum(user_rows, 0)
        # Gathered in numpy: a torch op releases the GIL and must win it back, and under load a
        # batch on the compute thread would queue behind the event loop once per op (see
        # mfserve.server.batching). Only the product and the top-k, worth the hand-off, are torch.
        return self._rank(
            torch.from_numpy(self._rank_user_np[query_rows]),
            self._rank_item,
            key_bias=self._rank_item_bias,
            key_scale=None,
            offset=None
            if self._rank_offset is None
            else torch.from_numpy(self._rank_offset.numpy()[query_rows]),
            k=k,
            requests=rows,
            seen_users=user_rows,
            popular_rows=popular,
            self_items=None,
        )

    def top_one_lists(
        self, user: int, k: int, request: RankRequest
    ) -> tuple[list[int], list[float]] | None:
        """:meth:`top_k_lists` for one user row, straight to lists (the server's lone TopK), or
        None when that row needs the general path (see :meth:`_top_one`)."""
        top = self._top_one(user, k, request)
        if top is None:
            return None
        ranked: tuple[list[int], list[float]] = finite_lists(
            top.indices[0].tolist(), top.values[0].tolist()
        )
        return ranked

    def top_k_known_lists(
        self, users: Sequence[int], k: int, exclude_seen: Sequence[bool]
    ) -> RankedLists | None:
        """:meth:`top_k_lists` for known user rows without allow or deny lists (the server's usual
        batch), or None when the catalogue spans several chunks (use :meth:`top_k_lists`).

        The general path's tensor ops in its order, so the same answers bit for bit, but in a
        handful of steps: on the server's compute thread every Python step holds the GIL the
        event loop needs, and every small torch op hands the GIL over and must win it back.
        """
        keys = self._rank_item
        n_keys = keys.shape[0]
        if n_keys > self.chunk_size:
            return None
        user_rows = np.array(users, dtype=np.int64)
        scores = torch.from_numpy(self._rank_user_np[user_rows]) @ keys.T
        if self._rank_item_bias is not None:
            scores += self._rank_item_bias
        if self._rank_offset is not None:
            scores += torch.from_numpy(self._rank_offset.numpy()[user_rows]).unsqueeze(1)
        wanted = np.flatnonzero(np.array(exclude_seen, dtype=bool))
        if wanted.size:
            rows, cols = seen_pairs(
                wanted, user_rows[wanted], self._seen_indptr_np, self._seen_indices_np
            )
            scores.numpy()[rows, cols] = -np.inf
        top = torch.topk(scores, min(k, n_keys), dim=1)
        return list(map(finite_lists, top.indices.tolist(), top.values.tolist()))

    def _top_one(self, user: int, k: int, request: RankRequest) -> torch.return_types.topk | None:
        """One known user without allow/deny lists over a one-chunk catalogue (a lone TopK): the
        full scan's own tensor ops, in its order (the same answer bit for bit), without the batch
        bookkeeping around them. None when the general path is needed."""
        keys = self._rank_item
        n_keys = keys.shape[0]
        exclude = request.exclude
        if (
            user < 0
            or request.candidates is not None
            or (exclude is not None and exclude.numel())
            or n_keys > self.chunk_size
        ):
            return None
        scores = self._rank_user[user : user + 1] @ keys.T
        if self._rank_item_bias is not None:
            scores += self._rank_item_bias
        if self._rank_offset is not None:
            scores += self._rank_offset[user : user + 1].unsqueeze(1)
        if request.exclude_seen:
            start, stop = self._seen_indptr_np[user], self._seen_indptr_np[user + 1]
            if stop > start:  # the user's CSR slice: no index arrays to build
                scores.numpy()[0, self._seen_indices_np[start:stop]] = -np.inf
        return torch.topk(scores, min(k, n_keys), dim=1)

    def _similar(
        self, items: torch.Tensor, k: int, requests: Sequence[RankRequest] | None
    ) -> Ranking:
        rows = list(requests) if requests is not None else [_NO_SEEN_RANK] * len(items)
        query = torch.nn.functional.normalize(
            self._similarity_keys.index_select(0, items), dim=1, eps=_NORM_EPS
        )
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
    ) -> Ranking:
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
            return Ranking(batch, [], empty, empty.long(), singles)
        banned_rows, banned_cols = banned_pairs(
            full_requests, seen_users, self_items, self._seen_indptr_np, self._seen_indices_np
        )
        if popular_rows is not None and not popular_rows.any():
            popular_rows = None
        scores, indices = chunked_topk(
            query,
            keys,
            key_bias=key_bias,
            key_scale=key_scale,
            offset=offset,
            k=k,
            banned_rows=banned_rows,
            banned_cols=banned_cols,
            popular=None if popular_rows is None else torch.from_numpy(popular_rows),
            popularity_score=self._popularity_score,
            chunk_size=self.chunk_size,
        )
        return Ranking(batch, full_rows, scores, indices, singles)

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


def _rows(rows: dict[str, int], ids: Sequence[str]) -> np.ndarray:
    """``rows[id]`` for each id, -1 where unknown: one C-level pass, no Python frame per id."""
    try:
        # The common case, every id known: __getitem__ needs no default argument per id (~20%
        # faster than get); the first unknown id ends the pass and the ids are looked up again.
        return np.fromiter(map(rows.__getitem__, ids), dtype=np.int64, count=len(ids))
    except KeyError:
        return np.fromiter(map(rows.get, ids, repeat(UNKNOWN)), dtype=np.int64, count=len(ids))


_DEFAULT_RANK = RankRequest()
_NO_SEEN_RANK = RankRequest(exclude_seen=False)
