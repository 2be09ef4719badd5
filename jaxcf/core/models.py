"""The notebook's two models: Flax modules, and the one copy of their scoring rule.

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
optimizer can differentiate with respect to the gathered rows only. :func:`score_pairs` (pairs of
indices) and :func:`score_block` (every item for a block of users) score a model or an ensemble whose
tables are stacked along a leading member axis (``float32[K, rows, d]``): the ensemble's prediction
is the mean of its members' (for biased members, the mean of their scaled sigmoids). Every
prediction jaxcf makes, in training, evaluation and inference, goes through these.

What does not live here: losses and training steps (``jaxcf.core.steps``), metrics (``jaxcf.core.metrics``).
"""

from __future__ import annotations

import functools
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


def _members(params: Mapping[str, jax.Array]) -> bool:
    """Whether the tables are stacked along a leading member axis."""
    return params["user_embedding"].ndim == 3


@functools.partial(jax.jit, static_argnames=("y_range", "per_member"))
def score_pairs(
    params: Mapping[str, jax.Array], users: jax.Array, items: jax.Array, y_range=None, per_member: bool = False
) -> jax.Array:
    """Predictions for (user, item) index pairs.

    Args:
      params: a model's tables (float32[rows, d]), or an ensemble's stacked (float32[K, rows, d]).
      users, items: int32[n] indices in range.
      y_range: the biased model's output range (a tuple: static); None for the dot model.
      per_member: for stacked tables, every member's predictions instead of their mean.

    Returns:
      float32[n], or float32[K, n] with ``per_member``.
    """

    def one(p):
        return score_rows(gather_rows(p, users, items), y_range)

    if not _members(params):
        return one(params)
    scores = jax.vmap(one)(params)
    return scores if per_member else jnp.mean(scores, axis=0)


def _block_one(params: Mapping[str, jax.Array], users: jax.Array, y_range) -> jax.Array:
    # HIGHEST: on GPUs a float32 matmul may otherwise run in TF32 and disagree with score_pairs.
    highest = jax.lax.Precision.HIGHEST
    logits = jnp.matmul(params["user_embedding"][users], params["item_embedding"].T, precision=highest)
    if y_range is None:
        return logits
    logits = logits + params["user_bias"][users] + params["item_bias"][:, 0][None, :]
    low, high = y_range
    return jax.nn.sigmoid(logits) * (high - low) + low


@functools.partial(jax.jit, static_argnames=("y_range",))
@functools.partial(jax.jit, static_argnames=("y_range",))
def score_block(params: Mapping[str, jax.Array], users: jax.Array, y_range=None) -> jax.Array:
    """Predicted ratings of every item for a block of users.

    For stacked dot members (no ``y_range``) the members' mean is one product contracted over members
    and factors together, ``einsum('sbf,sif->bi') / S``: the same sum, without a [S, B, items] array.

    Args:
      params: as for :func:`score_pairs`.
      users: int32[B] user indices.
      y_range: as for :func:`score_pairs`.

    Returns:
      float32[B, num_items]; for stacked tables, the members' mean.
    """
    if _members(params) and y_range is None:
        users_rows = jnp.take(params["user_embedding"], users, axis=1)
        total = jnp.einsum("sbf,sif->bi", users_rows, params["item_embedding"], precision=jax.lax.Precision.HIGHEST)
        return total / params["user_embedding"].shape[0]
    if _members(params):
        return jnp.mean(jax.vmap(lambda p: _block_one(p, users, y_range))(params), axis=0)
    return _block_one(params, users, y_range)


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


def build(num_users: int, num_items: int, n_factors: int, y_range=None) -> nn.Module:
    """The notebook's biased model when there is an output range ``y_range``, else its dot model."""
    if y_range is None:
        return EmbeddingDot(num_users, num_items, n_factors)
    return EmbeddingDotBias(num_users, num_items, n_factors, tuple(float(v) for v in y_range))


def init_params(model: nn.Module, key: jax.Array) -> Params:
    """Initial parameters as a flat dict of tables."""
    dummy = jnp.zeros((1,), jnp.int32)
    return dict(model.init(key, dummy, dummy)["params"])


def predict(model: nn.Module, params: Params, users: jax.Array, items: jax.Array) -> jax.Array:
    return model.apply({"params": params}, users, items)
