"""Many small F x F systems at once, stored batch-last: ``a[i, j]`` is one entry of every matrix.

A batch of ``B`` symmetric positive definite matrices is held as ``float[F, F, *batch]`` and a batch
of vectors as ``float[F, *batch]``, so ``a[i, j]`` is a contiguous ``[*batch]`` vector. For F up to
``UNROLL`` the Cholesky factorisation and the triangular solves are written out entry by entry (a
Python loop at trace time): every step is an elementwise fused multiply-subtract over the whole
batch, which XLA vectorises along the batch, with no ``fori_loop`` and no dynamic slicing. On
ml-latest-small's 9,066 items (F = 20) a factorisation and a draw (two triangular solves) took 7 ms,
``jaxcf.core.linalg``'s batch-first loops 126 ms and NumPy's LAPACK ``cholesky`` + ``solve`` 105 ms
(fastest of 15 on a busy 2-core AMD EPYC, ``bench/gibbs_sweep.py``). The price is compile time:
about F^2 / 2 fused loops of up to 2F operands each (a BPMF sweep at F = 20 compiles in 3x the
time of one built on ``jaxcf.core.linalg``); past ``UNROLL`` the matrices are moved to the batch-first layout and
solved by ``jaxcf.core.linalg``'s blocked routines instead: correct, not tuned here.

The factor is returned as a full ``[F, F, *batch]`` array (zeros above the diagonal). Inside one
``jit`` the solves read it back entry by entry; XLA folds those slices of the stacked factor
into the entries themselves, so nothing is copied.

Everything is plain XLA (no LAPACK custom call: its batched CPU kernels can deadlock XLA's thread
pool, see ``jaxcf.core.linalg``) and runs the same on GPU. What does not live here: the per-row
normal equations and the samplers and solvers that use these routines (``jaxcf.core.rows``,
``jaxcf.families.bpmf.fast_sweep``), the batch-first routines (``jaxcf.core.linalg``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcf.core import linalg

# Up to this F the routines are written out entry by entry (about F^3 / 6 fused operations to compile).
UNROLL = 32


def _to_first(x: jax.Array, dims: int) -> jax.Array:
    """Moves the leading ``dims`` (matrix) axes of a batch-last array to the end (batch-first)."""
    return jnp.moveaxis(x, tuple(range(dims)), tuple(range(-dims, 0)))


def _to_last(x: jax.Array, dims: int) -> jax.Array:
    return jnp.moveaxis(x, tuple(range(-dims, 0)), tuple(range(dims)))


def _entries(rows: list[list[jax.Array]], like: jax.Array) -> jax.Array:
    """Stacks a lower triangle of ``[*batch]`` entries into ``[F, F, *batch]`` (zeros above)."""
    zero = jnp.zeros_like(like)
    size = len(rows)
    return jnp.stack([jnp.stack([rows[i][j] if j <= i else zero for j in range(size)]) for i in range(size)])


def cholesky(a: jax.Array) -> jax.Array:
    """The lower Cholesky factors ``L`` of a batch of symmetric positive definite matrices.

    Only the lower triangle of ``a`` is read. Entry ``(i, j)`` of ``L`` (``i >= j``) is
    ``(a[i, j] - sum_{k<j} L[i, k] L[j, k]) / L[j, j]`` (left-looking, one entry per step).

    Args:
      a: float32[F, F, *batch] symmetric positive definite matrices, batch-last.

    Returns:
      float32[F, F, *batch] lower triangular (zeros above the diagonal); NaN where a matrix is not
      positive definite (as LAPACK's wrapper in JAX returns).
    """
    size = a.shape[0]
    if size > UNROLL:
        return _to_last(linalg.cholesky(_to_first(a, 2)), 2)
    factor: list[list[jax.Array]] = [[] for _ in range(size)]
    for j in range(size):
        pivot = a[j, j]
        for k in range(j):
            pivot = pivot - factor[j][k] * factor[j][k]
        root = jnp.sqrt(pivot)
        factor[j].append(root)
        for i in range(j + 1, size):
            entry = a[i, j]
            for k in range(j):
                entry = entry - factor[i][k] * factor[j][k]
            factor[i].append(entry / root)
    return _entries(factor, a[0, 0])


def solve_lower(factor: jax.Array, b: jax.Array) -> jax.Array:
    """``x`` with ``factor @ x = b`` for each matrix of the batch (forward substitution).

    Args:
      factor: float32[F, F, *batch] lower triangular (entries above the diagonal are not read).
      b: float32[F, *batch].

    Returns:
      float32[F, *batch].
    """
    size = factor.shape[0]
    if size > UNROLL:
        return _to_last(linalg.solve_lower_blocked(_to_first(factor, 2), _to_first(b, 1)), 1)
    x: list[jax.Array] = []
    for j in range(size):
        entry = b[j]
        for k in range(j):
            entry = entry - factor[j, k] * x[k]
        x.append(entry / factor[j, j])
    return jnp.stack(x)


def solve_lower_transpose(factor: jax.Array, b: jax.Array) -> jax.Array:
    """``x`` with ``factor.T @ x = b`` for each matrix of the batch (back substitution).

    Args:
      factor: float32[F, F, *batch] lower triangular (entries above the diagonal are not read).
      b: float32[F, *batch].

    Returns:
      float32[F, *batch].
    """
    size = factor.shape[0]
    if size > UNROLL:
        return _to_last(linalg.solve_lower_transpose_blocked(_to_first(factor, 2), _to_first(b, 1)), 1)
    x: list[jax.Array | None] = [None] * size
    for j in reversed(range(size)):
        entry = b[j]
        for k in range(j + 1, size):
            entry = entry - factor[k, j] * x[k]
        x[j] = entry / factor[j, j]
    return jnp.stack(x)


def cho_solve(factor: jax.Array, b: jax.Array) -> jax.Array:
    """``x`` with ``a @ x = b``, given ``factor = cholesky(a)``.

    Args:
      factor: float32[F, F, *batch] from :func:`cholesky`.
      b: float32[F, *batch].

    Returns:
      float32[F, *batch].
    """
    return solve_lower_transpose(factor, solve_lower(factor, b))


def gaussian_draw(factor: jax.Array, b: jax.Array, noise: jax.Array) -> jax.Array:
    """A draw from ``N(inv(P) b, inv(P))`` for ``P = L L^T``, ``L = factor``: ``inv(L^T) (inv(L) b + z)``.

    That is ``mean + inv(L^T) z`` with ``mean = inv(P) b`` (``inv(L^T) z`` has covariance
    ``inv(L L^T)``), with one back substitution instead of two.

    Args:
      factor: float32[F, F, *batch] from :func:`cholesky` of the precisions.
      b: float32[F, *batch] precision-weighted means (``P @ mean``).
      noise: float32[F, *batch] standard normal draws ``z``.

    Returns:
      float32[F, *batch].
    """
    return solve_lower_transpose(factor, solve_lower(factor, b) + noise)
