"""A Bayesian factorisation machine on relational blocks, sampled by Gibbs as myFM samples it.

The model (Rendle 2012; Freudenthaler, Schmidt-Thieme & Rendle 2011), for a rating whose feature vector
``x`` is one row of each block (``jaxcf.families.bfm.features``)::

    y = w0 + sum_j w_j x_j + sum_{a<b} <v_a, v_b> x_a x_b + noise,   noise ~ N(0, 1 / alpha)
    w_j ~ N(mu_w[g], 1 / lambda_w[g]),  v_jf ~ N(mu_v[g, f], 1 / lambda_v[g, f])   (g: j's group)
    lambda ~ Gamma(alpha_0 / 2, beta_0 / 2),  mu ~ N(mu_0, 1 / (gamma_0 lambda))       (per group and column)
    alpha ~ Gamma(alpha_0 / 2, beta_0 / 2),  w0 ~ N(0, 1 / reg_0)

with myFM 0.4's defaults (``Priors``) and its initial state (w0, w, V ~ N(0, 0.1^2); alpha 1, mu 0,
lambda 1e-5). The pairs include those within a block (a user's id with the items of its set), as
myFM's FM over ``X_rel`` has: per factor ``sum_{a<b} = (q_f^2 - sum_j v_jf^2 x_j^2) / 2``.

A sweep, in myFM's order: alpha; w0; per group lambda then mu, for w and for each factor (lambda_v and
mu_v depend on V only, so drawing them before the w pass, as here, leaves each draw's conditional as
in myFM); then the table column by column (column 0 is w, column f + 1 is factor f), and within a
column block by block. The prediction is linear in each scalar ``w_j`` or ``v_jf`` given everything
else, so each has a Gaussian full conditional; its sufficient statistics over the block rows holding
``j`` are myFM's relation-wise caches (per block row: rating count, sums of the other blocks' ``q_f``,
of its square, of the residual and of residual times ``q_f``), so a column costs the block's nonzeros
plus one pass over the ratings, never ratings times set size.

What is drawn jointly, and why that is valid: within one column, the features of one *class* of the
block's schedule at once. Features in a class share no block row, hence no rating; given the rest,
each one's conditional involves only its own rows, so they are independent and a joint draw is exact.
So all user-id features (one per row) are one draw, given the items' side and the users' implicit sets;
an implicit-set item is in the rows of every user who rated it, so it is never drawn with those users'
ids (another group, drawn before it) nor with another item one of those users rated (another class).
No two features of different blocks are drawn together (a rating holds both), nor two columns of one
feature. Classes are walked in a fixed order, so a sweep is a systematic-scan Gibbs sampler of the
same posterior as myFM's one-feature-at-a-time scan, in another order (myFM walks a block's features
by index; here tiers of rising degree): at 200 sweeps the chains have not settled (alpha still
rises), and the order moves a validation RMSE by about 0.001 either way.

Cost: a column walks each block's classes in a ``lax.scan`` (the busiest user's set sets a floor on
their number: 1,916 on ml-latest-small) plus two passes over the ratings. Ids-only sweeps take about
0.6x myFM's CPU time; with implicit sets 1.4-1.9x, the class loops costing about 25 ns per padded
entry of XLA's CPU gather and scatter (``bench/parity_bfm.py``, results/parity_bfm.json).

Everything is plain XLA in the dtype of the ratings ``y`` (float32 normally; float64 under
``jax_enable_x64`` for a check against myFM's doubles), with no LAPACK: every draw is scalar. The
residual is updated as each column goes, then recomputed from scratch at the end of the sweep (as
myFM does); the difference is reported as ``drift``.

It is one concept at some length: the Gibbs sweep of a relational Bayesian FM, from its hyper-parameters to
each column's class-by-class draws (its conditionals share one set of caches, so they stay together).

What does not live here: the blocks and their schedule (``jaxcf.families.bfm.features``), the family
(chains, kept samples, export: ``jaxcf.families.bfm.fit``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxcf.families.bfm.features import Block


class Priors(NamedTuple):
    """myFM 0.4's ``MyFMRegressor`` defaults (``myfm/base.py``; the C++ ``FMLearningConfig``)."""

    alpha_0: float = 1.0
    beta_0: float = 1.0
    gamma_0: float = 1.0
    mu_0: float = 0.0
    reg_0: float = 1.0
    init_stdev: float = 0.1


MYFM = Priors()


class Cache(NamedTuple):
    """What the state implies, kept so a sweep need not recompute it first.

    Attributes:
      q, s: per block, float32[num_rows + 1, D]: ``X @ table`` and ``X^2 @ table^2`` (column 0: the
        linear term; the last row pads).
      e: float32[n] prediction minus rating for each training rating (myFM's sign).
    """

    q: tuple[jax.Array, ...]
    s: tuple[jax.Array, ...]
    e: jax.Array


class State(NamedTuple):
    """One chain (float32 below stands for the dtype of the ratings).

    Attributes:
      w0: float32[] the global bias.
      tables: per block, float32[num_features + 1, D]: column 0 is w, column f + 1 is factor f of V
        (D = rank + 1); the last row pads (never read by a prediction).
      alpha: float32[] the noise precision.
      mu, lam: float32[groups, D] each group's prior mean and precision, per column.
      cache: see :class:`Cache`.
      pred_sum: float32[m] the sum over kept sweeps of the evaluation pairs' predictions.
      kept: int32[] how many sweeps ``pred_sum`` holds.
      drift: float32[] the largest |incremental - recomputed| residual of the last sweep.
    """

    w0: jax.Array
    tables: tuple[jax.Array, ...]
    alpha: jax.Array
    mu: jax.Array
    lam: jax.Array
    cache: Cache
    pred_sum: jax.Array
    kept: jax.Array
    drift: jax.Array


def block_q(block: Block, table: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``X @ table`` and ``X^2 @ table^2``: float32[num_rows + 1, D] each (the last row pads)."""
    columns = table[block.entry_features] * block.entry_values[:, None]
    # One scatter for both; the entries are in row order (CSR).
    both = jax.ops.segment_sum(jnp.concatenate([columns, columns * columns], axis=1), block.entry_rows,
                               block.num_rows + 1, indices_are_sorted=True)
    return both[:, :table.shape[1]], both[:, table.shape[1]:]


def own_terms(q: jax.Array, s: jax.Array) -> jax.Array:
    """float32[rows]: what a block row adds to a prediction by itself: its linear terms (column 0) and
    the pairs within the row, ``sum_f (q_f^2 - s_f) / 2`` (``q``, ``s`` from :func:`block_q`)."""
    return q[:, 0] + 0.5 * jnp.sum(q[:, 1:] * q[:, 1:] - s[:, 1:], axis=1)


def predict_rows(w0: jax.Array, q: tuple[jax.Array, ...], s: tuple[jax.Array, ...],
                 rows: tuple[jax.Array, ...]) -> jax.Array:
    """Predictions for cases given by one row index per block.

    A case's pairs are those within each block's row, a number per block row, plus ``<q_b, q_c>`` for
    each two blocks, so a case gathers one number and one F-vector per block.

    Args:
      w0: float32[]; q, s: per block, from :func:`block_q`.
      rows: per block, int32[m] the case's row in that block.

    Returns:
      float32[m].
    """
    own = [own_terms(qb, sb) for qb, sb in zip(q, s)]
    out = w0 + sum(o[r] for o, r in zip(own, rows))
    factors = [qb[:, 1:][r] for qb, r in zip(q, rows)]
    for a in range(len(factors)):
        for b in range(a + 1, len(factors)):
            out = out + jnp.sum(factors[a] * factors[b], axis=1)
    return out


def predict(state: State, blocks: tuple[Block, ...], rows: tuple[jax.Array, ...]) -> jax.Array:
    """float32[m]: the state's prediction of the cases ``rows`` (per block, int32[m])."""
    qs = [block_q(block, table) for block, table in zip(blocks, state.tables)]
    return predict_rows(state.w0, tuple(q for q, _ in qs), tuple(s for _, s in qs), rows)


def posterior_mean(state: State) -> jax.Array:
    """float32[m]: the mean prediction of the evaluation cases over the kept sweeps."""
    return state.pred_sum / jnp.maximum(state.kept, 1)


def fresh_cache(w0: jax.Array, tables: tuple[jax.Array, ...], blocks: tuple[Block, ...], y: jax.Array) -> Cache:
    """The cache of a state, computed from scratch (``y`` float32[n] the training ratings)."""
    qs = [block_q(block, table) for block, table in zip(blocks, tables)]
    q, s = tuple(x for x, _ in qs), tuple(x for _, x in qs)
    return Cache(q, s, predict_rows(w0, q, s, tuple(block.index for block in blocks)) - y)


def init_state(key: jax.Array, blocks: tuple[Block, ...], y: jax.Array, rank: int, num_eval: int,
               priors: Priors = MYFM) -> State:
    """myFM's starting point: w0, w, V ~ N(0, init_stdev^2); alpha 1; mu 0; lambda 1e-5.

    Args:
      key: a PRNG key; blocks: the relational blocks; y: float32[n] the training ratings.
      rank: the number of factors; num_eval: how many evaluation cases ``pred_sum`` holds.
    """
    sizes = [(block.num_features + 1) * (rank + 1) for block in blocks]
    dtype = y.dtype
    draws = priors.init_stdev * jax.random.normal(key, (1 + sum(sizes),), dtype)
    w0, start, tables = draws[0], 1, []
    for block, size in zip(blocks, sizes):
        tables.append(draws[start:start + size].reshape(block.num_features + 1, rank + 1))
        start += size
    tables = tuple(tables)
    groups = sum(len(block.group_sizes) for block in blocks)
    lam = jnp.full((groups, rank + 1), 1e-5, dtype)
    return State(w0, tables, jnp.ones((), dtype), jnp.zeros((groups, rank + 1), dtype), lam,
                 fresh_cache(w0, tables, blocks, y), jnp.zeros(num_eval, dtype), jnp.int32(0), jnp.zeros((), dtype))


def _hyper(unit_gamma, unit_normal, tables, blocks, mu, priors: Priors):
    """Each group's lambda (given the old mu), then its mu (given the new lambda), for every column.

    ``unit_gamma`` float32[groups, D] are Gamma(shape, 1) draws with the shapes of :func:`_gamma_shapes`;
    ``unit_normal`` float32[groups, D] standard normals.
    """
    sums, squares = [], []
    for block, table in zip(blocks, tables):
        start = 0
        for size in block.group_sizes:
            part = table[start:start + size]
            sums.append(jnp.sum(part, axis=0))
            squares.append(jnp.sum((part - mu[len(squares)][None]) ** 2, axis=0))
            start += size
    sums, squares = jnp.stack(sums), jnp.stack(squares)
    counts = jnp.asarray([size for block in blocks for size in block.group_sizes], sums.dtype)[:, None]
    lam = unit_gamma / ((priors.beta_0 + squares) / 2)
    precision = lam * (priors.gamma_0 + counts)
    mean = (priors.gamma_0 * priors.mu_0 + sums) / (priors.gamma_0 + counts)
    return mean + unit_normal * jax.lax.rsqrt(precision), lam


# Marsaglia & Tsang's method accepts a proposal with probability above 0.95 for shape >= 1, so 16 tries
# all fail with probability below 1e-20 (then the last proposal is taken).
GAMMA_TRIES = 16


def gamma_draws(shape: jax.Array, normals: jax.Array) -> jax.Array:
    """Gamma(shape, 1) draws by Marsaglia & Tsang (2000), from standard normals drawn beforehand.

    ``jax.random.gamma`` would do, but it costs the XLA compiler seconds per call; this is a handful of
    elementwise operations. A shape below 1 is boosted: ``Gamma(a) = Gamma(a + 1) * U^(1 / a)``.

    Args:
      shape: float32[n] positive shapes.
      normals: float32[3, GAMMA_TRIES, n] independent standard normals.

    Returns:
      float32[n].
    """
    boosted = shape + jnp.where(shape < 1, 1.0, 0.0)
    d = (boosted - 1.0 / 3.0)[None]
    z = normals[0]
    t = jax.lax.rsqrt(9.0 * d) * z
    v_minus_one = t * (3.0 + t * (3.0 + t))  # (1 + t)^3 - 1 without cancellation
    safe = jnp.where(t > -1.0, t, 0.0)  # rejected anyway; keeps log1p finite
    # log u < z^2 / 2 + d (1 - v + log v), with log v = 3 log1p(t).
    accept = (t > -1.0) & (jnp.log(jax.scipy.special.ndtr(normals[1])) < 0.5 * z * z
                           + d * (3.0 * jnp.log1p(safe) - v_minus_one))
    first = jnp.where(jnp.any(accept, axis=0), jnp.argmax(accept, axis=0), GAMMA_TRIES - 1)
    draw = d[0] * (1.0 + jnp.take_along_axis(v_minus_one, first[None], axis=0)[0])
    boost = jnp.where(shape < 1, jax.scipy.special.ndtr(normals[2, 0]) ** (1.0 / shape), 1.0)
    return jnp.maximum(draw, jnp.finfo(draw.dtype).tiny) * boost


def _gamma_shapes(blocks, n: int, priors: Priors, width: int, dtype) -> jax.Array:
    """float32[1 + groups * D]: the Gamma shapes of alpha, then of each group's lambda per column.

    All of a sweep's Gamma draws are made at once (their unit-rate draws do not depend on the state):
    each ``jax.random`` call costs the compiler seconds.
    """
    counts = [size for block in blocks for size in block.group_sizes]
    return jnp.asarray([(priors.alpha_0 + n) / 2] + [(priors.alpha_0 + c) / 2 for c in counts for _ in range(width)],
                       dtype)


def draw_tier(tier, noise, column, state_rows, consts, interaction, alpha, mu, lam):
    """Walks one tier's classes: each class's features drawn at once from their scalar conditionals.

    Args:
      tier: the classes (``jaxcf.families.bfm.features.Tier``); noise: float32[classes, size] standard normals.
      column: float32[num_features + 1] this column of the block's table.
      state_rows: float32[num_rows + 1, 4] per block row: q (this column), e (sum of residuals), eq
        (sum of residual times the other blocks' q), s (sum of x^2 v^2); updated as features change.
      consts: float32[num_rows + 1, 3] per block row: ratings, sum of the other blocks' q, sum of its
        square (myFM's cardinality, c and c_S).
      interaction: 1.0 for a factor column, 0.0 for w; alpha: scalar.
      mu, lam: float32[groups of the block] this column's prior of each group.

    Returns:
      (column, state_rows) after the tier.
    """
    # Each feature is in one class only, so its old value is read before the walk, its new one after.
    old = column[tier.features]
    fixed = consts[tier.rows]
    prior = (mu[tier.groups], lam[tier.groups])

    def step(state_rows, xs):
        rows, x, (count, c, c_sq), old, eps, (mu, lam) = xs
        here = state_rows[rows]
        # The slope of the prediction in v_jf is x (h + o): h this block's q without j, o the others'.
        h = interaction * (here[..., 0] - x * old[:, None])
        quad = jnp.sum(x * x * (count * h * h + 2.0 * c * h + c_sq), axis=1)
        lin = jnp.sum(-x * (here[..., 1] * h + here[..., 2]), axis=1)
        precision = lam + alpha * quad
        new = (alpha * (lin + quad * old) + lam * mu) / precision + eps * jax.lax.rsqrt(precision)
        step_at = x * (new - old)[:, None]
        update = jnp.stack([step_at, step_at * (h * count + c), step_at * (h * c + c_sq),
                            interaction * step_at * x * (new + old)[:, None]], axis=-1)
        return state_rows.at[rows].add(update), new

    fixed = (fixed[..., 0], fixed[..., 1], fixed[..., 2])
    state_rows, new = jax.lax.scan(step, state_rows, (tier.rows, tier.values, fixed, old, noise, prior))
    return column.at[tier.features].set(new), state_rows


def draw_column(d, noise, tables, cache: Cache, blocks, alpha, mu, lam):
    """Draws column ``d`` (0: w; f + 1: factor f) of every block's table, block by block.

    Args:
      d: int32[] the column; noise: float32[sum of the tiers' classes * sizes] standard normals.
      tables, cache: as in :class:`State`; blocks: the blocks; alpha: float32[].
      mu, lam: float32[groups, D] the groups' priors.

    Returns:
      (tables, cache) with column ``d`` drawn and the cache's column ``d`` and residual updated.
    """
    group_base = [sum(len(b.group_sizes) for b in blocks[:k]) for k in range(len(blocks))]
    dtype = cache.e.dtype
    interaction = (d > 0).astype(dtype)
    tables, q, s, e = list(tables), list(cache.q), list(cache.s), cache.e
    used = 0
    for b, block in enumerate(blocks):
        others = sum(jax.lax.dynamic_index_in_dim(q[o], d, 1, False)[blocks[o].index]
                     for o in range(len(blocks)) if o != b)
        # Column 0 (w): the slope is x, which the same formulas give with o = 1 and h = 0.
        other = interaction * others + (1.0 - interaction)
        sums = jax.ops.segment_sum(jnp.stack([other, other * other, e, e * other], axis=1), block.index,
                                   block.num_rows + 1)
        consts = jnp.stack([block.row_counts, sums[:, 0], sums[:, 1]], axis=1)
        q_old = jax.lax.dynamic_index_in_dim(q[b], d, 1, False)
        s_old = jax.lax.dynamic_index_in_dim(s[b], d, 1, False)
        state_rows = jnp.stack([q_old, sums[:, 2], sums[:, 3], s_old], axis=1)
        column = jax.lax.dynamic_index_in_dim(tables[b], d, 1, False)
        groups = slice(group_base[b], group_base[b] + len(block.group_sizes))
        for tier in block.tiers:
            size = tier.features.size
            tier_noise = noise[used:used + size].reshape(tier.features.shape)
            used += size
            column, state_rows = draw_tier(tier, tier_noise, column, state_rows, consts, interaction, alpha,
                                            mu[groups, d], lam[groups, d])
        q_new, s_new = state_rows[:, 0], state_rows[:, 3]
        # The prediction changes by dq * o (pairs with other blocks) plus the row's own pairs' change.
        row_change = jnp.stack([q_new - q_old, interaction * 0.5 * (q_new * q_new - q_old * q_old - (s_new - s_old))],
                               axis=1)[block.index]
        e = e + row_change[:, 0] * other + row_change[:, 1]
        tables[b] = jax.lax.dynamic_update_index_in_dim(tables[b], column, d, 1)
        q[b] = jax.lax.dynamic_update_index_in_dim(q[b], q_new, d, 1)
        s[b] = jax.lax.dynamic_update_index_in_dim(s[b], s_new, d, 1)
    return tuple(tables), Cache(tuple(q), tuple(s), e)


def sweep_draws(key: jax.Array, blocks: tuple[Block, ...], n: int, width: int, priors: Priors = MYFM,
                dtype=jnp.float32) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The random numbers of one sweep, drawn at once (each ``jax.random`` call costs the compiler seconds).

    Returns:
      unit_gamma: float32[1 + groups * D] Gamma(shape, 1) draws: alpha's, then each group's lambda per
        column (see :func:`_gamma_shapes`).
      normals: float32[1 + groups * D] standard normals: w0's, then each group's mu per column.
      column_noise: float32[D, slots] standard normals of the features, column by column; within a
        column block by block, tier by tier, ``[classes, size]`` row-major (``slots`` is the sum of
        the tiers' ``classes * size``).
    """
    groups = sum(len(block.group_sizes) for block in blocks)
    slots = sum(tier.features.size for block in blocks for tier in block.tiers)
    shapes = _gamma_shapes(blocks, n, priors, width, dtype)
    gamma_normals = 3 * GAMMA_TRIES * shapes.shape[0]
    normals = jax.random.normal(key, (gamma_normals + 1 + groups * width + width * slots,), dtype)
    unit_gamma = gamma_draws(shapes, normals[:gamma_normals].reshape(3, GAMMA_TRIES, -1))
    normals = normals[gamma_normals:]
    return unit_gamma, normals[:1 + groups * width], normals[1 + groups * width:].reshape(width, slots)


def sweep(state: State, key: jax.Array, blocks: tuple[Block, ...], y: jax.Array, eval_rows: tuple[jax.Array, ...],
          keep: jax.Array, priors: Priors = MYFM) -> State:
    """One Gibbs sweep (see the module docstring for the order and the blocks drawn jointly).

    Args:
      state: the chain; key: this sweep's PRNG key; blocks: the relational blocks.
      y: float32[n] the training ratings.
      eval_rows: per block, int32[m] the evaluation cases' rows.
      keep: bool[] whether this sweep's predictions join ``pred_sum``.

    Returns:
      The next state, its cache recomputed from scratch.
    """
    n = y.shape[0]
    width = state.tables[0].shape[1]
    groups = state.mu.shape[0]
    unit_gamma, normals, column_noise = sweep_draws(key, blocks, n, width, priors, y.dtype)
    e = state.cache.e
    alpha = unit_gamma[0] / ((priors.beta_0 + jnp.sum(e * e)) / 2)
    quad = alpha * n + priors.reg_0
    w0 = alpha * jnp.sum(state.w0 - e) / quad + normals[0] * jax.lax.rsqrt(quad)
    e = e + (w0 - state.w0)
    mu, lam = _hyper(unit_gamma[1:].reshape(groups, width), normals[1:1 + groups * width].reshape(groups, width),
                     state.tables, blocks, state.mu, priors)

    def body(carry, xs):
        d, noise = xs
        tables, cache = carry
        return draw_column(d, noise, tables, cache, blocks, alpha, mu, lam), None

    (tables, cache), _ = jax.lax.scan(body, (state.tables, state.cache._replace(e=e)),
                                      (jnp.arange(width), column_noise))
    fresh = fresh_cache(w0, tables, blocks, y)
    drift = jnp.max(jnp.abs(cache.e - fresh.e))
    pred = predict_rows(w0, fresh.q, fresh.s, eval_rows)
    return State(w0, tables, alpha, mu, lam, fresh, state.pred_sum + jnp.where(keep, pred, 0.0),
                 state.kept + keep.astype(jnp.int32), drift)


def run(state: State, key: jax.Array, blocks: tuple[Block, ...], y: jax.Array, eval_rows: tuple[jax.Array, ...],
        num_sweeps: int, num_kept: int, priors: Priors = MYFM) -> State:
    """``num_sweeps`` sweeps in one ``fori_loop``, the last ``num_kept`` kept (as myFM keeps them).

    Sweep ``k`` uses ``fold_in(key, k)``; :func:`run_range` runs a part of such a run.
    """
    return run_range(state, key, blocks, y, eval_rows, 0, num_sweeps, num_sweeps - num_kept, priors)


def run_range(state: State, key: jax.Array, blocks: tuple[Block, ...], y: jax.Array, eval_rows: tuple[jax.Array, ...],
              start: int, stop: int, keep_from: int, priors: Priors = MYFM) -> State:
    """Sweeps ``start .. stop - 1`` (sweep ``k`` keyed ``fold_in(key, k)``; kept when ``k >= keep_from``).

    Jit it with ``blocks`` as an argument (their shapes are static, their arrays are not) and
    ``start``, ``stop``, ``keep_from`` as traced or static integers.
    """

    def body(k, state):
        return sweep(state, jax.random.fold_in(key, k), blocks, y, eval_rows, k >= keep_from, priors)

    return jax.lax.fori_loop(start, stop, body, state)
