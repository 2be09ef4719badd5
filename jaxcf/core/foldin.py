"""Fold-in: a user's factors (and bias) solved from their ratings with the item side frozen.

Every kind of model is treated as Bayesian linear regression on the user's row ``x`` with an
empirical Gaussian prior (Salakhutdinov & Mnih's BPMF conditional, used as a point estimate):

- the prior ``x ~ N(mu, inv(prior_scale * Lambda))`` is fitted to the model's own users (the mean and
  covariance of the rows of every user with training ratings, per member of an ensemble);
- the noise precision ``alpha`` is one over the exported model's validation MSE (its out-of-sample
  error: the training residuals of an SGD model are too optimistic), or ``ensemble.noise_precision``
  for a Gibbs export when no validation figure is recorded;
- the features of a rating of item ``i`` are the item's row ``v_i`` and its offset ``o_i``.

The dot model predicts ``v_i . x``: the posterior mean is one solve, ``(alpha V'V + Lambda) x = alpha
V'r + Lambda mu``. A Gibbs export's members are dot models whose last user column is the constant 1
(the mean rating folded into the items' last column): that column stays 1 and is the offset. The
biased model predicts ``low + (high - low) sigmoid(v_i . u + b_u + b_i)``, so ``x = [u, b_u]``,
``v_i -> [v_i, 1]``, ``o_i = b_i``, and the non-linear least-squares problem is solved by a fixed
number of damped Gauss-Newton (Levenberg-Marquardt) steps from ``x = mu``, each step accepted only
where it lowers the objective. Every user of a request is solved at once: the F x F normal equations
are summed with ``segment_sum`` and solved with ``jaxcf.core.linalg`` (plain XLA ops; LAPACK's batched
kernels can deadlock XLA's CPU pool), one compiled call per power-of-two size, vmapped over members.

``prior_scale`` is the regularisation (each family's spec gives its default), chosen among
0.03-4 on held-out users drawn from the *training* users only, with ``python -m jaxcf.crossval
--protocol strong --choose-prior-scale ...`` (the commands and figures are in docs/results.md).

One concept at some length: solving users' rows from their ratings with the items frozen.

What does not live here: the Model that uses it (``jaxcf.serving.inference``), the evaluation protocol
(``jaxcf.training.crossval``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxcf.core import linalg
from jaxcf.core.errors import ModelError
from jaxcf.core.scoring import bucket

# Ratings of one solve call are padded to a power of two of at least this many: few compiled shapes.
MIN_PAIRS = 64
# Damped Gauss-Newton steps for the biased model (enough to converge to float32 precision from the
# prior mean for every user tried: tests/test_foldin.py checks the gradient at the solution).
GAUSS_NEWTON_STEPS = 25
# The prior's strength when a family names none (each family's spec passes its own, chosen on the training
# users: docs/results.md).
PRIOR_SCALE = 1.0
# A floor on the prior covariance's eigenvalues, relative to its mean eigenvalue (a table with a
# direction no user varies along would otherwise give an infinite prior precision).
COVARIANCE_FLOOR = 1e-6


@dataclasses.dataclass(frozen=True)
class Prior:
    """Per member: ``mean`` float32[K, d], ``precision`` float32[K, d, d], ``alpha`` float32[K]."""

    mean: np.ndarray
    precision: np.ndarray
    alpha: np.ndarray


def user_rows(weights: Mapping[str, np.ndarray], sigmoid: bool, fixed_last: bool) -> np.ndarray:
    """The solved part of every user's row: float[K, U, d] (``[u, b_u]`` for the biased model; without
    the constant last column of a Gibbs export)."""
    users = weights["user_embedding"]
    users = users if users.ndim == 3 else users[None]
    if sigmoid:
        bias = weights["user_bias"] if weights["user_bias"].ndim == 3 else weights["user_bias"][None]
        return np.concatenate([users, bias], axis=2)
    return users[..., :-1] if fixed_last else users


def item_features(weights: Mapping[str, np.ndarray], sigmoid: bool, fixed_last: bool) -> tuple[np.ndarray, np.ndarray]:
    """(features float32[K, I, d], offsets float32[K, I]) of every item (see the module docstring)."""
    items = weights["item_embedding"]
    items = items if items.ndim == 3 else items[None]
    if sigmoid:
        bias = weights["item_bias"] if weights["item_bias"].ndim == 3 else weights["item_bias"][None]
        ones = np.ones(items.shape[:2] + (1,), np.float32)
        return np.concatenate([items, ones], axis=2), bias[..., 0]
    if fixed_last:
        return items[..., :-1], items[..., -1]
    return items, np.zeros(items.shape[:2], np.float32)


def fit_prior(rows: np.ndarray, counts: np.ndarray, alpha: np.ndarray, scale: float = PRIOR_SCALE) -> Prior:
    """The empirical prior of each member from its users with training ratings (host, float64).

    Args:
      rows: float[K, U, d] from :func:`user_rows`.
      counts: int[U] training ratings per user (users without any are left out).
      alpha: float[K] noise precision per member.
      scale: multiplies the prior precision (the regularisation strength).
    """
    rated = rows[:, counts > 0].astype(np.float64) if (counts > 0).any() else rows.astype(np.float64)
    means, precisions = [], []
    for member in rated:
        mean = member.mean(axis=0)
        centred = member - mean
        cov = centred.T @ centred / max(1, len(member) - 1)
        floor = COVARIANCE_FLOOR * max(float(np.trace(cov)) / len(cov), 1e-12)
        cov = cov + floor * np.eye(len(cov))
        means.append(mean)
        precisions.append(scale * np.linalg.inv(cov))
    return Prior(np.asarray(means, np.float32), np.asarray(precisions, np.float32), np.asarray(alpha, np.float32))


def _gram(features, weights, rows, num_rows):
    """Per-row ``sum w f f'``: features float[P, d], weights float[P], rows int[P] (in chunks of pairs)."""
    return linalg.chunked_segment_sum(lambda f, w: w[:, None, None] * f[:, :, None] * f[:, None, :],
                                      (features, weights), rows, num_rows)


def _solve_linear(features, offsets, ratings, valid, rows, num_rows, mean, precision, alpha):
    """Posterior mean of each row under the linear model: float[B, d]."""
    w = alpha * valid
    gram = _gram(features, w, rows, num_rows) + precision[None]
    rhs = jax.ops.segment_sum((w * (ratings - offsets))[:, None] * features, rows, num_segments=num_rows)
    rhs = rhs + (precision @ mean)[None]
    return linalg.cho_solve(linalg.cholesky(gram), rhs)


def _solve_sigmoid(features, offsets, ratings, valid, rows, num_rows, mean, prec, alpha, y_range):
    """MAP of each row under the biased model by damped Gauss-Newton: float[B, d]."""
    low, high = y_range
    span = high - low
    w = alpha * valid

    def objective(x):
        z = jnp.sum(features * x[rows], axis=1) + offsets
        err = ratings - (low + span * jax.nn.sigmoid(z))
        data = jax.ops.segment_sum(w * err * err, rows, num_segments=num_rows)
        diff = x - mean[None]
        return data + jnp.sum((diff @ prec) * diff, axis=1)

    def step(_, carry):
        x, damping, value = carry
        z = jnp.sum(features * x[rows], axis=1) + offsets
        s = jax.nn.sigmoid(z)
        err = ratings - (low + span * s)
        jac = (span * s * (1 - s))[:, None] * features  # d prediction / d x, per rating
        hess = _gram(jac, w, rows, num_rows) + prec[None]
        grad = jax.ops.segment_sum((w * err)[:, None] * jac, rows, num_segments=num_rows)
        grad = grad - (x - mean[None]) @ prec.T
        diag = jnp.diagonal(hess, axis1=1, axis2=2)
        damped = hess + damping[:, None, None] * jnp.eye(x.shape[1])[None] * diag[:, None, :]
        candidate = x + linalg.cho_solve(linalg.cholesky(damped), grad)
        new_value = objective(candidate)
        better = new_value < value
        return (jnp.where(better[:, None], candidate, x), jnp.where(better, damping / 3, damping * 4),
                jnp.where(better, new_value, value))

    x0 = jnp.broadcast_to(mean, (num_rows, mean.shape[0]))
    start = (x0, jnp.full((num_rows,), 1e-3, x0.dtype), objective(x0))
    x, _, _ = jax.lax.fori_loop(0, GAUSS_NEWTON_STEPS, step, start)
    return x


@functools.partial(jax.jit, static_argnames=("num_rows", "y_range"))
def solve(features, offsets, prior_mean, prior_precision, alpha, items, ratings, valid, rows, num_rows, y_range=None):
    """Solved rows for a block of users, every member at once.

    Args:
      features, offsets: float32[K, I, d], float32[K, I] (:func:`item_features`).
      prior_mean, prior_precision, alpha: the :class:`Prior`'s arrays.
      items, ratings, valid, rows: the block's ratings, padded to a power of two: int32[P] item
        indices, float32[P] ratings, float32[P] 1 for a real rating and 0 for padding, int32[P] the
        row (user) of the block each rating belongs to.
      num_rows: users in the block (static).
      y_range: the biased model's range (static), or None for a linear model.

    Returns:
      float32[K, num_rows, d].
    """

    def one(f, o, mean, precision, a):
        gathered, offset = f[items], o[items]
        if y_range is None:
            return _solve_linear(gathered, offset, ratings, valid, rows, num_rows, mean, precision, a)
        return _solve_sigmoid(gathered, offset, ratings, valid, rows, num_rows, mean, precision, a, y_range)

    return jax.vmap(one)(features, offsets, prior_mean, prior_precision, alpha)


def solve_block(features, offsets, prior: Prior, user_of: np.ndarray, items: np.ndarray, ratings: np.ndarray,
                num_users: int, y_range) -> np.ndarray:
    """:func:`solve` for ``num_users`` users whose ratings are (user_of, items, ratings), padded to powers of
    two so that a handful of compiled shapes serves every request. Returns float32[K, num_users, d]."""
    pairs = bucket(max(MIN_PAIRS, len(items)))
    users = bucket(max(1, num_users))
    pad = pairs - len(items)
    y = tuple(float(v) for v in y_range) if y_range is not None else None
    out = solve(
        features, offsets, prior.mean, prior.precision, prior.alpha,
        np.pad(items.astype(np.int32), (0, pad)), np.pad(ratings.astype(np.float32), (0, pad)),
        np.pad(np.ones(len(items), np.float32), (0, pad)), np.pad(user_of.astype(np.int32), (0, pad)),
        users, y,
    )
    return np.asarray(out)[:, :num_users]


def noise_precision(metadata: Mapping) -> float:
    """``alpha`` = 1 / the exported model's validation MSE (its closing record), else the Gibbs config's."""
    for record in reversed(metadata.get("metrics") or []):
        mse = record.get("valid_mse") if isinstance(record, dict) else None
        if isinstance(mse, (int, float)) and math.isfinite(mse) and mse > 0:
            return 1.0 / float(mse)
    ensemble = (metadata.get("config") or {}).get("ensemble") or {}
    value = ensemble.get("noise_precision")
    return float(value) if isinstance(value, (int, float)) and value > 0 else 1.0


class Solver:
    """A model's frozen item side and its users' prior, ready to solve users from ratings.

    Args:
      weights, metadata: the export's tables and ``metadata.json``.
      counts: int[U] training ratings per user (the prior is fitted to users that have some).
      prior_scale: the prior's strength (None: ``default_scale``).
      sigmoid: the biased model's scoring (``[u, b_u]`` solved by Gauss-Newton through the sigmoid).
      fixed_last: the members' last user column is the constant 1 (a Gibbs export: the mean rating sits
        in the items' last column).
      default_scale: the family's prior scale.
    """

    def __init__(self, weights: Mapping[str, np.ndarray], metadata: Mapping, counts: np.ndarray,
                 prior_scale: float | None = None, *, sigmoid: bool = False, fixed_last: bool = False,
                 default_scale: float = PRIOR_SCALE):
        check_prior_scale(prior_scale)
        model = metadata["model"]
        self.sigmoid = sigmoid
        self.y_range = tuple(model["y_range"]) if sigmoid else None
        self.members = weights["user_embedding"].ndim == 3
        self.fixed_last = fixed_last
        self.features, self.offsets = item_features(weights, sigmoid, fixed_last)
        rows = user_rows(weights, sigmoid, fixed_last)
        alpha = np.full(rows.shape[0], noise_precision(metadata), np.float32)
        self.prior_scale = default_scale if prior_scale is None else float(prior_scale)
        self.prior = fit_prior(rows, counts, alpha, self.prior_scale)

    def solve(self, user_of: np.ndarray, items: np.ndarray, ratings: np.ndarray, num_users: int) -> np.ndarray:
        """float32[K, num_users, d] solved rows (K = 1 for a single model)."""
        return solve_block(self.features, self.offsets, self.prior, user_of, items, ratings, num_users, self.y_range)

    def tables(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Solved rows as the model's user tables (``user_embedding`` and, for the biased model,
        ``user_bias``), with the member axis only for an ensemble."""
        if self.sigmoid:
            out = {"user_embedding": rows[..., :-1], "user_bias": rows[..., -1:]}
        elif self.fixed_last:
            out = {"user_embedding": np.concatenate([rows, np.ones(rows.shape[:2] + (1,), np.float32)], axis=2)}
        else:
            out = {"user_embedding": rows}
        return {name: (table if self.members else table[0]).astype(np.float32) for name, table in out.items()}


def check_prior_scale(prior_scale) -> None:
    """Raises ModelError unless ``prior_scale`` is None or a finite number > 0."""
    if prior_scale is not None and not (isinstance(prior_scale, (int, float, np.floating))
                                        and not isinstance(prior_scale, bool) and math.isfinite(prior_scale)
                                        and prior_scale > 0):
        raise ModelError(f"prior_scale must be a finite number > 0; got {prior_scale!r}")


# Ratings per solve call: the per-rating outer products of a call take PAIRS_PER_CALL * d * d floats.
PAIRS_PER_CALL = 8192


def _groups(counts: np.ndarray) -> list[np.ndarray]:
    """Positions of users cut into groups of at most PAIRS_PER_CALL ratings (a larger user alone)."""
    groups, current, total = [], [], 0
    for position, count in enumerate(counts.tolist()):
        if current and total + count > PAIRS_PER_CALL:
            groups.append(np.asarray(current))
            current, total = [], 0
        current.append(position)
        total += count
    if current:
        groups.append(np.asarray(current))
    return groups


def solve_users(solver, user_of: np.ndarray, items: np.ndarray, ratings: np.ndarray,
                num_users: int) -> np.ndarray:
    """Rows for ``num_users`` users from their ratings (``user_of`` in [0, num_users)), in calls of at most
    PAIRS_PER_CALL ratings: float32[K, num_users, d]."""
    order = np.argsort(user_of, kind="stable")
    user_of, items, ratings = user_of[order], items[order], ratings[order]
    counts = np.bincount(user_of, minlength=num_users)
    starts = np.concatenate([[0], np.cumsum(counts)])
    out = None
    for group in _groups(counts):
        pick = np.concatenate([np.arange(starts[u], starts[u + 1]) for u in group]).astype(np.int64)
        local = np.searchsorted(group, user_of[pick])
        rows = solver.solve(local, items[pick], ratings[pick], len(group))
        if out is None:
            out = np.zeros((rows.shape[0], num_users, rows.shape[2]), np.float32)
        out[:, group] = rows
    return out
