"""Implicit alternating least squares (Hu, Koren & Volinsky 2008): ``model.kind: ials``.

Every (user, item) pair counts: an interaction with confidence ``1 + alpha`` and preference 1, every other
pair with confidence 1 and preference 0. With the other side's rows ``V`` fixed, a row is the exact
minimiser of ``sum_i c_ui (p_ui - x . v_i)^2 + lambda_u |x|^2``:

    (G + alpha * sum_{i in I_u} v_i v_i' + lambda_u I) x = (1 + alpha) * sum_{i in I_u} v_i,   G = V'V

(:func:`solve_systems`: the one copy, used by training's sweeps and by fold-in). This module is the light
half (the spec; fold-in solves a new user's row with the items frozen, exactly as a sweep would); the fit
half is ``fit``.

implicit's ``AlternatingLeastSquares`` is this algorithm with confidence ``alpha_implicit * r``:
``alpha_implicit = 1 + alpha`` gives the same sweeps (``tests/test_implicit.py``, ``docs/parity.md``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxcf.core import linalg
from jaxcf.core.family import IMPLICIT, PRODUCT, Spec
from jaxcf.families import _implicit


def row_regularization(counts: jax.Array, num_other: int, alpha: float, regularization: float,
                       exponent: float) -> jax.Array:
    """Each row's L2 weight: ``lambda * (alpha * |row's interactions| + |other side|) ** reg_exponent``
    (0: plain L2, as Hu et al. and implicit; 1: frequency-scaled, Rendle, Krichene, Zhang & Koren 2022)."""
    return regularization * (alpha * counts + num_other) ** exponent


def solve_systems(gram_all: jax.Array, gram: jax.Array, rhs: jax.Array, reg: jax.Array, alpha: float) -> jax.Array:
    """The rows' exact solutions: float32[R, F] from ``G`` [F, F], each row's ``sum v v'`` [R, F, F] and
    ``sum v`` [R, F], and its L2 weight [R] (plain XLA Cholesky, ``jaxcf.core.linalg``)."""
    size = gram_all.shape[-1]
    system = gram_all[None] + alpha * gram + reg[:, None, None] * jnp.eye(size, dtype=gram.dtype)[None]
    return linalg.cho_solve_blocked(linalg.cholesky(system), (1 + alpha) * rhs)


@functools.partial(jax.jit, static_argnames=("num_rows",))
def _fold_in_rows(items_table, items, valid, rows, num_rows, alpha, regularization, exponent):
    gathered = items_table[items]
    gram_all = jnp.matmul(items_table.T, items_table, precision=linalg.HIGHEST)
    gram = linalg.chunked_segment_sum(lambda g, v: v[:, None, None] * g[:, :, None] * g[:, None, :],
                                      (gathered, valid), rows, num_rows)
    rhs = jax.ops.segment_sum(valid[:, None] * gathered, rows, num_segments=num_rows)
    counts = jax.ops.segment_sum(valid, rows, num_segments=num_rows)
    reg = row_regularization(counts, items_table.shape[0], alpha, regularization, exponent)
    return solve_systems(gram_all, gram, rhs, reg, alpha)


class FoldIn(_implicit.InteractionSolver):
    """A user's row by one exact solve, as in a training sweep (``columns``: the iALS part of a table)."""

    def __init__(self, weights, metadata, counts=None, prior_scale=None, columns: slice = slice(None)):
        super().__init__(weights, metadata)
        self.items_table = jnp.asarray(weights["item_embedding"][:, columns])

    def solve_rows(self, user_of, items, num_users):
        args = self.padded(user_of, items, num_users)
        out = _fold_in_rows(self.items_table, *args, self.hyper("alpha", 1.0), self.hyper("regularization", 0.1),
                            self.hyper("reg_exponent", 0.0))
        return np.asarray(out)[:num_users]


def build(config, dataset, layout=None, orders=None):
    from jaxcf.families.ials import fit

    return fit.family(config, dataset, layout)


SPEC = Spec(
    name="ials", feedback=IMPLICIT, scoring=PRODUCT,
    summary="implicit alternating least squares (Hu et al. 2008), exact or conjugate-gradient solves",
    build=build, solver=FoldIn, validate=_implicit.validate,
)
