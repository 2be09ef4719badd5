"""Small dense linear algebra written with plain XLA ops: batched Cholesky and triangular solves.

jaxlib's CPU backend runs ``jnp.linalg.cholesky``, ``jax.scipy.linalg.solve_triangular`` and the other
LAPACK wrappers as FFI custom calls (``lapack_spotrf_ffi``, ``lapack_strsm_ffi``, ...). Batched, such a
call splits its matrices over XLA's intra-op thread pool (``jax::ParallelBatchMap``) and blocks until
they are done. When XLA runs two of them at once on the pool's workers (independent branches of one
program, after an asynchronous while loop), every worker blocks waiting for work that only a worker
could run: the process hangs at 0% CPU. ``bench/lapack_deadlock.py`` reproduces it with jax and numpy
alone; ``docs/robustness.md`` tells the whole story. No compiled jaxcf function calls a LAPACK kernel
(``tests/test_linalg.py`` checks the compiled programs): the F x F systems of the Gibbs sampler and of
alternating least squares are solved here instead, with matrix-vector products in a ``fori_loop`` of
F steps. Past ``BLOCK`` columns the factorisation is blocked (right-looking): the diagonal blocks are
factored and inverted one column or row per step, everything else is batched matrix products, so
the [..., F, F] batch is swept about F / BLOCK times instead of F times
(``bench/linalg.py`` measures both; results/linalg.json). It runs the same on every backend.

Every function takes any number of leading batch dimensions. What does not live here: the samplers and
solvers that use them (``jaxcf.families.bpmf``, ``jaxcf.families.ials``, ``jaxcf.core.foldin``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Exact float32 products on accelerators too (no TF32 / bf16 passes).
HIGHEST = jax.lax.Precision.HIGHEST


def _matvec(matrix: jax.Array, vector: jax.Array) -> jax.Array:
    return jnp.einsum("...ij,...j->...i", matrix, vector, precision=HIGHEST)


# Columns per block of the blocked Cholesky; systems this small or smaller are factored unblocked.
BLOCK = 32


def _mm(x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.matmul(x, y, precision=HIGHEST)


def _t(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def cholesky(a: jax.Array) -> jax.Array:
    """The lower Cholesky factor ``L`` of symmetric positive definite matrices (``a = L @ L.T``).

    Blocked right-looking for more than ``BLOCK`` columns: factor the leading block (unblocked), the
    panel below it is ``A21 inv(L11).T``, the trailing matrix loses ``L21 L21.T``; repeat on it. Only
    the lower triangle of ``a`` is read.

    Args:
      a: float[..., F, F] symmetric positive definite.

    Returns:
      float[..., F, F] lower triangular; NaN where ``a`` is not positive definite (as LAPACK's
      wrapper in JAX returns).
    """
    size = a.shape[-1]
    if size <= BLOCK:
        return _cholesky_unblocked(a)
    columns = []
    trailing = a
    for start in range(0, size, BLOCK):
        width = min(BLOCK, size - start)
        l11 = _cholesky_unblocked(trailing[..., :width, :width])
        l21 = _mm(trailing[..., width:, :width], _t(_lower_inverse(l11)))
        above = jnp.zeros((*a.shape[:-2], start, width), a.dtype)
        columns.append(jnp.concatenate([above, l11, l21], axis=-2))
        trailing = trailing[..., width:, width:] - _mm(l21, _t(l21))
    return jnp.concatenate(columns, axis=-1)


def _lower_inverse(factor: jax.Array) -> jax.Array:
    """``inv(L)`` of lower triangular ``L`` [..., b, b] by forward substitution, one row per step:
    row ``j`` of ``X`` is ``(e_j - L[j, :j] @ X[:j]) / L[j, j]``."""
    size = factor.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(size, dtype=factor.dtype), factor.shape)

    def row(j, x):
        # x's rows >= j are still zero, so the product sums over the rows < j only.
        partial = jnp.einsum("...k,...kc->...c", factor[..., j, :], x, precision=HIGHEST)
        return x.at[..., j, :].set((eye[..., j, :] - partial) / factor[..., j, j][..., None])

    return jax.lax.fori_loop(0, size, row, jnp.zeros_like(factor))


def _cholesky_unblocked(a: jax.Array) -> jax.Array:
    """The left-looking algorithm, one column per step: column ``j`` is ``a[:, j] - L[:, :j] @ L[j, :j]``
    scaled by the square root of its diagonal entry."""
    size = a.shape[-1]
    rows = jnp.arange(size)

    def column(j, factor):
        # factor's columns >= j are still zero, so factor @ factor[j] sums over the columns < j only.
        done = _matvec(factor, factor[..., j, :])
        v = a[..., :, j] - done
        pivot = jnp.sqrt(v[..., j])
        new = jnp.where(rows >= j, v / pivot[..., None], 0.0)
        return factor.at[..., :, j].set(new)

    return jax.lax.fori_loop(0, size, column, jnp.zeros_like(a))


def solve_lower(factor: jax.Array, b: jax.Array) -> jax.Array:
    """``x`` with ``factor @ x = b`` for lower triangular ``factor`` (forward substitution).

    Args:
      factor: float[..., F, F] lower triangular (entries above the diagonal are ignored).
      b: float[..., F] right-hand sides.

    Returns:
      float[..., F].
    """
    size = factor.shape[-1]

    def step(j, x):
        # x's entries >= j are still zero, so the product sums over the entries < j only.
        partial = jnp.sum(factor[..., j, :] * x, axis=-1)
        return x.at[..., j].set((b[..., j] - partial) / factor[..., j, j])

    return jax.lax.fori_loop(0, size, step, jnp.zeros_like(b))


def solve_lower_transpose(factor: jax.Array, b: jax.Array) -> jax.Array:
    """``x`` with ``factor.T @ x = b`` for lower triangular ``factor`` (back substitution).

    Args:
      factor: float[..., F, F] lower triangular (entries above the diagonal are ignored).
      b: float[..., F] right-hand sides.

    Returns:
      float[..., F].
    """
    size = factor.shape[-1]

    def step(k, x):
        j = size - 1 - k
        # Row j of factor.T is column j of factor; x's entries <= j are still zero.
        partial = jnp.sum(factor[..., :, j] * x, axis=-1)
        return x.at[..., j].set((b[..., j] - partial) / factor[..., j, j])

    return jax.lax.fori_loop(0, size, step, jnp.zeros_like(b))


def cho_solve(factor: jax.Array, b: jax.Array) -> jax.Array:
    """``x`` with ``a @ x = b``, given ``factor = cholesky(a)``.

    Args:
      factor: float[..., F, F] from :func:`cholesky`.
      b: float[..., F].

    Returns:
      float[..., F].
    """
    return solve_lower_transpose(factor, solve_lower(factor, b))


def solve_lower_blocked(factor: jax.Array, b: jax.Array) -> jax.Array:
    """:func:`solve_lower` by blocks of ``BLOCK`` entries: each diagonal block is solved one entry per
    step, the rest of the right-hand side loses that block's product in one matrix-vector product
    (F / BLOCK passes over the factor instead of F)."""
    size = factor.shape[-1]
    parts, rhs = [], b
    for start in range(0, size, BLOCK):
        end = min(start + BLOCK, size)
        part = solve_lower(factor[..., start:end, start:end], rhs[..., start:end])
        parts.append(part)
        if end < size:
            rhs = rhs.at[..., end:].add(-_matvec(factor[..., end:, start:end], part))
    return jnp.concatenate(parts, axis=-1)


def solve_lower_transpose_blocked(factor: jax.Array, b: jax.Array) -> jax.Array:
    """:func:`solve_lower_transpose` by blocks of ``BLOCK`` entries, from the last block up."""
    size = factor.shape[-1]
    parts, rhs = [], b
    for start in reversed(range(0, size, BLOCK)):
        end = min(start + BLOCK, size)
        part = solve_lower_transpose(factor[..., start:end, start:end], rhs[..., start:end])
        parts.insert(0, part)
        if start:
            rhs = rhs.at[..., :start].add(
                -jnp.einsum("...ji,...j->...i", factor[..., start:end, :start], part, precision=HIGHEST))
    return jnp.concatenate(parts, axis=-1)


def cho_solve_blocked(factor: jax.Array, b: jax.Array) -> jax.Array:
    """:func:`cho_solve` by blocks (:func:`solve_lower_blocked`, :func:`solve_lower_transpose_blocked`):
    the same solution up to rounding, about 3x faster at F = 128 (``bench/linalg.py``). The alternating
    least-squares sweeps use it; the Gibbs sampler keeps :func:`cho_solve`, whose sampled chains its
    published figures come from."""
    return solve_lower_transpose_blocked(factor, solve_lower_blocked(factor, b))


def inverse_root(precision: jax.Array) -> jax.Array:
    """``M`` with ``M @ M.T == inv(precision)``: ``inv(L).T`` for ``precision = L @ L.T``.

    Args:
      precision: float[..., F, F] symmetric positive definite.

    Returns:
      float[..., F, F] upper triangular.
    """
    factor = cholesky(precision)
    eye = jnp.broadcast_to(jnp.eye(precision.shape[-1], dtype=precision.dtype), precision.shape)
    # Column i of inv(L).T solves L.T m = e_i; vmap the vector solve over the columns.
    columns = jax.vmap(solve_lower_transpose, in_axes=(None, -1), out_axes=-1)(factor, eye)
    return columns


# Pairs whose per-pair terms are formed at once by chunked_segment_sum: memory GRAM_CHUNK * d * d floats
# for outer products, whatever a row's count.
GRAM_CHUNK = 4096


def chunked_segment_sum(fn, arrays, rows, num_rows, chunk: int = GRAM_CHUNK):
    """``segment_sum(fn(*arrays), rows)`` computed ``chunk`` pairs at a time (``lax.scan``), so that memory
    stays bounded for a user with any number of ratings. The pair count (a power of two, ``bucket``) must
    be a multiple of ``min(chunk, pairs)``."""
    pairs = rows.shape[0]
    size = min(chunk, pairs)
    shape = jax.eval_shape(fn, *(a[:size] for a in arrays))

    def add(total, part):
        *values, part_rows = part
        return total + jax.ops.segment_sum(fn(*values), part_rows, num_segments=num_rows), None

    parts = (*(a.reshape(pairs // size, size, *a.shape[1:]) for a in arrays), rows.reshape(pairs // size, size))
    total, _ = jax.lax.scan(add, jnp.zeros((num_rows, *shape.shape[1:]), shape.dtype), parts)
    return total
