"""Synthetic models with planted structure, for tests and for benchmarks at any catalogue size.

Items fall into clusters; each cluster has a centre in factor space and its items sit near it. Each
user is drawn near one cluster's centre, so that user's top items come from that cluster: an answer
can be checked without a trained model, and an approximate index is measured on realistic,
clustered data rather than on uniform noise.
"""

from __future__ import annotations

import torch

from mfserve.training.artifact import ModelArtifact


def synthetic_artifact(
    n_users: int,
    n_items: int,
    factors: int,
    *,
    clusters: int = 32,
    seen_per_user: int = 5,
    seed: int = 0,
    rank_head: bool = True,
    titles: bool = True,
) -> ModelArtifact:
    """A model of ``n_users`` x ``n_items`` whose user ``u`` prefers cluster ``u % clusters``.

    Item ``i`` belongs to cluster ``i % clusters``. Ids are ``"u<row>"`` and ``"i<row>"``. Each user
    has ``seen_per_user`` training items drawn from their own cluster, so excluding seen items is
    visible in the answers.
    """
    generator = torch.Generator().manual_seed(seed)
    clusters = max(1, min(clusters, n_items))
    centres = torch.nn.functional.normalize(
        torch.randn(clusters, factors, generator=generator), dim=1
    )
    item_cluster = torch.arange(n_items) % clusters
    user_cluster = torch.arange(n_users) % clusters
    item_factors = centres[item_cluster] + 0.15 * torch.randn(n_items, factors, generator=generator)
    user_factors = centres[user_cluster] + 0.05 * torch.randn(n_users, factors, generator=generator)
    item_bias = 0.1 * torch.randn(n_items, generator=generator)
    user_bias = 0.1 * torch.randn(n_users, generator=generator)

    per_cluster = (n_items + clusters - 1) // clusters
    seen_count = min(seen_per_user, per_cluster - 1) if per_cluster > 1 else 0
    picks = torch.randint(0, max(per_cluster - 1, 1), (n_users, seen_count), generator=generator)
    seen = (user_cluster.unsqueeze(1) + picks * clusters).clamp(max=n_items - 1)
    seen = torch.sort(seen, dim=1).values
    seen_rows = [torch.unique(row) for row in seen]  # at most seen_per_user each: cheap
    lengths = torch.tensor([len(r) for r in seen_rows], dtype=torch.int64)
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
    indices = torch.cat(seen_rows) if seen_rows else torch.empty(0, dtype=torch.int64)
    popularity = torch.bincount(indices, minlength=n_items)

    tensors = {
        "user_factors": user_factors,
        "item_factors": item_factors,
        "user_bias": user_bias,
        "item_bias": item_bias,
    }
    if rank_head:
        tensors["rank_user_factors"] = user_factors.clone()
        tensors["rank_item_factors"] = item_factors.clone()
    return ModelArtifact(
        tensors=tensors,
        user_ids=[f"u{row}" for row in range(n_users)],
        item_ids=[f"i{row}" for row in range(n_items)],
        global_mean=3.5,
        rating_range=(0.5, 5.0),
        seen_indptr=indptr,
        seen_indices=indices,
        item_popularity=popularity,
        item_titles=[f"Item {row}" for row in range(n_items)] if titles else None,
        item_genres=[[f"cluster-{row % clusters}"] for row in range(n_items)] if titles else None,
        hyperparameters={"synthetic": True, "clusters": clusters, "seed": seed},
        dataset={
            "source": "synthetic",
            "fingerprint": f"synthetic-{n_users}x{n_items}x{factors}-{seed}",
        },
    )
