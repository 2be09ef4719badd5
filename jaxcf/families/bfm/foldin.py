"""Fold-in for a Bayesian factorisation machine export: a user's rows solved from their ratings, per kept sample.

The user's ratings give their implicit set ``N`` (the distinct items they rated that the model knows),
and, in every kept sample ``k``, the conditional posterior of their id's weight and factors given the
rest of that sample (the items' rows, the implicit-set vectors, the user-id group's prior and the noise
precision: the export's :data:`jaxcf.families.bfm.IMPLICIT_TABLE` and :data:`~jaxcf.families.bfm.PRIOR_TABLE`).
With ``x = 1 / sqrt(|N|)``, ``s = x sum_{j in N} y_j``, ``t = x sum_{j in N} w_j`` and
``r2 = x^2 sum_{j in N} |y_j|^2`` (``y_j``, ``w_j`` item ``j``'s set vector and weight), a sample predicts::

    y(u, i) = c_i + t + (|s|^2 - r2) / 2 + <s, Q_i>  +  w_u + <v_u, s + Q_i>

(``c_i = w0 + b_i`` and ``Q_i`` from the item table), linear in ``z = [v_u, w_u]`` with features
``[s + Q_i, 1]``. Under the sample's prior ``z_f ~ N(mu_f, 1 / lambda_f)`` (the user-id group's, per
column) and noise precision ``alpha``, the conditional is Gaussian; its mean solves::

    (scale * diag(lambda) + alpha sum_i phi_i phi_i^T) z = alpha sum_i phi_i (r_i - offset_i) + scale * lambda * mu

and the user's exported row is ``[P, b_u, 1]`` with ``P = v_u + s``, ``b_u = w_u + t + <v_u, s> +
(|s|^2 - r2) / 2``: what the sampler's own tables would hold for that ``z``. ``scale`` is the prior
scale (``prior_scale``, default 1: the sampler's prior as it is). As for BPMF (``jaxcf.core.foldin``),
the conditional's mean stands for the user in each sample (a point, not a draw).

What is held fixed, and so approximate: the item side. In the sampler a new rater joins the items'
"flipped" sets, changing their rows; fold-in leaves every item row as trained. Without the user-id
group nothing is solved (the row is the set's alone); without the implicit group ``s``, ``t`` and ``r2``
are 0 (BPMF's conditional with biases).

Every solve is plain XLA (``jaxcf.core.linalg``: no LAPACK kernel), one member at a time (``lax.map``:
memory of one member's per-pair outer products), padded to powers of two so a few compiled shapes
serve every request. What does not live here: reading ratings and writing the new export
(``jaxcf.serving.foldin``), the sampler (``jaxcf.families.bfm.sampler``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxcf.core import linalg
from jaxcf.core.foldin import MIN_PAIRS, check_prior_scale
from jaxcf.core.scoring import bucket
from jaxcf.families.bfm import IMPLICIT_TABLE, PRIOR_TABLE

# The prior's strength when none is given: the sampler's own prior, as it is.
PRIOR_SCALE = 1.0


def _set_terms(implicit, set_items, set_valid, set_rows, num_rows, rank):
    """(s float[B, F], t float[B], r2 float[B]) of each user's implicit set (module docstring)."""
    count = jax.ops.segment_sum(set_valid, set_rows, num_segments=num_rows)
    x = jnp.where(count > 0, jax.lax.rsqrt(jnp.maximum(count, 1.0)), 0.0)
    vectors = implicit[set_items] * set_valid[:, None]
    sums = jax.ops.segment_sum(vectors, set_rows, num_segments=num_rows)
    squares = jax.ops.segment_sum(jnp.sum(vectors[:, :rank] ** 2, axis=1), set_rows, num_segments=num_rows)
    return x[:, None] * sums[:, :rank], x * sums[:, rank], x * x * squares


@functools.partial(jax.jit, static_argnames=("num_rows",))
def solve(item_table, implicit, prior, prior_scale, items, ratings, valid, rows, set_items, set_valid, set_rows,
          num_rows):
    """Each user's exported row ``[P, b_u]`` in every member.

    Args:
      item_table: float32[K, I, F + 2] the export's ``item_embedding`` (rows ``[Q, 1, w0 + b_i]``).
      implicit: float32[K, I, F + 1] the implicit-set table, or None without the group.
      prior: float32[K, 3, F + 1] the user-id prior table, or None without the group.
      prior_scale: float32[] multiplies the prior precision.
      items, ratings, valid, rows: the ratings, padded: int32[P] item, float32[P] rating, float32[P] 1 for
        a real one, int32[P] its user's row in the block.
      set_items, set_valid, set_rows: each user's distinct rated items, padded likewise.
      num_rows: users in the block (static).

    Returns:
      float32[K, num_rows, F + 1].
    """
    rank = item_table.shape[-1] - 2

    def one(member):
        table, implicit_k, prior_k = member
        q, c = table[:, :rank], table[:, rank + 1]
        if implicit_k is None:
            s = jnp.zeros((num_rows, rank), table.dtype)
            t = r2 = jnp.zeros(num_rows, table.dtype)
        else:
            s, t, r2 = _set_terms(implicit_k, set_items, set_valid, set_rows, num_rows, rank)
        own = t + 0.5 * (jnp.sum(s * s, axis=1) - r2)
        if prior_k is None:
            v, w = jnp.zeros_like(s), jnp.zeros_like(t)
        else:
            mean, precision, alpha = prior_k[0], prior_scale * prior_k[1], prior_k[2, 0]
            s_rated, q_rated = s[rows], q[items]
            phi = jnp.concatenate([s_rated + q_rated, jnp.ones((len(items), 1), table.dtype)], axis=1)
            offset = c[items] + own[rows] + jnp.sum(s_rated * q_rated, axis=1)
            weight = alpha * valid
            gram = linalg.chunked_segment_sum(lambda f, a: a[:, None, None] * f[:, :, None] * f[:, None, :],
                                              (phi, weight), rows, num_rows)
            gram = gram + jnp.diag(precision)[None]
            rhs = jax.ops.segment_sum((weight * (ratings - offset))[:, None] * phi, rows, num_segments=num_rows)
            z = linalg.cho_solve(linalg.cholesky(gram), rhs + (precision * mean)[None])
            v, w = z[:, :rank], z[:, rank]
        return jnp.concatenate([v + s, (w + own + jnp.sum(v * s, axis=1))[:, None]], axis=1)

    return jax.lax.map(one, (item_table, implicit, prior))


class Solver:
    """An export's frozen item side and its per-sample priors, ready to solve users from ratings (the
    interface of ``jaxcf.core.foldin.Solver``: ``solve``, ``tables``, ``prior_scale``).

    Args:
      weights, metadata: the export's tables and ``metadata.json``.
      counts: training ratings per user (unused: the prior is the sampler's own, not fitted to the users).
      prior_scale: multiplies the prior precision (None: 1, the sampler's prior).
    """

    def __init__(self, weights: Mapping[str, np.ndarray], metadata: Mapping, counts: np.ndarray | None = None,
                 prior_scale: float | None = None):
        check_prior_scale(prior_scale)
        self.prior_scale = PRIOR_SCALE if prior_scale is None else float(prior_scale)
        # On the device once: a request passes only its ratings.
        self.item_table = jnp.asarray(weights["item_embedding"], jnp.float32)
        self.implicit, self.prior = (None if weights.get(name) is None else jnp.asarray(weights[name], jnp.float32)
                                     for name in (IMPLICIT_TABLE, PRIOR_TABLE))

    def solve(self, user_of: np.ndarray, items: np.ndarray, ratings: np.ndarray, num_users: int) -> np.ndarray:
        """float32[K, num_users, F + 1]: the rows ``[P, b_u]`` of users ``0 .. num_users - 1`` from their
        ratings (``user_of`` int[n] in [0, num_users), ``items`` int[n] known items, ``ratings`` float[n])."""
        user_of, items = np.asarray(user_of, np.int64), np.asarray(items, np.int64)
        pairs = np.unique(user_of * self.item_table.shape[1] + items)
        set_rows, set_items = pairs // self.item_table.shape[1], pairs % self.item_table.shape[1]
        size, set_size = bucket(max(MIN_PAIRS, len(items))), bucket(max(MIN_PAIRS, len(pairs)))
        rows = bucket(max(1, num_users))

        def pad(values, dtype, length):
            return np.pad(np.asarray(values, dtype), (0, length - len(values)))

        out = solve(self.item_table, self.implicit, self.prior, np.float32(self.prior_scale),
                    pad(items, np.int32, size), pad(ratings, np.float32, size), pad(np.ones(len(items)), np.float32,
                                                                                   size),
                    pad(user_of, np.int32, size), pad(set_items, np.int32, set_size),
                    pad(np.ones(len(pairs)), np.float32, set_size), pad(set_rows, np.int32, set_size), rows)
        return np.asarray(out)[:, :num_users]

    def tables(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Solved rows as the export's user table: ``user_embedding`` float32[K, n, F + 2] (``[P, b_u, 1]``)."""
        ones = np.ones((*rows.shape[:2], 1), np.float32)
        return {"user_embedding": np.concatenate([rows, ones], axis=2).astype(np.float32)}
