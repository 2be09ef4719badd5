"""Optimizer construction: dense optax transforms and a row-sparse ``lazy_adam``.

``adam``       coupled L2, exactly ``torch.optim.Adam(weight_decay=wd)`` (the notebook's optimizer):
               ``wd * param`` is added to the gradient *before* the Adam moments, so every row of
               every table decays and carries momentum at every step.
``adamw``      decoupled decay, exactly ``torch.optim.AdamW``: ``param -= lr * wd * param`` beside
               the Adam step. With ``weight_decay=0`` it is the same optimizer as ``adam``.
``lazy_adam``  row-sparse Adam (TensorFlow's LazyAdam, torch's SparseAdam): only the rows a batch
               touches are read and written. Gradients for ids repeated within a batch are summed
               first; moments and the bias-correction step count are kept per row; decoupled weight
               decay applies to touched rows only. It is *not* the notebook's optimizer: rows that
               a batch does not touch keep their momentum frozen instead of coasting on it.

What does not live here: the train step that calls these (``jaxcf.train``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxcf.config import OptimConfig
from jaxcf.models import USER_TABLES


def dense(config: OptimConfig) -> optax.GradientTransformation:
    """The optax transform for a dense optimizer name (``adam`` or ``adamw``)."""
    if config.name == "adam":
        return optax.chain(
            optax.add_decayed_weights(config.weight_decay),
            optax.adam(config.learning_rate, b1=config.b1, b2=config.b2, eps=config.eps),
        )
    if config.name == "adamw":
        return optax.adamw(
            config.learning_rate, b1=config.b1, b2=config.b2, eps=config.eps,
            weight_decay=config.weight_decay,
        )
    raise ValueError(f"{config.name!r} is not a dense optimizer; allowed: adam, adamw")


class LazyAdamTableState(NamedTuple):
    mu: jax.Array  # float32[rows, d] first moment
    nu: jax.Array  # float32[rows, d] second moment
    count: jax.Array  # int32[rows] how many updates each row has received


class RowSparse(NamedTuple):
    """A row-sparse optimizer: ``init(params)`` and ``update(params, state, row_grads, users, items)``.

    ``row_grads[name]`` is float32[batch, d], the gradient with respect to the gathered rows; an id
    of ``-1`` marks a padding entry that must not touch any row.
    """

    init: Callable
    update: Callable


def sum_duplicate_rows(ids: jax.Array, grads: jax.Array, num_rows: int) -> tuple[jax.Array, jax.Array]:
    """Sums gradients of ids repeated within a batch.

    Args:
      ids: int32[batch] row ids; negative ids are padding.
      grads: float32[batch, d].
      num_rows: table size; used as the fill id for unused slots.

    Returns:
      (unique_ids int32[batch], filled with ``num_rows`` past the distinct ids,
       summed float32[batch, d], zero in unused slots).
    """
    ids = jnp.where(ids < 0, num_rows, ids)
    unique_ids, inverse = jnp.unique(ids, size=ids.shape[0], fill_value=num_rows, return_inverse=True)
    summed = jax.ops.segment_sum(grads, inverse.reshape(-1), num_segments=ids.shape[0])
    return unique_ids, summed


def lazy_adam(config: OptimConfig) -> RowSparse:
    lr, b1, b2, eps, wd = config.learning_rate, config.b1, config.b2, config.eps, config.weight_decay

    def init(params: Mapping[str, jax.Array]) -> dict[str, LazyAdamTableState]:
        return {
            name: LazyAdamTableState(
                jnp.zeros_like(table), jnp.zeros_like(table), jnp.zeros(table.shape[0], jnp.int32)
            )
            for name, table in params.items()
        }

    def update_table(table, state: LazyAdamTableState, ids, grads):
        num_rows = table.shape[0]
        rows, g = sum_duplicate_rows(ids, grads, num_rows)
        # Slots past the distinct ids hold num_rows: out of bounds, so reads fill and writes drop.
        p = table.at[rows].get(mode="fill", fill_value=0)
        mu = b1 * state.mu.at[rows].get(mode="fill", fill_value=0) + (1 - b1) * g
        nu = b2 * state.nu.at[rows].get(mode="fill", fill_value=0) + (1 - b2) * g * g
        count = state.count.at[rows].get(mode="fill", fill_value=0) + 1
        t = count.astype(table.dtype)[:, None]
        mu_hat = mu / (1 - b1**t)
        nu_hat = nu / (1 - b2**t)
        new_p = p - lr * (mu_hat / (jnp.sqrt(nu_hat) + eps) + wd * p)
        return (
            table.at[rows].set(new_p, mode="drop"),
            LazyAdamTableState(
                state.mu.at[rows].set(mu, mode="drop"),
                state.nu.at[rows].set(nu, mode="drop"),
                state.count.at[rows].set(count, mode="drop"),
            ),
        )

    def update(params, state, row_grads, users, items):
        new_params, new_state = {}, {}
        for name, table in params.items():
            ids = users if name in USER_TABLES else items
            new_params[name], new_state[name] = update_table(table, state[name], ids, row_grads[name])
        return new_params, new_state

    return RowSparse(init, update)


def build(config: OptimConfig) -> optax.GradientTransformation | RowSparse:
    """The optimizer for ``config.name``; a small explicit table, no name-based dispatch."""
    if config.name in ("adam", "adamw"):
        return dense(config)
    if config.name == "lazy_adam":
        return lazy_adam(config)
    raise ValueError(f"unknown optimizer {config.name!r}; allowed: adam, adamw, lazy_adam")
