"""Per-row normal equations from one side's ratings, and the per-row Gaussian draws and solves on them.

Gibbs sampling (BPMF), alternating least squares and fold-in all need, for every row ``u`` of one
side, ``gram_u = sum_{i in I_u} w_ui v_i v_i^T`` and ``rhs_u = sum_{i in I_u} r_ui v_i`` over the
other side's rows ``v_i``, then one F x F solve per row. A :class:`RowIndex` is built once on the
host (:func:`build_index`): the rows with ratings are put in buckets by their number of ratings,
rounded up to a power of two, and each bucket holds its rows' other-side ids as a padded
``[rows, length]`` block (padding points at an extra zero row). The sums are then one gather and
one batched matrix product per bucket, ``einsum('rlf,rlg->rfg')``: at most ``2 * nnz * F^2``
multiply-adds as dense products (1.4x on ml-latest-small), where a dense count matrix costs
``rows * other * F^2`` and a ``segment_sum`` of one outer product per rating took 14 times longer
(``bench/gibbs_sweep.py``). Rows without ratings have ``gram = 0`` and ``rhs = 0``.

The sums come out batch-last (``[F, F, R]``) in the index's own row order (buckets, then the rows
without ratings; ``RowIndex.order``), the layout ``jaxcf.core.batchlast`` factors fastest;
:func:`draw_rows` and :func:`solve_rows` return rows in the table's order. What does not live here:
the factorisations (``jaxcf.core.batchlast``), the hyper-parameters and sweeps (``jaxcf.families.bpmf.fit``,
``jaxcf.families.bpmf.fast_sweep``, ``jaxcf.families.ials.fit``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxcf.core import batchlast

# Exact float32 products on accelerators too (no TF32 / bf16 passes); a no-op on CPU.
HIGHEST = jax.lax.Precision.HIGHEST


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["others", "values", "weights", "order", "position"],
                   meta_fields=["num_rows", "num_other"])
@dataclasses.dataclass(frozen=True)
class RowIndex:
    """One side's ratings, bucketed by row length (a pytree: pass it to ``jit`` or close over it).

    Attributes:
      others: one int32[rows_b, length_b] per bucket: the other side's row id of each of the bucket's
        rows' ratings, padded with ``num_other`` (a zero row appended at use). A repeated pair appears
        as often as it was rated.
      values: float32[rows_b, length_b] per bucket: each rating's value (``rhs`` weights; padding 0).
      weights: float32[rows_b, length_b] per bucket, each rating's weight in ``gram``; None: all 1.
      order: int32[num_rows] the rows in index order: bucket by bucket, then the rows without ratings.
      position: int32[num_rows] where each row is in index order (``order[position[u]] == u``).
      num_rows, num_other: the sizes of this side's and the other side's tables (static).
    """

    others: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    weights: tuple[jax.Array, ...] | None
    order: jax.Array
    position: jax.Array
    num_rows: int
    num_other: int


def build_index(own: np.ndarray, other: np.ndarray, num_rows: int, num_other: int,
                values: np.ndarray | None = None, weights: np.ndarray | None = None) -> RowIndex:
    """Buckets one side's ratings (host arrays; ``jax.tree.map(jnp.asarray, index)`` puts them on a device).

    Args:
      own: int[n] this side's row of each rating, in [0, num_rows).
      other: int[n] the other side's row of each rating, in [0, num_other).
      num_rows, num_other: the table sizes (a mesh's padded sizes are fine: extra rows have no ratings).
      values: float[n] each rating's value for ``rhs``; None: 1 for every rating.
      weights: float[n] each rating's weight in ``gram``; None: 1 for every rating.

    Raises:
      ValueError: when the arrays differ in length or an id is out of range.
    """
    own, other = np.asarray(own, np.int64), np.asarray(other, np.int64)
    extras = {"values": values, "weights": weights}
    if any(len(x) != len(own) for x in (other, *(e for e in extras.values() if e is not None))):
        raise ValueError("own, other, values and weights must have one entry per rating (the same length)")
    for name, ids, size in (("own", own, num_rows), ("other", other, num_other)):
        if len(ids) and (ids.min() < 0 or ids.max() >= size):
            raise ValueError(f"{name} ids must lie in [0, {size}); found {ids.min()}..{ids.max()}")
    counts = np.bincount(own, minlength=num_rows)
    lengths = np.where(counts > 0, 1 << np.ceil(np.log2(np.maximum(counts, 1))).astype(np.int64), 0)
    by_row = np.argsort(own, kind="stable")
    row = own[by_row]
    rank = np.arange(len(own)) - (np.cumsum(counts) - counts)[row]  # place of each rating within its row
    slot = np.zeros(num_rows, np.int64)
    columns = {"others": other[by_row]}
    columns.update({k: np.asarray(v, np.float64)[by_row] for k, v in extras.items() if v is not None})
    if values is None:
        columns["values"] = np.ones(len(own))
    blocks: dict[str, list[np.ndarray]] = {name: [] for name in columns}
    ordered = []
    for length in np.unique(lengths[lengths > 0]):
        rows = np.flatnonzero(lengths == length)
        slot[rows] = np.arange(len(rows))
        ordered.append(rows)
        mine = lengths[row] == length
        for name, column in columns.items():
            pad, dtype = (num_other, np.int32) if name == "others" else (0.0, np.float32)
            block = np.full((len(rows), length), pad, dtype)
            block[slot[row[mine]], rank[mine]] = column[mine]
            blocks[name].append(block)
    order = np.concatenate([*ordered, np.flatnonzero(counts == 0)]).astype(np.int32)
    position = np.empty(num_rows, np.int32)
    position[order] = np.arange(num_rows, dtype=np.int32)
    return RowIndex(tuple(blocks["others"]), tuple(blocks["values"]),
                    tuple(blocks["weights"]) if weights is not None else None, order, position, num_rows, num_other)


def normal_equations(other_factors: jax.Array, index: RowIndex) -> tuple[jax.Array, jax.Array]:
    """Every row's ``gram = sum w v v^T`` and ``rhs = sum r v`` over its ratings, in index order.

    Args:
      other_factors: float32[num_other, F] the other side's rows.
      index: from :func:`build_index`.

    Returns:
      (gram float32[F, F, R], rhs float32[F, R]): batch-last, column ``k`` for row ``index.order[k]``
      (:func:`in_row_order` gives ``[R, F, F]`` and ``[R, F]`` in the table's order).

    Raises:
      ValueError: when ``other_factors`` does not have ``index.num_other`` rows.
    """
    size = other_factors.shape[1]
    zero = jnp.zeros((size,), other_factors.dtype)
    return _systems(other_factors, index, 1.0, jnp.zeros((size, size), other_factors.dtype), 1.0, zero)


def _systems(other_factors, index, gram_scale, gram_base, rhs_scale, rhs_base):
    """``(gram_base + gram_scale * gram, rhs_base + rhs_scale * rhs)`` as :func:`normal_equations` lays them out.

    The bucket blocks are written into one buffer (``dynamic_update_slice``, in place) with the scale and
    base applied on the way: the result is then materialised once. Joined with ``concatenate`` (or
    scaled afterwards) it is a cheap elementwise producer, which XLA copies into each of the Cholesky's
    F^2 / 2 entry kernels: the per-side draw then ran twice as long and took longer to compile.
    """
    if other_factors.shape[0] != index.num_other:
        raise ValueError(f"the index was built for {index.num_other} other rows; got {other_factors.shape[0]}")
    size, dtype = other_factors.shape[1], other_factors.dtype
    table = jnp.concatenate([other_factors, jnp.zeros((1, size), dtype)])
    gram = jnp.broadcast_to(gram_base.astype(dtype)[:, :, None], (size, size, index.num_rows))
    rhs = jnp.broadcast_to(rhs_base.astype(dtype)[:, None], (size, index.num_rows))
    start = 0
    for bucket, ids in enumerate(index.others):
        vectors = table[ids]  # [rows_b, length_b, F]; padding gathers the zero row
        weighted = vectors if index.weights is None else vectors * index.weights[bucket][..., None]
        block = jnp.transpose(jnp.einsum("rlf,rlg->rfg", weighted, vectors, precision=HIGHEST), (1, 2, 0))
        gram = jax.lax.dynamic_update_slice(gram, gram_base[:, :, None] + gram_scale * block, (0, 0, start))
        block = jnp.einsum("rl,rlf->fr", index.values[bucket], vectors, precision=HIGHEST)
        rhs = jax.lax.dynamic_update_slice(rhs, rhs_base[:, None] + rhs_scale * block, (0, start))
        start += ids.shape[0]
    return gram, rhs


def in_row_order(index: RowIndex, gram: jax.Array, rhs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """:func:`normal_equations`' output as ``(gram float32[R, F, F], rhs float32[R, F])``, row ``u`` at ``u``."""
    return jnp.transpose(gram, (2, 0, 1))[index.position], rhs.T[index.position]


def draw_systems(key: jax.Array, other_factors: jax.Array, index: RowIndex, mu: jax.Array, lam: jax.Array,
                 alpha: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """What :func:`draw_rows` factors and solves, in index order: every row's precision
    ``Lambda + alpha * gram_u`` (float32[F, F, R]), ``alpha * rhs_u + Lambda mu`` (float32[F, R]) and its
    standard normal draw (float32[F, R]: ``jax.random.normal(key, [R, F])``'s row ``u`` at ``position[u]``)."""
    precision, right = _systems(other_factors, index, alpha, lam, alpha, jnp.matmul(lam, mu, precision=HIGHEST))
    noise = jax.random.normal(key, (index.num_rows, other_factors.shape[1]), other_factors.dtype)
    return precision, right, noise[index.order].T


def draw_rows(key: jax.Array, other_factors: jax.Array, index: RowIndex, mu: jax.Array, lam: jax.Array,
              alpha: float) -> jax.Array:
    """Draws every row of one side from its Gaussian conditional given the other side.

    Row u has precision ``P = Lambda + alpha * gram_u`` and mean ``inv(P) (alpha * rhs_u + Lambda mu)``
    (``jaxcf.families.bpmf.fit.draw_rows``' maths, and its normal draws: ``jax.random.normal(key, [R, F])``); a row
    without ratings is drawn from the prior ``N(mu, inv(Lambda))``.

    Args:
      key: a PRNG key.
      other_factors: float32[num_other, F].
      index: this side's :class:`RowIndex` (its ``values`` are the centred ratings).
      mu, lam: float32[F], float32[F, F] the side's hyper-parameters.
      alpha: the observation precision.

    Returns:
      float32[R, F] in the table's row order.
    """
    precision, right, noise = draw_systems(key, other_factors, index, mu, lam, alpha)
    return batchlast.gaussian_draw(batchlast.cholesky(precision), right, noise).T[index.position]


def solve_rows(other_factors: jax.Array, index: RowIndex, base: jax.Array, alpha: float,
               reg: jax.Array | float = 0.0) -> jax.Array:
    """Solves every row's ``(base + alpha * gram_u + reg_u I) x_u = rhs_u`` (alternating least squares, fold-in).

    Args:
      other_factors: float32[num_other, F].
      index: this side's :class:`RowIndex` (``rhs_u = sum values * v``: scale the values to scale it).
      base: float32[F, F] a matrix shared by every row (e.g. ``V^T V`` for implicit ALS; zeros for none).
      alpha: the weight of each row's own ``gram_u``.
      reg: float32[R] each row's ridge (in the table's row order), or one number for all.

    Returns:
      float32[R, F] in the table's row order; a row without ratings solves to 0.
    """
    size = other_factors.shape[1]
    system, rhs = _systems(other_factors, index, alpha, base, 1.0, jnp.zeros((size,), other_factors.dtype))
    reg = jnp.broadcast_to(jnp.asarray(reg, system.dtype), (index.num_rows,))[index.order]
    diagonal = jnp.arange(size)
    # A scatter onto the diagonal (not ``system + eye * reg``): the systems stay one materialised buffer (see _systems).
    system = system.at[diagonal, diagonal].add(jnp.broadcast_to(reg[None, :], (size, index.num_rows)))
    return batchlast.cho_solve(batchlast.cholesky(system), rhs).T[index.position]


def row_sums(other_factors: jax.Array, index: RowIndex, x: jax.Array | None = None) -> jax.Array:
    """Every row's weighted sum of its other-side vectors, with no F x F matrix and no scatter.

    ``x`` None: ``sum_{i in I_u} values_ui v_i`` (the ``rhs`` of :func:`normal_equations`, alone).
    ``x`` float32[R, F]: ``sum_{i in I_u} weights_ui (x_u . v_i) v_i``, the product of row u's own
    ``gram_u`` with ``x_u`` (conjugate gradient's products), at ``2 * nnz * F`` multiply-adds.

    Returns:
      float32[R, F] in the table's row order; a row without ratings sums to 0.
    """
    size, dtype = other_factors.shape[1], other_factors.dtype
    table = jnp.concatenate([other_factors, jnp.zeros((1, size), dtype)])
    blocks, start = [], 0
    for bucket, ids in enumerate(index.others):
        vectors = table[ids]  # [rows_b, length_b, F]; padding gathers the zero row
        if x is None:
            weights = index.values[bucket]
        else:
            rows = x[index.order[start:start + ids.shape[0]]]
            weights = jnp.einsum("rlf,rf->rl", vectors, rows, precision=HIGHEST)
            if index.weights is not None:
                weights = weights * index.weights[bucket]
        blocks.append(jnp.einsum("rl,rlf->rf", weights, vectors, precision=HIGHEST))
        start += ids.shape[0]
    blocks.append(jnp.zeros((index.num_rows - start, size), dtype))
    return jnp.concatenate(blocks)[index.position]
