"""Row-sparse optimizers against a plain NumPy implementation, and the packed epoch against the step.

The NumPy reference is written from the definitions in ``jaxcf.core.optim``'s docstring (float64, one
loop over distinct ids), not from the JAX code: gradients of repeated ids are summed, moments and the
step count are per row, decay is decoupled and touches touched rows only, padding touches nothing.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcf import config as cfg
from jaxcf.core import optim, sparse, steps
from jaxcf.core.models import USER_TABLES

LR, B1, B2, EPS, WD = 1e-2, 0.9, 0.999, 1e-8, 0.1  # a large decay, so that decay bugs show


def _config(name: str) -> cfg.OptimConfig:
    return cfg.OptimConfig(name=name, learning_rate=LR, weight_decay=WD, b1=B1, b2=B2, eps=EPS)


class NumpyLazy:
    """Reference row-sparse Adam or SGD on float64 NumPy tables."""

    def __init__(self, name: str, params: dict):
        self.name = name
        self.params = {k: np.asarray(v, np.float64).copy() for k, v in params.items()}
        self.mu = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.nu = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.count = {k: np.zeros(len(v), np.int64) for k, v in self.params.items()}

    def step(self, row_grads: dict, users: np.ndarray, items: np.ndarray) -> None:
        for name, table in self.params.items():
            ids = users if name in USER_TABLES else items
            grads = np.asarray(row_grads[name], np.float64)
            for row in np.unique(ids[ids >= 0]):
                g = grads[ids == row].sum(axis=0)
                if self.name == "sgd":
                    table[row] -= LR * (g + WD * table[row])
                    continue
                self.count[name][row] += 1
                t = self.count[name][row]
                m = self.mu[name][row] = B1 * self.mu[name][row] + (1 - B1) * g
                v = self.nu[name][row] = B2 * self.nu[name][row] + (1 - B2) * g * g
                step = (m / (1 - B1**t)) / (np.sqrt(v / (1 - B2**t)) + EPS)
                table[row] -= LR * (step + WD * table[row])


def _tables(seed: int, num_users: int = 5, num_items: int = 4, factors: int = 3) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "user_embedding": rng.normal(size=(num_users, factors)).astype(np.float32),
        "item_embedding": rng.normal(size=(num_items, factors)).astype(np.float32),
        "user_bias": rng.normal(size=(num_users, 1)).astype(np.float32),
        "item_bias": rng.normal(size=(num_items, 1)).astype(np.float32),
    }


def _assert_matches(reference: NumpyLazy, params: dict, state: dict, *, rtol: float, atol: float) -> None:
    for name in reference.params:
        np.testing.assert_allclose(params[name], reference.params[name], rtol=rtol, atol=atol, err_msg=f"param {name}")
        if reference.name == "sgd":
            continue
        np.testing.assert_allclose(state[name].mu, reference.mu[name], rtol=rtol, atol=atol, err_msg=f"mu {name}")
        np.testing.assert_allclose(state[name].nu, reference.nu[name], rtol=rtol, atol=atol, err_msg=f"nu {name}")
        np.testing.assert_array_equal(state[name].count, reference.count[name], err_msg=f"count {name}")


# How a step finds the touched rows: 0 gathers and scatters them, inf computes every row (same result).
MODES = {"row-wise": 0.0, "dense": float("inf")}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["lazy_adam", "sgd"])
def test_row_sparse_update_matches_numpy_with_repeated_ids_and_padding(name, mode):
    params = _tables(0, num_users=6, num_items=5)  # user 5 and item 4 never appear
    initial = {k: v.copy() for k, v in params.items()}
    optimizer = optim.build(_config(name), 100)._replace(dense_rows_per_id=MODES[mode])
    reference = NumpyLazy(name, params)
    state = optimizer.init(params)
    params = {k: jnp.asarray(v) for k, v in params.items()}
    update = jax.jit(optimizer.update)
    rng = np.random.default_rng(1)
    batches = [
        # user 1 three times, item 2 twice
        (np.array([1, 1, 0, 1, 2]), np.array([2, 0, 2, 1, 1])),
        # the padded last batch of a run: -1 marks the two padding entries
        (np.array([3, 1, 1, -1, -1]), np.array([0, 0, 3, -1, -1])),
        (np.array([0, 0, 0, 0, 0]), np.array([1, 1, 1, 1, 1])),  # one id only
        (np.array([2, 3, 1, 0, 4]), np.array([3, 2, 1, 0, 0])),
    ]
    for users, items in batches:
        row_grads = {k: rng.normal(size=(len(users), v.shape[1])).astype(np.float32) for k, v in params.items()}
        for g in row_grads.values():
            g[users < 0] = 0.0  # what the train step's weight-0 padding produces
        params, state = update(params, state, row_grads, jnp.asarray(users, jnp.int32), jnp.asarray(items, jnp.int32))
        reference.step(row_grads, users, items)
    # float32 against float64 over 4 steps of size lr: relative 1e-5 is a few ulps of accumulated rounding.
    _assert_matches(reference, params, state, rtol=1e-5, atol=1e-6)
    for table, row in (("user_embedding", 5), ("user_bias", 5), ("item_embedding", 4), ("item_bias", 4)):
        np.testing.assert_array_equal(params[table][row], initial[table][row], err_msg=f"untouched {table} row moved")


@pytest.mark.parametrize("mode", MODES)
def test_padding_never_touches_a_row(mode):
    params = {k: jnp.asarray(v) for k, v in _tables(2).items()}
    optimizer = optim.build(_config("lazy_adam"), 100)._replace(dense_rows_per_id=MODES[mode])
    state = optimizer.init(params)
    grads = {k: jnp.zeros((3, v.shape[1])) for k, v in params.items()}
    users, items = jnp.array([-1, -1, -1], jnp.int32), jnp.array([-1, -1, -1], jnp.int32)
    new_params, new_state = optimizer.update(params, state, grads, users, items)
    for name in params:
        np.testing.assert_array_equal(new_params[name], params[name], err_msg=name)  # no decay either
        np.testing.assert_array_equal(new_state[name].count, 0, err_msg=name)


def test_owners_pick_exactly_one_position_per_distinct_id():
    rng = np.random.default_rng(3)
    scratch = jnp.asarray(rng.integers(-5, 50, 6), jnp.int32)  # stale contents must not matter
    for _ in range(5):
        ids = rng.integers(-1, 6, size=40).astype(np.int32)
        owner, is_owner, scratch = jax.jit(sparse.owners)(jnp.asarray(ids), scratch)
        owner, is_owner = np.asarray(owner), np.asarray(is_owner)
        real = ids >= 0
        np.testing.assert_array_equal(ids[owner][real], ids[real])  # each position's owner holds its id
        np.testing.assert_array_equal(np.sort(ids[is_owner]), np.unique(ids[real]))  # one owner per id
        np.testing.assert_array_equal(owner[~real], np.flatnonzero(~real))  # padding owns itself


def _numpy_row_grads(params: dict, users, items, ratings, weights, y_range) -> dict:
    """Gradient of sum(w * (pred - r)**2) / sum(w) for the biased model, by hand, in float64."""
    u = params["user_embedding"][users]
    i = params["item_embedding"][items]
    logits = (u * i).sum(1) + params["user_bias"][users, 0] + params["item_bias"][items, 0]
    s = 1 / (1 + np.exp(-logits))
    low, high = y_range
    pred = s * (high - low) + low
    d_logits = 2 * weights * (pred - ratings) / weights.sum() * s * (1 - s) * (high - low)
    return {
        "user_embedding": d_logits[:, None] * i,
        "item_embedding": d_logits[:, None] * u,
        "user_bias": d_logits[:, None],
        "item_bias": d_logits[:, None],
    }


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["lazy_adam", "sgd"])
def test_epoch_matches_numpy_including_the_padded_last_batch(name, mode):
    # 23 ratings in batches of 8: two full batches and a last one of 7 real ratings and 1 padding
    # entry; 5 users and 4 items, so ids repeat within every batch.
    y_range = (0.5, 5.0)
    rng = np.random.default_rng(4)
    n, batch_size = 23, 8
    users = rng.integers(0, 5, n).astype(np.int32)
    items = rng.integers(0, 4, n).astype(np.int32)
    ratings = (rng.integers(1, 11, n) / 2).astype(np.float32)
    params = {k: v * 0.3 for k, v in _tables(5).items()}
    optimizer = optim.build(_config(name), 100)._replace(dense_rows_per_id=MODES[mode])
    reference = NumpyLazy(name, params)

    state = steps.TrainState(
        {k: jnp.asarray(v) for k, v in params.items()}, optimizer.init(params), jnp.zeros((), jnp.int32)
    )
    epoch = steps.make_train_epoch(optimizer, y_range, batch_size)
    for e in range(2):
        order = rng.permutation(n).astype(np.int32)
        state, losses = epoch(state, 0.0, jnp.asarray(users), jnp.asarray(items), jnp.asarray(ratings),
                              jnp.asarray(order))
        assert losses.shape == (3,)
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            grads = _numpy_row_grads(
                reference.params, users[index], items[index], ratings[index], np.ones(len(index)), y_range
            )
            reference.step(grads, users[index], items[index])
        assert int(state.step) == 3 * (e + 1)
    # Two epochs of float32 forward/backward against float64: a few ulps, relative.
    _assert_matches(reference, state.params, state.opt_state, rtol=2e-5, atol=1e-6)


def test_packed_epoch_equals_repeated_steps():
    # The epoch packs the tables once; the single step packs and unpacks every time: same numbers.
    y_range = (0.5, 5.0)
    rng = np.random.default_rng(6)
    n, batch_size = 30, 8
    users = jnp.asarray(rng.integers(0, 5, n), jnp.int32)
    items = jnp.asarray(rng.integers(0, 4, n), jnp.int32)
    ratings = jnp.asarray(rng.integers(1, 11, n) / 2, jnp.float32)
    order = jnp.asarray(rng.permutation(n), jnp.int32)
    optimizer = optim.build(_config("lazy_adam"), 100)
    params = {k: jnp.asarray(v * 0.3) for k, v in _tables(7).items()}

    def fresh():  # the epoch donates its state: every run gets its own copies
        copies = {k: jnp.array(v) for k, v in params.items()}
        return steps.TrainState(copies, optimizer.init(copies), jnp.zeros((), jnp.int32))

    epoch = steps.make_train_epoch(optimizer, y_range, batch_size)
    by_epoch, losses = epoch(fresh(), 0.0, users, items, ratings, order)
    # One batch per call: each call packs and unpacks the tables around its single step.
    by_step = fresh()
    step_losses = []
    for start in range(0, n, batch_size):
        by_step, loss = epoch(by_step, 0.0, users, items, ratings, order[start : start + batch_size])
        step_losses.append(loss[0])
    np.testing.assert_allclose(losses, step_losses, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(by_epoch), jax.tree.leaves(by_step)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_row_wise_and_dense_steps_agree_on_a_larger_problem():
    # Many repeats per id (popular items), a padded last batch; both ways of finding rows, same numbers.
    rng = np.random.default_rng(10)
    n, batch_size, num_users, num_items = 3000, 512, 700, 60
    users = jnp.asarray(rng.integers(0, num_users, n), jnp.int32)
    items = jnp.asarray(np.minimum(rng.zipf(1.5, n) - 1, num_items - 1), jnp.int32)
    ratings = jnp.asarray(rng.integers(1, 11, n) / 2, jnp.float32)
    order = jnp.asarray(rng.permutation(n), jnp.int32)
    params = _tables(11, num_users=num_users, num_items=num_items, factors=8)
    results = []
    for ratio in MODES.values():
        optimizer = optim.build(_config("lazy_adam"), 100)._replace(dense_rows_per_id=ratio)
        copies = {k: jnp.asarray(v * 0.1) for k, v in params.items()}
        state = steps.TrainState(copies, optimizer.init(copies), jnp.zeros((), jnp.int32))
        state, _ = steps.make_train_epoch(optimizer, (0.5, 5.0), batch_size)(state, 0.0, users, items, ratings, order)
        results.append(state)
    # Same operations on the same values in the same order on CPU; other backends may reorder the sums.
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_dot_model_tables_pack_without_biases():
    params = {k: jnp.asarray(v) for k, v in _tables(8).items() if not k.endswith("bias")}
    optimizer = optim.build(_config("lazy_adam"), 100)
    packed = sparse.pack(optimizer, params, optimizer.init(params))
    assert packed.names == ("user_embedding", "item_embedding") and packed.widths == (3, 3)
    back, state = sparse.unpack(optimizer, packed)
    assert set(back) == set(params) and set(state) == set(params)
    for name in params:
        np.testing.assert_array_equal(back[name], params[name])


def test_build_names_every_choice_and_rejects_others():
    assert isinstance(optim.build(_config("lazy_adam"), 100), sparse.RowSparse)
    assert isinstance(optim.build(_config("sgd"), 100), sparse.RowSparse)
    for name in ("adam", "adamw"):
        tx = optim.build(_config(name), 100)
        assert hasattr(tx, "init") and hasattr(tx, "update") and not isinstance(tx, sparse.RowSparse)
    with pytest.raises(ValueError, match="allowed: adam, adamw, lazy_adam, sgd"):
        optim.build(_config("lazyadam"), 100)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_dense_optimizers_match_torch_formulas(name):
    # adam: coupled L2 (torch.optim.Adam); adamw: decoupled (torch.optim.AdamW); written out in NumPy.
    rng = np.random.default_rng(9)
    p = rng.normal(size=(4, 3))
    tx = optim.build(_config(name), 100)
    params = {"w": jnp.asarray(p, jnp.float32)}
    state = tx.init(params)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t in range(1, 4):
        g = rng.normal(size=p.shape)
        updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
        params = optax.apply_updates(params, updates)
        if name == "adam":
            g = g + WD * p
        else:
            p = p * (1 - LR * WD)
        m = B1 * m + (1 - B1) * g
        v = B2 * v + (1 - B2) * g * g
        p = p - LR * (m / (1 - B1**t)) / (np.sqrt(v / (1 - B2**t)) + EPS)
    np.testing.assert_allclose(params["w"], p, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["lazy_adam", "sgd"])
def test_chunked_dense_step_is_the_same_step(name):
    # A dense step may compute its batch's gradients a chunk at a time (sparse.DENSE_CHUNK): the same
    # parameters score every chunk and the sums are added in batch order, so nothing changes.
    rng = np.random.default_rng(12)
    batch, num_users, num_items = 512, 40, 9
    users = jnp.asarray(rng.integers(0, num_users, batch), jnp.int32)
    items = jnp.asarray(np.minimum(rng.zipf(1.5, batch) - 1, num_items - 1), jnp.int32)
    ratings = jnp.asarray(rng.integers(1, 11, batch) / 2, jnp.float32)
    weights = jnp.asarray(np.arange(batch) < 450, jnp.float32)  # a padded last batch: 62 padding entries
    params = {k: jnp.asarray(v * 0.3) for k, v in _tables(13, num_users=num_users, num_items=num_items).items()}
    optimizer = optim.build(_config(name), 100)._replace(dense_rows_per_id=float("inf"))
    packed = sparse.pack(optimizer, params, optimizer.init(params))
    whole = jax.jit(sparse.make_packed_step(optimizer, (0.5, 5.0), chunk_size=0))
    chunked = jax.jit(sparse.make_packed_step(optimizer, (0.5, 5.0), chunk_size=64))
    assert "while" in chunked.lower(packed, users, items, ratings, weights).as_text()  # it does loop over chunks
    (a, loss_a), (b, loss_b) = (f(packed, users, items, ratings, weights) for f in (whole, chunked))
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)  # the loss is summed per chunk: rounding only
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    # And it is the step the NumPy reference takes.
    reference = NumpyLazy(name, params)
    u, i = np.asarray(users)[:450], np.asarray(items)[:450]
    reference.step(_numpy_row_grads(reference.params, u, i, np.asarray(ratings)[:450], np.ones(450), (0.5, 5.0)), u, i)
    new_params, new_state = sparse.unpack(optimizer, b)
    _assert_matches(reference, new_params, new_state, rtol=2e-5, atol=1e-6)
