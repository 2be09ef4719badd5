"""The relational Bayesian FM sampler (``jaxcf.families.bfm.sampler``, ``.features``) against references.

- Posterior: jaxcf's sampler against a plain NumPy Gibbs sampler written here from the model's
  definition: a dense one-hot-plus-implicit design matrix (one row per rating), one scalar at a time
  in myFM's order (alpha, w0, lambda_w, mu_w, w, lambda_v, mu_v, V factor by factor), each conditional
  from the dense rows. It shares no code with jaxcf and none of its caches, classes or order. Both
  run 400 independent chains on a tiny problem; every Monte-Carlo error is the spread between chains.
  The same reference on a model without the implicit groups must fail the comparison by far.
- Replay: two jaxcf sweeps on a 30 x 25 problem (many classes, several tiers) against the dense
  scalar sampler fed the same random numbers in jaxcf's order: equal to float32 rounding.
- Relational blocks against dense rows (q, s and predictions); the schedule (no row twice in a
  class, every feature once); no LAPACK kernel in the compiled sampler; it lowers for CUDA.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcf.families.bfm import features, sampler

USERS, ITEMS, RANK = 8, 6, 2
# 15 ratings of 7 users and 5 items; user 7 and item 5 have none (their ids and set features are drawn
# from the prior). Items 0 and 1 share no rater and users 1 and 3 no item, so some classes hold two
# features.
PAIRS = np.array([(0, 0), (1, 0), (2, 0), (3, 1), (4, 1), (0, 2), (3, 2), (5, 2), (1, 3), (4, 3), (6, 3),
                  (2, 4), (5, 4), (6, 4), (0, 4)])
RATINGS = np.array([4, 3, 5, 2, 4, 3, 4, 1, 5, 4, 2, 3, 5, 3, 4], np.float64)


def tiny_blocks(user_implicit=True, item_implicit=True):
    users, items = PAIRS[:, 0], PAIRS[:, 1]
    return (features.relation_block(users, items, USERS, ITEMS, implicit=user_implicit),
            features.relation_block(items, users, ITEMS, USERS, implicit=item_implicit))


def dense_design(matrices, rows):
    """float64[m, p]: each case's rows of every block side by side; the group of each column."""
    parts = [m.dense()[r] for m, r in zip(matrices, rows)]
    groups, base = [], 0
    for m in matrices:
        for g, size in enumerate(m.group_sizes):
            groups += [base + g] * size
        base += len(m.group_sizes)
    return np.concatenate(parts, axis=1), np.asarray(groups)


def dense_predict(x, w0, w, v):
    """The FM on dense rows, for chains: x [n, p], w0 [C], w [C, p], v [C, p, F] -> [C, n]."""
    q, s = np.matmul(x, v), np.matmul(x * x, v * v)
    return w0[:, None] + w @ x.T + 0.5 * np.sum(q * q - s, axis=2)


def reference_chains(x, y, groups, x_eval, chains, sweeps, burn_in, seed):
    """myFM's Gibbs sampler written plainly on dense rows, one scalar at a time in myFM's order.

    Returns the mean prediction of ``x_eval`` over the sweeps after ``burn_in`` per chain [C, m], and
    the last sweep's prediction [C, m], alpha [C] and w0 [C].
    """
    a0 = b0 = g0 = reg0 = 1.0
    mu0 = 0.0
    rng = np.random.default_rng(seed)
    n, p = x.shape
    num_groups = groups.max() + 1
    count = np.bincount(groups, minlength=num_groups).astype(float)
    w0 = 0.1 * rng.standard_normal(chains)
    w = 0.1 * rng.standard_normal((chains, p))
    v = 0.1 * rng.standard_normal((chains, p, RANK))
    mu_w, mu_v = np.zeros((chains, num_groups)), np.zeros((chains, num_groups, RANK))
    total = np.zeros((chains, len(x_eval)))

    def normal(quad, lin):
        return lin / quad + rng.standard_normal(quad.shape) / np.sqrt(quad)

    def hyper(values, mu):  # values [C, p], mu [C, G]: lambda given the old mu, then mu given lambda
        square = np.stack([np.sum((values[:, groups == g] - mu[:, g:g + 1]) ** 2, 1) for g in range(num_groups)], 1)
        lam = rng.gamma((a0 + count) / 2, 1.0, size=mu.shape) / ((b0 + square) / 2)
        sums = np.stack([np.sum(values[:, groups == g], 1) for g in range(num_groups)], 1)
        return normal(lam * (g0 + count), lam * (g0 * mu0 + sums)), lam

    for sweep in range(sweeps):
        # The prediction per rating, recomputed each sweep and kept up to date as each scalar changes
        # (it is linear in each scalar: the change is the step times the slope); q = X V likewise.
        predicted = dense_predict(x, w0, w, v)
        q = np.matmul(x, v)
        e = predicted - y
        alpha = rng.gamma((a0 + n) / 2, 1.0, size=chains) / ((b0 + np.sum(e * e, 1)) / 2)
        new = normal(alpha * n + reg0, alpha * np.sum(w0[:, None] - e, 1))
        predicted += (new - w0)[:, None]
        w0 = new
        mu_w, lam_w = hyper(w, mu_w)
        for j in range(p):
            lam, mean = lam_w[:, groups[j]], mu_w[:, groups[j]]
            residual = y - predicted + w[:, j:j + 1] * x[:, j]
            new = normal(alpha * np.sum(x[:, j] ** 2) + lam, alpha * (residual @ x[:, j]) + lam * mean)
            predicted += (new - w[:, j])[:, None] * x[:, j]
            w[:, j] = new
        lam_v = np.zeros_like(mu_v)
        for f in range(RANK):
            mu_v[:, :, f], lam_v[:, :, f] = hyper(v[:, :, f], mu_v[:, :, f])
        for f in range(RANK):
            for j in range(p):
                old = v[:, j:j + 1, f]
                slope = x[:, j] * (q[:, :, f] - x[:, j] * old)  # d prediction / d v_jf
                residual = y - predicted + old * slope
                lam, mean = lam_v[:, groups[j], f], mu_v[:, groups[j], f]
                new = normal(alpha * np.sum(slope * slope, 1) + lam, alpha * np.sum(slope * residual, 1) + lam * mean)
                predicted += (new[:, None] - old) * slope
                q[:, :, f] += (new[:, None] - old) * x[:, j]
                v[:, j, f] = new
        if sweep >= burn_in:
            total += dense_predict(x_eval, w0, w, v)
    return total / (sweeps - burn_in), dense_predict(x_eval, w0, w, v), alpha, w0


def chains_program(matrices, y, eval_rows, sweeps, burn_in):
    """``keys [2, C] -> (kept mean [C, m], last prediction [C, m], alpha [C], w0 [C], drift [C])`` for C
    independent chains of jaxcf's sampler, jitted (one compiled program, vmapped over the chains)."""
    blocks = tuple(features.make_block(m) for m in matrices)
    y = jnp.asarray(y, jnp.float32)
    rows = tuple(jnp.asarray(r, jnp.int32) for r in eval_rows)

    def chain(key_init, key_run):
        state = sampler.init_state(key_init, blocks, y, RANK, len(rows[0]))
        state = sampler.run(state, key_run, blocks, y, rows, sweeps, sweeps - burn_in)
        return sampler.posterior_mean(state), sampler.predict(state, blocks, rows), state.alpha, state.w0, state.drift

    return jax.jit(jax.vmap(chain))


def _z_mean(a, b):
    """z-scores of the difference of the means of two sets of independent per-chain values ([C, ...])."""
    error = np.sqrt(a.var(0, ddof=1) / len(a) + b.var(0, ddof=1) / len(b))
    return (a.mean(0) - b.mean(0)) / error


def _z_var(a, b):
    """z-scores of the difference of two variances, each from independent draws ([C, m]); the standard
    error of a sample variance is sqrt((m4 - s^4) / C)."""
    def var_and_error(d):
        centred = d - d.mean(0)
        s2 = np.mean(centred ** 2, 0)
        return s2, np.sqrt(np.maximum(np.mean(centred ** 4, 0) - s2 ** 2, 1e-12) / len(d))
    (va, ea), (vb, eb) = var_and_error(a), var_and_error(b)
    return (va - vb) / np.sqrt(ea ** 2 + eb ** 2)


EVAL = np.array([(u, i) for u in range(USERS) for i in range(ITEMS)])  # all 30 pairs, rated or not
CHAINS, SWEEPS, BURN_IN = 400, 240, 120


@pytest.fixture(scope="module")
def compiled():
    """jaxcf's chains on the tiny problem, compiled once (the posterior and LAPACK tests share it)."""
    program = chains_program(tiny_blocks(), RATINGS, (EVAL[:, 0], EVAL[:, 1]), SWEEPS, BURN_IN)
    keys = jax.random.split(jax.random.key(0), 2 * CHAINS).reshape(2, CHAINS)
    return program.lower(*keys).compile(), keys


@pytest.fixture(scope="module")
def posterior_runs(compiled):
    program, keys = compiled
    ours = [np.asarray(o, np.float64) for o in program(*keys)]
    matrices = tiny_blocks()
    x_train, groups = dense_design(matrices, (PAIRS[:, 0], PAIRS[:, 1]))
    x_eval, _ = dense_design(matrices, (EVAL[:, 0], EVAL[:, 1]))
    reference = reference_chains(x_train, RATINGS, groups, x_eval, CHAINS, SWEEPS, BURN_IN, seed=1)
    # The same reference on the wrong model (no implicit groups): the test must be able to see it.
    wrong = tiny_blocks(False, False)
    x_wrong, groups_wrong = dense_design(wrong, (PAIRS[:, 0], PAIRS[:, 1]))
    x_eval_wrong, _ = dense_design(wrong, (EVAL[:, 0], EVAL[:, 1]))
    # A quarter of the chains suffice to see it (|z| in the tens).
    wrong_run = reference_chains(x_wrong, RATINGS, groups_wrong, x_eval_wrong, CHAINS // 4, SWEEPS, BURN_IN, seed=2)
    return ours, reference, wrong_run


# Five standard errors: ~62 comparisons each with a false-alarm chance of 6e-7 (normal tails), and
# the samples are fixed by the seeds, so the test is deterministic.
Z_LIMIT = 5.0


@pytest.mark.parity
def test_posterior_matches_dense_reference(posterior_runs):
    ours, reference, _ = posterior_runs
    z = {"mean prediction": _z_mean(ours[0], reference[0]), "prediction variance": _z_var(ours[1], reference[1]),
         "alpha": _z_mean(ours[2], reference[2]), "w0": _z_mean(ours[3], reference[3])}
    worst = {name: float(np.max(np.abs(value))) for name, value in z.items()}
    assert max(worst.values()) < Z_LIMIT, f"|z| per quantity: {worst}"
    assert np.max(ours[4]) < 1e-4, f"incremental residual drifted by {np.max(ours[4])}"


@pytest.mark.parity
def test_posterior_test_sees_a_wrong_model(posterior_runs):
    ours, _, wrong = posterior_runs
    assert np.max(np.abs(_z_mean(ours[0], wrong[0]))) > 2 * Z_LIMIT


def medium_problem(seed=4, users=30, items=25, ratings=220):
    """Random ratings of a 30 x 25 table (some users and items without any), both implicit groups."""
    rng = np.random.default_rng(seed)
    cells = rng.choice((users - 2) * (items - 2), ratings, replace=False)
    pairs = np.stack([cells // (items - 2), cells % (items - 2)], 1)
    y = rng.integers(1, 6, ratings).astype(np.float64)
    matrices = (features.relation_block(pairs[:, 0], pairs[:, 1], users, items, implicit=True),
                features.relation_block(pairs[:, 1], pairs[:, 0], items, users, implicit=True))
    return matrices, pairs, y


def replay_sweep(matrices, blocks, x, y, groups, state, draws):
    """One sweep of the dense scalar Gibbs sampler, in jaxcf's order and with its random numbers.

    The features of a class share no rating, so drawing them one after another from the dense
    conditionals, each with its own normal, gives what jaxcf's joint draw gives. float64 throughout.
    """
    unit_gamma, normals, noise = (np.asarray(d, np.float64) for d in draws)
    w0 = float(state.w0)
    tables = [np.asarray(t, np.float64)[:-1] for t in state.tables]
    z = np.concatenate(tables)  # [p, D]: column 0 w, then V
    mu_old = np.asarray(state.mu, np.float64)
    n, width = len(y), z.shape[1]
    count = np.bincount(groups).astype(float)
    predicted = dense_predict(x, np.array([w0]), z[None, :, 0], z[None, :, 1:])[0]
    e = predicted - y
    alpha = unit_gamma[0] / ((1.0 + e @ e) / 2)
    quad = alpha * n + 1.0
    new_w0 = alpha * np.sum(w0 - e) / quad + normals[0] / np.sqrt(quad)
    predicted += new_w0 - w0
    square = np.stack([np.sum((z[groups == g] - mu_old[g]) ** 2, 0) for g in range(len(count))])
    lam = unit_gamma[1:].reshape(-1, width) / ((1.0 + square) / 2)
    sums = np.stack([np.sum(z[groups == g], 0) for g in range(len(count))])
    mu = sums / (1.0 + count[:, None]) + normals[1:].reshape(-1, width) / np.sqrt(lam * (1.0 + count[:, None]))
    bases = np.cumsum([0] + [m.num_features for m in matrices])
    for d in range(width):
        q = x @ z[:, 1:]
        at = 0
        for base, block, matrix in zip(bases, blocks, matrices):
            for tier in block.tiers:
                features = np.asarray(tier.features)
                draws_here = noise[d, at:at + features.size].reshape(features.shape)
                at += features.size
                for c, k in np.ndindex(*features.shape):
                    if features[c, k] == matrix.num_features:
                        continue
                    j = base + features[c, k]
                    old = z[j, d]
                    slope = x[:, j] if d == 0 else x[:, j] * (q[:, d - 1] - x[:, j] * old)
                    residual = y - predicted + old * slope
                    g = groups[j]
                    precision = lam[g, d] + alpha * slope @ slope
                    new = (alpha * slope @ residual + lam[g, d] * mu[g, d]) / precision
                    new += draws_here[c, k] / np.sqrt(precision)
                    predicted += (new - old) * slope
                    if d:
                        q[:, d - 1] += (new - old) * x[:, j]
                    z[j, d] = new
    return new_w0, z, alpha, mu, lam


@pytest.mark.parity
def test_sweep_replays_dense_gibbs_with_the_same_draws():
    """Two sweeps on a 30 x 25 problem with several tiers and many classes equal the dense scalar
    sampler fed jaxcf's random numbers in jaxcf's order (float32 against float64)."""
    matrices, pairs, y = medium_problem()
    blocks = tuple(features.make_block(m) for m in matrices)
    assert max(len(b.tiers) for b in blocks) >= 3 and max(features.num_steps(b) for b in blocks) >= 10
    x, groups = dense_design(matrices, (pairs[:, 0], pairs[:, 1]))
    y32 = jnp.asarray(y, jnp.float32)
    rows = (jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32))
    rank = 3
    state = jax.jit(lambda k: sampler.init_state(k, blocks, y32, rank, 1))(jax.random.key(5))
    sweep = jax.jit(lambda s, k: sampler.sweep(s, k, blocks, y32, rows, jnp.bool_(False)))
    draws = jax.jit(lambda k: sampler.sweep_draws(k, blocks, len(y), rank + 1))
    for k in range(2):
        key = jax.random.key(10 + k)
        expected = replay_sweep(matrices, blocks, x, y, groups, state, draws(key))
        state = sweep(state, key)
        got = (float(state.w0), np.concatenate([np.asarray(t)[:-1] for t in state.tables]), float(state.alpha),
               np.asarray(state.mu), np.asarray(state.lam))
        for name, a, b in zip(("w0", "tables", "alpha", "mu", "lambda"), got, expected):
            # float32 against float64: about 1e-7 apart after a few hundred scalar draws; a wrong
            # conditional or cache is off by 1e-2 or more.
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"sweep {k}: {name}")


def test_relational_equals_dense():
    """q_f = X v_f, s_f = X^2 v_f^2 per block row, and the FM prediction of every (user, item) pair, from
    the relational blocks equal the same from the dense one-hot-plus-implicit rows."""
    matrices = tiny_blocks()
    blocks = tuple(features.make_block(m) for m in matrices)
    rng = np.random.default_rng(3)
    tables = tuple(rng.standard_normal((m.num_features + 1, RANK + 1)).astype(np.float32) for m in matrices)
    block_q = jax.jit(sampler.block_q)
    for block, matrix, table in zip(blocks, matrices, tables):
        q, s = block_q(block, jnp.asarray(table))
        dense = matrix.dense()
        np.testing.assert_allclose(np.asarray(q)[:-1], dense @ table[:-1], rtol=1e-5, atol=1e-5, err_msg="q")
        np.testing.assert_allclose(np.asarray(s)[:-1], (dense ** 2) @ table[:-1] ** 2, rtol=1e-5, atol=1e-5)
    state = sampler.State(jnp.float32(0.7), tuple(jnp.asarray(t) for t in tables), *([None] * 7))
    rows = (jnp.asarray(EVAL[:, 0]), jnp.asarray(EVAL[:, 1]))
    predicted = jax.jit(sampler.predict)(state, blocks, rows)
    x_eval, _ = dense_design(matrices, (EVAL[:, 0], EVAL[:, 1]))
    w = np.concatenate([t[:-1, 0] for t in tables])[None]
    v = np.concatenate([t[:-1, 1:] for t in tables])[None]
    expected = dense_predict(x_eval, np.array([0.7]), w, v)[0]
    np.testing.assert_allclose(np.asarray(predicted), expected, rtol=1e-5, atol=1e-5)


def test_schedule_classes_share_no_row():
    for matrix in tiny_blocks():
        block = features.make_block(matrix)
        dense = matrix.dense()
        seen = []
        for tier in block.tiers:
            for rows, values, members in zip(*(np.asarray(a) for a in (tier.rows, tier.values, tier.features))):
                real = values != 0
                assert len(np.unique(rows[real])) == real.sum(), "a block row appears twice in one class"
                for slot, feature in enumerate(members):
                    if feature == matrix.num_features:  # padding
                        assert not real[slot].any()
                        continue
                    seen.append(feature)
                    np.testing.assert_array_equal(np.sort(rows[slot][real[slot]]), np.flatnonzero(dense[:, feature]))
                    np.testing.assert_allclose(np.sort(values[slot][real[slot]]),
                                               np.sort(dense[:, feature][dense[:, feature] != 0]), rtol=1e-6)
        assert sorted(seen) == list(range(matrix.num_features)), "each feature is drawn exactly once"


def test_no_lapack_kernel_in_the_sweep(compiled):
    targets = set(re.findall(r'custom_call_target="([^"]+)"', compiled[0].as_text()))
    assert not [t for t in targets if "lapack" in t.lower()], sorted(targets)


def test_sweep_lowers_for_cuda():
    blocks = tuple(features.make_block(m) for m in tiny_blocks())
    y = jnp.asarray(RATINGS, jnp.float32)
    rows = (jnp.asarray(EVAL[:, 0], jnp.int32), jnp.asarray(EVAL[:, 1], jnp.int32))
    state = sampler.init_state(jax.random.key(0), blocks, y, RANK, len(EVAL))
    function = jax.jit(lambda s, k, b: sampler.sweep(s, k, b, y, rows, jnp.bool_(True)))
    exported = jax.export.export(function, platforms=("cuda",))(state, jax.random.key(1), blocks)
    assert "cuda" in exported.platforms and exported.mlir_module()
