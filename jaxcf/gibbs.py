"""Bayesian matrix factorisation (BPMF) by Gibbs sampling, several chains in one vmapped program.

The model of Salakhutdinov & Mnih (ICML 2008), "Bayesian probabilistic matrix factorization using
Markov chain Monte Carlo"::

    r_ui ~ N(mean + <U_u, V_i>, 1 / alpha)           mean: the mean training rating
    U_u  ~ N(mu_U, inv(Lambda_U)),  V_i ~ N(mu_V, inv(Lambda_V))
    (mu, Lambda) ~ Normal-Wishart(mu0 = 0, beta0 = 2, W0 = I, nu0 = F)   for each side

One sweep samples each side's hyper-parameters from their conditional, then every user vector
(users are independent given the items: a Gaussian with an F x F precision per user), then every
item vector. The posterior mean of a rating is estimated by averaging the predictions of the kept
samples, which is exactly an ensemble of dot models: member ``k`` has ``user_embedding[k] = [U, 1]``
and ``item_embedding[k] = [V, mean]``, so ``<user row, item row> = <U_u, V_i> + mean``.

The per-row sums ``sum_i V_i V_i^T`` are two matrix products with a dense count matrix when the
table is small (ml-latest-small, ml-100k), else a scan over chunks of ratings (memory ``rows * F * F``
plus one chunk's outer products, not one ``F x F`` matrix per rating).

What does not live here: the workdir, export and CLI (``jaxcf.ensemble``), SGD training
(``jaxcf.train``, ``jaxcf.members``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcf import evaluate, linalg
from jaxcf.config import Config
from jaxcf.data import DataError, Dataset

# Ratings per scan step when summing outer products (memory: chunk * F * F floats per chain).
CHUNK = 8192
# The Normal-Wishart hyper-prior of the paper: mu0 = 0, beta0 = 2, W0 = I, nu0 = F.
BETA0 = 2.0


class Side(NamedTuple):
    """The ratings seen from one side, in one of two forms (the other form's fields are None).

    Dense, for small tables: ``counts`` and ``sums`` float32[num_rows, num_other], how many ratings
    each pair has (0 or 1, more for a repeated pair) and the sum of their centred values; the per-row
    sums are then two matrix products. Chunked, for any size: ``own``, ``other`` int32[chunks, CHUNK]
    row ids of each rating on this and the other side (padding: own = num_rows, dropped) and
    ``targets`` float32[chunks, CHUNK] centred ratings (padding 0); the sums are scatter-adds.
    """

    counts: jax.Array | None = None
    sums: jax.Array | None = None
    own: jax.Array | None = None
    other: jax.Array | None = None
    targets: jax.Array | None = None


# Up to this many (row, other row) cells, a side is held dense: ml-latest-small (671 x 9,066) and
# ml-100k are, ml-1m is not. Two float32 matrices per side; the products replace scatter-adds of
# F * F floats per rating, which dominate a sweep on a CPU.
DENSE_CELLS = 1 << 24


def _side(own: np.ndarray, other: np.ndarray, targets: np.ndarray, num_rows: int, num_other: int) -> Side:
    if num_rows * num_other <= DENSE_CELLS:
        counts = np.zeros((num_rows, num_other), np.float32)
        sums = np.zeros((num_rows, num_other), np.float64)
        np.add.at(counts, (own, other), 1.0)
        np.add.at(sums, (own, other), targets)
        return Side(counts=jnp.asarray(counts), sums=jnp.asarray(sums, jnp.float32))
    n = len(own)
    chunks = max(1, -(-n // CHUNK))
    pad = chunks * CHUNK - n
    return Side(
        own=jnp.asarray(np.pad(own, (0, pad), constant_values=num_rows).reshape(chunks, CHUNK), jnp.int32),
        other=jnp.asarray(np.pad(other, (0, pad)).reshape(chunks, CHUNK), jnp.int32),
        targets=jnp.asarray(np.pad(targets, (0, pad)).reshape(chunks, CHUNK), jnp.float32),
    )


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


def sample_hyperparameters(key: jax.Array, factors: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Draws (mu, Lambda) of one side from their Normal-Wishart conditional given its vectors.

    Args:
      factors: float32[rows, F] the side's current vectors.

    Returns:
      (mu float32[F], Lambda float32[F, F]).
    """
    rows, size = factors.shape
    mean = factors.mean(axis=0)
    centred = factors - mean[None]
    scatter = centred.T @ centred  # rows * sample covariance
    beta = BETA0 + rows
    # W*^-1 = W0^-1 + N S + beta0 N / (beta0 + N) (mu0 - mean)(mu0 - mean)^T, with mu0 = 0, W0 = I.
    inverse_scale = jnp.eye(size) + scatter + (BETA0 * rows / beta) * jnp.outer(mean, mean)
    inverse_scale = (inverse_scale + inverse_scale.T) / 2
    key_wishart, key_normal = jax.random.split(key)
    lam = wishart(key_wishart, linalg.inverse_root(inverse_scale), size + rows)
    mu = rows * mean / beta + linalg.inverse_root(beta * lam) @ jax.random.normal(key_normal, (size,))
    return mu, lam


def normal_equations(other_factors: jax.Array, side: Side, num_rows: int) -> tuple[jax.Array, jax.Array]:
    """Per-row ``sum V_i V_i^T`` and ``sum r_ui V_i`` over each row's ratings.

    Returns:
      (gram float32[num_rows, F, F], rhs float32[num_rows, F]).
    """
    size = other_factors.shape[1]
    if side.counts is not None:
        outer = (other_factors[:, :, None] * other_factors[:, None, :]).reshape(-1, size * size)
        highest = jax.lax.Precision.HIGHEST  # exact float32 sums on accelerators too (no TF32)
        gram = jnp.matmul(side.counts, outer, precision=highest).reshape(num_rows, size, size)
        return gram, jnp.matmul(side.sums, other_factors, precision=highest)

    def add_chunk(carry, chunk):
        gram, rhs = carry
        own, other, targets = chunk
        vectors = jnp.take(other_factors, other, axis=0)
        gram = gram.at[own].add(vectors[:, :, None] * vectors[:, None, :], mode="drop")
        rhs = rhs.at[own].add(vectors * targets[:, None], mode="drop")
        return (gram, rhs), None

    init = (jnp.zeros((num_rows, size, size), other_factors.dtype), jnp.zeros((num_rows, size), other_factors.dtype))
    (gram, rhs), _ = jax.lax.scan(add_chunk, init, (side.own, side.other, side.targets))
    return gram, rhs


def draw_rows(
    key: jax.Array, gram: jax.Array, rhs: jax.Array, mu: jax.Array, lam: jax.Array, alpha: float
) -> jax.Array:
    """Draws every row of one side from its Gaussian conditional.

    Row u has precision ``P = Lambda + alpha * gram[u]`` and mean ``inv(P) (alpha * rhs[u] + Lambda
    mu)``; a row without training ratings is drawn from the prior.

    Args:
      gram, rhs: from :func:`normal_equations`.
      mu, lam: the side's hyper-parameters.
      alpha: the observation precision.

    Returns:
      float32[num_rows, F].
    """
    precision = lam[None] + alpha * gram
    # jaxcf.linalg, not jnp.linalg: LAPACK's batched kernels can deadlock XLA's CPU thread pool.
    chol = linalg.cholesky(precision)
    right = alpha * rhs + (lam @ mu)[None]
    mean = linalg.cho_solve(chol, right)
    noise = jax.random.normal(key, mean.shape, mean.dtype)
    # inv(L^T) z has covariance inv(L L^T) = inv(P).
    return mean + linalg.solve_lower_transpose(chol, noise)


def sample_side(key: jax.Array, own: jax.Array, other: jax.Array, side: Side, alpha: float) -> jax.Array:
    """One side's hyper-parameters from its current vectors, then all its rows given the other side."""
    key_hyper, key_rows = jax.random.split(key)
    mu, lam = sample_hyperparameters(key_hyper, own)
    gram, rhs = normal_equations(other, side, own.shape[0])
    return draw_rows(key_rows, gram, rhs, mu, lam, alpha)


def make_sweep(user_side: Side, item_side: Side, alpha: float) -> Callable:
    """A jitted ``(keys [C], users float32[C, U, F], items float32[C, I, F]) -> (users, items)``:
    one Gibbs sweep of C independent chains, vmapped."""

    def sweep(key, users, items):
        key_users, key_items = jax.random.split(key)
        users = sample_side(key_users, users, items, user_side, alpha)
        items = sample_side(key_items, items, users, item_side, alpha)
        return users, items

    return jax.jit(jax.vmap(sweep), donate_argnums=(1, 2))


def kept_sweeps(sweeps: int, burn_in: int, per_chain: int) -> list[int]:
    """The 1-based sweeps whose samples are kept: ``per_chain`` of them, evenly spaced, ending with
    the last sweep, all after the burn-in.

    Raises:
      DataError: when fewer than ``per_chain`` sweeps follow the burn-in (a config problem; see
        :func:`jaxcf.config.validate`).
    """
    thin = (sweeps - burn_in) // per_chain
    if thin < 1:
        raise DataError(f"{sweeps} sweeps after a burn-in of {burn_in} cannot give {per_chain} samples per chain")
    return [sweeps - thin * j for j in reversed(range(per_chain))]


class Result(NamedTuple):
    """What :func:`fit` returns.

    Attributes:
      members: ``user_embedding`` float32[K, U, F + 1] and ``item_embedding`` float32[K, I, F + 1]:
        the kept samples as dot models (see the module docstring).
      history: one metrics record per sweep; ``valid_rmse`` is that of the mean of the samples kept
        so far (before the first kept sample, of the current samples' mean over chains).
    """

    members: dict[str, np.ndarray]
    history: list[dict]


def fit(config: Config, dataset: Dataset, on_epoch: Callable[[dict], None] | None = None) -> Result:
    """Runs ``config.ensemble.chains`` chains for ``config.train.epochs`` sweeps each.

    Args:
      config: ``model.n_factors`` is F; ``ensemble.size`` samples are kept in all, ``size / chains``
        per chain; ``ensemble.burn_in`` and ``ensemble.noise_precision`` (alpha) as documented.
      dataset: ratings and split.
      on_epoch: called with each sweep's metrics record.

    Returns:
      :class:`Result`.
    """
    ratings = dataset.ratings
    train, valid = dataset.split.train, dataset.split.valid
    size, chains = config.ensemble.size, config.ensemble.chains
    factors = config.model.n_factors
    kept = set(kept_sweeps(config.train.epochs, config.ensemble.burn_in, size // chains))
    mean = float(np.mean(ratings.ratings[train], dtype=np.float64))
    centred = ratings.ratings[train].astype(np.float64) - mean
    user_side = _side(ratings.users[train], ratings.items[train], centred, ratings.num_users, ratings.num_items)
    item_side = _side(ratings.items[train], ratings.users[train], centred, ratings.num_items, ratings.num_users)
    sweep = make_sweep(user_side, item_side, config.ensemble.noise_precision)

    root = jax.random.key(config.seed)
    init_key, chain_key = jax.random.fold_in(root, 0), jax.random.fold_in(root, 2)
    # Small random starts; the burn-in forgets them (the paper starts from a MAP solution instead).
    users = 0.1 * jax.random.normal(jax.random.fold_in(init_key, 0), (chains, ratings.num_users, factors))
    items = 0.1 * jax.random.normal(jax.random.fold_in(init_key, 1), (chains, ratings.num_items, factors))
    chain_keys = jnp.stack([jax.random.fold_in(chain_key, c) for c in range(chains)])

    predict = _make_predict(mean)
    valid_users, valid_items = jnp.asarray(ratings.users[valid]), jnp.asarray(ratings.items[valid])
    train_users, train_items = jnp.asarray(ratings.users[train]), jnp.asarray(ratings.items[train])
    valid_targets, train_targets = ratings.ratings[valid], ratings.ratings[train]
    total = np.zeros(len(valid), np.float64)
    members_users, members_items, history = [], [], []
    for epoch in range(1, config.train.epochs + 1):
        start = time.perf_counter()
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(chain_keys, epoch)
        users, items = sweep(keys, users, items)
        sample_valid = np.asarray(predict(users, items, valid_users, valid_items), np.float64)  # [C, n_valid]
        sample_train = np.asarray(predict(users, items, train_users, train_items), np.float64)
        if epoch in kept:
            total += sample_valid.sum(axis=0)
            members_users.append(np.asarray(users))
            members_items.append(np.asarray(items))
        count = len(members_users) * chains
        ensemble = total / count if count else sample_valid.mean(axis=0)
        valid_mse = evaluate.mse(ensemble, valid_targets)
        record = {
            "epoch": epoch,
            "train_loss": float(np.mean((sample_train - train_targets[None]) ** 2)),
            "valid_mse": valid_mse,
            "valid_rmse": math.sqrt(valid_mse),
            "valid_mae": evaluate.mae(ensemble, valid_targets),
            "sample_valid_rmse": float(np.mean(np.sqrt(np.mean((sample_valid - valid_targets[None]) ** 2, axis=1)))),
            "members": count,
            "seconds": time.perf_counter() - start,
        }
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
    return Result(_as_dot_members(members_users, members_items, mean), history)


def _make_predict(mean: float) -> Callable:
    @jax.jit
    def predict(users, items, user_ids, item_ids):
        """float32[C, n]: each chain's prediction for the pairs."""
        return jnp.sum(users[:, user_ids] * items[:, item_ids], axis=-1) + mean

    return predict


def _as_dot_members(users: list[np.ndarray], items: list[np.ndarray], mean: float) -> dict[str, np.ndarray]:
    """Kept samples (each float32[C, rows, F]) as K = samples * C dot models with the mean folded in."""
    users_k = np.concatenate(users, axis=0)
    items_k = np.concatenate(items, axis=0)
    ones = np.ones(users_k.shape[:2] + (1,), np.float32)
    means = np.full(items_k.shape[:2] + (1,), mean, np.float32)
    return {
        "user_embedding": np.concatenate([users_k.astype(np.float32), ones], axis=2),
        "item_embedding": np.concatenate([items_k.astype(np.float32), means], axis=2),
    }
