"""Implicit feedback: the protocol (interactions, split, metrics), iALS proved against the ``implicit``
library, BPR's step and EASE's closed form against NumPy, and each model through the whole tool chain."""

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import safetensors.numpy

import jaxcf
from jaxcf import config, data
from jaxcf.cli import train
from jaxcf.core import optim, ranking, sparse
from jaxcf.core.errors import ConfigError
from jaxcf.data.implicit import interactions
from jaxcf.families.bpr import fit as bpr
from jaxcf.families.ease import fit as ease
from jaxcf.families.ials import fit as ials

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def implicit_data():
    cfg = config.load("bias.yaml")
    return interactions(data.load(cfg.data, 42), 4.0, 0.2, 42)


# ------------------------------------------------------------------------------ the protocol


def test_interactions_follow_the_protocol(implicit_data):
    import io

    from jaxcf.data import registry

    frame = pd.read_csv(io.BytesIO(registry.read_bundled("ml-latest-small-2016", "ratings.csv")))
    kept = frame[frame.rating >= 4.0].reset_index(drop=True)
    r = implicit_data.ratings
    assert len(r) == len(kept) == 51_568 and np.all(r.ratings == 1.0)
    # Ids in order of first appearance among the interactions.
    assert r.user_ids.raw.tolist() == kept.userId.unique().tolist()
    assert r.item_ids.raw.tolist() == kept.movieId.unique().tolist()
    # Test: the first int(n * 0.2) of RandomState(42).permutation(n), both parts in file order.
    permutation = np.random.RandomState(42).permutation(len(kept))
    np.testing.assert_array_equal(implicit_data.split.valid, np.sort(permutation[: int(len(kept) * 0.2)]))
    assert implicit_data.implicit_threshold == 4.0


def _reference_metrics(scores, train_pairs, test_pairs, num_items, ks):
    """The protocol written out per user in NumPy."""
    known = np.zeros(num_items, bool)
    known[[i for _, i in train_pairs]] = True
    seen, test = {}, {}
    for u, i in train_pairs:
        seen.setdefault(u, set()).add(i)
    for u, i in test_pairs:
        test.setdefault(u, set()).add(i)
    sums, users, covered = {}, 0, {k: set() for k in ks}
    for u in sorted(test):
        candidates = [i for i in range(num_items) if known[i] and i not in seen.get(u, set())]
        relevant = {i for i in test[u] if i in candidates}
        if not relevant:
            continue
        users += 1
        ranked = sorted(candidates, key=lambda i: (-scores[u, i], i))
        first = next(r for r, i in enumerate(ranked, 1) if i in relevant)
        sums["mrr"] = sums.get("mrr", 0) + 1 / first
        for k in ks:
            top = ranked[:k]
            hits = [i in relevant for i in top]
            n = min(k, len(relevant))
            dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
            idcg = sum(1 / math.log2(r + 2) for r in range(n))
            ap = sum(sum(hits[: r + 1]) / (r + 1) for r, h in enumerate(hits) if h) / n
            for name, value in (("recall", sum(hits) / n), ("ndcg", dcg / idcg), ("map", ap), ("hit", any(hits))):
                sums[f"{name}@{k}"] = sums.get(f"{name}@{k}", 0) + value
            covered[k] |= set(top)
    out = {name: value / users for name, value in sums.items()}
    out.update({f"coverage@{k}": len(covered[k]) / known.sum() for k in ks})
    return out, users


def test_implicit_metrics_match_a_direct_computation():
    rng = np.random.default_rng(0)
    num_users, num_items = 30, 40
    pairs = {(int(u), int(i)) for u, i in zip(rng.integers(0, num_users, 400), rng.integers(0, num_items, 400))}
    pairs = sorted(pairs)
    test_mask = rng.random(len(pairs)) < 0.25
    train_pairs = [p for p, t in zip(pairs, test_mask) if not t]
    test_pairs = [p for p, t in zip(pairs, test_mask) if t]
    scores = rng.normal(size=(num_users, num_items)).astype(np.float32)
    ks = (3, 5, 10)
    got = ranking.implicit_metrics(lambda users: jnp.asarray(scores[users]), num_items,
                                   *map(np.asarray, zip(*train_pairs)), *map(np.asarray, zip(*test_pairs)), ks=ks,
                                   users_per_block=8)
    want, users = _reference_metrics(scores, train_pairs, test_pairs, num_items, ks)
    assert got["scored_users"] == users and got["protocol"] == "implicit-holdout"
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name


def test_mrr_orders_ties_as_the_top_k_does():
    """A user whose scores all tie gets the rank of their first relevant item in index order, not 1."""
    scores = np.zeros((2, 6), np.float32)
    scores[1] = [0.5, 0.9, 0.9, 0.1, 0.9, 0.0]
    got = ranking.implicit_metrics(lambda users: jnp.asarray(scores[users]), 6, np.asarray([0, 1]),
                                   np.asarray([0, 0]), np.asarray([0, 1, 1]), np.asarray([3, 4, 5]), ks=(2,),
                                   users_per_block=2, known=np.ones(6, bool))
    # User 0: candidates 1..5 all at 0, relevant item 3 is third in index order. User 1: item 4 ties with
    # items 1 and 2 at 0.9 and comes after them: rank 3.
    assert got["mrr"] == pytest.approx((1 / 3 + 1 / 3) / 2)


# ------------------------------------------------------------------------------ iALS against implicit


@pytest.mark.parity
def test_ials_matches_implicit_als_from_the_same_start(implicit_data):
    """jaxcf's exact iALS and implicit's ALS(use_cg=False, float64) agree after 3 sweeps.

    Tolerance: jaxcf solves in float32; each sweep's F x F solves round at ~1e-7 relative, and the
    alternation carries it along: measured 2.2e-6 after 2 sweeps on items of magnitude ~5. 2e-5 of
    the largest entry leaves room for 3 sweeps and other CPUs' summation orders.
    """
    import scipy.sparse as sp
    import threadpoolctl
    from implicit.cpu.als import AlternatingLeastSquares

    r, train = implicit_data.ratings, implicit_data.split.train
    factors, alpha, reg, sweeps = 16, 2.0, 0.5, 3
    cfg = config.load("bias.yaml", ["model.kind=ials", f"model.n_factors={factors}", f"implicit.alpha={alpha}",
                                    f"implicit.regularization={reg}"])
    matrix = sp.csr_matrix((np.ones(len(train)), (r.users[train], r.items[train])), shape=(r.num_users, r.num_items))
    rng = np.random.default_rng(0)
    start_users, start_items = rng.normal(0, 0.1, (r.num_users, factors)), rng.normal(0, 0.1, (r.num_items, factors))
    reference = AlternatingLeastSquares(factors=factors, regularization=reg, alpha=1 + alpha, iterations=sweeps,
                                        use_cg=False, dtype=np.float64, random_state=0, num_threads=1,
                                        calculate_training_loss=False)
    reference.user_factors, reference.item_factors = start_users.copy(), start_items.copy()
    with threadpoolctl.threadpool_limits(1, "blas"):  # implicit's advice: its own threads, one BLAS thread
        reference.fit(matrix, show_progress=False)
    family = ials.family(cfg, implicit_data)
    state = ials.ALSState(jnp.asarray(start_users, jnp.float32), jnp.asarray(start_items, jnp.float32))
    for number in range(sweeps):
        state, _ = family.epoch(state, number)
    for name, got, want in (("users", state.users, reference.user_factors),
                            ("items", state.items, reference.item_factors)):
        diff = float(np.max(np.abs(np.asarray(got, np.float64) - want)))
        assert diff <= 2e-5 * float(np.max(np.abs(want))), f"{name}: max |jaxcf - implicit| = {diff:.3g}"
    ours = family.record(state, sweeps - 1, np.zeros(1), {})[0]
    theirs = ranking.implicit_metrics(lambda u: jnp.asarray(reference.user_factors[u] @ reference.item_factors.T),
                                      r.num_items, r.users[train], r.items[train],
                                      r.users[implicit_data.split.valid], r.items[implicit_data.split.valid])
    for key in ("ndcg@20", "recall@20", "map@20", "mrr"):
        assert ours[key] == pytest.approx(theirs[key], abs=2e-3), key


def test_ials_loss_is_the_objective_written_out():
    rng = np.random.default_rng(3)
    users, items, alpha, reg, exponent = rng.normal(size=(5, 3)), rng.normal(size=(4, 3)), 2.0, 0.3, 0.5
    pairs = [(0, 1), (0, 2), (1, 0), (3, 3), (4, 1)]
    p = np.zeros((5, 4))
    for u, i in pairs:
        p[u, i] = 1
    c = 1 + alpha * p
    counts_u, counts_i = p.sum(1), p.sum(0)
    want = (np.sum(c * (p - users @ items.T) ** 2)
            + np.sum(reg * (alpha * counts_u + 4) ** exponent * np.sum(users**2, 1))
            + np.sum(reg * (alpha * counts_i + 5) ** exponent * np.sum(items**2, 1))) / 20
    settings = ials.Settings(alpha, reg, exponent, "cholesky", 3)
    u_idx, i_idx = (jnp.asarray(x) for x in zip(*pairs))
    got = ials.loss(ials.ALSState(jnp.asarray(users, jnp.float32), jnp.asarray(items, jnp.float32)), u_idx, i_idx,
                    settings, (jnp.asarray(counts_u, jnp.float32), jnp.asarray(counts_i, jnp.float32)), 5, 4)
    assert float(got) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("exponent", [0.0, 0.7])
def test_exact_row_solves_match_the_normal_equations(exponent):
    """The chunked exact solve (rows sorted by length, chunks of 4 rows, interactions summed 16 at a
    time) against NumPy's float64 solve of each row's normal equations, written out: rows without
    interactions (0), a repeated pair (counted twice), rows of 1 to 40 interactions (several steps)."""
    rng = np.random.default_rng(5)
    num_rows, num_other, size, alpha, reg = 11, 50, 6, 3.0, 0.5
    lengths = [0, 1, 2, 5, 16, 17, 33, 40, 0, 3, 9]
    own = np.repeat(np.arange(num_rows), lengths)
    other = np.concatenate([rng.choice(num_other, n, replace=False) for n in lengths])
    own, other = np.append(own, 3), np.append(other, other[own == 3][0])  # one pair twice
    shuffled = rng.permutation(len(own))
    own, other = own[shuffled], other[shuffled]
    vectors = rng.normal(size=(num_other, size)).astype(np.float32)
    counts = np.bincount(own, minlength=num_rows).astype(np.float32)
    settings = ials.Settings(alpha, reg, exponent, "cholesky", 3)
    rows = ials.make_rows(own, other, num_rows, chunk=4)
    assert rows.order.shape == (3, 4)  # 9 rows with interactions, padded to whole chunks of 4
    got = ials.solve_side(jnp.zeros((num_rows, size)), jnp.asarray(vectors), jax.tree.map(jnp.asarray, rows),
                          jnp.asarray(counts), settings)
    v = vectors.astype(np.float64)
    for r in range(num_rows):
        items = other[own == r]
        lam = reg * (alpha * len(items) + num_other) ** exponent
        system = v.T @ v + alpha * v[items].T @ v[items] + lam * np.eye(size)
        want = np.linalg.solve(system, (1 + alpha) * v[items].sum(0))
        np.testing.assert_allclose(np.asarray(got[r]), want, rtol=2e-4, atol=2e-6, err_msg=f"row {r}")
    assert not np.asarray(got[0]).any() and not np.asarray(got[8]).any()


@pytest.mark.parametrize("exponent, reg", [(0.0, 1.0), (1.0, 0.01)])
def test_each_exact_ials_sweep_lowers_its_objective(implicit_data, exponent, reg):
    """Alternating exact minimisation never raises the objective that ``ials.loss`` reports (plain and
    frequency-scaled L2): a check that the solves and the reported loss are the same problem."""
    cfg = config.load("bias.yaml", ["model.kind=ials", "model.n_factors=8", f"implicit.reg_exponent={exponent}",
                                    f"implicit.regularization={reg}", "implicit.alpha=2"])
    family = ials.family(cfg, implicit_data)
    state, losses = family.init(), []
    for number in range(4):
        state, value = family.epoch(state, number)
        losses.append(float(value[0]))
    assert all(b <= a * (1 + 1e-5) for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0]


def test_conjugate_gradient_converges_to_the_exact_solve(implicit_data):
    exact_cfg = config.load("bias.yaml", ["model.kind=ials", "model.n_factors=8"])
    cg_cfg = config.load("bias.yaml", ["model.kind=ials", "model.n_factors=8", "implicit.solver=cg",
                                       "implicit.cg_steps=8"])
    exact, cg = ials.family(exact_cfg, implicit_data), ials.family(cg_cfg, implicit_data)
    a, b = exact.init(), cg.init()
    for number in range(3):
        a, _ = exact.epoch(a, number)
        b, _ = cg.epoch(b, number)
    # 8 CG steps in 8 dimensions solve each system exactly (up to rounding), from any start.
    np.testing.assert_allclose(np.asarray(b.users), np.asarray(a.users), rtol=1e-3, atol=1e-3)
    # A user without training interactions: (G + reg I) x = 0 is solved by exactly 0 on both routes.
    r = implicit_data.ratings
    empty = np.bincount(r.users[implicit_data.split.train], minlength=r.num_users) == 0
    assert empty.any() and not np.asarray(b.users)[empty].any() and not np.asarray(a.users)[empty].any()


# ------------------------------------------------------------------------------ BPR and EASE against NumPy


def _bpr_case():
    rng = np.random.default_rng(1)
    params = {"user_embedding": rng.normal(0, 0.3, (3, 2)).astype(np.float32),
              "item_embedding": rng.normal(0, 0.3, (4, 2)).astype(np.float32),
              "item_bias": rng.normal(0, 0.1, (4, 1)).astype(np.float32)}
    users, positives = jnp.asarray([0, 2, 0]), jnp.asarray([1, 3, 2])
    return params, users, positives


def _bpr_gradients(params, users, positives, negatives, scale):
    """NumPy, float64: the gradient of ``scale`` times the summed BPR loss (l2 0.01) with respect to each table."""
    u, v, b = (params[k].astype(np.float64) for k in ("user_embedding", "item_embedding", "item_bias"))
    grads = {"u": np.zeros_like(u), "v": np.zeros_like(v), "b": np.zeros_like(b)}
    total = 0.0
    for user, pos, neg in zip(users.tolist(), positives.tolist(), negatives.tolist()):
        x = u[user] @ (v[pos] - v[neg]) + b[pos, 0] - b[neg, 0]
        total += np.log1p(np.exp(-x)) * scale
        g = -1 / (1 + np.exp(x)) * scale
        grads["u"][user] += g * (v[pos] - v[neg]) + 2 * 0.01 * u[user] * scale
        grads["v"][pos] += g * u[user] + 2 * 0.01 * v[pos] * scale
        grads["v"][neg] += -g * u[user] + 2 * 0.01 * v[neg] * scale
        grads["b"][pos, 0] += g + 2 * 0.01 * b[pos, 0] * scale
        grads["b"][neg, 0] += -g + 2 * 0.01 * b[neg, 0] * scale
    return (u, v, b), grads, total


UNIFORM_4 = bpr.Sampler(jnp.arange(4, dtype=jnp.int32), jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32), 0)


def test_a_bpr_step_is_gradient_descent_on_the_bpr_loss():
    """The row-sparse engine's step (lazy_adam's path) run with plain SGD: one step on the batch's mean loss."""
    import jax

    params, users, positives = _bpr_case()
    cfg = config.load("bias.yaml", ["model.kind=bpr", "optim.name=sgd", "optim.learning_rate=0.5",
                                    "optim.weight_decay=0", "implicit.l2=0.01"])
    optimizer = optim.build(cfg.optim, 1)
    packed = sparse.pack(optimizer, {k: jnp.asarray(v) for k, v in params.items()}, optimizer.init(params))
    step = bpr.make_step(optimizer, UNIFORM_4, 1, 0.01)
    drawn = bpr.draw_negatives(UNIFORM_4, jax.random.key(7), (3, 1))
    new, loss = step(packed, drawn, users, positives, jnp.ones(3))
    negatives = np.asarray(drawn)[:, 0]
    (u, v, b), grads, total = _bpr_gradients(params, users, positives, negatives, 1 / 3)
    got, _ = sparse.unpack(optimizer, new)
    assert float(loss) == pytest.approx(total, rel=1e-5)
    np.testing.assert_allclose(got["user_embedding"], u - 0.5 * grads["u"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["item_embedding"], v - 0.5 * grads["v"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["item_bias"], b - 0.5 * grads["b"], rtol=1e-5, atol=1e-6)


def test_the_sgd_bpr_step_is_learnbpr_per_triple():
    """``optim.name: sgd``: every triple's own step (learning rate times its gradient) added to its rows, and
    with distinct rows exactly implicit's update (``z = 1 / (1 + exp(score))``, ``regularization = 2 * l2``)."""
    import jax

    params, users, positives = _bpr_case()
    step = bpr.make_sgd_step(0.5, UNIFORM_4, 1, 0.01)
    drawn = bpr.draw_negatives(UNIFORM_4, jax.random.key(7), (3, 1))
    new, loss = step(bpr.pack_items(params), drawn, users, positives, jnp.ones(3))
    new = bpr.unpack_items(new)
    negatives = np.asarray(drawn)[:, 0]
    (u, v, b), grads, total = _bpr_gradients(params, users, positives, negatives, 1.0)
    assert float(loss) == pytest.approx(total / 3, rel=1e-5)  # the reported loss is the batch mean
    np.testing.assert_allclose(new["user_embedding"], u - 0.5 * grads["u"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["item_embedding"], v - 0.5 * grads["v"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["item_bias"], b - 0.5 * grads["b"], rtol=1e-5, atol=1e-6)
    # One triple (user 1, item 0, negative 3): implicit's cpu/bpr.pyx update, transcribed.
    lr, reg = 0.5, 0.02
    one = bpr.make_sgd_step(lr, UNIFORM_4, 1, reg / 2)
    new, _ = one(bpr.pack_items(params), jnp.asarray([[3]]), jnp.asarray([1]), jnp.asarray([0]), jnp.ones(1))
    new = bpr.unpack_items(new)
    user = np.append(u[1], 1.0)
    liked, disliked = np.append(v[0], b[0]), np.append(v[3], b[3])
    z = 1.0 / (1.0 + np.exp(user @ (liked - disliked)))
    want_user = user[:2] + lr * (z * (liked[:2] - disliked[:2]) - reg * user[:2])
    want_liked = liked + lr * (z * user - reg * liked)
    want_disliked = disliked + lr * (-z * user - reg * disliked)
    np.testing.assert_allclose(new["user_embedding"][1], want_user, rtol=1e-5)
    np.testing.assert_allclose(np.append(new["item_embedding"][0], new["item_bias"][0]), want_liked, rtol=1e-5)
    np.testing.assert_allclose(np.append(new["item_embedding"][3], new["item_bias"][3]), want_disliked, rtol=1e-5)


def test_bpr_negatives_by_popularity_and_verified():
    """Popularity draws pick a training interaction's item; verification skips a triple whose negative the
    user has (the bisection agrees with a set lookup on every pair)."""
    import jax

    rng = np.random.default_rng(3)
    users = rng.integers(0, 30, 400)
    items = (rng.zipf(1.5, 400) - 1) % 50
    cfg = config.load("bpr.yaml", ["implicit.negative_sampling=popularity", "implicit.verify_negatives=true"])
    sampler = bpr.make_sampler(cfg, users, items, 30, 50)
    grid_u, grid_i = np.meshgrid(np.arange(30), np.arange(50), indexing="ij")
    found = np.asarray(bpr.seen_by(sampler, jnp.asarray(grid_u.ravel()), jnp.asarray(grid_i.ravel())))
    have = set(zip(users.tolist(), items.tolist()))
    assert found.tolist() == [(a, c) in have for a, c in zip(grid_u.ravel().tolist(), grid_i.ravel().tolist())]
    drawn = bpr.draw_negatives(sampler, jax.random.key(0), (400, 4))
    weights = bpr.verified(sampler, jnp.asarray(users), drawn, jnp.ones(400))
    draws = np.asarray(drawn)
    assert set(draws.ravel().tolist()) <= set(items.tolist())
    clash = np.array([[(a, d) in have for d in row] for a, row in zip(users.tolist(), draws.tolist())]).any(axis=1)
    assert clash.any() and np.asarray(weights).tolist() == (~clash).astype(float).tolist()
    counts = np.bincount(draws.ravel(), minlength=50) / draws.size
    popular = np.bincount(items, minlength=50).argmax()
    assert counts[popular] > 0.2  # zipf: the most frequent item is about a third of the interactions


def test_ease_is_steck_s_closed_form():
    rng = np.random.default_rng(2)
    x = (rng.random((12, 7)) < 0.4).astype(np.float64)
    x[:, 6] = 0  # an item nobody has: its row and column stay zero
    users, items = np.nonzero(x)
    b, loss = ease.solve(users, items, 12, 7, lam=3.0)
    gram = x[:, :6].T @ x[:, :6] + 3.0 * np.eye(6)
    p = np.linalg.inv(gram)
    expected = np.eye(6) - p / np.diag(p)[None, :]
    np.testing.assert_allclose(b[:6, :6], expected, atol=1e-6)
    assert np.all(np.diag(b) == 0) and not b[6].any() and not b[:, 6].any()
    # The constrained minimiser: the gradient of |X - XB|^2 + lambda |B|^2 is zero off the diagonal.
    grad = -2 * x.T @ (x - x @ b) + 2 * 3.0 * b
    off = ~np.eye(7, dtype=bool)
    assert np.abs(grad[off]).max() < 1e-4
    assert loss == pytest.approx((np.sum((x - x @ b) ** 2) + 3.0 * np.sum(b.astype(np.float64) ** 2)) / x.size,
                                 rel=1e-6)
    # A repeated interaction is one 1 of X; and lambda 0 with a rank-deficient X is refused, not inverted.
    again, _ = ease.solve(np.append(users, users[0]), np.append(items, items[0]), 12, 7, lam=3.0)
    np.testing.assert_array_equal(again, b)
    with pytest.raises(ConfigError, match="not positive definite"):
        ease.solve(np.array([0, 0]), np.array([0, 1]), 1, 2, lam=0.0)  # X = [1 1]: X'X is singular


# ------------------------------------------------------------------------------ the tool chain


@pytest.mark.parametrize("kind", ["ials", "bpr", "ease", "blend"])
def test_each_model_trains_resumes_exports_loads_recommends_and_folds_in(kind, tmp_path, capsys):
    small = ["data.name=ml-100k", "model.n_factors=8"]
    short = {"ials": ["train.epochs=4"], "bpr": ["train.batch_size=4096", "train.epochs=4"], "ease": [],
             "blend": ["model.kind=blend", "train.epochs=3"]}[kind]
    argv = ["--config", f"{kind if kind != 'blend' else 'ials'}.yaml", "--quiet", "--set", *small, *short]
    assert train.main([*argv, "--workdir", str(tmp_path / "full")]) == 0
    out = capsys.readouterr().out
    assert "recall@20" in out and "final ndcg@20" in out
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    final = records[-1]
    assert final["final"] and final["protocol"] == "implicit-holdout" and final["scored_users"] > 0
    for k in (10, 20, 50):
        for name in ("recall", "ndcg", "map", "hit", "coverage"):
            assert 0 <= final[f"{name}@{k}"] <= 1, (name, k)
    if kind != "ease":  # resume: two epochs, then the rest, bitwise equal to the uninterrupted run
        epochs = int(short[-1].split("=")[1])
        assert train.main([*argv[:-1], argv[-1].replace(f"={epochs}", "=2"), "--workdir", str(tmp_path / "part")]) == 0
        assert train.main([*argv, "--workdir", str(tmp_path / "part"), "--resume"]) == 0
        weights = [safetensors.numpy.load_file(tmp_path / run / "model" / "weights.safetensors")
                   for run in ("part", "full")]
        assert weights[0].keys() == weights[1].keys()
        for name in weights[0]:
            np.testing.assert_array_equal(weights[0][name], weights[1][name], err_msg=name)
    model = jaxcf.load_model(tmp_path / "full")
    assert model.metadata["model"]["kind"] == kind and model.kind == kind  # it says what it is
    ranking = model.recommend(1, k=5)
    seen = set(model.item_ids.raw[model.seen(int(model.lookup_users(1)[0][0]))].tolist())
    assert len(ranking.ids) == 5 and not seen & set(ranking.ids.tolist())
    assert len(model.similar_items(int(model.item_ids.raw[0]), k=3).ids) == 3
    history = pd.DataFrame({"userId": [99999] * 3, "movieId": list(seen)[:3], "rating": [5.0] * 3})
    folded = model.fold_in(history)
    assert folded.fold_in_report.users_added == 1 and not folded.predict(99999, list(seen)[0]).fallback[0]
    assert len(folded.recommend(99999, k=5).ids) == 5
    # The CLI speaks of scores and interactions for these models, not of predicted ratings.
    from jaxcf.cli import recommend

    assert recommend.main(["--model", str(tmp_path / "full"), "--user", "1", "--k", "2"]) == 0
    assert recommend.main(["--model", str(tmp_path / "full"), "--user", "424242", "--k", "2"]) == 0
    out = capsys.readouterr().out
    assert f"by score, excluding the {len(seen)} items they interacted with" in out
    assert "ranked by number of training interactions; score = the mean score" in out
    assert "rating" not in out.replace("Rating", "")  # titles aside


# ------------------------------------------------------------------------------ leave-last-k-out and strong


def test_leave_last_takes_each_user_s_latest_ratings():
    from jaxcf.data.splits import leave_last_split

    users = np.asarray([0, 0, 0, 1, 1, 2, 0, 1])
    stamps = np.asarray([5, 9, 1, 3, 3, 7, 9, 2])  # user 0's two latest tie at 9: the later row wins
    split = leave_last_split(users, stamps, 1)
    assert split.valid.tolist() == [4, 6] and split.name == "last-1"  # user 2 has one rating: all in training
    assert split.train.tolist() == [0, 1, 2, 3, 5, 7]
    two = leave_last_split(users, stamps, 2)
    assert two.valid.tolist() == [1, 3, 4, 6]


def test_leave_last_on_a_frame_through_fit_and_its_errors():
    frame = pd.DataFrame({"userId": [1, 1, 1, 2, 2, 2, 3, 3, 3] * 4, "movieId": list(range(36)),
                          "rating": [5.0, 4.0, 3.0] * 12, "when": pd.date_range("2020-01-01", periods=36, freq="D")})
    dataset = data.from_frame(frame, config.load(None, ["data.leave_last=2", "data.timestamp_col=when"]).data, 0)
    r = dataset.ratings
    for user in range(3):
        rows = np.flatnonzero(r.users == user)
        assert set(dataset.split.valid[np.isin(dataset.split.valid, rows)]) == set(rows[-2:])
    with pytest.raises(data.DataError, match="missing column.*when"):
        data.from_frame(frame.drop(columns="when"),
                        config.load(None, ["data.leave_last=1", "data.timestamp_col=when"]).data, 0)
    with pytest.raises(config.ConfigError, match="both choose"):
        config.load(None, ["data.leave_last=1", "data.split=u1", "data.name=ml-100k"])
    with pytest.raises(data.DataError, match="neither numbers nor ISO 8601 dates"):
        data.from_frame(frame.assign(when="soon"),
                        config.load(None, ["data.leave_last=1", "data.timestamp_col=when"]).data, 0)


def test_implicit_leave_last_holds_out_each_user_s_latest_interaction():
    cfg = config.load("ials.yaml", ["data.leave_last=1"])
    dataset = data.interactions(data.load(cfg.data, 42), 4.0, 0.2, 42, leave_last=1)
    r, split = dataset.ratings, dataset.split
    assert split.name == "last-1-implicit" and len(np.unique(r.users[split.valid])) == len(split.valid)
    latest = pd.DataFrame({"u": r.users, "t": r.timestamps}).groupby("u").t.max()
    assert np.all(r.timestamps[split.valid] == latest.loc[r.users[split.valid]].to_numpy())


def test_model_scores_rank_as_recommend_does(tmp_path):
    assert train.main(["--config", "ials.yaml", "--quiet", "--workdir", str(tmp_path), "--set", "data.name=ml-100k",
                       "model.n_factors=8", "train.epochs=2"]) == 0
    model = jaxcf.load_model(tmp_path)
    scores = model.scores([1, 2])
    assert scores.shape == (2, model.num_items)
    row = scores[0].copy()
    row[model.seen(int(model.lookup_users(1)[0][0]))] = -np.inf
    assert model.item_ids.raw[np.argsort(-row, kind="stable")[:5]].tolist() == model.recommend(1, k=5).ids.tolist()
    with pytest.raises(jaxcf.UnknownIdError, match="unknown user id 99999"):
        model.scores([99999])


def test_strong_generalisation_for_an_implicit_model(tmp_path, capsys):
    from jaxcf.cli import crossval

    out = tmp_path / "strong.json"
    assert crossval.main(["--config", "ials.yaml", "--protocol", "strong", "--out", str(out), "--set",
                          "data.name=ml-100k", "model.n_factors=16", "train.epochs=4"]) == 0
    result = json.loads(out.read_text())["splits"][0]
    answers = [result[a] for a in ("fallback", "fold_in", "joint")]
    # The same held-out users and relevant items are scored for each answer.
    assert len({a["scored_users"] for a in answers}) == 1 and answers[0]["scored_users"] > 50
    # Folding a user's history in beats ranking by popularity; it stays near retraining with them.
    assert answers[1]["ndcg@20"] > answers[0]["ndcg@20"] + 0.02
    assert abs(answers[1]["ndcg@20"] - answers[2]["ndcg@20"]) < 0.05
    assert "fold_in   ndcg@20" in capsys.readouterr().out


def test_fold_in_counts_only_interactions_as_training_does(tmp_path):
    assert train.main(["--config", "ials.yaml", "--quiet", "--workdir", str(tmp_path), "--set", "data.name=ml-100k",
                       "model.n_factors=8", "train.epochs=2"]) == 0
    model = jaxcf.load_model(tmp_path)
    items = model.item_ids.raw[:3].tolist()
    liked = pd.DataFrame({"user_id": [90001] * 2, "item_id": items[:2], "rating": [5.0, 4.0]})
    cols = {"user_col": "user_id", "item_col": "item_id", "rating_col": "rating"}
    plain = model.fold_in(liked, **cols)
    # A 2-star rating is not an interaction (data.implicit_threshold 4): it changes nothing, and is reported.
    mixed = model.fold_in(pd.concat([liked, pd.DataFrame({"user_id": [90001], "item_id": [items[2]],
                                                          "rating": [2.0]})]), **cols)
    np.testing.assert_array_equal(mixed.scores([90001]), plain.scores([90001]))
    assert mixed.fold_in_report.below_threshold == 1 and plain.fold_in_report.below_threshold == 0
    # A user with no interaction stays unknown (the cold start answers them), and is counted.
    only_low = pd.DataFrame({"user_id": [90001, 90002], "item_id": [items[0], items[1]], "rating": [5.0, 1.0]})
    folded = model.fold_in(only_low, **cols)
    assert folded.fold_in_report.users_added == 1 and folded.fold_in_report.users_without_interactions == 1
    assert folded.recommend(90002, k=3).fallback and not folded.recommend(90001, k=3).fallback
    with pytest.raises(jaxcf.ModelError, match="no row is an interaction"):
        model.fold_in(only_low.iloc[1:], **cols)
    # On the fly: the same rule; the 2-star item is left out of the answer (rated), not used in the solve.
    ranked, _ = model.recommend_from_ratings(items[:2], [5.0, 4.0], k=6)
    also, _ = model.recommend_from_ratings(items, [5.0, 4.0, 2.0], k=5)
    assert also.ids.tolist() == [i for i in ranked.ids.tolist() if i != items[2]][:5]


@pytest.mark.parametrize("kind", ["bpr", "ease", "blend"])
def test_one_device_families_refuse_a_mesh_before_any_work(kind):
    with pytest.raises(config.ConfigError, match="one device"):
        config.load("ials.yaml", [f"model.kind={kind}", "mesh.model=2"] + (["train.epochs=1"] if kind == "ease"
                                                                             else []))
