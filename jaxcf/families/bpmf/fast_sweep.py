"""One BPMF Gibbs sweep on bucketed per-row normal equations (``jaxcf.core.rows``), chain after chain.

The same sampler as ``jaxcf.families.bpmf.fit.make_sweep``, step for step and draw for draw: each side's
hyper-parameters from ``jaxcf.families.bpmf.prior.sample_hyperparameters``, then every user given the items, then
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

from jaxcf.core import batchlast, rows
from jaxcf.families.bpmf import prior


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
    mu, lam = prior.sample_hyperparameters(key_hyper, own, num_rows)
    drawn = rows.draw_rows(key_rows, other, index, mu, lam, alpha)
    if num_rows is None or num_rows == own.shape[0]:
        return drawn
    return jnp.where((jnp.arange(own.shape[0]) < num_rows)[:, None], drawn, 0.0)


def pad_systems(precision: jax.Array, right: jax.Array, noise: jax.Array, size: int):
    """Systems padded to ``size`` with identity precisions (whose draws are 0, from zero right-hand sides and
    zero noise): both sides' systems then share one compiled factor-and-draw program."""
    pad = size - precision.shape[-1]
    factors = precision.shape[0]
    eye = jnp.broadcast_to(jnp.eye(factors, dtype=precision.dtype)[:, :, None], (factors, factors, pad))
    zeros = jnp.zeros((factors, pad), right.dtype)
    return (jnp.concatenate([precision, eye], axis=2), jnp.concatenate([right, zeros], axis=1),
            jnp.concatenate([noise, zeros], axis=1))


def _systems(key, other, index, mu, lam, alpha, size):
    return pad_systems(*rows.draw_systems(key, other, index, mu, lam, alpha), size)


def _draw(precision, right, noise):
    return batchlast.gaussian_draw(batchlast.cholesky(precision), right, noise)


def _finish(drawn, index, num_rows):
    table = drawn[:, : index.num_rows].T[index.position]
    if num_rows is None or num_rows == index.num_rows:
        return table
    return jnp.where((jnp.arange(index.num_rows) < num_rows)[:, None], table, 0.0)


class Sweep:
    """``(keys [C], users float32[C, U, F], items float32[C, I, F]) -> (users, items)``: one Gibbs sweep
    of C independent chains (``make_sweep``'s), as a few compiled programs that both sides share.

    The F x F factorisations written out entry by entry (``jaxcf.core.batchlast``) take long to compile
    (about F^3 / 6 fused operations), and so does the hyper-parameter draw; compiled inside one sweep, each
    is compiled twice, once per side. Here a side's step is five calls: its vectors' statistics, the
    hyper-parameters (one program for both sides), its systems (``jaxcf.core.rows``, padded to the larger
    side's rows with identity systems), the factor-and-draw (one program for both sides: the users' side
    pays for the padding, a few milliseconds) and the rows back in table order. The calls are dispatched
    without waiting (nothing reaches the host inside a sweep); chains run one after the other.
    """

    def __init__(self, user_side: rows.RowIndex, item_side: rows.RowIndex, alpha: float,
                 num_users: int | None = None, num_items: int | None = None):
        self.sides = ((user_side, num_users), (item_side, num_items))
        self.size = max(user_side.num_rows, item_side.num_rows)
        self.statistics = jax.jit(prior.side_statistics, static_argnums=1)
        self.hyper = jax.jit(prior.draw_hyperparameters)
        self.systems = jax.jit(_systems, static_argnums=(5, 6))
        self.draw = jax.jit(_draw)
        self.finish = jax.jit(_finish, static_argnums=2)
        self.alpha = alpha

    def side(self, key: jax.Array, own: jax.Array, other: jax.Array, which: int) -> jax.Array:
        """One side's hyper-parameters from its vectors ``own``, then its rows given ``other``."""
        index, num_rows = self.sides[which]
        if index.num_rows != own.shape[0] or index.num_other != other.shape[0]:
            raise ValueError(f"the index was built for {index.num_rows} x {index.num_other} rows; the tables have "
                             f"{own.shape[0]} and {other.shape[0]} (build it with the padded table sizes)")
        key_hyper, key_rows = jax.random.split(key)
        mu, lam = self.hyper(key_hyper, *self.statistics(own, num_rows))
        drawn = self.draw(*self.systems(key_rows, other, index, mu, lam, self.alpha, self.size))
        return self.finish(drawn, index, num_rows)

    def __call__(self, keys: jax.Array, users: jax.Array, items: jax.Array) -> tuple[jax.Array, jax.Array]:
        out_users, out_items = [], []
        for chain in range(keys.shape[0]):
            key_users, key_items = jax.random.split(keys[chain])
            chain_users = self.side(key_users, users[chain], items[chain], 0)
            out_items.append(self.side(key_items, items[chain], chain_users, 1))
            out_users.append(chain_users)
        return jnp.stack(out_users), jnp.stack(out_items)


def make_sweep(user_side: rows.RowIndex, item_side: rows.RowIndex, alpha: float, num_users: int | None = None,
               num_items: int | None = None) -> Callable:
    """``(keys [C], users float32[C, U, F], items float32[C, I, F]) -> (users, items)``: one Gibbs
    sweep of C independent chains as one traceable function (the caller may jit it), as
    ``jaxcf.families.bpmf.fit.make_sweep``; :class:`Sweep` is the same sweep as separately compiled calls.

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
