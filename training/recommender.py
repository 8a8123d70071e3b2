"""The in-process model: batched rating prediction, top-k and similar items over a loaded artifact.

The server, ``mfserve evaluate`` and ``mfserve recommend`` all answer through this class, its
:attr:`Recommender.ranker` and its rating kernel (:mod:`mfserve.training.scoring`), so the figures a
user measures from the outside are the figures training reported.

Every method takes a batch: index tensors in, tensors out, with no per-item Python loop. Ids are
mapped to rows with one dict lookup each; -1 marks an id the model does not know.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping, Sequence
from itertools import repeat

import numpy as np
import torch

from mfserve.training.artifact import ModelArtifact
from mfserve.training.foldin import FoldIn, UserEvidence
from mfserve.training.scoring import (
    DEFAULT_CHUNK,
    ExactRanker,
    Ranked,
    RankedLists,
    Ranker,
    RankingTables,
    RankRequest,
    choose_ranker,
    ranking_tables,
)
from mfserve.training.scoring.compiled import CompiledRanker
from mfserve.training.scoring.ratings import PairKernel, pair_kernel

__all__ = ["UNKNOWN", "RankRequest", "Ranked", "RankedLists", "Recommender", "UserEvidence"]

UNKNOWN = -1


class Recommender:
    """Scores users against items with the artifact's rating and ranking heads."""

    def __init__(
        self,
        artifact: ModelArtifact,
        *,
        chunk_size: int = DEFAULT_CHUNK,
        compiled: bool | None = None,
    ) -> None:
        """``compiled``: whether ranking and rating may use the numba kernels (None: where they
        can; False: torch only, the reference the tests compare the kernels with)."""
        self.artifact = artifact
        self.chunk_size = chunk_size
        self._compiled = compiled
        # The kernels are built on first use (compiling and measuring take a while, and a model
        # served with an approximate index never needs the exact ranking kernel); the lock makes
        # two first users build once.
        self._build_lock = threading.Lock()
        self._ranker: Ranker | None = None
        self._rating_kernel: PairKernel | bool | None = False  # False: not built yet
        self._fold_in: FoldIn | None = None
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

        self.exact = ExactRanker(
            ranking_tables(artifact), artifact.item_popularity, chunk_size=chunk_size
        )

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
        """The ranking head's tables as numpy views (no copies)."""
        return self.exact.tables

    @property
    def ranker(self) -> Ranker:
        """The exact ranker this model answers with (:func:`~mfserve.training.scoring.choose_ranker`:
        compiled where numba can serve, else torch), built on first use: the server builds it
        when it loads a version, before the version takes calls."""
        ranker = self._ranker
        if ranker is None:
            with self._build_lock:
                if self._ranker is None:
                    self._ranker = choose_ranker(self.exact, compiled=self._compiled)
                ranker = self._ranker
        return ranker

    def prepare(self, *, ranking: bool = True) -> None:
        """Build the kernels now (the rating kernel, and the ranker unless ``ranking`` is false),
        so that no call pays for compiling or measuring them: the server's load does this."""
        if ranking:
            self.ranker  # noqa: B018 (the property builds it)
        self.rating_kernel  # noqa: B018
        self.fold_in  # noqa: B018 (its gram matrix is one pass over the item table)

    @property
    def rating_kernel(self) -> PairKernel | None:
        """The compiled rating kernel (None without numba or with ``compiled=False``), built and
        warmed on first use."""
        kernel = self._rating_kernel
        if kernel is False:
            with self._build_lock:
                if self._rating_kernel is False:
                    built = None if self._compiled is False else pair_kernel(self.artifact)
                    self._rating_kernel = built
                kernel = self._rating_kernel
        assert kernel is not True
        return kernel

    @property
    def fold_in(self) -> FoldIn:
        """The fold-in solver of this model (:mod:`mfserve.training.foldin`), built on first use."""
        fold_in = self._fold_in
        if fold_in is None:
            with self._build_lock:
                if self._fold_in is None:
                    self._fold_in = FoldIn(self.artifact)
                fold_in = self._fold_in
        return fold_in

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
        return torch.from_numpy(self.exact.tables.seen_rows(user_row))

    # ------------------------------------------------------------- ratings
    def predict(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Predicted ratings (float32) for pairs of rows, clipped to the rating range.

        A row of -1 (unknown id) contributes no factors and no bias: the answer falls back to the
        global mean plus whichever biases are known (the cold-start estimate).
        """
        return torch.from_numpy(self.predict_rows(users.numpy(), items.numpy()))

    def predict_rows(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """:meth:`predict` over int64 row arrays, as the server calls it: the compiled kernel
        where there is one (pair by pair, so a rating never depends on its batch), else torch."""
        kernel = self.rating_kernel
        if kernel is not None:
            ratings: np.ndarray = kernel.predict(users, items)
            return ratings
        tensor = self._predict_torch(torch.from_numpy(users), torch.from_numpy(items))
        return tensor.numpy()

    def _predict_torch(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
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
        return [
            (torch.tensor(items, dtype=torch.int64), torch.tensor(scores, dtype=torch.float32))
            for items, scores in self.top_k_lists(users, k, requests)
        ]

    def top_k_lists(
        self,
        users: torch.Tensor | Sequence[int],
        k: int,
        requests: Sequence[RankRequest] | None = None,
    ) -> RankedLists:
        """:meth:`top_k` as Python lists, as :attr:`ranker` answers (the server writes lists)."""
        rows = users.tolist() if isinstance(users, torch.Tensor) else list(users)
        return self.rank_with(self.ranker, rows, k, _requests(requests, len(rows), _DEFAULT_RANK))

    def rank_with(
        self, ranker: Ranker, users: Sequence[int], k: int, requests: Sequence[RankRequest]
    ) -> RankedLists:
        """``ranker.top_k``, except for rows whose request carries ``evidence``: those users are
        folded in and ranked by :meth:`top_k_folded`; the answers keep the batch's order."""
        folded = [row for row, request in enumerate(requests) if request.evidence is not None]
        if not folded:
            return ranker.top_k(users, k, requests)
        answers: RankedLists = [([], [])] * len(requests)
        chosen_requests = [requests[row] for row in folded]
        evidence = [r.evidence for r in chosen_requests if r.evidence is not None]
        ranked = self.top_k_folded(evidence, k, chosen_requests)
        for row, answer in zip(folded, ranked, strict=True):
            answers[row] = answer
        if len(folded) < len(requests):
            chosen = set(folded)
            rest = [row for row in range(len(requests)) if row not in chosen]
            plain = ranker.top_k([users[row] for row in rest], k, [requests[row] for row in rest])
            for row, answer in zip(rest, plain, strict=True):
                answers[row] = answer
        return answers

    def top_k_folded(
        self,
        evidence: Sequence[UserEvidence],
        k: int,
        requests: Sequence[RankRequest] | None = None,
    ) -> RankedLists:
        """Best ``k`` items for users folded in from ``evidence`` (a known user's evidence adds to
        what the model knows), exactly; ``exclude_seen`` drops the interacted items too."""
        reqs = _requests(requests, len(evidence), _DEFAULT_RANK)
        queries, offsets = self.fold_in.ranking_queries(evidence)
        # The compiled scan when this model has one (built: a server with an approximate index
        # never builds it) and no row has an allow-list; else the exact general path.
        ranker = self._ranker
        if isinstance(ranker, CompiledRanker) and all(r.candidates is None for r in reqs):
            excluded = [self._excluded(e, r) for e, r in zip(evidence, reqs, strict=True)]
            return ranker.kernel.top_k_queries(queries, offsets, k, excluded)
        return self.exact.top_k_queries(
            queries,
            offsets,
            [e.user for e in evidence],
            k,
            [_excluding_interactions(r, e) for r, e in zip(reqs, evidence, strict=True)],
        )

    def _excluded(self, evidence: UserEvidence, request: RankRequest) -> np.ndarray:
        """The item rows ``request`` keeps out of a folded-in user's list: its deny-list, and
        with ``exclude_seen`` the interacted items and a known user's training items."""
        parts = []
        if request.exclude is not None and request.exclude.numel():
            parts.append(request.exclude.numpy())
        if request.exclude_seen:
            parts.append(evidence.items)
            if evidence.user >= 0:
                parts.append(self.exact.tables.seen_rows(evidence.user))
        if not parts:
            return _NOTHING
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def similar_items(
        self, items: torch.Tensor, k: int, requests: Sequence[RankRequest] | None = None
    ) -> Ranked:
        """Nearest ``k`` items to each query item by cosine similarity (never the item itself)."""
        return [
            (torch.tensor(rows, dtype=torch.int64), torch.tensor(scores, dtype=torch.float32))
            for rows, scores in self.similar_items_lists(items, k, requests)
        ]

    def similar_items_lists(
        self,
        items: torch.Tensor | Sequence[int],
        k: int,
        requests: Sequence[RankRequest] | None = None,
    ) -> RankedLists:
        """:meth:`similar_items` as Python lists."""
        rows = items.tolist() if isinstance(items, torch.Tensor) else list(items)
        return self.ranker.similar(rows, k, _requests(requests, len(rows), _NO_SEEN_RANK))


def _requests(
    requests: Sequence[RankRequest] | None, size: int, default: RankRequest
) -> Sequence[RankRequest]:
    return requests if requests is not None else [default] * size


def _excluding_interactions(request: RankRequest, evidence: UserEvidence) -> RankRequest:
    """``request`` whose ``exclude_seen`` also drops the items of ``evidence``."""
    request = dataclasses.replace(request, evidence=None)
    if not request.exclude_seen or evidence.empty:
        return request
    items = torch.from_numpy(evidence.items)
    exclude = items if request.exclude is None else torch.cat([request.exclude, items])
    return dataclasses.replace(request, exclude=exclude)


def _rows(rows: dict[str, int], ids: Sequence[str]) -> np.ndarray:
    """``rows[id]`` for each id, -1 where unknown: one C-level pass, no Python frame per id."""
    try:
        # The common case, every id known: __getitem__ needs no default argument per id (~20%
        # faster than get); the first unknown id ends the pass and the ids are looked up again.
        return np.fromiter(map(rows.__getitem__, ids), dtype=np.int64, count=len(ids))
    except KeyError:
        return np.fromiter(map(rows.get, ids, repeat(UNKNOWN)), dtype=np.int64, count=len(ids))


_DEFAULT_RANK = RankRequest()
_NOTHING = np.empty(0, dtype=np.int64)
_NO_SEEN_RANK = RankRequest(exclude_seen=False)
