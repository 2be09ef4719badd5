"""BPMF's hyper-parameters: the Normal-Wishart conditional of each side's (mu, Lambda) given its vectors
(Salakhutdinov & Mnih 2008, eq. 14), drawn by the Bartlett decomposition.

Shared by the sampler's two forms (``jaxcf.families.bpmf.fit.make_sweep``, one program; and
``jaxcf.families.bpmf.fast_sweep.Sweep``, separately compiled stages), so that they draw the same numbers.

What does not live here: the rows' draws (``jaxcf.core.rows``), the sweeps and the family (``fit``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcf.core import linalg

# The Normal-Wishart hyper-prior of the paper: mu0 = 0, beta0 = 2, W0 = I, nu0 = F.
BETA0 = 2.0


def wishart(key: jax.Array, scale_root: jax.Array, df: float) -> jax.Array:
    """One draw of Wishart(scale, df) by the Bartlett decomposition.

    Args:
      key: a PRNG key.
      scale_root: float32[F, F], any M with ``M @ M.T == scale`` (the distribution of
        ``A @ A.T`` is invariant under rotations, so M need not be triangular).
      df: degrees of freedom, > F - 1.

    Returns:
      float32[F, F] symmetric positive definite.
    """
    size = scale_root.shape[0]
    key_chi, key_normal = jax.random.split(key)
    # A_ii = sqrt(chi2(df - i)) for i = 0..F-1; chi2(k) = 2 * Gamma(k / 2).
    chi2 = 2.0 * jax.random.gamma(key_chi, (df - jnp.arange(size)) / 2.0)
    bartlett = jnp.tril(jax.random.normal(key_normal, (size, size)), -1) + jnp.diag(jnp.sqrt(chi2))
    root = scale_root @ bartlett
    return root @ root.T


def side_statistics(factors: jax.Array, num_rows: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """What a side's hyper-parameter draw needs of its vectors: their mean (float32[F]), ``rows`` times
    their sample covariance (float32[F, F]) and ``rows`` (float32[]), over the leading ``num_rows`` real
    rows (the others pad the table on a mesh; None: all)."""
    rows = factors.shape[0] if num_rows is None else num_rows
    real = (jnp.arange(factors.shape[0]) < rows)[:, None]
    mean = jnp.sum(jnp.where(real, factors, 0.0), axis=0) / rows
    centred = jnp.where(real, factors - mean[None], 0.0)
    return mean, centred.T @ centred, jnp.asarray(rows, factors.dtype)


def draw_hyperparameters(key: jax.Array, mean: jax.Array, scatter: jax.Array, rows: jax.Array
                         ) -> tuple[jax.Array, jax.Array]:
    """Draws (mu float32[F], Lambda float32[F, F]) from their Normal-Wishart conditional given a side's
    :func:`side_statistics` (``rows`` may be traced: one compiled program serves both sides)."""
    size = mean.shape[0]
    beta = BETA0 + rows
    # W*^-1 = W0^-1 + N S + beta0 N / (beta0 + N) (mu0 - mean)(mu0 - mean)^T, with mu0 = 0, W0 = I.
    inverse_scale = jnp.eye(size) + scatter + (BETA0 * rows / beta) * jnp.outer(mean, mean)
    inverse_scale = (inverse_scale + inverse_scale.T) / 2
    key_wishart, key_normal = jax.random.split(key)
    lam = wishart(key_wishart, linalg.inverse_root(inverse_scale), size + rows)
    mu = rows * mean / beta + linalg.inverse_root(beta * lam) @ jax.random.normal(key_normal, (size,))
    return mu, lam


def sample_hyperparameters(
    key: jax.Array, factors: jax.Array, num_rows: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """Draws (mu, Lambda) of one side from their Normal-Wishart conditional given its vectors.

    Args:
      factors: float32[rows, F] the side's current vectors.
      num_rows: how many leading rows are real (the others pad the table on a mesh); None: all.

    Returns:
      (mu float32[F], Lambda float32[F, F]).
    """
    return draw_hyperparameters(key, *side_statistics(factors, num_rows))
