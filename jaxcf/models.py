"""Flax modules for the notebook's two models: forward pass only.

Parameters are a flat dict of named tables, so weights can be injected from elsewhere (the parity
suite loads PyTorch's) and optimizers and shardings can address each table by name:

=================  ===================  ================================
name               shape                PyTorch notebook name
=================  ===================  ================================
``user_embedding``  [num_users, F]       ``users.weight``
``item_embedding``  [num_items, F]       ``movies.weight``
``user_bias``       [num_users, 1]       ``users_b.weight`` (bias model)
``item_bias``       [num_items, 1]       ``movies_b.weight`` (bias model)
=================  ===================  ================================

Scoring of rows that are already gathered is reachable as :func:`score_rows`, so a row-sparse
optimizer can differentiate with respect to the gathered rows only.

What does not live here: losses and training (``jaxcf.train``).
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

Params = dict[str, jax.Array]

# Names of the per-user and per-item tables: which id array indexes which table.
USER_TABLES = ("user_embedding", "user_bias")
ITEM_TABLES = ("item_embedding", "item_bias")


def uniform_init(low: float, high: float):
    """U[low, high) initialiser, written out because Flax, PyTorch and fastai defaults differ."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, minval=low, maxval=high)

    return init


def score_rows(rows: Mapping[str, jax.Array], y_range: tuple[float, float] | None) -> jax.Array:
    """Scores already-gathered rows.

    Args:
      rows: ``user_embedding`` and ``item_embedding`` float32[batch, F]; with biases,
        ``user_bias`` and ``item_bias`` float32[batch, 1].
      y_range: (min, max) of the biased model's scaled sigmoid; None for the plain dot product.

    Returns:
      float32[batch] predicted ratings.
    """
    dot = jnp.sum(rows["user_embedding"] * rows["item_embedding"], axis=-1)
    if y_range is None:
        return dot
    # The notebook squeezes [batch, 1] biases to [batch]; index instead so batch 1 stays 1-D.
    logits = dot + rows["user_bias"][..., 0] + rows["item_bias"][..., 0]
    low, high = y_range
    return jax.nn.sigmoid(logits) * (high - low) + low


def gather_rows(params: Mapping[str, jax.Array], users: jax.Array, items: jax.Array) -> dict[str, jax.Array]:
    """Looks up each table's rows for a batch of (user, item) index pairs."""
    rows = {}
    for name, table in params.items():
        ids = users if name in USER_TABLES else items
        rows[name] = jnp.take(table, ids, axis=0)
    return rows


class EmbeddingDot(nn.Module):
    """The notebook's ``EmbeddingDotProd``: rating = <user vector, item vector>.

    Embeddings start uniform in [0, 0.05), as in the notebook.
    """

    num_users: int
    num_items: int
    n_factors: int = 50

    y_range = None

    def setup(self):
        init = uniform_init(0.0, 0.05)
        self.user_embedding = self.param("user_embedding", init, (self.num_users, self.n_factors))
        self.item_embedding = self.param("item_embedding", init, (self.num_items, self.n_factors))

    def __call__(self, users: jax.Array, items: jax.Array) -> jax.Array:
        """Args: users int32[batch] in [0, num_users); items int32[batch] in [0, num_items).

        Returns: float32[batch] predictions.
        """
        return score_rows(gather_rows(self.variables["params"], users, items), None)


class EmbeddingDotBias(nn.Module):
    """The notebook's ``EmbeddingDotProdBias``.

    rating = sigmoid(<u, m> + b_u + b_m) * (high - low) + low, with every table uniform in
    [-0.01, 0.01) at the start, as the notebook's ``get_emb``.
    """

    num_users: int
    num_items: int
    n_factors: int = 50
    y_range: tuple[float, float] = (0.5, 5.0)

    def setup(self):
        init = uniform_init(-0.01, 0.01)
        self.user_embedding = self.param("user_embedding", init, (self.num_users, self.n_factors))
        self.item_embedding = self.param("item_embedding", init, (self.num_items, self.n_factors))
        self.user_bias = self.param("user_bias", init, (self.num_users, 1))
        self.item_bias = self.param("item_bias", init, (self.num_items, 1))

    def __call__(self, users: jax.Array, items: jax.Array) -> jax.Array:
        """Args: users int32[batch] in [0, num_users); items int32[batch] in [0, num_items).

        Returns: float32[batch] predictions in y_range.
        """
        return score_rows(gather_rows(self.variables["params"], users, items), self.y_range)


MODELS = {"dot": EmbeddingDot, "bias": EmbeddingDotBias}


def build(kind: str, num_users: int, num_items: int, n_factors: int, y_range=None) -> nn.Module:
    """Constructs a model by config name (``dot`` or ``bias``)."""
    if kind == "dot":
        return EmbeddingDot(num_users, num_items, n_factors)
    if kind == "bias":
        return EmbeddingDotBias(num_users, num_items, n_factors, tuple(float(v) for v in y_range))
    raise ValueError(f"unknown model kind {kind!r}; allowed: {', '.join(MODELS)}")


def init_params(model: nn.Module, key: jax.Array) -> Params:
    """Initial parameters as a flat dict of tables."""
    dummy = jnp.zeros((1,), jnp.int32)
    return dict(model.init(key, dummy, dummy)["params"])


def predict(model: nn.Module, params: Params, users: jax.Array, items: jax.Array) -> jax.Array:
    return model.apply({"params": params}, users, items)
