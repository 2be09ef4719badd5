"""Implicit ALS (Hu, Koren & Volinsky 2008) as a family: one epoch is one alternating sweep.

Every (user, item) pair counts: an interaction with confidence ``c = 1 + alpha`` and preference 1,
every other pair with confidence 1 and preference 0. With the other side's rows ``V`` fixed, a
user's row is the exact minimiser of ``sum_i c_ui (p_ui - x . v_i)^2 + lambda_u |x|^2``:

    (G + alpha * sum_{i in I_u} v_i v_i' + lambda_u I) x = (1 + alpha) * sum_{i in I_u} v_i,   G = V'V

(the Gram trick: the unobserved pairs enter only through ``G``). ``lambda_u = lambda`` (``implicit.
regularization``), or frequency-scaled, ``lambda * (alpha |I_u| + |I|) ** nu`` with ``nu =
implicit.reg_exponent`` (Rendle, Krichene, Zhang & Koren 2022: regularisation that grows with a row's
weight). A sweep solves every user, then every item from the new users. The exact solves go a
chunk of rows at a time (:class:`Rows`; rows sorted by their number of interactions): each row's
``sum v_i v_i'`` is summed over its own items only, ``SEGMENT`` at a time (about ``nnz * F^2`` work,
where a dense count matrix would cost ``rows * items * F^2``), and the chunk's F x F systems are
factored and solved while they are in cache, by ``jaxcf.core.linalg`` (plain XLA ops, never LAPACK's
batched kernels, which can deadlock XLA's CPU pool). With ``implicit.solver: cg`` the rows take
``implicit.cg_steps`` steps of conjugate gradient from the last sweep's row (Takacs et al. 2011),
which never form the F x F matrices; their products use ``jaxcf.families.bpmf.make_side``'s dense counts on
small tables and scatter-adds of chunks otherwise. On a mesh both tables are row-sharded over ``model``,
and the exact solves build every row's normal equations that way too, so that each device solves the
systems of its own rows (``docs/distributed.md``).

implicit's ``AlternatingLeastSquares`` is this algorithm with confidence ``alpha_implicit * r``:
``alpha_implicit = 1 + alpha`` gives the same sweeps (``tests/test_implicit.py``, ``docs/parity.md``).

One concept at some length: the iALS sweep (exact chunked solves, conjugate gradient, the mesh).

What does not live here: the metrics (``jaxcf.core.ranking.implicit_metrics``), the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcf.core import distributed, linalg, rng
from jaxcf.core import rows as rows_index
from jaxcf.core.family import Family
from jaxcf.data import Dataset
from jaxcf.families import _implicit
from jaxcf.families.bpmf.fit import Side, make_side, normal_equations
from jaxcf.families.ials import SPEC, row_regularization, solve_systems


class ALSState(NamedTuple):
    users: jax.Array  # float32[U, F]
    items: jax.Array  # float32[I, F]


class Settings(NamedTuple):
    alpha: float
    regularization: float
    exponent: float
    solver: str
    cg_steps: int


class Rows(NamedTuple):
    """One side's interactions for the exact solves: ``flat`` holds every row's items, row by row
    (row ``r``'s are ``flat[starts[r]:starts[r] + counts[r]]``; a repeated pair appears twice), and
    ``order`` the rows with interactions, most interactions first, padded with ``num_rows`` (dropped)
    to a whole number of chunks of ``chunk`` rows. Rows without interactions are in no chunk: their
    exact solution is 0."""

    flat: np.ndarray  # int32[nnz]
    starts: np.ndarray  # int32[R]
    counts: np.ndarray  # int32[R]
    order: np.ndarray  # int32[chunks, chunk]


# Rows solved together on CPU: a chunk's [chunk, F, F] systems stay in cache through the solve's steps.
CPU_CHUNK = 32
# Elsewhere (accelerators), bigger batches.
DEVICE_CHUNK = 2048
# Interactions of each row gathered per step of the per-chunk loop that sums ``v_i v_i'``.
SEGMENT = 16


def make_rows(own: np.ndarray, other: np.ndarray, num_rows: int, chunk: int | None = None) -> Rows:
    """:class:`Rows` from one side's interactions (``own[k]`` interacted with ``other[k]``)."""
    if chunk is None:
        chunk = CPU_CHUNK if jax.default_backend() == "cpu" else DEVICE_CHUNK
    order = np.argsort(own, kind="stable")
    counts = np.bincount(own, minlength=num_rows)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    busy = np.flatnonzero(counts > 0)
    busy = busy[np.argsort(-counts[busy], kind="stable")]
    padded = np.full(max(1, -(-len(busy) // chunk)) * chunk, num_rows, np.int64)
    padded[: len(busy)] = busy
    flat = np.asarray(other)[order] if len(order) else np.zeros(1, np.int64)
    return Rows(flat.astype(np.int32), starts.astype(np.int32), counts.astype(np.int32),
                padded.reshape(-1, chunk).astype(np.int32))


def _exact_rows(other: jax.Array, rows: Rows, gram_all: jax.Array, reg: jax.Array, alpha: float,
                num_rows: int) -> jax.Array:
    """The exact solve of every row with interactions, a chunk of rows at a time (``lax.scan``): the
    chunk's ``sum v_i v_i'`` in steps of ``SEGMENT`` interactions per row (as many steps as its longest
    row needs), then its systems' Cholesky factors and solves."""
    size = other.shape[1]
    flat, starts, counts, order = (jnp.asarray(x) for x in rows)
    last = flat.shape[0] - 1

    def solve_chunk(_, ids):
        real = ids < num_rows
        index = jnp.minimum(ids, num_rows - 1)
        start = starts[index]
        count = jnp.where(real, counts[index], 0)
        end = start + count

        def add_segment(step, sums):
            gram, rhs = sums
            at = start[:, None] + step * SEGMENT + jnp.arange(SEGMENT)[None, :]
            vectors = jnp.take(other, flat[jnp.minimum(at, last)], axis=0) * (at < end[:, None])[..., None]
            gram = gram + jnp.einsum("csf,csg->cfg", vectors, vectors, precision=linalg.HIGHEST)
            return gram, rhs + jnp.sum(vectors, axis=1)

        steps = (jnp.max(count) + SEGMENT - 1) // SEGMENT
        zeros = (jnp.zeros((ids.shape[0], size, size), other.dtype), jnp.zeros((ids.shape[0], size), other.dtype))
        gram, rhs = jax.lax.fori_loop(0, steps, add_segment, zeros)
        return None, solve_systems(gram_all, gram, rhs, reg[index], alpha)

    _, solved = jax.lax.scan(solve_chunk, None, order)
    return jnp.zeros((num_rows, size), other.dtype).at[order.reshape(-1)].set(
        solved.reshape(-1, size), mode="drop")


def make_sides(own: np.ndarray, other: np.ndarray, num_rows: int, num_other: int, solver: str,
               mesh: bool = False) -> Side | Rows | rows_index.RowIndex:
    """One side's interactions as the solver reads them: :class:`Rows` for ``cholesky`` and
    a ``jaxcf.core.rows.RowIndex`` for ``cg`` on one device (its products are ``jaxcf.core.rows.row_sums``:
    ``nnz * F`` work, no scatter); on a mesh a ``jaxcf.families.bpmf.Side``, where each device
    solves the systems of its own rows from per-row normal equations (``docs/distributed.md``)."""
    if solver == "cholesky" and not mesh:
        return make_rows(own, other, num_rows)
    if not mesh:
        return rows_index.build_index(own, other, num_rows, num_other)
    return make_side(own, other, np.ones(len(own)), num_rows, num_other)


def solve_side(own: jax.Array, other: jax.Array, side: Side | Rows, counts: jax.Array, settings: Settings,
               num_rows: int | None = None, num_other: int | None = None) -> jax.Array:
    """New rows of one side given the other (see the module docstring).

    Args:
      own: float32[R, F] the side's current rows (the start of conjugate gradient).
      other: float32[O, F] the other side's rows.
      side: this side's interactions (:func:`make_sides` for ``settings.solver``).
      counts: float32[R] interactions per row (for the frequency-scaled L2).
      num_rows, num_other: rows of each side that are real (a mesh pads the rest, which stay zero).
    """
    alpha = settings.alpha
    gram_all = jnp.matmul(other.T, other, precision=linalg.HIGHEST)
    reg = regularization(counts, num_other or other.shape[0], settings)
    if settings.solver == "cholesky" and isinstance(side, Rows):
        rows = _exact_rows(other, side, gram_all, reg, alpha, own.shape[0])
    elif settings.solver == "cholesky":
        gram, rhs = normal_equations(other, side, own.shape[0])
        rows = solve_systems(gram_all, gram, rhs, reg, alpha)
    else:
        rows = _conjugate_gradient(own, other, side, gram_all, reg, settings)
        # A row without interactions solves (G + reg I) x = 0 exactly at 0; CG's few steps only near it.
        rows = jnp.where((counts > 0)[:, None], rows, 0.0)
    if num_rows is not None and num_rows < own.shape[0]:
        rows = jnp.where((jnp.arange(own.shape[0]) < num_rows)[:, None], rows, 0.0)
    return rows


def regularization(counts: jax.Array, num_other: int, settings: Settings) -> jax.Array:
    """:func:`jaxcf.families.ials.row_regularization` with a :class:`Settings`' values."""
    return row_regularization(counts, num_other, settings.alpha, settings.regularization, settings.exponent)


def _observed_product(x: jax.Array, other: jax.Array, side: Side | rows_index.RowIndex) -> jax.Array:
    """``sum_{i in I_u} (x_u . v_i) v_i`` for every row u, without forming any F x F matrix."""
    if isinstance(side, rows_index.RowIndex):
        return rows_index.row_sums(other, side, x)
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

    if isinstance(side, rows_index.RowIndex):
        rhs = (1 + alpha) * rows_index.row_sums(other, side)
    elif side.counts is not None:
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
    l2 = (jnp.sum(regularization(counts[0], num_items, settings) * jnp.sum(state.users**2, axis=1))
          + jnp.sum(regularization(counts[1], num_users, settings) * jnp.sum(state.items**2, axis=1)))
    return (grams + observed + l2) / (num_users * num_items)


def settings_of(config: Any) -> Settings:
    implicit = config.implicit
    return Settings(float(implicit.alpha), float(implicit.regularization), float(implicit.reg_exponent),
                    implicit.solver, int(implicit.cg_steps))


def family(config: Any, dataset: Dataset, layout=None) -> Family:
    """iALS on ``dataset``'s implicit training interactions; ``model.n_factors`` is F."""
    ratings = dataset.ratings
    train = dataset.split.train
    users_t, items_t = ratings.users[train], ratings.items[train]
    num_users, num_items, factors = ratings.num_users, ratings.num_items, config.model.n_factors
    rows_u = layout.padded_rows(num_users) if layout else num_users
    rows_i = layout.padded_rows(num_items) if layout else num_items
    settings = settings_of(config)
    user_side = make_sides(users_t, items_t, rows_u, rows_i, settings.solver, mesh=layout is not None)
    item_side = make_sides(items_t, users_t, rows_i, rows_u, settings.solver, mesh=layout is not None)
    user_counts = np.pad(np.bincount(users_t, minlength=num_users), (0, rows_u - num_users)).astype(np.float32)
    item_counts = np.pad(np.bincount(items_t, minlength=num_items), (0, rows_i - num_items)).astype(np.float32)

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

    def record(state, number, losses, carry, evaluate=True):
        return _implicit.record(dataset, params(state), layout, number, float(losses[0]), evaluate), carry

    return Family(
        name=SPEC.name, init=init, epoch=epoch, record=record, params=params,
        row_axes=lambda state: ALSState(0, 0) if isinstance(state, ALSState) else distributed.single_row_axes(state),
        final=lambda host: _implicit.final(dataset, host),
        model_info=SPEC.model_info(n_factors=factors, y_range=None, num_users=num_users, num_items=num_items),
        divergence_hint="raise implicit.regularization",
        monitor="ndcg@20", maximize=True, columns=_implicit.COLUMNS,
    )
