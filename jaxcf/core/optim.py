"""Optimizers by config name: optax transforms for the dense ones, row-sparse update rules for the others.

Dense (every row of every table is read and written at every step), built with optax:

``adam``       coupled L2, exactly ``torch.optim.Adam(weight_decay=wd)`` (the notebook's optimizer):
               ``wd * param`` is added to the gradient *before* the Adam moments.
``adamw``      decoupled decay, exactly ``torch.optim.AdamW``: ``param -= lr * wd * param`` beside
               the Adam step. With ``weight_decay=0`` it is the same optimizer as ``adam``.

Either may follow ``optim.schedule`` (a multiplier of the learning rate over the run, which scales
the decoupled decay too, as torch's schedulers do). Models trained side by side (``jaxcf.core.steps``'
members) carry their hyper-parameters in the optimizer state (``optax.inject_hyperparams``) so that
each member can have its own; :func:`transform` builds both forms from one factory.

Row-sparse (only the rows a batch touches are read and written; cost grows with the batch, not with
the tables; ``jaxcf.core.sparse`` runs them). These are *different optimizers* from the notebook's:

``lazy_adam``  Adam on the touched rows only. Gradients of an id repeated within a batch are summed
               first; the moments *and the bias-correction step count* are kept per row (a row's
               ``t`` is how many batches have touched it). Decoupled weight decay applies to touched
               rows only. TensorFlow's LazyAdam and ``torch.optim.SparseAdam`` also update touched
               rows only, but count steps per *table*, and SparseAdam has no weight decay.
``sgd``        plain row-sparse SGD: ``param -= lr * (grad + wd * param)`` on the touched rows, with
               repeated ids summed first; no state.

What does not live here: the row-sparse engine (``jaxcf.core.sparse``), the train step (``jaxcf.core.steps``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from jaxcf.core.config import OptimConfig
from jaxcf.core.errors import ConfigError
from jaxcf.core.sparse import LazyAdamTableState, RowSparse

# The hyper-parameters a member may hold in its optimizer state, by their optax names.
INJECTED = ("learning_rate", "weight_decay", "b1", "b2", "eps")


def _adamw(learning_rate, weight_decay, b1, b2, eps) -> optax.GradientTransformation:
    return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)


def _adam(learning_rate, weight_decay, b1, b2, eps) -> optax.GradientTransformation:
    # Coupled L2, as torch.optim.Adam(weight_decay=...): the decay joins the gradient before the moments.
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate, b1=b1, b2=b2, eps=eps))


# Small explicit tables, no name-based dispatch.
DENSE: dict[str, Callable[..., optax.GradientTransformation]] = {"adamw": _adamw, "adam": _adam}


def schedule_multiplier(name: str, total_steps: int) -> optax.Schedule:
    """The learning-rate multiplier of ``optim.schedule`` over ``total_steps`` optimizer steps."""
    if name == "constant":
        return optax.constant_schedule(1.0)
    if name == "cosine":
        return optax.cosine_decay_schedule(1.0, total_steps)
    if name == "onecycle":
        return optax.cosine_onecycle_schedule(total_steps, 1.0)
    raise ConfigError(f"optim.schedule: unknown value {name!r}; allowed: constant, cosine, onecycle")


def transform(config: OptimConfig, total_steps: int, injected: bool = False) -> optax.GradientTransformation:
    """The optax transform of a dense ``optim.name``, with its schedule over ``total_steps`` steps.

    Args:
      config: the optimizer section.
      total_steps: optimizer steps in the whole run (the schedule's length).
      injected: hold the hyper-parameters in the state (``optax.inject_hyperparams``), so that
        members trained side by side can differ in them. The plain form is what a single model
        uses: bit for bit the optimizer of the notebook's port (the injected form rounds the
        hyper-parameters to float32 before computing ``1 - b1`` and the like).

    Raises:
      ConfigError: for an optimizer that is not dense.
    """
    factory = DENSE.get(config.name)
    if factory is None:
        raise ConfigError(f"optim.name {config.name!r} is not a dense optimizer; allowed: {', '.join(DENSE)}")
    hyper = {name: getattr(config, name) for name in INJECTED}
    tx = optax.inject_hyperparams(factory)(**hyper) if injected else factory(**hyper)
    if config.schedule == "constant" and not injected:
        return tx
    return optax.chain(tx, optax.scale_by_schedule(schedule_multiplier(config.schedule, total_steps)))


def build(config: OptimConfig, total_steps: int) -> optax.GradientTransformation | RowSparse:
    """The optimizer for ``config.name``: an optax transform, or a :class:`jaxcf.core.sparse.RowSparse`.

    Raises:
      ConfigError: for an unknown name.
    """
    if config.name in ROW_SPARSE:
        return ROW_SPARSE[config.name](config)
    if config.name not in DENSE:
        raise ConfigError(f"unknown optimizer {config.name!r}; allowed: {', '.join(sorted([*DENSE, *ROW_SPARSE]))}")
    return transform(config, total_steps)


def lazy_adam(config: OptimConfig) -> RowSparse:
    """Row-sparse Adam with per-row moments and step counts, decoupled decay on touched rows."""
    lr, b1, b2, eps, wd = config.learning_rate, config.b1, config.b2, config.eps, config.weight_decay

    def init(params: Mapping[str, jax.Array]) -> dict[str, LazyAdamTableState]:
        return {
            name: LazyAdamTableState(jnp.zeros_like(table), jnp.zeros_like(table), jnp.zeros(table.shape[0], jnp.int32))
            for name, table in params.items()
        }

    def update_rows(rows, count, grads):
        param, mu, nu = rows
        count = count + 1
        t = count.astype(param.dtype)[:, None]
        mu = b1 * mu + (1 - b1) * grads
        nu = b2 * nu + (1 - b2) * grads * grads
        step = (mu / (1 - b1**t)) / (jnp.sqrt(nu / (1 - b2**t)) + eps)
        param = param - lr * (step + wd * param)
        return (param, mu, nu), count

    def to_slots(state, names):
        return [[state[n].mu for n in names], [state[n].nu for n in names]], [state[n].count for n in names]

    def from_slots(per_table):
        return {name: LazyAdamTableState(slots[0], slots[1], count) for name, (slots, count) in per_table.items()}

    return RowSparse(init, 2, True, update_rows, to_slots, from_slots)


def sgd(config: OptimConfig) -> RowSparse:
    """Row-sparse SGD: ``param -= lr * (summed grad + wd * param)`` on touched rows; no state."""
    lr, wd = config.learning_rate, config.weight_decay

    def update_rows(rows, count, grads):
        (param,) = rows
        return (param - lr * (grads + wd * param),), count

    return RowSparse(
        init=lambda params: {},
        slots=0,
        counted=False,
        update_rows=update_rows,
        to_slots=lambda state, names: ([], [None for _ in names]),
        from_slots=lambda per_table: {},
    )


ROW_SPARSE: dict[str, Callable[[OptimConfig], RowSparse]] = {"lazy_adam": lazy_adam, "sgd": sgd}
