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

A sweep is this family's epoch (``train.epochs`` counts sweeps), so the one loop (``jaxcf.training.loop``)
checkpoints, resumes and shards it like any model: the state holds the chains and a buffer of the
kept samples. On a mesh every side's rows are sharded over ``model``; the rows that pad a table to a
multiple of ``model`` are masked out of the hyper-parameter draws and kept at zero.

One concept at some length: the Gibbs sampler of BPMF, from its hyper-parameters to the kept samples.

What does not live here: the F x F solves (``jaxcf.core.linalg``, plain XLA ops: LAPACK's batched kernels
can deadlock XLA's CPU thread pool), the loop, SGD training (``jaxcf.families.sgd``, ``jaxcf.families.members``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcf.core import linalg, metrics, rng, scoring
from jaxcf.core.errors import DataError
from jaxcf.core.family import Family
from jaxcf.data import Dataset
from jaxcf.families.bpmf import SPEC
from jaxcf.families.bpmf.prior import (  # noqa: F401  (the hyper-parameter draws, also used here)
    BETA0,
    draw_hyperparameters,
    sample_hyperparameters,
    side_statistics,
    wishart,
)

# Ratings per scan step when summing outer products (memory: chunk * F * F floats per chain).
CHUNK = 8192


class Side(NamedTuple):
    """The ratings seen from one side, in one of two forms (the other form's fields are None).

    Dense, for small tables: ``counts`` and ``sums`` float32[num_rows, num_other], how many ratings
    each pair has (0 or 1, more for a repeated pair) and the sum of their centred values; the per-row
    sums are then two matrix products. Chunked, for any size: ``own``, ``other`` int32[chunks, CHUNK]
    row ids of each rating on this and the other side (padding: own = PAD_ID, dropped) and
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


# The row id of a padding entry of a chunked side: beyond any table, so its scatter is dropped.
PAD_ID = 2**30


def make_side(own: np.ndarray, other: np.ndarray, targets: np.ndarray, num_rows: int, num_other: int) -> Side:
    """One side's ratings as host arrays (dense or chunked; see :class:`Side`).

    Args:
      own, other: int[n] row ids of each rating on this side and on the other.
      targets: float[n] centred ratings.
      num_rows, num_other: the table sizes (the padded ones on a mesh).
    """
    if num_rows * num_other <= DENSE_CELLS:
        counts = np.zeros((num_rows, num_other), np.float32)
        sums = np.zeros((num_rows, num_other), np.float64)
        np.add.at(counts, (own, other), 1.0)
        np.add.at(sums, (own, other), targets)
        return Side(counts=counts, sums=sums.astype(np.float32))
    n = len(own)
    chunks = max(1, -(-n // CHUNK))
    pad = chunks * CHUNK - n
    return Side(
        own=np.pad(own, (0, pad), constant_values=PAD_ID).reshape(chunks, CHUNK).astype(np.int32),
        other=np.pad(other, (0, pad)).reshape(chunks, CHUNK).astype(np.int32),
        targets=np.pad(targets, (0, pad)).reshape(chunks, CHUNK).astype(np.float32),
    )


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
    # jaxcf.core.linalg, not jnp.linalg: LAPACK's batched kernels can deadlock XLA's CPU thread pool.
    chol = linalg.cholesky(precision)
    right = alpha * rhs + (lam @ mu)[None]
    mean = linalg.cho_solve(chol, right)
    noise = jax.random.normal(key, mean.shape, mean.dtype)
    # inv(L^T) z has covariance inv(L L^T) = inv(P).
    return mean + linalg.solve_lower_transpose(chol, noise)


def sample_side(
    key: jax.Array, own: jax.Array, other: jax.Array, side: Side, alpha: float, num_rows: int | None = None
) -> jax.Array:
    """One side's hyper-parameters from its current vectors, then all its rows given the other side.

    Rows at or beyond ``num_rows`` (a mesh's padding) stay zero.
    """
    key_hyper, key_rows = jax.random.split(key)
    mu, lam = sample_hyperparameters(key_hyper, own, num_rows)
    gram, rhs = normal_equations(other, side, own.shape[0])
    drawn = draw_rows(key_rows, gram, rhs, mu, lam, alpha)
    if num_rows is None or num_rows == own.shape[0]:
        return drawn
    return jnp.where((jnp.arange(own.shape[0]) < num_rows)[:, None], drawn, 0.0)


def make_sweep(user_side: Side, item_side: Side, alpha: float, num_users: int | None = None,
               num_items: int | None = None) -> Callable:
    """``(keys [C], users float32[C, U, F], items float32[C, I, F]) -> (users, items)``: one Gibbs
    sweep of C independent chains, vmapped (not jitted: the caller jits it with its shardings)."""

    def sweep(key, users, items):
        key_users, key_items = jax.random.split(key)
        users = sample_side(key_users, users, items, user_side, alpha, num_users)
        items = sample_side(key_items, items, users, item_side, alpha, num_items)
        return users, items

    return jax.vmap(sweep)


def kept_sweeps(sweeps: int, burn_in: int, per_chain: int) -> list[int]:
    """The 1-based sweeps whose samples are kept: ``per_chain`` of them, evenly spaced, ending with
    the last sweep, all after the burn-in.

    Raises:
      DataError: when fewer than ``per_chain`` sweeps follow the burn-in (a config problem; see
        :func:`jaxcf.core.config.validate`).
    """
    thin = (sweeps - burn_in) // per_chain
    if thin < 1:
        raise DataError(f"{sweeps} sweeps after a burn-in of {burn_in} cannot give {per_chain} samples per chain")
    return [sweeps - thin * j for j in reversed(range(per_chain))]




class GibbsState(NamedTuple):
    """The sampler's state: the chains now, the samples kept so far, and their predictions' running sum.

    Attributes:
      users, items: float32[C, U, F], float32[C, I, F] each chain's current sample.
      kept_users, kept_items: float32[S, C, U, F], float32[S, C, I, F]: slot ``s`` holds the chains'
        samples of the ``s``-th kept sweep (zeros until then): the export, what predict and fold-in use.
      prediction_sum: float32[n] the sum over kept samples of their predictions of the evaluated pairs
        (validation, then test): the posterior mean so far is it over the count, with no sample re-scored.
    """

    users: jax.Array
    items: jax.Array
    kept_users: jax.Array
    kept_items: jax.Array
    prediction_sum: jax.Array


def row_axes(state: GibbsState) -> GibbsState:
    return GibbsState(1, 1, 2, 2, None)


def as_members(state: GibbsState, mean: float) -> dict[str, jax.Array]:
    """Kept samples as ``S * C`` dot models with the mean folded in (sweep-major, then chain)."""
    users = state.kept_users.reshape(-1, *state.kept_users.shape[2:])
    items = state.kept_items.reshape(-1, *state.kept_items.shape[2:])
    ones = jnp.ones((*users.shape[:2], 1), users.dtype)
    means = jnp.full((*items.shape[:2], 1), mean, items.dtype)
    return {"user_embedding": jnp.concatenate([users, ones], axis=2),
            "item_embedding": jnp.concatenate([items, means], axis=2)}


def family(config: Any, dataset: Dataset, layout=None) -> Family:
    """The Gibbs sampler as a family: ``config.ensemble.chains`` chains, ``train.epochs`` sweeps each.

    ``model.n_factors`` is F; ``ensemble.size`` samples are kept in all, ``size / chains`` per chain;
    ``ensemble.burn_in`` and ``ensemble.noise_precision`` (alpha) as documented in ``jaxcf.core.config``.
    On one device a sweep is ``jaxcf.families.bpmf.fast_sweep.Sweep`` (per-row sums over each row's own
    ratings, batch-last factorisations); on a mesh, :func:`make_sweep` with the rows sharded.
    """
    from jaxcf.families.bpmf import fast_sweep

    ratings = dataset.ratings
    train = dataset.split.train
    size, chains, factors = config.ensemble.size, config.ensemble.chains, config.model.n_factors
    per_chain = size // chains
    kept = kept_sweeps(config.train.epochs, config.ensemble.burn_in, per_chain)
    slot_of = {sweep: slot for slot, sweep in enumerate(kept)}
    mean = float(np.mean(ratings.ratings[train], dtype=np.float64))
    centred = ratings.ratings[train].astype(np.float64) - mean
    num_users, num_items = ratings.num_users, ratings.num_items
    alpha = config.ensemble.noise_precision
    chain_key = rng.stream(config.seed, "chains")
    chain_keys = jnp.stack([jax.random.fold_in(chain_key, c) for c in range(chains)])
    train_u, train_i = ratings.users[train], ratings.items[train]
    train_targets = ratings.ratings[train].astype(np.float64)
    evaluation = metrics.Evaluation.of(dataset, None)
    role = "valid" if evaluation.has("valid") else "test" if evaluation.has("test") else None

    def store(state, slot):
        return state._replace(kept_users=state.kept_users.at[slot].set(state.users),
                              kept_items=state.kept_items.at[slot].set(state.items))

    def current_scores(chains_now, u, i):  # float32[C, b]: each chain's current prediction
        return jnp.sum(chains_now[0][:, u] * chains_now[1][:, i], axis=-1) + mean

    if layout is None:
        user_index = jax.tree.map(jnp.asarray, fast_sweep.make_side(train_u, train_i, centred, num_users, num_items))
        item_index = jax.tree.map(jnp.asarray, fast_sweep.make_side(train_i, train_u, centred, num_items, num_users))
        sweep = fast_sweep.Sweep(user_index, item_index, alpha)
        store_fn = jax.jit(store, donate_argnums=(0,))
    else:
        rows_u, rows_i = layout.padded_rows(num_users), layout.padded_rows(num_items)
        user_side = make_side(train_u, train_i, centred, rows_u, rows_i)
        item_side = make_side(train_i, train_u, centred, rows_i, rows_u)
        user_side_d, item_side_d = layout.replicate(user_side), layout.replicate(item_side)
        shard_u, shard_k = layout.sharding(3, 1), layout.sharding(4, 2)
        state_shardings = GibbsState(shard_u, shard_u, shard_k, shard_k, layout.replicated)
        sweep_fn = jax.jit(
            lambda k, u, i, us, its: make_sweep(us, its, alpha, num_users, num_items)(k, u, i),
            in_shardings=(layout.replicated, shard_u, shard_u, jax.tree.map(lambda _: layout.replicated, user_side),
                          jax.tree.map(lambda _: layout.replicated, item_side)),
            out_shardings=(shard_u, shard_u),
            donate_argnums=(1, 2),
        )

        def sweep(keys, users, items):
            return sweep_fn(keys, users, items, user_side_d, item_side_d)

        store_fn = jax.jit(store, in_shardings=(state_shardings, layout.replicated),
                           out_shardings=state_shardings, donate_argnums=(0,))

    predict_current = scoring.pair_predictor(current_scores, evaluation.users, evaluation.items,
                                             config.train.eval_batch_size, layout)
    last = {}  # the sweep whose current predictions were last scored, and them (a kept sweep scores them)

    def current(state, number):
        if last.get("number") != number:
            last.update(number=number, scores=np.asarray(predict_current((state.users, state.items)), np.float64))
        return last["scores"]

    def init():
        root = rng.stream(config.seed, "init")
        # Small random starts; the burn-in forgets them (the paper starts from a MAP solution instead).
        users = 0.1 * jax.random.normal(jax.random.fold_in(root, 0), (chains, num_users, factors))
        items = 0.1 * jax.random.normal(jax.random.fold_in(root, 1), (chains, num_items, factors))
        return GibbsState(users, items, jnp.zeros((per_chain, chains, num_users, factors)),
                          jnp.zeros((per_chain, chains, num_items, factors)), jnp.zeros(len(evaluation.users)))

    def epoch(state, number):
        sweep_number = number + 1
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(chain_keys, sweep_number)
        users, items = sweep(keys, state.users, state.items)
        state = state._replace(users=users, items=items)
        if sweep_number in slot_of:
            state = store_fn(state, slot_of[sweep_number])
            if len(evaluation.users):
                total = state.prediction_sum + jnp.asarray(np.sum(current(state, number), axis=0), jnp.float32)
                state = state._replace(prediction_sum=total if layout is None else layout.replicate(total))
        # The sweep's host sync: each chain's training MSE, from the same predictions the record reads
        # (the evaluated pairs start with the training pairs, in order).
        train_part = current(state, number)[:, evaluation.part("train")]
        return state, np.mean((train_part - train_targets[None]) ** 2, axis=1)

    def record(state, number, losses, carry, evaluate=True):
        count = sum(sweep <= number + 1 for sweep in kept) * chains
        if not evaluate:
            return {"epoch": number + 1, "train_loss": float(np.mean(losses)), "members": count}, carry
        scores = current(state, number)
        ensemble = (np.asarray(state.prediction_sum, np.float64) / count if count
                    else np.mean(scores, axis=0) if len(scores) else scores.reshape(0))
        result = {"epoch": number + 1, "train_loss": float(np.mean(losses)), **evaluation.metrics(ensemble),
                  "members": count}
        if role:  # each chain's current sample as a model of its own (from its rows)
            part = evaluation.part(role)
            targets = evaluation.targets[part]
            result[f"sample_{role}_rmse"] = float(np.mean(np.sqrt(np.mean((scores[:, part] - targets) ** 2, axis=1))))
        if not np.all(np.isfinite(ensemble)):  # the loop decides; it reads the losses itself
            result["diverged"] = "the sampler's predictions are not finite"
        return result, carry

    return Family(
        name=SPEC.name,
        init=init,
        epoch=epoch,
        record=record,
        params=lambda state: as_members(state, mean),
        row_axes=row_axes,
        final=lambda params: metrics.final_metrics(dataset, None, params),
        model_info=SPEC.model_info(n_factors=factors + 1, y_range=None, num_users=num_users, num_items=num_items,
                                   ensemble_size=size),
        divergence_hint="check the ratings' scale (they are centred on their mean, but must be finite and "
                        "moderate) or lower ensemble.noise_precision",
    )
