"""Building an approximate index over a version's ranking head, and measuring its recall.

The index itself (search, exclusions, the server's path) is :mod:`mfserve.training.scoring.ann`;
storing it beside a version is :mod:`mfserve.training.ann_store`; the HNSW graph's memory layout
is :mod:`mfserve.training.ann_layout`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mfserve.training.ann_layout import locality_ordered
from mfserve.training.artifact import ModelArtifact
from mfserve.training.scoring.ann import (
    DEFAULT_PARAMS,
    KINDS,
    AnnError,
    AnnIndex,
    faiss_module,
    model_sha256,
)
from mfserve.training.scoring.types import RankingTables, RankRequest, ranking_tables

if TYPE_CHECKING:
    from mfserve.training.recommender import Recommender


def _augmented_keys(tables: RankingTables) -> np.ndarray:
    keys = tables.keys.astype(np.float32)
    if tables.key_bias is not None:
        keys = np.concatenate([keys, tables.key_bias.astype(np.float32)[:, None]], axis=1)
    return np.ascontiguousarray(keys)


def build_index(
    artifact: ModelArtifact,
    kind: str = "hnsw",
    *,
    seed: int = 0,
    locality: bool = True,
    **params: int,
) -> AnnIndex:
    """Build an HNSW or IVF inner-product index over ``artifact``'s ranking item factors.

    ``params``: ``m``, ``ef_construction``, ``ef_search`` (hnsw); ``nlist``, ``nprobe`` (ivf).
    ``locality``: renumber an HNSW graph so that neighbours sit together in memory (same answers,
    faster walks on a large catalogue: :mod:`mfserve.training.ann_layout`).
    """
    if kind not in KINDS:
        raise AnnError(f"unknown index kind {kind!r}; expected one of {', '.join(KINDS)}")
    unknown = set(params) - set(DEFAULT_PARAMS[kind])
    if unknown:
        raise AnnError(f"unknown {kind} parameter(s): {', '.join(sorted(unknown))}")
    faiss = faiss_module()
    chosen = {**DEFAULT_PARAMS[kind], **params}
    tables = ranking_tables(artifact)
    keys = _augmented_keys(tables)
    n, dim = keys.shape
    extra: dict[str, Any] = {}
    started = time.perf_counter()
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, chosen["m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = chosen["ef_construction"]
        index.hnsw.efSearch = chosen["ef_search"]
        index.add(keys)
        if locality:
            index = locality_ordered(index, faiss)
            extra["layout"] = "breadth-first"
    else:
        if chosen["nlist"] <= 0:
            chosen["nlist"] = max(
                1, min(n // 39, int(4 * n**0.5))
            )  # faiss wants >= 39 points a list
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, chosen["nlist"], faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(keys)
        index.add(keys)
        index.nprobe = chosen["nprobe"]
    seconds = time.perf_counter() - started
    return AnnIndex(kind, index, chosen, tables, seconds, model_sha256(artifact), extra=extra)


def measure_recall(
    recommender: Recommender,
    index: AnnIndex,
    n_queries: int,
    k: int = 10,
    *,
    seed: int = 0,
    exclude_seen: bool = False,
    **search_params: int,
) -> float:
    """Mean recall@k of the index against the exact torch ranking."""
    generator = torch.Generator().manual_seed(seed)
    n_queries = min(n_queries, recommender.n_users)
    users = torch.randperm(recommender.n_users, generator=generator)[:n_queries]
    requests = [RankRequest(exclude_seen=exclude_seen)] * n_queries
    exact = recommender.exact.top_k_tensors(users.tolist(), k, requests)
    approx = index.top_k(recommender.exact, users, k, requests, **search_params)
    hits = 0
    total = 0
    for (exact_rows, _), (approx_rows, _) in zip(exact, approx, strict=True):
        hits += int(torch.isin(approx_rows, exact_rows).sum())
        total += exact_rows.numel()
    return hits / max(total, 1)
