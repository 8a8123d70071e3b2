"""Optional approximate top-k: a faiss index over the ranking item factors, stored beside a version.

Built by :mod:`mfserve.training.ann_build`, stored beside a version by
:mod:`mfserve.training.ann_store` (sidecar files with checksums).

Exactness: the ranking score is ``query . item + item_bias + user_offset``. Appending 1 to the query
and the bias to the item vector makes the inner product equal ``query . item + item_bias`` exactly,
and ``user_offset`` does not change the order, so it is added back after the search.

Exclusions (seen items, deny-lists) mean faiss's own filtered search: the walk a plain search
makes (HNSW) or the lists it scans (IVF), keeping the best ``k`` rows that are not excluded (an
``IDSelector``). A query with at most ``SHARED_EXCLUSIONS`` excluded rows is searched with the
others in its batch, over-fetching ``k +`` the batch's widest exclusion and dropping the excluded
rows: neither the walk nor the scan depends on ``k`` (faiss 1.15; the tests pin the two paths to
the same answers, alone and batched), so this gives the filtered answer at one search per batch.
A heavier query (ml-latest-small's heaviest users have seen ~2,000 items) is searched alone with a
selector: an over-fetch would copy, heap and filter thousands of rows for every query in its batch.

faiss's HNSW walk keeps excluded rows among its ``ef_search`` candidates, and a user's excluded
(seen) items crowd the neighbourhood of the user's query, so a heavy user's walk ends with few
eligible candidates: recall@10 0.84 for ml-latest-small's 30 heaviest users at ef_search 64. Their
walk is widened by the number of excluded rows (up to ``MAX_WIDENED_EF``), as hnswlib's filtered
search keeps ``ef`` *eligible* candidates: 0.98 at ~4.5x the lone query's time, still far below an
exact scan of a large catalogue. Light queries keep ``ef_search`` as given.

faiss is the ``[ann]`` extra: it is imported on first use, with an error that says what to install.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mfserve.training.artifact import MANIFEST, MODEL_TENSORS, ModelArtifact
from mfserve.training.scoring.types import RankedLists, RankingTables, RankRequest

if TYPE_CHECKING:
    from mfserve.training.scoring.exact import ExactRanker

KINDS = ("hnsw", "ivf")
# Defaults measured on the 1M x 64 clustered synthetic catalogue (benchmarks/big_catalogue.py, 2
# shared cores): M=16/efConstruction=64 builds in ~80 s (M=32/100: 210-380 s) and at efSearch=64
# gives recall@10 0.994 at ~0.2 ms per lone query on one thread (M=32/100: 0.999).
DEFAULT_PARAMS: dict[str, dict[str, int]] = {
    "hnsw": {"m": 16, "ef_construction": 64, "ef_search": 64},
    "ivf": {"nlist": 0, "nprobe": 32},  # nlist 0: 4 * sqrt(n_items), a common starting point
}
# Past this many excluded rows a query is searched alone with a selector (module doc). Measured on
# ml-latest-small (benchmarks/ann_exclusions.py): each over-fetched row costs ~0.1 us, a search
# of its own ~15-20 us more than sharing one, so the two meet at ~150-200 rows for a lone query;
# lower, because in a batch every query pays for the widest.
SHARED_EXCLUSIONS = 128
# A heavy query's HNSW walk is widened by its excluded rows up to this (module doc): 16x the
# default ef_search, ~1 ms for a lone query on ml-latest-small.
MAX_WIDENED_EF = 1024


class AnnError(Exception):
    """The index is missing its dependency, corrupt, stale, or does not fit the artifact."""


def faiss_module() -> Any:
    try:
        import faiss
    except ImportError as exc:  # the [ann] extra is optional
        raise AnnError(
            "approximate top-k needs faiss: pip install 'mfserve[ann]' (or faiss-cpu)"
        ) from exc
    return faiss


def model_sha256(artifact: ModelArtifact) -> str:
    """sha256 of the artifact's model.safetensors, from its (already verified) manifest."""
    if artifact.path is None:
        raise AnnError("the artifact was never saved: build the index from a loaded version")
    try:
        manifest = json.loads((artifact.path / MANIFEST).read_text(encoding="utf-8"))
        return str(manifest["files"][MODEL_TENSORS])
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise AnnError(f"{artifact.path / MANIFEST}: no sha256 for {MODEL_TENSORS}: {exc}") from exc


@dataclass
class AnnIndex:
    """A faiss inner-product index over one artifact's ranking item factors."""

    kind: str
    index: Any = field(repr=False)  # faiss.Index
    params: dict[str, int]
    tables: RankingTables = field(repr=False)
    build_seconds: float
    model_sha256: str
    index_sha256: str = ""  # set by save() and load_index()
    extra: dict[str, Any] = field(default_factory=dict)
    _params_cache: dict[tuple[int, int], Any] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    # numpy views of the ranking queries and offsets, made once: a lone query in a server runs on
    # cold caches, where each torch-to-numpy conversion cost more than the bookkeeping it served.
    _user_queries: np.ndarray = field(init=False, repr=False, compare=False)
    _user_offsets: np.ndarray | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._user_queries = self.tables.queries
        self._user_offsets = self.tables.user_offset

    @property
    def augmented(self) -> bool:
        return self.tables.key_bias is not None

    @property
    def n_items(self) -> int:
        return int(self.index.ntotal)

    def _search_params(self, ef_search: int | None, nprobe: int | None) -> Any:
        # Per-call parameters rather than mutating the index: safe when threads share one index.
        # Built once per setting: a SWIG object per call cost ~5 us, a twentieth of a lone search.
        key = (ef_search or 0, nprobe or 0)
        params = self._params_cache.get(key)
        if params is None:
            faiss = faiss_module()
            if self.kind == "hnsw":
                params = faiss.SearchParametersHNSW(efSearch=ef_search or self.params["ef_search"])
            else:
                params = faiss.SearchParametersIVF(nprobe=nprobe or self.params["nprobe"])
            self._params_cache[key] = params
        return params

    def _filtered_params(self, skip: np.ndarray, ef_search: int | None, nprobe: int | None) -> Any:
        """Search parameters that leave out the rows in ``skip`` (built per query: the selector
        holds that query's rows)."""
        faiss = faiss_module()
        ids = np.ascontiguousarray(skip, dtype=np.int64)
        # The parameters keep references to the selectors they are given (faiss's wrapper), and
        # the batch selector copies the ids into its own set, so nothing here outlives the call.
        excluded = faiss.IDSelectorNot(faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids)))
        if self.kind == "hnsw":
            return faiss.SearchParametersHNSW(
                sel=excluded, efSearch=ef_search or self.params["ef_search"]
            )
        return faiss.SearchParametersIVF(sel=excluded, nprobe=nprobe or self.params["nprobe"])

    def _raw_search(
        self,
        queries: np.ndarray,
        fetch: int,
        ef_search: int | None,
        nprobe: int | None,
        skip: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """faiss's answer for un-augmented queries [B, d]: float32 scores and int64 rows [B, fetch],
        rows -1 where the index found fewer, leaving out the rows in ``skip``. numpy throughout: on
        1M x 64 a lone query's bookkeeping in torch cost more than the search itself."""
        batch, dim = queries.shape
        if self.augmented:
            x = np.empty((batch, dim + 1), dtype=np.float32)
            x[:, :dim] = queries
            x[:, dim] = 1.0
        else:
            x = np.ascontiguousarray(queries, dtype=np.float32)
        if skip is None:
            params = self._search_params(ef_search, nprobe)
        else:
            params = self._filtered_params(skip, ef_search, nprobe)
        scores, rows = self.index.search(x, fetch, params=params)
        return scores, rows

    def walk_width(self, ef_search: int | None, k: int, excluded: int) -> int | None:
        """The efSearch of an HNSW query that leaves out ``excluded`` rows: ``ef_search`` (or the
        stored one), widened by the excluded rows up to ``MAX_WIDENED_EF`` when they are too many
        to share a batch's search (module doc); None for IVF."""
        base = ef_search or self.params.get("ef_search", 0)
        if not base:
            return None
        walk = max(base, k)
        if excluded <= SHARED_EXCLUSIONS:
            return walk
        return max(walk, min(walk + excluded, MAX_WIDENED_EF))

    def _best(
        self,
        queries: np.ndarray,
        k: int,
        banned: Sequence[np.ndarray | None],
        ef_search: int | None,
        nprobe: int | None,
        offsets: np.ndarray | None = None,
    ) -> list[tuple[list[int], list[float]]]:
        """Best ``k`` rows and scores for each query [B, d] (1 <= k <= n_items), leaving out
        ``banned[b]``, best first, shorter where the index finds fewer; ``offsets[b]`` is added to
        row b's scores in float32. Light exclusions share one over-fetching search; heavy ones are
        searched alone with a selector (module doc)."""
        shared: list[int] = []
        alone: list[int] = []
        for b, skip in enumerate(banned):
            (shared if skip is None or len(skip) <= SHARED_EXCLUSIONS else alone).append(b)
        answers: list[tuple[list[int], list[float]]] = [([], [])] * len(banned)
        if shared:
            widest = max((len(s) for b in shared if (s := banned[b]) is not None), default=0)
            every = len(shared) == len(banned)
            scores, found = self._raw_search(
                queries if every else queries[shared],
                min(k + widest, self.n_items),
                ef_search,
                nprobe,
            )
            if offsets is not None:
                scores += (offsets if every else offsets[shared])[:, None]
            for b, found_rows, found_scores in zip(
                shared, found.tolist(), scores.tolist(), strict=True
            ):
                skip = banned[b]
                listed = None if skip is None else skip.tolist()
                answers[b] = _eligible(found_rows, found_scores, listed, k)
        for b in alone:
            skip = banned[b]
            assert skip is not None  # only queries with exclusions are searched alone
            widened = self.walk_width(ef_search, k, len(skip))
            scores, found = self._raw_search(queries[b : b + 1], k, widened, nprobe, skip)
            if offsets is not None:
                scores += offsets[b]
            answers[b] = _eligible(found[0].tolist(), scores[0].tolist(), None, k)
        return answers

    def search(
        self,
        queries: torch.Tensor,
        k: int,
        *,
        exclude: Sequence[torch.Tensor | None] | None = None,
        ef_search: int | None = None,
        nprobe: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Approximate best ``k`` items for each query row: (scores [B, k], item rows [B, k]).

        ``queries`` are un-augmented ranking queries [B, d]; scores are ``query . item + bias``.
        ``exclude[b]`` holds item rows never to return for row ``b``. Short rows are padded with
        score -inf and row -1.
        """
        batch = queries.shape[0]
        k = max(0, min(k, self.n_items))
        banned = [
            e.numpy() if e is not None and e.numel() else None
            for e in (exclude if exclude is not None else [None] * batch)
        ]
        if batch == 0 or k == 0:
            return torch.empty(batch, k), torch.empty(batch, k, dtype=torch.int64)
        plain = queries.to(torch.float32).numpy()
        if all(b is None for b in banned):  # nothing to filter: faiss's arrays are the answer
            scores, rows = self._raw_search(plain, k, ef_search, nprobe)
            found = torch.from_numpy(rows)
            return torch.from_numpy(scores).masked_fill(found < 0, -torch.inf), found
        out_scores = torch.full((batch, k), -torch.inf)
        out_rows = torch.full((batch, k), -1, dtype=torch.int64)
        for b, (items, kept) in enumerate(self._best(plain, k, banned, ef_search, nprobe)):
            out_rows[b, : len(items)] = torch.tensor(items, dtype=torch.int64)
            out_scores[b, : len(items)] = torch.tensor(kept, dtype=torch.float32)
        return out_scores, out_rows

    def top_k(
        self,
        exact: ExactRanker,
        users: torch.Tensor,
        k: int,
        requests: Sequence[RankRequest] | None = None,
        **search_params: int,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`top_k_lists` as tensors: (item rows, scores) per user."""
        return [
            (torch.tensor(items, dtype=torch.int64), torch.tensor(scores, dtype=torch.float32))
            for items, scores in self.top_k_lists(exact, users, k, requests, **search_params)
        ]

    def top_k_lists(
        self,
        exact: ExactRanker,
        users: torch.Tensor | Sequence[int],
        k: int,
        requests: Sequence[RankRequest] | None = None,
        **search_params: int,
    ) -> RankedLists:
        """Best ``k`` items (rows, scores; best first) per user row, by the index. Unknown users
        (the popularity answer) and allow-lists (a handful of candidates: exact is cheaper) are
        answered by ``exact``, the model's exact ranker, which also knows each user's seen items.
        """
        n_items = self.n_items  # one read of the SWIG attribute per call, not three
        if exact.n_items != n_items:
            raise AnnError(f"index of {n_items} items used with a model of {exact.n_items}")
        user_rows: list[int] = users.tolist() if isinstance(users, torch.Tensor) else list(users)
        reqs = list(requests) if requests is not None else [RankRequest()] * len(user_rows)
        results: list[tuple[list[int], list[float]]] = [([], [])] * len(reqs)
        approx: list[int] = []
        exact_rows: list[int] = []
        for b, row in enumerate(user_rows):
            (exact_rows if row < 0 or reqs[b].candidates is not None else approx).append(b)
        if exact_rows:
            answers = exact.top_k(
                [user_rows[b] for b in exact_rows], k, [reqs[b] for b in exact_rows]
            )
            for b, answer in zip(exact_rows, answers, strict=True):
                results[b] = answer
        k = max(0, min(k, n_items))
        if not approx or k == 0:
            return results
        banned: list[np.ndarray | None] = []
        for b in approx:
            request = reqs[b]
            skip = exact.seen_rows(user_rows[b]) if request.exclude_seen else None
            denied = request.exclude.numpy() if request.exclude is not None else None
            if denied is not None and denied.size:
                skip = denied if skip is None else np.concatenate([skip, denied])
            # A row banned twice counts twice against the fetch: a wider margin, the same answer.
            banned.append(skip if skip is not None and skip.size else None)
        rows = [user_rows[b] for b in approx]
        # One row is a slice (a view); several a gather (the usual batch under load).
        pick: list[int] | slice = slice(rows[0], rows[0] + 1) if len(rows) == 1 else rows
        answers = self._best(
            self._user_queries[pick],
            k,
            banned,
            search_params.get("ef_search"),
            search_params.get("nprobe"),
            offsets=None if self._user_offsets is None else self._user_offsets[pick],
        )
        for b, answer in zip(approx, answers, strict=True):
            results[b] = answer
        return results

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``ann-<kind>.faiss`` and its JSON sidecar into ``folder``; return the sidecar
        (:func:`mfserve.training.ann_store.save_index`)."""
        from mfserve.training.ann_store import save_index  # the store builds on this module

        sidecar: Path = save_index(self, folder)
        return sidecar


def _eligible(
    rows: list[int], scores: list[float], banned: list[int] | None, k: int
) -> tuple[list[int], list[float]]:
    """The first ``k`` of an index's answer that are real rows (not -1 padding) and not banned."""
    if banned is None and len(rows) == k and -1 not in rows:
        return rows, scores  # the usual answer: nothing to drop
    skip = set(banned) if banned is not None else set()
    items: list[int] = []
    kept: list[float] = []
    for row, score in zip(rows, scores, strict=True):
        if row >= 0 and row not in skip:
            items.append(row)
            kept.append(score)
            if len(items) == k:
                break
    return items, kept
