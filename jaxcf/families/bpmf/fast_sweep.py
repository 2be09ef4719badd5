"""One BPMF Gibbs sweep on bucketed per-row normal equations (``jaxcf.core.rows``), chain after chain.

The same sampler as ``jaxcf.families.bpmf.fit.make_sweep``, step for step and draw for draw: each side's
hyper-parameters from ``jaxcf.families.bpmf.fit.sample_hyperparameters``, then every user given the items, then
every item given the new users, with the same key splits and the same ``jax.random.normal`` shapes,
so the same keys give the same chains up to float32 rounding (``tests/test_rows.py``). What
differs is the arithmetic: each row's ``sum V_i V_i^T`` is summed over its own ratings only
(``jaxcf.core.rows``: about ``nnz * F^2`` work instead of a dense count matrix's ``rows * other * F^2``),
and the F x F precisions are factored batch-last (``jaxcf.core.batchlast``). On ml-latest-small, one
sweep of one chain took 36 ms at F = 20 (``make_sweep`` of ``fit``: 488 ms; myFM 0.4: 156 ms) and
23 ms at F = 10 (112 ms; 55 ms): the fastest of 15 runs, side by side on a busy 2-core AMD EPYC
(load average ~8; ``bench/gibbs_sweep.py``, ``results/gibbs_sweep.json``). It compiles slower (84 s
against 25 s at F = 20 on that host): the Cholesky is written out entry by entry.

What does not live here: the model, hyper-priors and the family around the sweep (``jaxcf.families.bpmf.fit``),
the per-row sums and draws (``jaxcf.core.rows``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxcf.core import rows
from jaxcf.families.bpmf import fit


def make_side(own: np.ndarray, other: np.ndarray, targets: np.ndarray, num_rows: int,
              num_other: int) -> rows.RowIndex:
    """One side's ratings as the fast sweep reads them (host arrays), like ``jaxcf.families.bpmf.fit.make_side``.

    Args:
      own, other: int[n] row ids of each rating on this side and on the other.
      targets: float[n] centred ratings.
      num_rows, num_other: the table sizes (the padded ones on a mesh).
    """
    return rows.build_index(own, other, num_rows, num_other, values=targets)


def sample_side(key: jax.Array, own: jax.Array, other: jax.Array, index: rows.RowIndex, alpha: float,
                num_rows: int | None = None) -> jax.Array:
    """One side's hyper-parameters from its current vectors, then all its rows given the other side.

    Args:
      key: a PRNG key (split as ``jaxcf.families.bpmf.fit.sample_side`` splits it).
      own: float32[R, F] the side's current vectors.
      other: float32[O, F] the other side's vectors.
      index: this side's ratings (:func:`make_side`).
      alpha: the observation precision.
      num_rows: how many leading rows are real (a mesh pads the rest, which stay zero); None: all.

    Returns:
      float32[R, F].

    Raises:
      ValueError: when ``index`` was built for other table sizes.
    """
    if index.num_rows != own.shape[0] or index.num_other != other.shape[0]:
        raise ValueError(f"the index was built for {index.num_rows} x {index.num_other} rows; the tables have "
                         f"{own.shape[0]} and {other.shape[0]} (build it with the padded table sizes)")
    key_hyper, key_rows = jax.random.split(key)
    mu, lam = fit.sample_hyperparameters(key_hyper, own, num_rows)
    drawn = rows.draw_rows(key_rows, other, index, mu, lam, alpha)
    if num_rows is None or num_rows == own.shape[0]:
        return drawn
    return jnp.where((jnp.arange(own.shape[0]) < num_rows)[:, None], drawn, 0.0)


def make_sweep(user_side: rows.RowIndex, item_side: rows.RowIndex, alpha: float, num_users: int | None = None,
               num_items: int | None = None) -> Callable:
    """``(keys [C], users float32[C, U, F], items float32[C, I, F]) -> (users, items)``: one Gibbs
    sweep of C independent chains (not jitted: the caller jits it), as ``jaxcf.families.bpmf.fit.make_sweep``.

    The chains run one after the other (``lax.map``), not vmapped: under ``vmap`` the in-place block
    writes of ``jaxcf.core.rows`` become scatters that copy the whole ``[F, F, R]`` buffer once per bucket,
    which made a chain's sweep twice as slow; a chain is already a batch of ``R`` systems.
    """

    def sweep(chain):
        key, users, items = chain
        key_users, key_items = jax.random.split(key)
        users = sample_side(key_users, users, items, user_side, alpha, num_users)
        items = sample_side(key_items, items, users, item_side, alpha, num_items)
        return users, items

    return lambda keys, users, items: jax.lax.map(sweep, (keys, users, items))
