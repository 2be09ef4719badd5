"""jaxcf.core.rows and batchlast against NumPy (float64), the fast BPMF sweep against bpmf.fit's,
no LAPACK kernel in their compiled programs, and every one of them lowers for CUDA."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcf.core import batchlast, rows
from jaxcf.families.bpmf import fast_sweep
from jaxcf.families.bpmf import fit as gibbs

USERS, ITEMS, FACTORS = 12, 15, 4


def _ratings(seed=0):
    """Ratings with every case the buckets meet: user 0 has 40 (bucket of 64), user 3 rates item 2
    twice (the pair counts twice), user 11 and item 14 have none, and the rest a few each."""
    rng = np.random.default_rng(seed)
    users = np.concatenate([np.zeros(40, np.int64), rng.integers(1, USERS - 1, 50), [3, 3]])
    items = np.concatenate([rng.integers(0, ITEMS - 1, 90), [2, 2]])
    values = rng.normal(size=len(users))
    return users, items, values


def _reference(own, other, num_rows, vectors, values, weights):
    gram = np.zeros((num_rows, vectors.shape[1], vectors.shape[1]))
    rhs = np.zeros((num_rows, vectors.shape[1]))
    for u, i, r, w in zip(own, other, values, weights):
        gram[u] += w * np.outer(vectors[i], vectors[i])
        rhs[u] += r * vectors[i]
    return gram, rhs


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("side", ["users", "items"])
def test_normal_equations_match_numpy(side, weighted):
    users, items, values = _ratings()
    own, other, num_rows, num_other = (users, items, USERS, ITEMS) if side == "users" else (items, users, ITEMS, USERS)
    weights = np.random.default_rng(1).uniform(0.5, 2.0, len(users)) if weighted else None
    index = rows.build_index(own, other, num_rows, num_other, values=values, weights=weights)
    assert sorted(index.order.tolist()) == list(range(num_rows)), "order must be a permutation of the rows"
    assert np.array_equal(index.order[index.position], np.arange(num_rows))
    vectors = np.random.default_rng(2).normal(size=(num_other, 5))
    gram, rhs = rows.in_row_order(index, *jax.jit(rows.normal_equations)(jnp.asarray(vectors, jnp.float32), index))
    expected = _reference(own, other, num_rows, vectors, values, np.ones(len(own)) if weights is None else weights)
    # float32 sums of at most 40 products of O(1) numbers: a few ulps of the largest sum.
    np.testing.assert_allclose(gram, expected[0], rtol=1e-5, atol=1e-4, err_msg="gram")
    np.testing.assert_allclose(rhs, expected[1], rtol=1e-5, atol=1e-4, err_msg="rhs")
    empty = np.flatnonzero(np.bincount(own, minlength=num_rows) == 0)
    assert len(empty) and not np.any(np.asarray(gram)[empty]), "a row without ratings must have gram 0"


@pytest.mark.parametrize("weighted", [False, True])
def test_row_sums_are_the_rhs_and_the_gram_products(weighted):
    """``row_sums`` (conjugate gradient's products, no F x F matrix) against the dense reference:
    ``sum values v`` and ``gram_u @ x_u`` for every row, zero for a row without ratings."""
    users, items, values = _ratings()
    weights = np.random.default_rng(1).uniform(0.5, 2.0, len(users)) if weighted else None
    index = rows.build_index(users, items, USERS, ITEMS, values=values, weights=weights)
    vectors = np.random.default_rng(2).normal(size=(ITEMS, 5))
    x = np.random.default_rng(3).normal(size=(USERS, 5))
    gram, rhs = _reference(users, items, USERS, vectors, values, np.ones(len(users)) if weights is None else weights)
    table = jnp.asarray(vectors, jnp.float32)
    np.testing.assert_allclose(jax.jit(rows.row_sums)(table, index), rhs, rtol=1e-5, atol=1e-4)
    product = jax.jit(rows.row_sums)(table, index, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(product, np.einsum("rfg,rg->rf", gram, x), rtol=1e-5, atol=1e-3)
    assert not np.any(np.asarray(product)[USERS - 1]), "user 11 has no ratings"


def test_values_default_to_one_and_bad_ids_fail():
    users, items, _ = _ratings()
    index = rows.build_index(users, items, USERS, ITEMS)
    vectors = np.random.default_rng(3).normal(size=(ITEMS, 3))
    _, rhs = rows.in_row_order(index, *jax.jit(rows.normal_equations)(jnp.asarray(vectors, jnp.float32), index))
    np.testing.assert_allclose(rhs, _reference(users, items, USERS, vectors, np.ones(len(users)),
                                               np.ones(len(users)))[1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="other ids must lie in"):
        rows.build_index(users, items, USERS, 5)
    with pytest.raises(ValueError, match="same length"):
        rows.build_index(users, items[:-1], USERS, ITEMS)
    with pytest.raises(ValueError, match="built for 15 other rows"):
        rows.normal_equations(jnp.zeros((ITEMS + 1, 3)), index)


def _spd(rng, size, batch):
    x = rng.normal(size=(*batch, size, size))
    return x @ np.swapaxes(x, -1, -2) + size * np.eye(size)


def _last(x, dims):
    return np.moveaxis(x, tuple(range(-dims, 0)), tuple(range(dims)))


@jax.jit
def _factor_and_solves(a, factor, b, z):
    """Our factor of ``a``, and each solve with ``factor`` (NumPy's, so each routine is checked on its own)."""
    return batchlast.cholesky(a), {
        "solve_lower": batchlast.solve_lower(factor, b),
        "solve_lower_transpose": batchlast.solve_lower_transpose(factor, b),
        "cho_solve": batchlast.cho_solve(factor, b),
        "gaussian_draw": batchlast.gaussian_draw(factor, b, z),
    }


# (F, batch shape): unrolled sizes with one and two batch axes, and one past UNROLL (the batch-first fallback).
@pytest.mark.parametrize("size, batch", [(1, (7,)), (3, (2, 3)), (8, (7,)), (batchlast.UNROLL + 8, (3,))])
def test_batchlast_matches_numpy(size, batch):
    rng = np.random.default_rng(size)
    a, b, z = _spd(rng, size, batch), rng.normal(size=(*batch, size)), rng.normal(size=(*batch, size))
    lower = np.linalg.cholesky(a)
    upper = np.swapaxes(lower, -1, -2)
    factor, solved = _factor_and_solves(*(jnp.asarray(_last(x, 2), jnp.float32) for x in (a, lower)),
                                        *(jnp.asarray(_last(x, 1), jnp.float32) for x in (b, z)))
    # float32 against float64: condition numbers of ~10 keep every error within a few ulps.
    np.testing.assert_allclose(factor, _last(lower, 2), rtol=2e-5, atol=2e-5, err_msg="cholesky")
    assert not np.any(np.triu(np.moveaxis(np.asarray(factor), (0, 1), (-2, -1)), 1)), "the factor must be lower"
    mean = np.linalg.solve(a, b[..., None])[..., 0]
    wanted = {
        "solve_lower": np.linalg.solve(lower, b[..., None])[..., 0],
        "solve_lower_transpose": np.linalg.solve(upper, b[..., None])[..., 0],
        "cho_solve": mean,
        "gaussian_draw": mean + np.linalg.solve(upper, z[..., None])[..., 0],
    }
    for name, want in wanted.items():
        np.testing.assert_allclose(np.moveaxis(np.asarray(solved[name]), 0, -1), want, rtol=1e-4, atol=1e-5,
                                   err_msg=name)


def test_a_matrix_that_is_not_positive_definite_gives_nan():
    a = jnp.asarray([[1.0, 2.0], [2.0, 1.0]], jnp.float32)[:, :, None]
    assert np.isnan(np.asarray(batchlast.cholesky(a))).any()


def test_solve_rows_matches_numpy():
    users, items, values = _ratings()
    index = rows.build_index(users, items, USERS, ITEMS, values=values)
    rng = np.random.default_rng(4)
    vectors, reg = rng.normal(size=(ITEMS, 5)), rng.uniform(0.5, 1.5, USERS)
    base = vectors.T @ vectors
    solve = jax.jit(rows.solve_rows, static_argnums=3)
    solved = solve(jnp.asarray(vectors, jnp.float32), index, jnp.asarray(base, jnp.float32), 2.0,
                   jnp.asarray(reg, jnp.float32))
    gram, rhs = _reference(users, items, USERS, vectors, values, np.ones(len(users)))
    expected = np.linalg.solve(base + 2.0 * gram + reg[:, None, None] * np.eye(5), rhs[..., None])[..., 0]
    np.testing.assert_allclose(solved, expected, rtol=1e-4, atol=1e-5)
    assert not np.any(np.asarray(solved)[USERS - 1]), "a row without ratings solves to 0"


PADDED_USERS = USERS + 4  # the table a mesh of 8 devices would hold: 4 padding rows, which must stay zero


def _sweeps():
    """The old and the new sweep (2 chains, F = 4, users padded as on a mesh), each jitted with the sides
    as arguments, and their arguments: ``{name: (jitted, (keys, users, items, user_side, item_side))}``."""
    users, items, values = _ratings()
    keys = jax.random.split(jax.random.key(0), 2)
    start = (0.1 * jax.random.normal(jax.random.key(1), (2, PADDED_USERS, FACTORS)),
             0.1 * jax.random.normal(jax.random.key(2), (2, ITEMS, FACTORS)))
    out = {}
    for name, module in (("old", gibbs), ("new", fast_sweep)):
        sides = (jax.tree.map(jnp.asarray, module.make_side(users, items, values, PADDED_USERS, ITEMS)),
                 jax.tree.map(jnp.asarray, module.make_side(items, users, values, ITEMS, PADDED_USERS)))
        jitted = jax.jit(lambda k, u, i, a, b, module=module: module.make_sweep(a, b, 1.5, USERS)(k, u, i))
        out[name] = (jitted, (keys, *start, *sides))
    return out


SWEEPS = _sweeps()


@functools.cache
def _compiled(name):
    """Each sweep compiled once for the module (a Gibbs sweep takes seconds to compile)."""
    jitted, args = SWEEPS[name]
    return jitted.lower(*args).compile()


@pytest.mark.parity
def test_fast_sweep_draws_what_the_gibbs_sweep_draws():
    compiled = {name: _compiled(name) for name in SWEEPS}
    keys, *start = SWEEPS["old"][1][:3]
    state = {"old": tuple(start), "new": tuple(start)}
    for sweep in range(3):
        step = jax.random.split(jax.random.fold_in(keys[0], sweep), 2)
        state = {name: compiled[name](step, *state[name], *SWEEPS[name][1][3:]) for name in state}
        for table, old, new in zip(("users", "items"), state["old"], state["new"]):
            # The same normal draws and maths; only the order of float32 sums differs (bucketed products
            # against a dense count matrix, the factor entry by entry against column by column): ~1e-7 of
            # a row's size, amplified by the precisions' condition numbers (here < 100) and by the
            # sweeps, so 2e-5 after three sweeps (a changed draw or formula moves rows by ~0.1).
            np.testing.assert_allclose(new, old, rtol=0, atol=2e-5, err_msg=f"{table} after sweep {sweep + 1}")
    assert not np.any(np.asarray(state["new"][0])[:, USERS:]), "padding rows must stay zero"
    assert np.all(np.asarray(state["new"][0])[:, USERS - 1] != 0), "a user without ratings is drawn from the prior"


def _programs():
    """(name, jitted function, example arguments): every compiled program of core.rows and core.batchlast."""
    users, items, values = _ratings()
    index = jax.tree.map(jnp.asarray, rows.build_index(users, items, USERS, ITEMS, values=values))
    vectors = jnp.ones((ITEMS, FACTORS))
    big = batchlast.UNROLL + 2
    spd = jnp.broadcast_to(jnp.eye(big)[:, :, None] * 2.0, (big, big, 3))
    return [
        ("fast-gibbs-sweep", *SWEEPS["new"]),
        ("normal-equations", jax.jit(rows.normal_equations), (vectors, index)),
        ("draw-rows", jax.jit(lambda k, v, x: rows.draw_rows(k, v, x, jnp.zeros(FACTORS), jnp.eye(FACTORS), 1.5)),
         (jax.random.key(0), vectors, index)),
        ("solve-rows", jax.jit(lambda v, x: rows.solve_rows(v, x, v.T @ v, 1.0, 0.5)), (vectors, index)),
        ("batchlast-large-f", jax.jit(lambda a, b: batchlast.gaussian_draw(batchlast.cholesky(a), b, b)),
         (spd, jnp.ones((big, 3)))),
    ]


PROGRAMS = _programs()


@pytest.mark.parametrize("name, function, args", PROGRAMS, ids=[p[0] for p in PROGRAMS])
def test_no_lapack_kernel_on_cpu(name, function, args):
    text = (_compiled("new") if name == "fast-gibbs-sweep" else function.lower(*args).compile()).as_text()
    targets = set(re.findall(r'custom_call_target="([^"]+)"', text))
    assert not [t for t in targets if "lapack" in t.lower()], f"{name} calls {sorted(targets)}"


def test_the_lapack_check_can_fail():
    """The check above finds LAPACK where it is: jnp.linalg.cholesky is a LAPACK custom call on CPU."""
    text = jax.jit(jnp.linalg.cholesky).lower(jnp.eye(3)[None]).compile().as_text()
    assert any("lapack" in t.lower() for t in re.findall(r'custom_call_target="([^"]+)"', text))


@pytest.mark.parametrize("name, function, args", PROGRAMS, ids=[p[0] for p in PROGRAMS])
def test_lowers_for_cuda(name, function, args):
    exported = jax.export.export(function, platforms=("cuda",))(*args)
    assert "cuda" in exported.platforms and exported.mlir_module()
