"""The compiled train step and epoch of the gradient-trained models, and the order an epoch visits rows in.

The ratings go onto the device once. Each epoch is one jitted call: its order (drawn on the host by
:func:`shuffle_order`) is cut into batches, a ``lax.scan`` reads each batch's rows and steps, and
the state buffers are donated. The host syncs once per epoch. K models differing in their seed and
their continuous hyper-parameters train side by side as ``jax.vmap`` of the same epoch
(:func:`make_members_epoch`), each with its own order.

The last partial batch is trained on, as torch's DataLoader does (80,004 training ratings give 1,250
batches of 64 and one of 4): it is padded to the batch size with zero-weight entries, and the loss
is ``sum(w * err**2) / sum(w)``, so its gradient is exactly that of the 4 real ratings.

One step function serves every case (:func:`make_step`): an optax transform (with its schedule
inside) or a row-sparse optimizer (``jaxcf.core.sparse``), with or without Surprise-style L2 on the rows
a batch gathers. The sharded epoch (``jaxcf.core.distributed``) runs the same body (:func:`make_epoch_body`).

What does not live here: building the initial state and the epoch loop (``jaxcf.families.sgd``,
``jaxcf.training.loop``), models (``jaxcf.core.models``), optimizers (``jaxcf.core.optim``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcf.core import models, sparse
from jaxcf.core.errors import ConfigError


class TrainState(NamedTuple):
    params: dict[str, jax.Array]
    opt_state: Any
    step: jax.Array  # int32[] optimizer steps taken


def weighted_mse(predictions: jax.Array, ratings: jax.Array, weights: jax.Array) -> jax.Array:
    """MSE over the entries with weight 1; padding entries (weight 0) contribute nothing."""
    err = predictions - ratings
    return jnp.sum(weights * err * err) / jnp.sum(weights)


def row_penalty(rows: dict[str, jax.Array], weights: jax.Array) -> jax.Array:
    """``sum(w * |row|^2) / sum(w)`` over every gathered row (embeddings and biases): Surprise-style L2
    on the rows a batch touches, once per rating."""
    return sum(jnp.sum(weights[:, None] * row * row) for row in rows.values()) / jnp.sum(weights)


def make_step(tx: optax.GradientTransformation, y_range: tuple[float, float] | None, row_l2: bool = False) -> Callable:
    """A pure ``(state, row_l2, users, items, ratings, weights) -> (state, mse)`` for one batch.

    Args:
      tx: the optax transform (``jaxcf.core.optim.transform``).
      y_range: the biased model's output range; None for the dot model.
      row_l2: whether the loss adds ``row_l2 * row_penalty``; without it the ``row_l2`` argument is
        ignored and the step is exactly the notebook's.

    The returned loss is the MSE alone.
    """

    def step(state, l2, users, items, ratings, weights):
        def loss_fn(params):
            rows = models.gather_rows(params, users, items)
            mse = weighted_mse(models.score_rows(rows, y_range), ratings, weights)
            return (mse + l2 * row_penalty(rows, weights) if row_l2 else mse), mse

        (_, mse), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1), mse

    return step


def make_epoch_body(
    optimizer, y_range, *, row_l2: bool = False, dense_chunk: int = sparse.DENSE_CHUNK
) -> Callable:
    """``(state, l2, xs, read) -> (state, float32[num_batches] losses)``: one epoch as a ``lax.scan``.

    ``xs`` are the epoch's batches in any form and ``read(x)`` turns one into ``(users, items,
    ratings, weights)``: positions read inside the scan on one device (:func:`make_train_epoch`), or
    the values themselves on a mesh (``jaxcf.core.distributed``). A row-sparse optimizer trains on packed
    tables, packed once before the scan and unpacked after it.
    """
    if isinstance(optimizer, sparse.RowSparse):
        if row_l2:
            raise ValueError("row L2 needs a dense optimizer (adam or adamw)")
        packed_step = sparse.make_packed_step(optimizer, y_range, dense_chunk)

        def sparse_body(state, l2, xs, read):
            packed = sparse.pack(optimizer, state.params, state.opt_state)
            packed, losses = jax.lax.scan(lambda carry, x: packed_step(carry, *read(x)), packed, xs)
            params, opt_state = sparse.unpack(optimizer, packed)
            steps = jax.tree.leaves(xs)[0].shape[0]
            return TrainState(params, opt_state, state.step + steps), losses

        return sparse_body
    step = make_step(optimizer, y_range, row_l2)

    def body(state, l2, xs, read):
        return jax.lax.scan(lambda carry, x: step(carry, l2, *read(x)), state, xs)

    return body


def num_batches(num_ratings: int, batch_size: int) -> int:
    return -(-num_ratings // batch_size)


# A batch may exceed the data up to this size (a default of 64 on a handful of ratings is fine); past it, the
# padding of every epoch up to the batch size is the cost of a typo.
MAX_PADDED_BATCH = 1 << 16


def check_batch_size(batch_size: int, num_ratings: int, what: str = "training ratings") -> None:
    """A batch far larger than the data pads every epoch up to it: refused as the typo it is.

    Raises:
      ConfigError: naming both sizes.
    """
    if batch_size > max(num_ratings, MAX_PADDED_BATCH):
        raise ConfigError(f"train.batch_size {batch_size} is larger than the {num_ratings} {what}; use at most "
                          f"{num_ratings} (one batch is then the whole epoch)")


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


def _reader(users, items, ratings) -> Callable:
    """Reads one batch inside the scan: its rows stay in cache instead of a whole epoch's batched copies
    of the columns being written out first."""

    def read(x):
        index, weights = x
        return (
            users.at[index].get(mode="promise_in_bounds"),
            items.at[index].get(mode="promise_in_bounds"),
            ratings.at[index].get(mode="promise_in_bounds"),
            weights,
        )

    return read


def make_train_epoch(optimizer, y_range, batch_size: int, *, row_l2: bool = False,
                     dense_chunk: int = sparse.DENSE_CHUNK) -> Callable:
    """A jitted ``(state, l2, users, items, ratings, order) -> (state, float32[num_batches] losses)``.

    ``order`` is int32[n]: the epoch's permutation of the training rows; ``l2`` the row L2 weight
    (ignored without ``row_l2``). The state is donated.
    """
    body = make_epoch_body(optimizer, y_range, row_l2=row_l2, dense_chunk=dense_chunk)

    def epoch(state, l2, users, items, ratings, order):
        return body(state, l2, epoch_index(order, batch_size, ratings.dtype), _reader(users, items, ratings))

    return jax.jit(epoch, donate_argnums=(0,))


def make_members_epoch(tx: optax.GradientTransformation, y_range, batch_size: int) -> Callable:
    """A jitted ``(state[K], l2 float32[K], users, items, ratings, orders int32[K, n]) ->
    (state[K], float32[K, num_batches] losses)``: one epoch of K members, each with its own order
    and row L2 weight, as a ``vmap`` of :func:`make_train_epoch`'s epoch. The state is donated."""
    body = make_epoch_body(tx, y_range, row_l2=True)

    def epoch(state, l2, users, items, ratings, order):
        return body(state, l2, epoch_index(order, batch_size, ratings.dtype), _reader(users, items, ratings))

    return jax.jit(jax.vmap(epoch, in_axes=(0, 0, None, None, None, 0)), donate_argnums=(0,))


def shuffle_order(key: jax.Array, epoch: int, num_ratings: int, batch_size: int) -> np.ndarray:
    """The training order of ``epoch`` (0-based): int32[num_ratings] positions into the training rows.

    A uniformly random permutation (NumPy's, seeded by ``key`` and ``epoch``: a pure function of
    them, so a resumed run replays exactly the order an uninterrupted run uses), cut into batches
    of ``batch_size`` as the notebook's shuffled DataLoader cuts it, with each batch's positions
    then put in ascending order. Which ratings share a batch is as random as the permutation; the
    order inside a batch changes only the rounding of the batch's sums. Training rows are stored by
    user (:func:`rows_by_user`), so each batch reads and writes the user table in ascending row
    order, which is faster on CPU at large batches (``BENCHMARKS.md``).

    Drawn on the host: ``jax.random.permutation`` is a sort on XLA's CPU backend, many times slower
    (``bench/step_parts.py``).
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
    cache instead of swapping across all of memory (``bench/step_parts.py`` times it).
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
    # A stable argsort as one sort of (user, position) pairs: NumPy's vectorised int64 sort, several
    # times faster than argsort(kind="stable") for millions of rows.
    pairs = (keys.astype(np.int64) << 32) | np.arange(len(rows), dtype=np.int64)
    pairs.sort()
    return rows[pairs & 0xFFFFFFFF]
