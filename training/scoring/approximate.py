"""Approximate top-k: a faiss index (:mod:`.ann`) answers known users without an allow-list; the
exact ranker answers the rest (unknown users, allow-lists) and every similar-items query."""

from __future__ import annotations

from collections.abc import Sequence

from mfserve.training.scoring.ann import AnnIndex
from mfserve.training.scoring.exact import ExactRanker
from mfserve.training.scoring.types import RankedLists, RankRequest

# Per-call search parameter of each index kind (the others are build parameters).
SEARCH_PARAM = {"hnsw": "ef_search", "ivf": "nprobe"}


class ApproximateRanker:
    """An index and the search parameter it is queried with, over a model's exact ranker."""

    def __init__(self, index: AnnIndex, exact: ExactRanker, search: int | None = None) -> None:
        """``search``: the per-call ``ef_search`` (HNSW) or ``nprobe`` (IVF); None or 0 uses the
        value stored with the index."""
        self.index = index
        self.exact = exact
        knob = SEARCH_PARAM[index.kind]
        value = int(search or index.params[knob])
        self.search = {knob: value}
        if index.kind == "hnsw":
            # Distances an HNSW search computes: about ef_search candidates x 2M neighbours each.
            self._visits = value * 2 * index.params.get("m", 16)
        else:
            # nprobe inverted lists of about n_items / nlist vectors each.
            self._visits = value * -(-index.n_items // max(1, index.params.get("nlist", 1)))

    @property
    def kind(self) -> str:
        return str(self.index.kind)

    def describe(self) -> str:
        params = " ".join(f"{k}={v}" for k, v in self.index.params.items())
        layout = self.index.extra.get("layout", "item order")
        ((knob, value),) = self.search.items()
        return (
            f"approximate {self.kind} index {params}, layout {layout}, serving {knob}={value}, "
            f"built in {self.index.build_seconds:.0f}s"
        )

    def visits(self, user: int, request: RankRequest) -> int:
        """Distances one query computes; a heavy user's HNSW walk is widened by the rows it leaves
        out (``AnnIndex.walk_width``), and an exact query costs what the exact ranker scans."""
        if user < 0 or request.candidates is not None:
            return int(self.exact.visits(user, request))
        ef = self.search.get("ef_search")
        if not ef:
            return int(self._visits)
        excluded = 0 if request.exclude is None else int(request.exclude.numel())
        if request.exclude_seen:
            excluded += int(self.exact.tables.seen_count(user))
        return int(self._visits * (self.index.walk_width(ef, 0, excluded) or ef) // ef)

    def top_k(self, users: Sequence[int], k: int, requests: Sequence[RankRequest]) -> RankedLists:
        # Rows as a list, not a tensor: the index needs none (measured in a serving process, a
        # lone query's torch calls cost ~65-85 us on cold caches, a third of the search's time).
        return self.index.top_k_lists(self.exact, users, k, requests, **self.search)

    def similar(self, items: Sequence[int], k: int, requests: Sequence[RankRequest]) -> RankedLists:
        return self.exact.similar(items, k, requests)
