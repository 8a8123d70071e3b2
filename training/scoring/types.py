"""What every ranking implementation shares: the per-row options, the answer's shape, the tables
it reads, and the one interface (:class:`Ranker`) the rest of mfserve calls.

The ranking head is chosen here, once (:func:`ranking_tables`): an artifact with a ranking head
(``rank_*`` tensors, the iALS head) ranks by it; one without ranks by predicted rating, whose
user bias and global mean do not change the order but keep the scores readable as ratings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

import numpy as np
import torch

if TYPE_CHECKING:
    from mfserve.training.artifact import ModelArtifact
    from mfserve.training.foldin import UserEvidence

RankedRow = tuple[list[int], list[float]]  # item rows and scores, best first
RankedLists = list[RankedRow]
Ranked = list[tuple[torch.Tensor, torch.Tensor]]  # the same answer as tensors


@dataclass(frozen=True)
class RankRequest:
    """Per-row options of a batched top-k call (one row per user or query item)."""

    exclude_seen: bool = True
    exclude: torch.Tensor | None = None  # int64 item rows never to return
    candidates: torch.Tensor | None = None  # int64 item rows: rank only these
    # Interactions sent with the call: the row's user is folded in from them and ranked by
    # Recommender.top_k_folded (exactly); a Ranker is never handed such a row.
    evidence: UserEvidence | None = None
    # In (0, 1]: the row's answer is re-ranked for variety (scoring.diversity) from a pool of
    # pool_size(k) items, after ranking; rankers rank as for any row.
    diversity: float = 0.0

    @property
    def plain(self) -> bool:
        """Neither an allow-list nor a deny-list: what every fast path serves."""
        return (
            self.candidates is None
            and self.evidence is None
            and (self.exclude is None or not self.exclude.numel())
        )


class RankingTables(NamedTuple):
    """What exact and approximate ranking read, as numpy arrays sharing the artifact's memory:
    ``queries[user] . keys[item] (+ key_bias[item]) (+ user_offset[user])``, the seen items of a
    user being ``seen_indices[seen_indptr[user]:seen_indptr[user + 1]]``. Read-only by contract."""

    queries: np.ndarray  # [n_users, d]
    keys: np.ndarray  # [n_items, d]
    key_bias: np.ndarray | None  # [n_items], None when the score has no item term
    user_offset: np.ndarray | None  # [n_users], None when it is all zero
    seen_indptr: np.ndarray  # int64 [n_users + 1]
    seen_indices: np.ndarray  # int64 [n_seen]

    def seen_rows(self, user: int) -> np.ndarray:
        """The item rows ``user`` rated in training (a view, no copy)."""
        indptr = self.seen_indptr
        rows: np.ndarray = self.seen_indices[indptr[user] : indptr[user + 1]]
        return rows

    def seen_count(self, user: int) -> int:
        return int(self.seen_indptr[user + 1] - self.seen_indptr[user])


def ranking_tables(artifact: ModelArtifact) -> RankingTables:
    """The ranking head's tables (module doc): the one place that choice is made."""
    tensors = artifact.tensors
    if "rank_user_factors" in tensors:
        # The default iALS head has no item bias and no user offset: None skips adding zeros.
        queries, keys = tensors["rank_user_factors"], tensors["rank_item_factors"]
        key_bias = tensors.get("rank_item_bias")
        offset = None
    else:
        queries, keys = tensors["user_factors"], tensors["item_factors"]
        key_bias = tensors["item_bias"]
        offset = (tensors["user_bias"] + artifact.global_mean).numpy()
    return RankingTables(
        queries.contiguous().numpy(),
        keys.contiguous().numpy(),
        None if key_bias is None else key_bias.contiguous().numpy(),
        offset,
        artifact.seen_indptr.numpy(),
        artifact.seen_indices.numpy(),
    )


class Ranker(Protocol):
    """The one ranking interface: exact or approximate, compiled or torch, chosen when a version
    is loaded (:func:`mfserve.training.scoring.choose_ranker`).

    Every method takes a batch and returns one row per query, in order; ``k`` is the batch's
    largest (callers cut rows to their own). Fewer than ``k`` come back where fewer items are
    eligible. An unknown user (row -1) gets the popularity ranking.
    """

    def top_k(self, users: Sequence[int], k: int, requests: Sequence[RankRequest]) -> RankedLists:
        """Best ``k`` items for each user row."""
        ...

    def similar(self, items: Sequence[int], k: int, requests: Sequence[RankRequest]) -> RankedLists:
        """Nearest ``k`` items to each item row by cosine similarity (never the item itself)."""
        ...

    def visits(self, user: int, request: RankRequest) -> int:
        """An upper bound on the item scores (or index distances) one TopK query computes, which
        the server's batcher compares with what it computes on the event loop. A pruned scan
        usually stops far earlier, but only the bound is known before the call."""
        ...

    def describe(self) -> str:
        """Which implementation answers, and why, for the load log."""
        ...
