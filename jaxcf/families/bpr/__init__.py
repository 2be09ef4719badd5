"""Bayesian personalised ranking (Rendle, Freudenthaler, Gantner & Schmidt-Thieme 2009): ``model.kind: bpr``.

A user's score of an item is ``u . v_i + b_i``; each training interaction (u, i) is paired with
``implicit.negatives`` items (drawn uniformly or by popularity, optionally verified), and the loss of a
triple is ``-log sigmoid(s_ui - s_uj)`` plus ``implicit.l2`` times the squared norms of the rows it
touches, trained by a row-sparse optimizer (``optim.name: lazy_adam``, or ``sgd``: LearnBPR's per-triple
steps). The export is a dot model: user rows ``[u, 1]``, item rows ``[v, b]``.

This module is the light half (the spec; fold-in: the user's BPR objective with the expectation over
negatives taken exactly, every item of the catalogue, minimised by gradient descent from zero with a step
of one over its Lipschitz bound). The fit half is ``fit``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxcf.core import linalg
from jaxcf.core.errors import ConfigError
from jaxcf.core.family import IMPLICIT, PRODUCT, Spec
from jaxcf.families import _implicit

STEPS = 200  # gradient steps of fold-in's convex solve
CHUNK = 256  # interactions whose scores against the whole catalogue are formed at once


def validate(config) -> None:
    _implicit.validate(config)
    if config.optim.name not in ("lazy_adam", "sgd"):
        raise ConfigError(f"model.kind bpr trains with a row-sparse optimizer (lazy_adam or sgd); got "
                          f"optim.name {config.optim.name!r}")
    if config.optim.name == "sgd" and config.optim.weight_decay:
        raise ConfigError("model.kind bpr with optim.name sgd: BPR's regularisation is implicit.l2 (per triple, as "
                          f"LearnBPR); set optim.weight_decay: 0 (got {config.optim.weight_decay!r})")


@functools.partial(jax.jit, static_argnames=("num_rows",))
def _fold_in_rows(items_table, items, valid, rows, num_rows, l2):
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
        total = linalg.chunked_segment_sum(per_pair, (u[rows], items, valid), rows, num_rows, chunk=CHUNK)
        return total + 2 * l2 * counts[:, None] * u

    def step(_, u):
        return u - gradient(u) / lipschitz[:, None]

    return jax.lax.fori_loop(0, STEPS, step, jnp.zeros((num_rows, factors), items_table.dtype))


class FoldIn(_implicit.InteractionSolver):
    """A user's row minimising their BPR objective; exported with its constant last column."""

    def __init__(self, weights, metadata, counts=None, prior_scale=None):
        super().__init__(weights, metadata)
        self.items_table = jnp.asarray(weights["item_embedding"])

    def solve_rows(self, user_of, items, num_users):
        out = _fold_in_rows(self.items_table, *self.padded(user_of, items, num_users), self.hyper("l2", 1e-4))
        return np.asarray(out)[:num_users]

    def tables(self, rows):
        rows = rows[0]
        return {"user_embedding": np.concatenate([rows, np.ones((rows.shape[0], 1), np.float32)],
                                                 axis=1).astype(np.float32)}


def build(config, dataset, layout=None, orders=None):
    from jaxcf.families.bpr import fit

    return fit.family(config, dataset, layout)


SPEC = Spec(
    name="bpr", feedback=IMPLICIT, scoring=PRODUCT,
    summary="Bayesian personalised ranking (Rendle et al. 2009) with a row-sparse optimizer",
    build=build, solver=FoldIn, validate=validate, mesh=False,
)
