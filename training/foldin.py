"""Fold-in: a user's vectors for both heads, solved at call time from interactions sent with the
call, against the model's fixed item tables and with the regularisation it was trained with.

**Rating head.** Training minimises, per rating, the squared error plus ``reg`` on the factor row
and ``bias_reg`` on the bias it looked up, so with the item side fixed a user's parameters
``theta = [x, b]`` solve the ridge problem over that user's ratings ``j``::

    min  sum_j w_j (r_j - mu - b_j - [q_j, 1] . theta)^2  +  W (reg |x|^2 + bias_reg b^2),  W = sum_j w_j

**Ranking head.** The iALS user step with the item factors ``Y`` fixed: every item is a zero of
confidence 1, an interacted item a one of confidence ``1 + alpha w_j``::

    (Y^T Y + sum_j alpha w_j y_j y_j^T + lambda I) x = sum_j (1 + alpha w_j) y_j

``Y^T Y`` is computed once per model, so a fold-in costs a d x d solve plus a few multiply-adds
per interaction.

**A known user** keeps what the model learned: the trained vector ``theta_u`` solves the user's
own problem, whose Hessian ``H_u`` is known from the items the user rated in training (the
artifact keeps them), so adding interactions is one Newton step from it,
``(H_u + dH) theta = H_u theta_u + db``. With nothing to add the answer is ``theta_u`` itself.
The artifact keeps which items a user rated, not the ratings, so the ranking head's ``H_u``
gives every training item the model's mean confidence; the rating head's Hessian needs no
ratings and is exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mfserve.training.artifact import ModelArtifact
from mfserve.training.config import TrainConfig

__all__ = ["FoldIn", "UserEvidence"]

_DEFAULTS = TrainConfig()
GRAM_BLOCK_ROWS = 65_536
# A floor on the rating head's ridge, so that a model trained with reg 0 (the reference recipe)
# still gives a user with fewer ratings than factors a solvable system.
MIN_RIDGE = 1e-6


@dataclass(frozen=True)
class UserEvidence:
    """One user's interactions, encoded: item rows the model knows, one entry per item."""

    user: int  # the user's row, or -1 for a user the model does not know
    items: np.ndarray  # int64 item rows, distinct
    ratings: np.ndarray  # float32, NaN where the interaction carries no rating
    weights: np.ndarray  # float32, > 0

    @classmethod
    def of(
        cls,
        user: int,
        items: Sequence[int] | np.ndarray,
        ratings: Sequence[float] | np.ndarray | None = None,
        weights: Sequence[float] | np.ndarray | None = None,
    ) -> UserEvidence:
        """Evidence from parallel lists; rows of -1 (unknown items) are dropped, and an item
        given twice keeps its last entry (training keeps one row per user and item, too)."""
        rows = np.asarray(items, dtype=np.int64)
        n = rows.size
        rated = np.full(n, np.nan, np.float32) if ratings is None else np.asarray(ratings)
        weight = np.ones(n, np.float32) if weights is None else np.asarray(weights)
        keep = rows >= 0
        if n > 1 and len(set(rows.tolist())) < n:
            # The last entry of each item: its first in the reversed order.
            _, first_reversed = np.unique(rows[::-1], return_index=True)
            last = np.zeros(n, dtype=bool)
            last[n - 1 - first_reversed] = True
            keep &= last
        if keep.all():
            return cls(int(user), rows, rated.astype(np.float32), weight.astype(np.float32))
        return cls(
            int(user),
            rows[keep],
            rated[keep].astype(np.float32),
            weight[keep].astype(np.float32),
        )

    @property
    def empty(self) -> bool:
        return self.items.size == 0


class FoldIn:
    """Solves users' vectors for one model (module doc); built once per loaded version."""

    def __init__(self, artifact: ModelArtifact) -> None:
        params = artifact.hyperparameters
        tensors = artifact.tensors
        self.mu = float(artifact.global_mean)
        self.rating_range = artifact.rating_range
        self.reg = float(params.get("reg", _DEFAULTS.reg))
        self.bias_reg = float(params.get("bias_reg", _DEFAULTS.bias_reg))
        self.use_biases = bool(params.get("use_biases", _DEFAULTS.use_biases))
        self.q = tensors["item_factors"].numpy()
        self.item_bias = tensors["item_bias"].numpy()
        self.user_factors = tensors["user_factors"].numpy()
        self.user_bias = tensors["user_bias"].numpy()
        self.seen_indptr = artifact.seen_indptr.numpy()
        self.seen_indices = artifact.seen_indices.numpy()
        self.has_rank_head = "rank_user_factors" in tensors
        if self.has_rank_head:
            self.alpha = float(params.get("rank_alpha", _DEFAULTS.rank_alpha))
            self.rank_reg = float(params.get("rank_reg", _DEFAULTS.rank_reg))
            self.binary = params.get("rank_weighting", _DEFAULTS.rank_weighting) == "binary"
            self.y = tensors["rank_item_factors"].numpy()
            self.rank_users = tensors["rank_user_factors"].numpy()
            d = self.y.shape[1]
            # Accumulated in float64 a block at a time: a float64 copy of a 1M-item table would
            # be 0.5 GB for a moment at every load.
            gram = np.zeros((d, d))
            for start in range(0, self.y.shape[0], GRAM_BLOCK_ROWS):
                block = self.y[start : start + GRAM_BLOCK_ROWS].astype(np.float64)
                gram += block.T @ block
            self._gram = gram + self.rank_reg * np.eye(d)
            self._gram_inverse = np.linalg.inv(self._gram)
            # A training item's confidence weight when its rating is not kept (module doc).
            # (mu is 0 in a model without biases: the middle of the range stands in for it.)
            low, high = self.rating_range
            mean_rating = self.mu if self.use_biases and self.mu > 0 else (low + high) / 2
            self._mean_weight = 1.0 if self.binary else mean_rating / high

    def _seen(self, user: int) -> np.ndarray:
        seen: np.ndarray = self.seen_indices[self.seen_indptr[user] : self.seen_indptr[user + 1]]
        return seen

    # ------------------------------------------------------------- ranking head
    def rank_weights(self, evidence: UserEvidence) -> np.ndarray:
        """The confidence weight ``w`` of each interaction: its rating over the rating maximum
        (as training weighs a rating), or 1 when unrated or the head is binary; times the
        interaction's own weight."""
        if self.binary:
            base = np.ones_like(evidence.ratings)
        else:
            base = np.where(
                np.isnan(evidence.ratings), 1.0, evidence.ratings / self.rating_range[1]
            )
        weights: np.ndarray = (base * evidence.weights).astype(np.float64)
        return weights

    def ranking_queries(
        self, users: Sequence[UserEvidence]
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Each user's ranking query (float32 [B, d]) and score offset ([B], None when the
        ranking head has none): the iALS head's vectors, or the rating head's when the model
        ranks by predicted rating."""
        if not self.has_rank_head:
            factors, biases = self.rating_params(users)
            return factors, (biases + self.mu).astype(np.float32)
        queries = np.empty((len(users), self.y.shape[1]), dtype=np.float32)
        for n, evidence in enumerate(users):
            queries[n] = self._rank_query(evidence)
        return queries, None

    def _rank_query(self, evidence: UserEvidence) -> np.ndarray:
        y = self.y[evidence.items].astype(np.float64)
        conf = self.alpha * self.rank_weights(evidence)
        rhs = y.T @ (1.0 + conf)
        if evidence.user < 0 and 0 < len(conf) < y.shape[1] and conf.min() > 0:
            # Fewer interactions than factors (the usual new user): Woodbury's identity turns
            # the d x d solve into an n x n one against the precomputed inverse of the gram,
            # (G + Y^T C Y)^-1 r = z - B^T (C^-1 + B Y^T)^-1 (Y z), z = G^-1 r, B = Y G^-1.
            z = self._gram_inverse @ rhs
            b = y @ self._gram_inverse
            inner = b @ y.T
            inner.flat[:: len(conf) + 1] += 1.0 / conf  # the diagonal
            query: np.ndarray = z - b.T @ np.linalg.solve(inner, y @ z)
            return query
        if evidence.user >= 0:
            training = self._seen(evidence.user)
            seen = self.y[training].astype(np.float64)
            prior_conf = self.alpha * self._mean_weight
            prior = self._gram + prior_conf * (seen.T @ seen)
            # An item the user had in training is already a preference of 1 in the prior: a new
            # interaction with it replaces its confidence, and adds no second preference.
            again = np.isin(evidence.items, training)
            if again.any():
                preference = np.where(again, 0.0, 1.0)
                conf = np.where(again, conf - prior_conf, conf)
                rhs = y.T @ (preference + conf)
            lhs = prior + (y.T * conf) @ y
            rhs += prior @ self.rank_users[evidence.user]
        else:
            lhs = self._gram + (y.T * conf) @ y
        solved: np.ndarray = np.linalg.solve(lhs, rhs)
        return solved

    # ------------------------------------------------------------- rating head
    def rating_params(self, users: Sequence[UserEvidence]) -> tuple[np.ndarray, np.ndarray]:
        """Each user's rating-head factors (float32 [B, f]) and bias ([B]) from the rated
        interactions; a new user with no rating gets zeros (the bias-only cold-start estimate)."""
        f = self.q.shape[1]
        factors = np.zeros((len(users), f), np.float32)
        biases = np.zeros(len(users), np.float32)
        penalty = np.full(f + 1, max(self.reg, MIN_RIDGE))
        penalty[f] = max(self.bias_reg, MIN_RIDGE) if self.use_biases else 0.0
        for n, evidence in enumerate(users):
            rated = ~np.isnan(evidence.ratings)
            items = evidence.items[rated]
            if evidence.user >= 0:
                theta_u = np.append(self.user_factors[evidence.user], self.user_bias[evidence.user])
            if not items.size:
                if evidence.user >= 0:
                    factors[n], biases[n] = theta_u[:f], theta_u[f]
                continue
            phi = np.empty((items.size, f + 1))
            phi[:, :f] = self.q[items]
            phi[:, f] = 1.0 if self.use_biases else 0.0
            weight = evidence.weights[rated].astype(np.float64)
            target = evidence.ratings[rated] - self.mu - self.item_bias[items]
            lhs = (phi.T * weight) @ phi + np.diag(penalty * float(weight.sum()))
            rhs = phi.T @ (weight * target)
            if evidence.user >= 0:
                seen = self._seen(evidence.user)
                known = np.empty((seen.size, f + 1))
                known[:, :f] = self.q[seen]
                known[:, f] = phi[0, f]
                hessian = known.T @ known + np.diag(penalty * seen.size)
                lhs += hessian
                rhs += hessian @ theta_u
            if not self.use_biases:
                lhs[f, f] = 1.0  # b stays 0: its row of the system is the identity
            theta = np.linalg.solve(lhs, rhs)
            factors[n], biases[n] = theta[:f], theta[f]
        return factors, biases

    def predict(self, evidence: UserEvidence, items: np.ndarray) -> np.ndarray:
        """Predicted ratings (float32) of one folded-in user for item rows (-1: unknown item,
        which gets the user's bias-only estimate), clipped to the rating range."""
        factors, biases = self.rating_params([evidence])
        rows = np.asarray(items, dtype=np.int64)
        known = rows >= 0
        safe = np.where(known, rows, 0)
        estimate = self.mu + biases[0] + np.where(known, self.item_bias[safe], 0.0)
        estimate = estimate + np.where(known, self.q[safe] @ factors[0], 0.0)
        low, high = self.rating_range
        ratings: np.ndarray = np.clip(estimate, low, high).astype(np.float32)
        return ratings
