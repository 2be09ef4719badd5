"""K models in one compiled program: members trained side by side with ``jax.vmap``, as a family.

Members that differ only in *vmapped* keys (the seed and the continuous optimizer hyper-parameters in
:data:`VMAPPED`) train in one jitted program: one ``lax.scan`` per epoch over a ``vmap`` of the one
train step (``jaxcf.core.steps.make_members_epoch``), with ``learning_rate``, ``weight_decay``, ``b1``,
``b2`` and ``eps`` held per member in the optimizer state (``optax.inject_hyperparams``) and
``row_l2`` passed per member.

A member with seed ``s`` starts from exactly the parameters and batch order that a single model with
``seed: s`` uses, and takes the same steps up to float32 rounding of the injected hyper-parameters.
The data split is the caller's: all members see the same training and validation rows.

An ensemble (``ensemble.size: K``, method ``seeds``) is K members with seeds ``seed, seed+1, ...``;
its prediction is the mean of the members'. A sweep (``jaxcf.training.sweep``) is members from a grid, and
may let some of them diverge (``allow_diverged``): their metrics are NaN from then on.

The record of an epoch: the ensemble's metrics (``jaxcf.core.metrics.Evaluation`` of the mean of the healthy
members' predictions: ``valid_rmse`` and its siblings, ``test_*``), ``members`` (how many are
healthy) and per member ``member_valid_rmse``, ``member_valid_mae`` (each member answered as a model
of its own answers, fallbacks included; ``member_test_*`` when there is no validation part) and
``member_train_mse`` (lists of K floats; NaN for a diverged member).

What does not live here: the step and the epoch (``jaxcf.core.steps``), grids and the sweep CLI
(``jaxcf.training.sweep``), the loop (``jaxcf.training.loop``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcf.core import distributed, metrics, models, optim, rng, scoring, steps
from jaxcf.core.config import to_dict
from jaxcf.core.errors import ConfigError
from jaxcf.core.family import Family
from jaxcf.families.sgd import fit as sgd

# Keys whose values may differ between the members of one compiled program (besides the seed).
VMAPPED = ("optim.learning_rate", "optim.weight_decay", "optim.row_l2", "optim.b1", "optim.b2", "optim.eps")


class Member(NamedTuple):
    """One model of a program: its full config (``config.seed`` is its init and shuffle seed) and the
    grid point that made it (``{dotted key: value}``, without the seed)."""

    config: Any
    point: dict


def seed_members(config: Any) -> list[Member]:
    """The ``ensemble.size`` members of a seeds ensemble: the config with seeds seed, seed+1, ..."""
    return [
        Member(dataclasses.replace(config, seed=config.seed + k), {"seed": config.seed + k})
        for k in range(config.ensemble.size)
    ]


def static_part(config: Any) -> str:
    """The part of a config that must be equal within one compiled program (JSON, for grouping)."""
    raw = to_dict(config)
    raw.pop("seed")
    for key in VMAPPED:
        section, name = key.split(".")
        raw[section].pop(name)
    return json.dumps(raw, sort_keys=True)


def make_optimizer(config: Any, steps_per_epoch: int) -> optax.GradientTransformation:
    """The member optimizer: ``optim.name`` with its hyper-parameters injected into the state, then the
    schedule's multiplier.

    Raises:
      ConfigError: for an optimizer that cannot be vmapped (the row-sparse ones).
    """
    if config.optim.name not in optim.DENSE:
        raise ConfigError(
            f"optim.name {config.optim.name!r}: models trained side by side use adam or adamw; "
            f"the row-sparse optimizers hold their hyper-parameters outside the state"
        )
    return optim.transform(config.optim, steps_per_epoch * config.train.epochs, injected=True)


def init_members(setup: sgd.Setup, members: Sequence[Member], tx: optax.GradientTransformation) -> steps.TrainState:
    """Stacked initial states: member k's parameters are those of ``jaxcf.families.sgd.init_state`` with
    ``seed = members[k].config.seed``, and its injected hyper-parameters are its own."""
    keys = jnp.stack([jax.random.key_data(rng.stream(m.config.seed, "init")) for m in members])
    hyper = {name: jnp.asarray([getattr(m.config.optim, name) for m in members], jnp.float32)
             for name in optim.INJECTED}

    def init(key_data, member_hyper):
        params = models.init_params(setup.model, jax.random.wrap_key_data(key_data))
        params = {name: jnp.asarray(value, jnp.float32) for name, value in params.items()}
        opt_state = tx.init(params)
        injected = opt_state[0]._replace(hyperparams={**opt_state[0].hyperparams, **member_hyper})
        return steps.TrainState(params, (injected, *opt_state[1:]), jnp.zeros((), jnp.int32))

    return jax.vmap(init)(keys, hyper)


def family(
    setup: sgd.Setup, members: Sequence[Member], layout=None, *, allow_diverged: bool = False, method: str = "seeds"
) -> Family:
    """K members side by side.

    Args:
      setup: from ``jaxcf.families.sgd.make_setup`` for any member's config (the static part is read from it).
      members: the K members; they must share ``static_part``.
      layout: a mesh layout, or None for one device.
      allow_diverged: keep training when some members diverge (a sweep); else any divergence stops the run.
      method: recorded in the export (``seeds`` for an ensemble, ``sweep`` for a sweep's members).

    Raises:
      ConfigError: when the members do not share one static part, or the optimizer cannot be vmapped.
    """
    if len({static_part(m.config) for m in members}) != 1:
        raise ConfigError("members of one program may differ only in seed and " + ", ".join(VMAPPED))
    config = setup.config
    ratings = setup.dataset.ratings
    train = setup.train_rows
    evaluation = metrics.Evaluation.of(setup.dataset, setup.y_range)
    role = "valid" if evaluation.has("valid") else "test" if evaluation.has("test") else None
    tx = make_optimizer(config, setup.steps_per_epoch)
    l2 = jnp.asarray([m.config.optim.row_l2 for m in members], jnp.float32)
    users, items, targets = ratings.users[train], ratings.items[train], ratings.ratings[train]
    if layout is None:
        users, items, targets = jnp.asarray(users), jnp.asarray(items), jnp.asarray(targets)
        epoch_fn = steps.make_members_epoch(tx, setup.y_range, config.train.batch_size)
    else:
        body = steps.make_epoch_body(tx, setup.y_range, row_l2=True)
        epoch_fn = distributed.ShardedEpoch(layout, body, config.train.batch_size, members=True,
                                            row_axes=distributed.member_row_axes)
    y_range = setup.y_range
    predict = scoring.pair_predictor(lambda p, u, i: models.score_pairs(p, u, i, y_range, per_member=True),
                                     evaluation.users, evaluation.items, config.train.eval_batch_size, layout)
    check_finite = jax.jit(sgd.finite_tables) if layout is None else (lambda p: layout.fetch(sgd.finite_tables, p))
    order_keys = [rng.stream(m.config.seed, "order") for m in members]
    seeds = [m.config.seed for m in members]
    too_far = sgd.absurd_rmse(ratings.ratings[train])

    def epoch(state, number):
        orders = np.stack([steps.shuffle_order(key, number, len(train), config.train.batch_size)
                           for key in order_keys])
        state, losses = epoch_fn(state, l2, users, items, targets, orders)
        return state, np.asarray(losses)  # the one host sync of the epoch

    def record(state, number, losses, carry, evaluate=True):
        diverged = np.asarray(carry.get("diverged", [False] * len(members)), bool)
        diverged |= ~np.all(np.isfinite(losses), axis=1) | ~np.asarray(check_finite(state.params), bool)
        member: list[dict] = [{} for _ in members]
        if evaluate:
            predictions = predict(state.params).astype(np.float64)
            predictions[diverged] = np.nan
            member = [evaluation.metrics(p) if not d and role else {} for p, d in zip(predictions, diverged)]
            if role:  # NaN or far outside the ratings' scale, from the members' own predictions
                rows_rmse = np.asarray([m.get(f"{role}_rmse_rows", np.nan) for m in member])
                diverged |= ~(rows_rmse <= too_far)
        healthy = ~diverged
        record = {
            "epoch": number + 1,
            "train_loss": float(np.mean(losses[healthy])) if healthy.any() else math.nan,
            "members": int(healthy.sum()),
            "member_train_mse": np.where(diverged, np.nan, np.mean(losses, axis=1)).tolist(),
        }
        if diverged.any() and not allow_diverged:  # the loop decides; a sweep lets members go
            bad = ", ".join(str(s) for s, d in zip(seeds, diverged) if d)
            record["diverged"] = f"the member(s) with seed {bad} diverged"
        elif not healthy.any():
            record["diverged"] = "every member diverged"
        elif evaluate:
            record.update(evaluation.metrics(predictions[healthy].mean(axis=0)))
            if role:
                for name in ("rmse", "mae"):
                    record[f"member_{role}_{name}"] = [np.nan if d else m[f"{role}_{name}"]
                                                       for m, d in zip(member, diverged)]
        return record, {"diverged": diverged.tolist()}

    return Family(
        name=config.model.kind,
        init=lambda: init_members(setup, members, tx),
        epoch=epoch,
        record=record,
        params=lambda state: state.params,
        row_axes=distributed.member_row_axes,
        final=lambda params: metrics.final_metrics(setup.dataset, y_range, params),
        model_info=sgd.model_info(setup, len(members), method),
        divergence_hint=sgd.divergence_hint(ratings.ratings[train], setup.y_range),
        check_losses=False,  # a member's divergence is named (or tolerated, in a sweep) by the record
    )


def healthy_mean(values: list[float]) -> float:
    """The mean of the finite values (NaN when none)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan
