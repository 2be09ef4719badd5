"""The compiled training step and epoch, and the order an epoch visits the training rows in.

The ratings go onto the device once. Each epoch is one jitted call: its order (drawn on the host by
:func:`shuffle_order`) is cut into batches, a ``lax.scan`` reads each batch's rows and steps, and
the state buffers are donated. The host syncs once per epoch.

The last partial batch is trained on, as torch's DataLoader does (80,004 training ratings give 1,250
batches of 64 and one of 4): it is padded to the batch size with zero-weight entries, and the loss
is ``sum(w * err**2) / sum(w)``, so its gradient is exactly that of the 4 real ratings.

What does not live here: the fit loop and the CLI (``jaxcf.train``), models (``jaxcf.models``),
optimizers (``jaxcf.optim``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcf import models, optim


class TrainState(NamedTuple):
    params: dict[str, jax.Array]
    opt_state: Any
    step: jax.Array  # int32[] optimizer steps taken



# Ratings per chunk of a dense row-sparse step (see make_packed_sparse_step): [16384, 51] float32
# rows and gradients are 3.3 MB each, which stay in a 32 MiB L3 cache.
DENSE_CHUNK = 16_384


def weighted_mse(predictions: jax.Array, ratings: jax.Array, weights: jax.Array) -> jax.Array:
    """MSE over the entries with weight 1; padding entries (weight 0) contribute nothing."""
    err = predictions - ratings
    return jnp.sum(weights * err * err) / jnp.sum(weights)


def make_train_step(optimizer, y_range: tuple[float, float] | None) -> Callable:
    """A pure ``(state, users, items, ratings, weights) -> (state, loss)`` for one batch."""

    def loss_of_rows(rows, ratings, weights):
        return weighted_mse(models.score_rows(rows, y_range), ratings, weights)

    if isinstance(optimizer, optim.RowSparse):
        packed_step = make_packed_sparse_step(optimizer, y_range)

        def sparse_step(state, users, items, ratings, weights):
            # One step packs and unpacks the tables; make_train_epoch packs once per epoch instead.
            packed = optim.pack(optimizer, state.params, state.opt_state)
            packed, loss = packed_step(packed, users, items, ratings, weights)
            params, opt_state = optim.unpack(optimizer, packed)
            return TrainState(params, opt_state, state.step + 1), loss

        return sparse_step

    def dense_step(state, users, items, ratings, weights):
        def loss_fn(params):
            return loss_of_rows(models.gather_rows(params, users, items), ratings, weights)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1), loss

    return dense_step


def make_packed_sparse_step(
    optimizer: optim.RowSparse, y_range: tuple[float, float] | None, chunk_size: int = DENSE_CHUNK
) -> Callable:
    """A pure ``(packed, users, items, ratings, weights) -> (packed, loss)`` for a row-sparse optimizer.

    ``packed`` is :class:`jaxcf.optim.Packed`: each id kind's tables and optimizer slots side by side,
    so the rows gathered for the forward pass are the rows the optimizer updates (one gather and one
    scatter per id kind and batch).

    When every table is updated densely (large batches: see ``RowSparse.dense_rows_per_id``) and
    the batch is a multiple of ``chunk_size`` larger than it, the batch's gradients are computed
    ``chunk_size`` ratings at a time and summed into table-sized buffers, then every table is
    updated once: the same step (the same parameters score every chunk, and the sums are added in
    batch order, as one scatter of the whole batch adds them), but each chunk's rows and gradients
    stay in cache instead of streaming ``[batch, F]`` arrays through memory.
    """

    def loss_and_grads(packed, users, items, ratings, weights, total_weight):
        def loss_of_group_rows(group_rows):
            rows = optim.table_rows(packed, group_rows)
            err = models.score_rows(rows, y_range) - ratings
            return jnp.sum(weights * err * err) / total_weight

        gathered = optim.gather_rows(packed, users, items)
        loss, group_grads = jax.value_and_grad(loss_of_group_rows)(gathered)
        return loss, group_grads, gathered

    def step(packed, users, items, ratings, weights):
        # Padding entries must not count as touching a row (they would advance its moments).
        real = weights > 0
        ids = {"user": jnp.where(real, users, -1), "item": jnp.where(real, items, -1)}
        total_weight = jnp.sum(weights)
        batch = users.shape[0]
        chunked = (
            batch > chunk_size > 0
            and batch % chunk_size == 0
            and all(optim.updates_densely(optimizer, g, batch) for g in packed.groups.values())
        )
        if not chunked:
            loss, group_grads, gathered = loss_and_grads(packed, users, items, ratings, weights, total_weight)
            return optim.sparse_step(optimizer, packed, group_grads, ids["user"], ids["item"], gathered), loss

        def chunk(carry, xs):
            accs, loss = carry
            chunk_users, chunk_items, chunk_ratings, chunk_weights, chunk_ids = xs
            part, group_grads, _ = loss_and_grads(
                packed, chunk_users, chunk_items, chunk_ratings, chunk_weights, total_weight
            )
            accs = {g: optim.accumulate(accs[g], chunk_ids[g], group_grads[g]) for g in accs}
            return (accs, loss + part), None

        def split(x):
            return x.reshape(batch // chunk_size, chunk_size, *x.shape[1:])

        accs = {g: optim.zero_accumulator(group) for g, group in packed.groups.items()}
        xs = jax.tree.map(split, (users, items, ratings, weights, ids))
        (accs, loss), _ = jax.lax.scan(chunk, (accs, jnp.zeros((), jnp.float32)), xs)
        groups = {g: optim.apply_dense(optimizer, group, accs[g]) for g, group in packed.groups.items()}
        return optim.Packed(groups, packed.names, packed.widths), loss

    return step


def num_batches(num_ratings: int, batch_size: int) -> int:
    return -(-num_ratings // batch_size)


def epoch_index(order: jax.Array, batch_size: int, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """The epoch's batches as ``[num_batches, batch_size]`` positions and weights.

    The last partial batch is padded with weight-0 entries that point at a real row (so gathers
    stay in range) and contribute nothing to the loss or its gradient.
    """
    n = order.shape[0]
    batches = num_batches(n, batch_size)
    pad = batches * batch_size - n
    index = jnp.concatenate([order, jnp.zeros((pad,), order.dtype)])
    weights = jnp.concatenate([jnp.ones((n,), dtype), jnp.zeros((pad,), dtype)])
    return index.reshape(batches, batch_size), weights.reshape(batches, batch_size)


def epoch_batches(users, items, ratings, order, batch_size: int) -> tuple[jax.Array, ...]:
    """The epoch's batches as ``[num_batches, batch_size]`` arrays (users, items, ratings, weights);
    see :func:`epoch_index`."""
    index, weights = epoch_index(order, batch_size, ratings.dtype)
    return jnp.take(users, index), jnp.take(items, index), jnp.take(ratings, index), weights


def _batch(users, items, ratings, index, weights) -> tuple[jax.Array, ...]:
    """One batch, read inside the scan: its rows stay in cache instead of a whole epoch's batched
    copies of the columns being written out first."""
    return (
        users.at[index].get(mode="promise_in_bounds"),
        items.at[index].get(mode="promise_in_bounds"),
        ratings.at[index].get(mode="promise_in_bounds"),
        weights,
    )


def make_train_epoch(optimizer, y_range, batch_size: int, dense_chunk: int = DENSE_CHUNK) -> Callable:
    """A jitted ``(state, users, items, ratings, order) -> (state, float32[num_batches] losses)``.

    ``order`` is int32[n]: the epoch's permutation of the training rows. The state is donated.
    A row-sparse optimizer trains on packed tables (packed once before the scan, unpacked after);
    ``dense_chunk`` is its ``make_packed_sparse_step`` chunk size (0: no chunks).
    """
    if isinstance(optimizer, optim.RowSparse):
        packed_step = make_packed_sparse_step(optimizer, y_range, dense_chunk)

        def sparse_epoch(state, users, items, ratings, order):
            xs = epoch_index(order, batch_size, ratings.dtype)
            packed = optim.pack(optimizer, state.params, state.opt_state)
            packed, losses = jax.lax.scan(
                lambda packed, x: packed_step(packed, *_batch(users, items, ratings, *x)), packed, xs
            )
            params, opt_state = optim.unpack(optimizer, packed)
            return TrainState(params, opt_state, state.step + xs[0].shape[0]), losses

        return jax.jit(sparse_epoch, donate_argnums=(0,))

    step = make_train_step(optimizer, y_range)

    def epoch(state, users, items, ratings, order):
        def body(state, x):
            return step(state, *_batch(users, items, ratings, *x))

        return jax.lax.scan(body, state, epoch_index(order, batch_size, ratings.dtype))

    return jax.jit(epoch, donate_argnums=(0,))


def shuffle_order(key: jax.Array, epoch: int, num_ratings: int, batch_size: int) -> np.ndarray:
    """The training order of ``epoch`` (0-based): int32[num_ratings] positions into the training rows.

    A uniformly random permutation (NumPy's, seeded by ``key`` and ``epoch``: a pure function of
    them, so a resumed run replays exactly the order an uninterrupted run uses), cut into batches
    of ``batch_size`` as the notebook's shuffled DataLoader cuts it, with each batch's positions
    then put in ascending order. Which ratings share a batch is as random as the permutation; the
    order inside a batch changes only the rounding of the batch's sums. Training rows are stored by
    user (``jaxcf.train.Setup.train_rows``), so each batch reads and writes the user table in ascending
    row order: on CPU, twice as fast as random rows at large batches (``BENCHMARKS.md``).

    Drawn on the host: ``jax.random.permutation`` is a sort on XLA's CPU backend, 20x slower (21 s
    against 1.2 s for 16M positions with NumPy's ``permutation``, 0.84 s with :func:`_permutation`;
    ``bench/step_parts.py``).
    """
    seed = np.asarray(jax.random.key_data(jax.random.fold_in(key, epoch))).ravel()
    order = _permutation(np.random.default_rng(seed), num_ratings)
    full = num_ratings - num_ratings % batch_size
    order[:full].reshape(-1, batch_size).sort(axis=1)
    order[full:].sort()
    return order


# Positions per bucket of _permutation: 256 KB of int32, which a core's L2 cache holds.
SHUFFLE_BUCKET = 1 << 16


def _permutation(rng: np.random.Generator, n: int) -> np.ndarray:
    """A uniformly random permutation of ``range(n)`` as int32, by Rao and Sandelius's method.

    Each position goes to one of ``ceil(n / SHUFFLE_BUCKET)`` buckets uniformly at random, the
    buckets are laid end to end, and each is shuffled (Fisher-Yates) on its own. The result is
    uniform over all permutations (Sandelius 1962; Rao 1961), and each shuffle works inside the
    cache instead of swapping across all of memory: 0.84 s against NumPy's ``permutation`` 1.23 s
    for 16M positions on a 2-core CPU (``bench/step_parts.py``).
    """
    buckets = -(-n // SHUFFLE_BUCKET)
    if buckets <= 1:
        order = np.arange(n, dtype=np.int32)
        rng.shuffle(order)
        return order
    label = rng.integers(0, buckets, n, dtype=np.uint16)  # at most 65,535 buckets: 4 billion positions
    order = np.argsort(label, kind="stable").astype(np.int32)  # a radix sort of 16-bit keys
    for bucket in np.split(order, np.cumsum(np.bincount(label, minlength=buckets))[:-1]):
        rng.shuffle(bucket)  # a view: shuffled in place
    return order


def rows_by_user(users: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``rows`` stably sorted by user (a no-op for files sorted by user, as MovieLens's are)."""
    keys = users[rows]
    if np.all(keys[1:] >= keys[:-1]):
        return rows
    # A stable argsort as one sort of (user, position) pairs: NumPy's vectorised int64 sort, 4x
    # faster than argsort(kind="stable") for 16M rows.
    pairs = (keys.astype(np.int64) << 32) | np.arange(len(rows), dtype=np.int64)
    pairs.sort()
    return rows[pairs & 0xFFFFFFFF]
