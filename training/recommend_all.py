"""``mfserve recommend --all --out recs.parquet``: every user's top-k, in-process, in batches.

The same lists ``BatchTopK`` streams from a server (the model's ranker, ties ordered by item row),
written as one parquet table with a row per (user, rank): ``user_id``, ``rank`` (1-based),
``item_id``, ``score``. The file is written beside its destination and renamed into place, so a
failed run never leaves half a table where a reader expects a whole one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from mfserve.training.recommender import RankRequest, Recommender
from mfserve.training.scoring.diversity import tie_stable

CHUNK_USERS = 1024


def all_recommendations(
    recommender: Recommender, k: int, *, exclude_seen: bool = True, chunk: int = CHUNK_USERS
) -> dict[str, np.ndarray]:
    """Columns of the table for every user of the model, users in model order."""
    request = RankRequest(exclude_seen=exclude_seen)
    users: list[np.ndarray] = []
    ranks: list[np.ndarray] = []
    items: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    for start in range(0, recommender.n_users, chunk):
        rows = list(range(start, min(start + chunk, recommender.n_users)))
        for user, row in zip(
            rows, recommender.top_k_lists(rows, k, [request] * len(rows)), strict=True
        ):
            ranked_items, ranked_scores = tie_stable(row)
            count = len(ranked_items)
            users.append(np.full(count, user, dtype=np.int64))
            ranks.append(np.arange(1, count + 1, dtype=np.int32))
            items.append(np.asarray(ranked_items, dtype=np.int64))
            scores.append(np.asarray(ranked_scores, dtype=np.float32))
    user_ids = np.asarray(recommender.user_ids, dtype=object)
    item_ids = np.asarray(recommender.item_ids, dtype=object)
    empty = np.empty(0, dtype=np.int64)
    return {
        "user_id": user_ids[np.concatenate(users) if users else empty],
        "rank": np.concatenate(ranks) if ranks else np.empty(0, np.int32),
        "item_id": item_ids[np.concatenate(items) if items else empty],
        "score": np.concatenate(scores) if scores else np.empty(0, np.float32),
    }


def write_recommendations(columns: dict[str, np.ndarray], out: str | os.PathLike[str]) -> Path:
    """The table as parquet at ``out``, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    target = Path(out)
    table = pa.table(
        {
            "user_id": pa.array(columns["user_id"].tolist(), type=pa.string()),
            "rank": pa.array(columns["rank"]),
            "item_id": pa.array(columns["item_id"].tolist(), type=pa.string()),
            "score": pa.array(columns["score"]),
        }
    )
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or ".")
    os.close(handle)
    try:
        pq.write_table(table, temporary)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target
