"""Writes ``pinned_answers.json``: what a running server answers for a fixed set of calls on the
bundled model, so that a later release can be checked against it (``test_pinned_answers.py``).

The TopK and SimilarItems answers in the repository were written against commit e58cfdf (the
release before ranking moved into ``mfserve.training.scoring``), serving the default recipe
trained on the bundled data by that commit (training is deterministic). The BatchPredict ratings
were written again when the rating head's gradients were written out (55e8006: the last, short
batch of an epoch is no longer scaled up, so the rating head's tensors changed; the ranking head's
did not, and the TopK/SimilarItems answers of the new model matched the pinned ones within 4e-6)::

    mfserve train --out /tmp/pin/movielens
    mfserve serve --model /tmp/pin/movielens --port 50071 &
    python tests/e2e/pin_answers.py localhost:50071 > tests/e2e/pinned_answers.json
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mfserve.client import RecommenderClient

USERS = ["1", "2", "68", "414", "610"]  # light, heavy (414 rated ~2,700 movies) and the last row
COLD_USER = "no-such-user"  # with allow_cold_start: the popularity ranking
ITEMS = ["1", "296", "2571", "79132"]
PAIRS = [("1", "296"), ("1", "2571"), ("2", "318"), ("414", "1"), ("610", "79132")]
# The calls a TopK can take: plain, seen items kept, a deny-list and an allow-list.
TOP_K_OPTIONS: list[dict[str, Any]] = [
    {},
    {"exclude_seen": False},
    {"exclude_item_ids": ["318", "356"]},
    {"candidate_item_ids": ["1", "296", "318", "356", "2571", "4993"]},
]
COLD_OPTIONS: list[dict[str, Any]] = [
    {"allow_cold_start": True},
    {"allow_cold_start": True, "exclude_item_ids": ["356"]},
]


def answers(target: str, *, concurrently: bool = False) -> dict[str, Any]:
    """The pinned calls' answers; ``concurrently``: the TopK calls sent all at once from 16
    threads, so that the server batches them (a batched answer must equal a lone one)."""
    calls = [(user, options) for user in USERS for options in TOP_K_OPTIONS]
    calls += [(COLD_USER, options) for options in COLD_OPTIONS]
    with RecommenderClient(target, timeout=30.0) as client:
        client.wait_until_ready(timeout=30)

        def top_k(call: tuple[str, dict[str, Any]]) -> dict[str, Any]:
            user, options = call
            answer = ranked(client.top_k(user, k=10, **options))
            return {"user_id": user, "options": options, "answer": answer}

        if concurrently:
            with ThreadPoolExecutor(16) as pool:
                top_k_answers = list(pool.map(top_k, calls))
        else:
            top_k_answers = [top_k(call) for call in calls]
        similar = [
            {"item_id": item, "answer": ranked(client.similar_items(item, k=10))} for item in ITEMS
        ]
        users, items = zip(*PAIRS, strict=True)
        ratings = list(client.batch_predict(list(users), list(items)))
    return {
        "top_k": top_k_answers,
        "similar_items": similar,
        "batch_predict": {"pairs": PAIRS, "ratings": ratings},
    }


def ranked(result: Any) -> dict[str, list[Any]]:
    return {"item_ids": list(result.item_ids), "scores": [rec.score for rec in result]}


def dumps(pinned: dict[str, Any]) -> str:
    """One call a line, so a changed answer shows as one changed line in a diff."""
    top_k = ",\n  ".join(json.dumps(call) for call in pinned["top_k"])
    similar = ",\n  ".join(json.dumps(call) for call in pinned["similar_items"])
    return (
        f'{{"top_k": [\n  {top_k}\n ],\n "similar_items": [\n  {similar}\n ],\n'
        f' "batch_predict": {json.dumps(pinned["batch_predict"])}}}\n'
    )


if __name__ == "__main__":
    sys.stdout.write(dumps(answers(sys.argv[1])))
