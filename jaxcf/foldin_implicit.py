"""Fold-in for implicit-feedback models: a user's row from their interactions, the items frozen.

- iALS: one exact solve of the user's normal equations, as in a training sweep (``jaxcf.ials``):
  ``(V'V + alpha sum_{i in I_u} v_i v_i' + lambda_u I) x = (1 + alpha) sum_{i in I_u} v_i``.
- BPR: the user's BPR objective with the expectation over negatives taken exactly (every item of the
  catalogue, not a sample), ``sum_{i in I_u} mean_j -log sigmoid(s_i - s_j) + l2 |I_u| |u|^2`` with
  ``s_i = u . v_i + b_i``: convex in ``u``, minimised by gradient descent from zero with a step of
  one over its Lipschitz bound, ``BPR_STEPS`` steps.
- EASE: the user's row is their interaction indicator; nothing to solve.
- blend (``jaxcf.blend``): each part's row as above, weighted and set side by side.

Rating values are not used (an interaction is an interaction), as in training. The hyper-parameters
come from the export's config. Same interface as ``jaxcf.foldin.Solver``.

What does not live here: explicit models' fold-in (``jaxcf.foldin``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxcf import linalg
from jaxcf.metrics import bucket

BPR_STEPS = 200
BPR_CHUNK = 256  # pairs whose scores against the whole catalogue are formed at once
MIN_PAIRS = 64


@functools.partial(jax.jit, static_argnames=("num_rows",))
def _ials_rows(items_table, items, valid, rows, num_rows, alpha, regularization, exponent):
    gathered = items_table[items]
    gram_all = jnp.matmul(items_table.T, items_table, precision=linalg.HIGHEST)
    gram = linalg.chunked_segment_sum(lambda g, v: v[:, None, None] * g[:, :, None] * g[:, None, :], (gathered, valid),
                               rows, num_rows)
    rhs = jax.ops.segment_sum(valid[:, None] * gathered, rows, num_segments=num_rows)
    counts = jax.ops.segment_sum(valid, rows, num_segments=num_rows)
    reg = regularization * (alpha * counts + items_table.shape[0]) ** exponent
    system = gram_all[None] + alpha * gram + reg[:, None, None] * jnp.eye(items_table.shape[1])[None]
    return linalg.cho_solve(linalg.cholesky(system), (1 + alpha) * rhs)


@functools.partial(jax.jit, static_argnames=("num_rows",))
def _bpr_rows(items_table, items, valid, rows, num_rows, l2):
    factors = items_table.shape[1] - 1
    vectors, bias = items_table[:, :factors], items_table[:, factors]
    counts = jax.ops.segment_sum(valid, rows, num_segments=num_rows)
    max_norm = jnp.max(jnp.sum(vectors**2, axis=1))
    # Each term's curvature is at most |v_i - v_j|^2 / 4 <= max_norm: a safe step for the whole sum.
    lipschitz = counts * max_norm + 2 * l2 * counts + 1e-6

    def gradient(u):
        def per_pair(user, item, real):  # [C, F] each pair's gradient, a chunk of pairs at a time
            s_pos = jnp.sum(user * vectors[item], axis=1) + bias[item]
            s_all = jnp.matmul(user, vectors.T, precision=linalg.HIGHEST) + bias[None]  # [C, I]
            weight = jax.nn.sigmoid(s_all - s_pos[:, None]) * real[:, None]  # d/d(s_j - s_i) of -log sigmoid
            return (jnp.matmul(weight, vectors, precision=linalg.HIGHEST) / vectors.shape[0]
                    - jnp.mean(weight, axis=1)[:, None] * vectors[item])

        # Chunks of pairs: a [C, I] block of scores at a time, not [P, I] (a user with 200k ratings).
        total = linalg.chunked_segment_sum(per_pair, (u[rows], items, valid), rows, num_rows, chunk=BPR_CHUNK)
        return total + 2 * l2 * counts[:, None] * u

    def step(_, u):
        return u - gradient(u) / lipschitz[:, None]

    return jax.lax.fori_loop(0, BPR_STEPS, step, jnp.zeros((num_rows, factors), items_table.dtype))


class ImplicitSolver:
    """Solves users of an implicit-feedback export (``family`` ials, bpr, ease or blend) from their items."""

    def __init__(self, weights: Mapping[str, np.ndarray], metadata: Mapping):
        model = metadata["model"]
        self.family = model["family"]
        self.members = False
        self.num_items = int(weights["item_embedding"].shape[0])
        blend = model.get("blend") or {}
        self.ease_columns = int(blend.get("ease_columns", 0))  # a blend: EASE's columns come first
        self.ease_weight = float(blend.get("ease_weight", 0.0))
        self.items_table = jnp.asarray(weights["item_embedding"][:, self.ease_columns:])
        self.features = weights["item_embedding"][None]  # (the interface of jaxcf.foldin.Solver)
        implicit = (metadata.get("config") or {}).get("implicit") or {}
        self.alpha = float(implicit.get("alpha", 1.0))
        self.regularization = float(implicit.get("regularization", 0.1))
        self.exponent = float(implicit.get("reg_exponent", 0.0))
        self.l2 = float(implicit.get("l2", 1e-4))
        self.prior_scale = None
        # New ratings under this are not interactions (training's data.implicit_threshold).
        data = metadata.get("data") or {}
        self.threshold = float(data.get("implicit_threshold") or ((metadata.get("config") or {}).get("data") or {})
                               .get("implicit_threshold", 4.0))

    def solve(self, user_of: np.ndarray, items: np.ndarray, ratings: np.ndarray, num_users: int) -> np.ndarray:
        """float32[1, num_users, d] rows (``ratings`` are not used: every interaction counts as one)."""
        if self.family in ("ease", "blend"):
            rows = np.zeros((num_users, self.num_items), np.float32)
            rows[user_of, items] = 1.0
            if self.family == "ease":
                return rows[None]
            factors = self._solve(user_of, items, num_users, bpr=False)
            return np.concatenate([self.ease_weight * rows, (1 - self.ease_weight) * factors], axis=1)[None]
        if self.family == "ials":
            return self._solve(user_of, items, num_users, bpr=False)[None]
        return self._solve(user_of, items, num_users, bpr=True)[None]

    def _solve(self, user_of: np.ndarray, items: np.ndarray, num_users: int, bpr: bool) -> np.ndarray:
        pairs, users = bucket(max(MIN_PAIRS, len(items))), bucket(max(1, num_users))
        pad = pairs - len(items)
        args = (self.items_table, np.pad(items.astype(np.int32), (0, pad)), np.pad(np.ones(len(items), np.float32),
                (0, pad)), np.pad(user_of.astype(np.int32), (0, pad)), users)
        if bpr:
            out = _bpr_rows(*args, self.l2)
        else:
            out = _ials_rows(*args, self.alpha, self.regularization, self.exponent)
        return np.asarray(out)[:num_users]

    def tables(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Rows as the export's user table (BPR's with its constant last column)."""
        rows = rows[0]
        if self.family == "bpr":
            rows = np.concatenate([rows, np.ones((rows.shape[0], 1), np.float32)], axis=1)
        return {"user_embedding": rows.astype(np.float32)}
