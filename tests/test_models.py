"""Model shapes, initial ranges, injected weights and the scoring rule."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxcf import EmbeddingDot, EmbeddingDotBias
from jaxcf.core import models

NUM_USERS, NUM_ITEMS, FACTORS = 671, 9066, 50


def test_dot_model_shapes_and_initial_range():
    model = EmbeddingDot(NUM_USERS, NUM_ITEMS, FACTORS)
    params = models.init_params(model, jax.random.key(0))
    assert {k: v.shape for k, v in params.items()} == {
        "user_embedding": (NUM_USERS, FACTORS),
        "item_embedding": (NUM_ITEMS, FACTORS),
    }
    for table in params.values():
        assert table.dtype == jnp.float32
        assert float(table.min()) >= 0.0 and float(table.max()) < 0.05
        assert float(table.max()) > 0.049 and float(table.min()) < 1e-4  # really spans [0, 0.05)
    users = jnp.array([0, 5, 670], jnp.int32)
    items = jnp.array([1, 9065, 3], jnp.int32)
    out = model.apply({"params": params}, users, items)
    assert out.shape == (3,)
    expected = np.sum(np.asarray(params["user_embedding"])[users] * np.asarray(params["item_embedding"])[items], 1)
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_bias_model_shapes_range_and_formula():
    model = EmbeddingDotBias(NUM_USERS, NUM_ITEMS, FACTORS, (0.5, 5.0))
    params = models.init_params(model, jax.random.key(1))
    assert {k: v.shape for k, v in params.items()} == {
        "user_embedding": (NUM_USERS, FACTORS),
        "item_embedding": (NUM_ITEMS, FACTORS),
        "user_bias": (NUM_USERS, 1),
        "item_bias": (NUM_ITEMS, 1),
    }
    for table in params.values():
        assert float(table.min()) >= -0.01 and float(table.max()) < 0.01
        assert float(table.min()) < -0.009 and float(table.max()) > 0.009
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    users = np.array([0, 1, 2, 2], np.int32)
    items = np.array([4, 4, 9065, 0], np.int32)
    out = np.asarray(model.apply({"params": params}, jnp.asarray(users), jnp.asarray(items)))
    logits = (p["user_embedding"][users] * p["item_embedding"][items]).sum(1) + p["user_bias"][users, 0]
    logits += p["item_bias"][items, 0]
    np.testing.assert_allclose(out, 1 / (1 + np.exp(-logits)) * 4.5 + 0.5, rtol=1e-6)


def test_injected_weights_are_used_as_given():
    model = EmbeddingDotBias(2, 3, 2, (1.0, 5.0))
    params = {
        "user_embedding": jnp.array([[1.0, 0.0], [0.0, 2.0]]),
        "item_embedding": jnp.array([[1.0, 1.0], [0.0, 0.0], [-1.0, 3.0]]),
        "user_bias": jnp.array([[0.0], [-1.0]]),
        "item_bias": jnp.array([[0.0], [0.0], [-5.0]]),
    }
    out = model.apply({"params": params}, jnp.array([0, 1, 1]), jnp.array([0, 1, 2]))
    logits = np.array([1.0, -1.0, 6.0 - 1.0 - 5.0])
    np.testing.assert_allclose(out, 1 / (1 + np.exp(-logits)) * 4 + 1, rtol=1e-6)


def test_score_rows_matches_the_module_and_keeps_batch_one_1d():
    model = EmbeddingDotBias(5, 7, 3, (0.5, 5.0))
    params = models.init_params(model, jax.random.key(2))
    users, items = jnp.array([3]), jnp.array([6])
    rows = models.gather_rows(params, users, items)
    direct = models.score_rows(rows, (0.5, 5.0))
    assert direct.shape == (1,)  # the notebook's .squeeze() would make this a scalar
    np.testing.assert_array_equal(direct, model.apply({"params": params}, users, items))


def test_build_by_output_range():
    """An output range is the biased model's (its scaled sigmoid); none, the dot model's."""
    assert isinstance(models.build(2, 3, 4), EmbeddingDot)
    assert models.build(2, 3, 4, (0, 5)).y_range == (0.0, 5.0)
