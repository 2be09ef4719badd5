"""Implicit ALS (Hu, Koren & Volinsky 2008) as a family: one epoch is one alternating sweep.

Every (user, item) pair counts: an interaction with confidence ``c = 1 + alpha`` and preference 1,
every other pair with confidence 1 and preference 0. With the other side's rows ``V`` fixed, a
user's row is the exact minimiser of ``sum_i c_ui (p_ui - x . v_i)^2 + lambda_u |x|^2``:

    (G + alpha * sum_{i in I_u} v_i v_i' + lambda_u I) x = (1 + alpha) * sum_{i in I_u} v_i,   G = V'V

(the Gram trick: the unobserved pairs enter only through ``G``). ``lambda_u = lambda`` (``implicit.
regularization``), or frequency-scaled, ``lambda * (alpha |I_u| + |I|) ** nu`` with ``nu =
implicit.reg_exponent`` (Rendle, Krichene, Zhang & Koren 2022: regularisation that grows with a row's
weight). A sweep solves every user, then every item from the new users. The per-row sums are two
matrix products with a dense count matrix on small tables, scatter-adds of chunks otherwise
(``jaxcf.gibbs.make_side``); the F x F systems are solved by ``jaxcf.linalg`` (plain XLA ops, never
LAPACK's batched kernels, which can deadlock XLA's CPU pool), or, with ``implicit.solver: cg``, by
``implicit.cg_steps`` steps of conjugate gradient from the last sweep's row (Takacs et al. 2011),
which never forms the F x F matrices. On a mesh both tables are row-sharded over ``model``.

implicit's ``AlternatingLeastSquares`` is this algorithm with confidence ``alpha_implicit * r``:
``alpha_implicit = 1 + alpha`` gives the same sweeps (``tests/test_implicit.py``, ``docs/parity.md``).

What does not live here: the metrics (``jaxcf.ranking.implicit_metrics``), the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcf import distributed, linalg, rng
from jaxcf.config import Config
from jaxcf.data import Dataset
from jaxcf.errors import TrainingDiverged
from jaxcf.family import Family
from jaxcf.gibbs import Side, make_side, normal_equations
from jaxcf.implicit_family import implicit_final, implicit_record, table_columns


class ALSState(NamedTuple):
    users: jax.Array  # float32[U, F]
    items: jax.Array  # float32[I, F]


class Settings(NamedTuple):
    alpha: float
    regularization: float
    exponent: float
    solver: str
    cg_steps: int


def solve_side(own: jax.Array, other: jax.Array, side: Side, counts: jax.Array, settings: Settings,
               num_rows: int | None = None, num_other: int | None = None) -> jax.Array:
    """New rows of one side given the other (see the module docstring).

    Args:
      own: float32[R, F] the side's current rows (the start of conjugate gradient).
      other: float32[O, F] the other side's rows.
      side: this side's interactions (``jaxcf.gibbs.make_side`` with targets 1).
      counts: float32[R] interactions per row (for the frequency-scaled L2).
      num_rows, num_other: rows of each side that are real (a mesh pads the rest, which stay zero).
    """
    alpha = settings.alpha
    size = other.shape[1]
    gram_all = jnp.matmul(other.T, other, precision=linalg.HIGHEST)
    reg = row_regularization(counts, num_other or other.shape[0], settings)
    if settings.solver == "cholesky":
        gram, rhs = normal_equations(other, side, own.shape[0])
        system = gram_all[None] + alpha * gram + reg[:, None, None] * jnp.eye(size)[None]
        rows = linalg.cho_solve(linalg.cholesky(system), (1 + alpha) * rhs)
    else:
        rows = _conjugate_gradient(own, other, side, gram_all, reg, settings)
        # A row without interactions solves (G + reg I) x = 0 exactly at 0; CG's few steps only near it.
        rows = jnp.where((counts > 0)[:, None], rows, 0.0)
    if num_rows is not None and num_rows < own.shape[0]:
        rows = jnp.where((jnp.arange(own.shape[0]) < num_rows)[:, None], rows, 0.0)
    return rows


def row_regularization(counts: jax.Array, num_other: int, settings: Settings) -> jax.Array:
    """Each row's L2 weight: ``lambda * (alpha * |row's interactions| + |other side|) ** reg_exponent``."""
    return settings.regularization * (settings.alpha * counts + num_other) ** settings.exponent


def _observed_product(x: jax.Array, other: jax.Array, side: Side) -> jax.Array:
    """``sum_{i in I_u} (x_u . v_i) v_i`` for every row u, without forming any F x F matrix."""
    if side.counts is not None:
        dots = jnp.matmul(x, other.T, precision=linalg.HIGHEST) * side.counts
        return jnp.matmul(dots, other, precision=linalg.HIGHEST)

    def add_chunk(total, chunk):
        own, other_ids, _ = chunk
        vectors = jnp.take(other, other_ids, axis=0)
        rows = jnp.take(x, jnp.minimum(own, x.shape[0] - 1), axis=0)
        return total.at[own].add(jnp.sum(rows * vectors, axis=1)[:, None] * vectors, mode="drop"), None

    total, _ = jax.lax.scan(add_chunk, jnp.zeros_like(x), (side.own, side.other, side.targets))
    return total


def _conjugate_gradient(start, other, side, gram_all, reg, settings):
    alpha = settings.alpha

    def matvec(x):
        return jnp.matmul(x, gram_all, precision=linalg.HIGHEST) + alpha * _observed_product(x, other, side) \
            + reg[:, None] * x

    if side.counts is not None:
        rhs = (1 + alpha) * jnp.matmul(side.counts, other, precision=linalg.HIGHEST)
    else:
        _, rhs = normal_equations(other, side, start.shape[0])
        rhs = (1 + alpha) * rhs
    residual = rhs - matvec(start)
    direction = residual
    norm = jnp.sum(residual * residual, axis=1)

    def step(_, carry):
        x, residual, direction, norm = carry
        product = matvec(direction)
        step_size = norm / jnp.maximum(jnp.sum(direction * product, axis=1), 1e-30)
        x = x + step_size[:, None] * direction
        residual = residual - step_size[:, None] * product
        new_norm = jnp.sum(residual * residual, axis=1)
        direction = residual + (new_norm / jnp.maximum(norm, 1e-30))[:, None] * direction
        return x, residual, direction, new_norm

    x, *_ = jax.lax.fori_loop(0, settings.cg_steps, step, (start, residual, direction, norm))
    return x


def make_sweep(user_side: Side, item_side: Side, user_counts, item_counts, settings: Settings,
               num_users: int | None = None, num_items: int | None = None) -> Callable:
    """``state -> state``: one sweep (users from items, then items from the new users); not jitted."""

    def sweep(state: ALSState) -> ALSState:
        users = solve_side(state.users, state.items, user_side, user_counts, settings, num_users, num_items)
        items = solve_side(state.items, users, item_side, item_counts, settings, num_items, num_users)
        return ALSState(users, items)

    return sweep


def loss(state: ALSState, train_users: jax.Array, train_items: jax.Array, settings: Settings, counts: tuple,
         num_users: int, num_items: int) -> jax.Array:
    """The objective per pair: ``(sum_all c (p - x.v)^2 + L2) / (U * I)``, with the sum over every pair
    from the Gram matrices (``sum_ui (x_u . v_i)^2 = <U'U, V'V>``) and each row's L2 weight as its solve's
    (:func:`row_regularization`); rows a mesh pads are zero and count for nothing."""
    alpha = settings.alpha
    grams = jnp.sum(jnp.matmul(state.users.T, state.users, precision=linalg.HIGHEST)
                    * jnp.matmul(state.items.T, state.items, precision=linalg.HIGHEST))
    predicted = jnp.sum(state.users[train_users] * state.items[train_items], axis=1)
    observed = jnp.sum((1 + alpha) * (1 - predicted) ** 2 - predicted**2)
    l2 = (jnp.sum(row_regularization(counts[0], num_items, settings) * jnp.sum(state.users**2, axis=1))
          + jnp.sum(row_regularization(counts[1], num_users, settings) * jnp.sum(state.items**2, axis=1)))
    return (grams + observed + l2) / (num_users * num_items)


def settings_of(config: Config) -> Settings:
    implicit = config.implicit
    return Settings(float(implicit.alpha), float(implicit.regularization), float(implicit.reg_exponent),
                    implicit.solver, int(implicit.cg_steps))


def family(config: Config, dataset: Dataset, layout=None) -> Family:
    """iALS on ``dataset``'s implicit training interactions; ``model.n_factors`` is F."""
    ratings = dataset.ratings
    train = dataset.split.train
    users_t, items_t = ratings.users[train], ratings.items[train]
    num_users, num_items, factors = ratings.num_users, ratings.num_items, config.model.n_factors
    rows_u = layout.padded_rows(num_users) if layout else num_users
    rows_i = layout.padded_rows(num_items) if layout else num_items
    ones = np.ones(len(train))
    user_side = make_side(users_t, items_t, ones, rows_u, rows_i)
    item_side = make_side(items_t, users_t, ones, rows_i, rows_u)
    user_counts = np.pad(np.bincount(users_t, minlength=num_users), (0, rows_u - num_users)).astype(np.float32)
    item_counts = np.pad(np.bincount(items_t, minlength=num_items), (0, rows_i - num_items)).astype(np.float32)
    settings = settings_of(config)

    def run(state, sides, counts):
        sweep = make_sweep(sides[0], sides[1], counts[0], counts[1], settings, num_users, num_items)
        new = sweep(state)
        return new, loss(new, jnp.asarray(users_t), jnp.asarray(items_t), settings, counts, num_users, num_items)

    data = ((user_side, item_side), (user_counts, item_counts))
    if layout is None:
        data = jax.tree.map(jnp.asarray, data)
        sweep_fn = jax.jit(run, donate_argnums=(0,))
    else:
        data = layout.replicate(data)
        shard = layout.sharding(2, 0)
        state_shardings = ALSState(shard, shard)
        sweep_fn = jax.jit(run, in_shardings=(state_shardings, jax.tree.map(lambda _: layout.replicated, data[0]),
                                              jax.tree.map(lambda _: layout.replicated, data[1])),
                           out_shardings=(state_shardings, layout.replicated), donate_argnums=(0,))

    def init():
        key = rng.stream(config.seed, "init")
        std = config.implicit.init_std
        return ALSState(std * jax.random.normal(jax.random.fold_in(key, 0), (num_users, factors)),
                        std * jax.random.normal(jax.random.fold_in(key, 1), (num_items, factors)))

    def epoch(state, number):
        state, value = sweep_fn(state, *data)
        return state, np.asarray(value, np.float64).reshape(1)

    def params(state):
        return {"user_embedding": state.users, "item_embedding": state.items}

    def record(state, number, losses, carry):
        if not np.all(np.isfinite(losses)):
            raise TrainingDiverged(f"iALS produced non-finite factors in sweep {number + 1}; raise "
                                   "implicit.regularization")
        return implicit_record(dataset, params(state), layout, number, float(losses[0])), carry

    return Family(
        name="ials", init=init, epoch=epoch, record=record, params=params,
        row_axes=lambda state: ALSState(0, 0) if isinstance(state, ALSState) else distributed.single_row_axes(state),
        final=lambda host: implicit_final(dataset, host),
        model_info={"kind": "dot", "family": "ials", "feedback": "implicit", "n_factors": factors, "y_range": None,
                    "num_users": num_users, "num_items": num_items},
        monitor="ndcg@20", maximize=True, columns=table_columns(),
    )
