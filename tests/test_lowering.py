"""Every compiled training and inference function: no LAPACK kernel on CPU, and it still lowers for CUDA.

LAPACK's batched kernels can deadlock XLA's CPU thread pool (``bench/lapack_deadlock.py``), so no
compiled jaxcf program may call one: each program here is compiled for this CPU and its custom calls
are listed. GPU sessions are rare, so between them ``jax.export`` lowers each program for CUDA on
this machine: a change that breaks the GPU path fails here first.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcf import config
from jaxcf.core import foldin, models, optim, ranking, scoring, steps
from jaxcf.families import bpr as bpr_spec
from jaxcf.families import ials as ials_spec
from jaxcf.families.bpmf import fit as gibbs
from jaxcf.families.bpr import fit as bpr
from jaxcf.families.ials import fit as ials
from jaxcf.families.sgd.fit import init_state, make_setup
from jaxcf.families.sgd.members import Member, init_members, make_optimizer
from jaxcf.serving import catalogue

USERS, ITEMS, FACTORS, RATINGS, BATCH = 12, 9, 4, 40, 8


def _dataset():
    from jaxcf.data import Dataset, Split
    from jaxcf.data.ids import IdMap
    from jaxcf.data.ratings import Ratings

    rng = np.random.default_rng(0)
    users = np.concatenate([np.arange(USERS), rng.integers(0, USERS, RATINGS - USERS)]).astype(np.int32)
    items = np.concatenate([np.arange(ITEMS), rng.integers(0, ITEMS, RATINGS - ITEMS)]).astype(np.int32)
    ratings = Ratings(users, items, rng.integers(1, 6, RATINGS).astype(np.float32), IdMap(np.arange(USERS)),
                      IdMap(np.arange(ITEMS)), "made here", "0" * 64)
    return Dataset(ratings, Split(np.arange(30), np.arange(30, 40)))


def _epoch_args(state, l2=0.0):
    data = _dataset().ratings
    return (state, jnp.float32(l2), jnp.asarray(data.users[:30]), jnp.asarray(data.items[:30]),
            jnp.asarray(data.ratings[:30]), jnp.arange(30, dtype=jnp.int32))


def _programs():
    """(name, jitted function, example arguments) for every compiled program jaxcf runs."""
    dataset = _dataset()
    out = []
    for name in ("adamw", "lazy_adam"):
        cfg = config.load("bias.yaml", [f"optim.name={name}", f"model.n_factors={FACTORS}"])
        setup = make_setup(cfg, dataset)
        out.append((f"epoch-{name}", steps.make_train_epoch(setup.optimizer, setup.y_range, BATCH),
                    _epoch_args(init_state(setup))))
    cfg = config.load("bias.yaml", [f"model.n_factors={FACTORS}", "ensemble.size=2"])
    setup = make_setup(cfg, dataset)
    tx = make_optimizer(cfg, 4)
    state = init_members(setup, [Member(cfg, {}), Member(cfg, {})], tx)
    args = _epoch_args(state)
    members_args = (state, jnp.zeros(2, jnp.float32), *args[2:5], jnp.stack([args[5], args[5]]))
    out.append(("epoch-members", steps.make_members_epoch(tx, setup.y_range, BATCH), members_args))

    ratings, train = dataset.ratings, dataset.split.train
    centred = ratings.ratings[train] - ratings.ratings[train].mean()
    sides = (gibbs.make_side(ratings.users[train], ratings.items[train], centred, USERS, ITEMS),
             gibbs.make_side(ratings.items[train], ratings.users[train], centred, ITEMS, USERS))
    sweep = jax.jit(lambda keys, u, i: gibbs.make_sweep(*sides, 1.5)(keys, u, i))
    keys = jax.random.split(jax.random.key(0), 2)
    out.append(("gibbs-sweep", sweep, (keys, jnp.zeros((2, USERS, FACTORS)), jnp.zeros((2, ITEMS, FACTORS)))))

    params = {k: jnp.asarray(v) for k, v in init_state(make_setup(config.load("bias.yaml"), dataset)).params.items()}
    stacked = jax.tree.map(lambda t: jnp.stack([t, t]), params)
    pairs = (jnp.arange(5, dtype=jnp.int32), jnp.arange(5, dtype=jnp.int32))
    out.append(("score-pairs", jax.jit(lambda p, u, i: models.score_pairs(p, u, i, (0.5, 5.0))), (params, *pairs)))
    out.append(("score-pairs-members", jax.jit(lambda p, u, i: models.score_pairs(p, u, i, (0.5, 5.0), True)),
                (stacked, *pairs)))
    block = jnp.arange(4, dtype=jnp.int32)
    out.append(("score-block-members", jax.jit(lambda p, u: models.score_block(p, u, (0.5, 5.0))), (stacked, block)))
    mask = (jnp.zeros(4, jnp.int32), jnp.arange(4, dtype=jnp.int32))
    out.append(("top-k-masked", jax.jit(lambda p, u, e: catalogue.top_k_masked(p, u, e, 3, (0.5, 5.0))),
                (stacked, block, jnp.zeros((4, ITEMS), bool))))
    unit = catalogue.unit_rows(np.asarray(params["item_embedding"]))
    out.append(("top-k-cosine", jax.jit(lambda t, q, e: catalogue.top_k_cosine(t, q, e, 3)),
                (unit, jnp.int32(2), jnp.zeros(ITEMS, bool))))
    scores = jnp.zeros((4, ITEMS))
    out.append(("ranking-hits", jax.jit(lambda s, a, b, c, d, e, f, g: ranking._top_hits(s, a, b, c, d, e, f, g, 3)),
                (scores, *mask, *mask, jnp.zeros(ITEMS, bool), jnp.zeros(ITEMS), jnp.zeros(4, bool))))
    out.append(("score-rows", jax.jit(lambda p, u: scoring._score_block(p, u, None)), (stacked, block)))
    out.append(("implicit-block", jax.jit(lambda s, e, r: ranking._implicit_block(s, e, r, 3)),
                (scores, jnp.zeros((4, ITEMS), bool), jnp.zeros((4, ITEMS), bool))))
    out.extend(_implicit_programs(dataset))
    out.extend(_fold_in_programs(params))
    return out


def _implicit_programs(dataset):
    """The iALS sweep (exact and conjugate-gradient solves) and BPR's epoch."""
    ratings, train = dataset.ratings, dataset.split.train
    counts = (jnp.asarray(np.bincount(ratings.users[train], minlength=USERS), jnp.float32),
              jnp.asarray(np.bincount(ratings.items[train], minlength=ITEMS), jnp.float32))
    state = ials.ALSState(jnp.ones((USERS, FACTORS)), jnp.ones((ITEMS, FACTORS)))
    out = []
    for solver, mesh in (("cholesky", False), ("cholesky", True), ("cg", False)):
        cfg = config.load("ials.yaml", [f"model.n_factors={FACTORS}", f"implicit.solver={solver}"])
        user_side = ials.make_sides(ratings.users[train], ratings.items[train], USERS, ITEMS, solver, mesh)
        item_side = ials.make_sides(ratings.items[train], ratings.users[train], ITEMS, USERS, solver, mesh)
        sweep = ials.make_sweep(user_side, item_side, *counts, ials.settings_of(cfg), USERS, ITEMS)
        out.append((f"ials-sweep-{solver}{'-mesh-form' if mesh else ''}", jax.jit(sweep), (state,)))
    cfg = config.load("bpr.yaml", [f"model.n_factors={FACTORS}", f"train.batch_size={BATCH}"])
    optimizer = optim.build(cfg.optim, 10)
    params = bpr.init_params(cfg, USERS, ITEMS)
    bpr_state = steps.TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))
    train_users, train_items = ratings.users[train], ratings.items[train]
    epoch = bpr.make_epoch(optimizer, cfg, bpr.make_sampler(cfg, train_users, train_items, USERS, ITEMS))
    out.append(("bpr-epoch", epoch, (bpr_state, jax.random.key(0), jnp.asarray(ratings.users[train]),
                                     jnp.asarray(ratings.items[train]), jnp.arange(len(train), dtype=jnp.int32))))
    return out


def _fold_in_programs(params):
    """Fold-in's solves: Bayesian ridge (dot), damped Gauss-Newton (bias), iALS and BPR rows."""
    pairs = 16
    block = (jnp.arange(pairs, dtype=jnp.int32) % ITEMS, jnp.full(pairs, 4.0), jnp.ones(pairs),
             jnp.arange(pairs, dtype=jnp.int32) % 2)
    out = []
    for name, y_range, d in (("foldin-ridge", None, FACTORS), ("foldin-gauss-newton", (0.5, 5.0), FACTORS + 1)):
        features, offsets = jnp.ones((1, ITEMS, d)), jnp.zeros((1, ITEMS))
        prior = (jnp.zeros((1, d)), jnp.eye(d)[None], jnp.ones(1))
        out.append((name, jax.jit(lambda f, o, m, p, a, i, r, v, w, y=y_range: foldin.solve(
            f, o, m, p, a, i, r, v, w, 2, y)), (features, offsets, *prior, *block)))
    table = jnp.asarray(params["item_embedding"])
    rows = (block[0], block[2], block[3])
    out.append(("foldin-ials", jax.jit(lambda t, i, v, w: ials_spec._fold_in_rows(t, i, v, w, 2, 1.0, 1.0, 0.0)),
                (table, *rows)))
    out.append(("foldin-bpr", jax.jit(lambda t, i, v, w: bpr_spec._fold_in_rows(t, i, v, w, 2, 1e-4)),
                (table, *rows)))
    return out


PROGRAMS = _programs()


@pytest.mark.parametrize("name, function, args", PROGRAMS, ids=[p[0] for p in PROGRAMS])
def test_no_lapack_kernel_on_cpu(name, function, args):
    text = function.lower(*args).compile().as_text()
    targets = set(re.findall(r'custom_call_target="([^"]+)"', text))
    assert not [t for t in targets if "lapack" in t.lower()], f"{name} calls {sorted(targets)}"


@pytest.mark.parametrize("name, function, args", PROGRAMS, ids=[p[0] for p in PROGRAMS])
def test_lowers_for_cuda(name, function, args):
    exported = jax.export.export(function, platforms=("cuda",))(*args)
    assert "cuda" in exported.platforms and exported.mlir_module()
