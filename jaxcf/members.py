"""K models in one compiled program: SGD members trained side by side with ``jax.vmap``.

Members that differ only in *vmapped* keys (the seed and the continuous optimizer hyper-parameters in
:data:`VMAPPED`) train in one jitted program: one ``lax.scan`` per epoch over a ``vmap`` of the train
step, with ``learning_rate``, ``weight_decay``, ``b1``, ``b2`` and ``eps`` held per member in the
optimizer state (``optax.inject_hyperparams``) and ``row_l2`` passed per member.

A member with seed ``s`` starts from exactly the parameters and batch order that ``python -m
jaxcf.train`` uses with ``seed: s``, and with ``row_l2 = 0`` and a constant schedule takes the same
steps (up to float32 rounding of the injected hyper-parameters). The data split is the caller's: all
members of a program see the same training and validation rows.

The loss may add ``row_l2`` times the L2 norm of every row a batch gathers (Surprise-style, once
per rating), and the learning rate may follow ``optim.schedule``; ``jaxcf.train`` implements
neither, so configs that use them are trained here (``jaxcf.ensemble``).

What does not live here: the single-model loop (``jaxcf.train``), grids and the sweep CLI
(``jaxcf.sweep``), ensemble workdirs and exports (``jaxcf.ensemble``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcf import evaluate, models, steps, train
from jaxcf.config import Config, ConfigError, to_dict
from jaxcf.data import Dataset

# Keys whose values may differ between the members of one compiled program (besides the seed).
VMAPPED = ("optim.learning_rate", "optim.weight_decay", "optim.row_l2", "optim.b1", "optim.b2", "optim.eps")
# The injected optimizer hyper-parameters (a subset of VMAPPED, by their optax names).
INJECTED = ("learning_rate", "weight_decay", "b1", "b2", "eps")


def _adamw(learning_rate, weight_decay, b1, b2, eps) -> optax.GradientTransformation:
    return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)


def _adam(learning_rate, weight_decay, b1, b2, eps) -> optax.GradientTransformation:
    # Coupled L2, as torch.optim.Adam(weight_decay=...) and jaxcf.optim.dense("adam").
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate, b1=b1, b2=b2, eps=eps))


FACTORIES: dict[str, Callable[..., optax.GradientTransformation]] = {"adamw": _adamw, "adam": _adam}


def schedule_multiplier(name: str, total_steps: int) -> optax.Schedule:
    """The learning-rate multiplier of ``optim.schedule`` over ``total_steps`` optimizer steps."""
    if name == "constant":
        return optax.constant_schedule(1.0)
    if name == "cosine":
        return optax.cosine_decay_schedule(1.0, total_steps)
    if name == "onecycle":
        return optax.cosine_onecycle_schedule(total_steps, 1.0)
    raise ConfigError(f"optim.schedule: unknown value {name!r}; allowed: constant, cosine, onecycle")


def make_optimizer(config: Config, steps_per_epoch: int) -> optax.GradientTransformation:
    """The member optimizer: ``optim.name`` with its hyper-parameters injected into the state, then the
    schedule's multiplier (which scales the decoupled decay too, as torch's schedulers do).

    Raises:
      ConfigError: for an optimizer that cannot be vmapped (the row-sparse ones).
    """
    factory = FACTORIES.get(config.optim.name)
    if factory is None:
        raise ConfigError(
            f"optim.name {config.optim.name!r}: models trained side by side use adam or adamw; "
            f"the row-sparse optimizers hold their hyper-parameters outside the state"
        )
    hyper = {name: getattr(config.optim, name) for name in INJECTED}
    multiplier = schedule_multiplier(config.optim.schedule, steps_per_epoch * config.train.epochs)
    return optax.chain(optax.inject_hyperparams(factory)(**hyper), optax.scale_by_schedule(multiplier))


def make_member_step(tx: optax.GradientTransformation, y_range: tuple[float, float] | None) -> Callable:
    """A pure ``(state, row_l2, users, items, ratings, weights) -> (state, mse)`` for one member.

    The loss is ``jaxcf.steps.weighted_mse`` plus ``row_l2 * sum(w * |row|^2) / sum(w)`` over every
    gathered row (the user's and the item's embedding and bias): Surprise-style L2 on the rows the batch
    touches, once per rating. With ``row_l2 = 0`` the gradient is exactly that of ``jaxcf.train``.
    The returned loss is the MSE alone, as ``jaxcf.train`` reports it.
    """

    def step(state, row_l2, users, items, ratings, weights):
        def loss_fn(params):
            rows = models.gather_rows(params, users, items)
            mse = steps.weighted_mse(models.score_rows(rows, y_range), ratings, weights)
            penalty = sum(jnp.sum(weights[:, None] * row * row) for row in rows.values()) / jnp.sum(weights)
            return mse + row_l2 * penalty, mse

        (_, mse), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return steps.TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1), mse

    return step


def make_members_epoch(tx: optax.GradientTransformation, y_range, batch_size: int) -> Callable:
    """A jitted ``(state[K], row_l2 float32[K], users, items, ratings, orders int32[K, n]) ->
    (state[K], float32[K, num_batches] losses)``: one epoch of K members, one ``lax.scan`` over a
    ``vmap`` of the step. Each member has its own batch order; the state is donated."""
    step = make_member_step(tx, y_range)

    def epoch(state, row_l2, users, items, ratings, order):
        xs = steps.epoch_batches(users, items, ratings, order, batch_size)
        return jax.lax.scan(lambda state, batch: step(state, row_l2, *batch), state, xs)

    return jax.jit(jax.vmap(epoch, in_axes=(0, 0, None, None, None, 0)), donate_argnums=(0,))


def _vmapped_scores(y_range) -> Callable:
    @jax.jit
    def scores(params, users, items):
        """float32[K, n]: every member's prediction for the pairs."""
        return jax.vmap(lambda p: models.score_rows(models.gather_rows(p, users, items), y_range))(params)

    return scores


def member_scores(
    params: dict[str, jax.Array], y_range, users: np.ndarray, items: np.ndarray, chunk: int
) -> np.ndarray:
    """Every member's predictions for index pairs, in chunks of ``chunk`` pairs.

    Args:
      params: stacked tables, ``name -> float32[K, rows, d]``.
      users, items: int32[n] indices.

    Returns:
      float32[K, n] on the host.
    """
    fn = _vmapped_scores(y_range)
    k = next(iter(params.values())).shape[0]
    n = len(users)
    chunk = max(1, min(chunk, n))
    out = np.empty((k, n), np.float32)
    for start in range(0, n, chunk):
        u, i = users[start : start + chunk], items[start : start + chunk]
        size = len(u)
        u, i = np.pad(u, (0, chunk - size)), np.pad(i, (0, chunk - size))
        out[:, start : start + size] = np.asarray(fn(params, jnp.asarray(u, jnp.int32), jnp.asarray(i, jnp.int32)))[
            :, :size
        ]
    return out


# ----------------------------------------------------------------------------------- members


class Member(NamedTuple):
    """One model of a sweep: its full config (``config.seed`` is its init and shuffle seed) and the
    grid point that made it (``{dotted key: value}``, without the seed)."""

    config: Config
    point: dict


def static_part(config: Config) -> str:
    """The part of a config that must be equal within one compiled program (JSON, for grouping)."""
    raw = to_dict(config)
    raw.pop("seed")
    for key in VMAPPED:
        section, name = key.split(".")
        raw[section].pop(name)
    return json.dumps(raw, sort_keys=True)


def init_members(setup: train.Setup, members: Sequence[Member], tx: optax.GradientTransformation) -> steps.TrainState:
    """Stacked initial states: member k's parameters are those of ``jaxcf.train.init_state`` with
    ``seed = members[k].config.seed``, and its injected hyper-parameters are its own."""
    seeds = [m.config.seed for m in members]
    keys = jnp.stack([jax.random.key_data(jax.random.fold_in(jax.random.key(s), 0)) for s in seeds])
    hyper = {name: jnp.asarray([getattr(m.config.optim, name) for m in members], jnp.float32) for name in INJECTED}

    def init(key_data, member_hyper):
        params = models.init_params(setup.model, jax.random.wrap_key_data(key_data))
        params = {name: jnp.asarray(value, jnp.float32) for name, value in params.items()}
        opt_state = tx.init(params)
        injected = opt_state[0]._replace(hyperparams={**opt_state[0].hyperparams, **member_hyper})
        return steps.TrainState(params, (injected, *opt_state[1:]), jnp.zeros((), jnp.int32))

    return jax.vmap(init)(keys, hyper)


@dataclasses.dataclass
class MembersResult:
    """What :func:`fit_members` returns.

    Attributes:
      state: the final stacked state (``params`` tables are float32[K, rows, d]).
      history: one record per epoch: the ensemble's ``valid_rmse``/``valid_mse``/``valid_mae`` (the
        mean of the K members' predictions), and per member ``member_valid_rmse``,
        ``member_valid_mae`` and ``member_train_mse`` (lists of K floats; NaN for a diverged member).
      best_epoch: the epoch with the lowest ensemble valid RMSE.
      best_params: the parameters of ``best_epoch`` when early stopping is on, else None.
      diverged: bool[K], members whose loss became NaN or infinite (their metrics are NaN from then on).
      predictions: float32[K, n_valid] the last epoch's validation predictions.
      stopped_early: whether early stopping ended the run.
    """

    state: steps.TrainState
    history: list[dict]
    best_epoch: int
    best_params: Any
    diverged: np.ndarray
    predictions: np.ndarray
    stopped_early: bool = False


def fit_members(
    config: Config,
    dataset: Dataset,
    members: Sequence[Member],
    *,
    on_epoch: Callable[[dict], None] | None = None,
    show_progress: bool = False,
) -> MembersResult:
    """Trains K members that share ``static_part`` in one vmapped program.

    Args:
      config: any member's config (the static part is read from it; seeds and vmapped keys from each
        member). ``train.early_stopping_patience`` watches the *ensemble's* valid RMSE and keeps the
        parameters of its best epoch.
      dataset: ratings and the (shared) split.
      members: the K members.
      on_epoch: called with each epoch's record.
      show_progress: a tqdm bar over epochs on stderr.

    Returns:
      :class:`MembersResult`.

    Raises:
      ConfigError: when the members do not share one static part, or the optimizer cannot be vmapped.
    """
    from tqdm.auto import tqdm

    if len({static_part(m.config) for m in members}) != 1:
        raise ConfigError("members of one program may differ only in seed and " + ", ".join(VMAPPED))
    setup = train.make_setup(config, dataset)
    ratings = dataset.ratings
    train_rows, valid_rows = setup.train_rows, dataset.split.valid
    n = len(train_rows)
    tx = make_optimizer(config, steps.num_batches(n, config.train.batch_size))
    state = init_members(setup, members, tx)
    epoch_fn = make_members_epoch(tx, setup.y_range, config.train.batch_size)
    row_l2 = jnp.asarray([m.config.optim.row_l2 for m in members], jnp.float32)
    users, items = jnp.asarray(ratings.users[train_rows]), jnp.asarray(ratings.items[train_rows])
    targets = jnp.asarray(ratings.ratings[train_rows])
    valid_users, valid_items = ratings.users[valid_rows], ratings.items[valid_rows]
    valid_targets = ratings.ratings[valid_rows].astype(np.float64)
    shuffle_keys = [jax.random.fold_in(jax.random.key(m.config.seed), 1) for m in members]
    patience = config.train.early_stopping_patience
    diverged = np.zeros(len(members), bool)
    history: list[dict] = []
    best_epoch, best_rmse, best_params, stopped = 0, math.inf, None, False

    bar = tqdm(total=config.train.epochs, disable=not show_progress, desc="members", unit="epoch", leave=False,
               file=sys.stderr)
    for epoch in range(config.train.epochs):
        start = time.perf_counter()
        orders = np.stack([steps.shuffle_order(key, epoch, n, config.train.batch_size) for key in shuffle_keys])
        state, losses = epoch_fn(state, row_l2, users, items, targets, orders)
        losses = np.asarray(losses)  # the one host sync of the epoch
        train_seconds = time.perf_counter() - start
        diverged |= ~np.all(np.isfinite(losses), axis=1)
        predictions = member_scores(state.params, setup.y_range, valid_users, valid_items,
                                    config.train.eval_batch_size).astype(np.float64)
        predictions[diverged] = np.nan
        errors = predictions - valid_targets[None]
        member_rmse = np.sqrt(np.mean(errors**2, axis=1))
        healthy = ~diverged
        mean_prediction = predictions[healthy].mean(axis=0) if healthy.any() else np.full(len(valid_rows), np.nan)
        valid_mse = evaluate.mse(mean_prediction, valid_targets)
        record = {
            "epoch": epoch + 1,
            "train_loss": float(np.mean(losses[healthy])) if healthy.any() else math.nan,
            "valid_mse": valid_mse,
            "valid_rmse": math.sqrt(valid_mse),
            "valid_mae": evaluate.mae(mean_prediction, valid_targets),
            "members": int(healthy.sum()),
            "member_valid_rmse": member_rmse.tolist(),
            "member_valid_mae": np.mean(np.abs(errors), axis=1).tolist(),
            "member_train_mse": np.where(diverged, np.nan, np.mean(losses, axis=1)).tolist(),
            "train_seconds": train_seconds,
            "seconds": time.perf_counter() - start,
        }
        history.append(record)
        if record["valid_rmse"] < best_rmse:
            best_epoch, best_rmse = epoch + 1, record["valid_rmse"]
            if patience:
                best_params = jax.tree.map(jnp.copy, state.params)
        bar.update(1)
        bar.set_postfix(valid_rmse=f"{record['valid_rmse']:.4f}")
        if on_epoch is not None:
            on_epoch(record)
        if patience and epoch + 1 - best_epoch >= patience:
            stopped = True
            break
    bar.close()
    return MembersResult(state, history, best_epoch, best_params, diverged, predictions.astype(np.float32), stopped)
