"""One model trained by a gradient optimizer (the notebook's way): its setup and its family.

:func:`make_setup` derives everything training needs from a config and a dataset (the output range,
the Flax module, the optimizer, the training rows ordered by user); :func:`init_state` is the seeded
initial state; :func:`family` is what the one loop (``jaxcf.training.loop``) runs: an epoch is one
compiled ``lax.scan`` (``jaxcf.core.steps``) over the epoch's shuffled batches, on one device or a mesh.

The record of an epoch: ``train_loss`` (the notebook's debiased moving average of batch losses,
momentum 0.98), ``train_mse_epoch_mean``, the validation and test metrics of ``jaxcf.core.metrics.Evaluation``
(``valid_rmse`` over every validation rating answered as ``predict`` answers it, ``valid_rmse_known``,
``valid_rmse_rows`` the notebook's way, ...; ``test_*`` likewise) and ``valid_loss_notebook`` (the
notebook's mean of per-batch means over batches of 128, from the table rows).

What does not live here: K models side by side (``jaxcf.families.members``), the loop (``jaxcf.training.loop``),
the step and the epoch (``jaxcf.core.steps``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcf.core import distributed, metrics, models, optim, rng, scoring, steps
from jaxcf.core.errors import DataError
from jaxcf.core.family import SIGMOID, Family
from jaxcf.data import Dataset
from jaxcf.families.sgd import BIAS, DOT


@dataclasses.dataclass
class Setup:
    """Everything derived from a config and a dataset before training starts."""

    config: Any
    dataset: Dataset
    model: Any
    y_range: tuple[float, float] | None
    optimizer: Any

    # The training rows ordered by user (stably: file order within a user), so that batches whose
    # positions ascend touch the user table in ascending order (see steps.shuffle_order).
    train_rows: np.ndarray

    @property
    def valid_rows(self) -> np.ndarray:
        return self.dataset.split.valid

    @property
    def steps_per_epoch(self) -> int:
        return steps.num_batches(len(self.train_rows), self.config.train.batch_size)


def spec_of(config: Any):
    """The spec of the kind this module trains (``bias`` or ``dot``)."""
    return BIAS if config.model.kind == BIAS.name else DOT


def output_range(config: Any, dataset: Dataset) -> tuple[float, float] | None:
    """The biased model's output range: ``model.y_range``, else (min, max) of the ratings; None for dot.

    Raises:
      DataError: when every rating is the same, so that (min, max) is empty.
    """
    if spec_of(config).scoring != SIGMOID:
        return None
    ratings = dataset.ratings
    y_range = config.model.y_range or ratings.rating_range
    if not y_range[0] < y_range[1]:
        raise DataError(
            f"{ratings.source}: every rating is {y_range[0]}, so the biased model's range "
            "(min, max) is empty; set model.y_range: [low, high] or use model.kind: dot"
        )
    return float(y_range[0]), float(y_range[1])


def make_setup(config: Any, dataset: Dataset) -> Setup:
    ratings = dataset.ratings
    y_range = output_range(config, dataset)
    model = models.build(ratings.num_users, ratings.num_items, config.model.n_factors, y_range)
    train_rows = steps.rows_by_user(ratings.users, dataset.split.train)
    steps.check_batch_size(config.train.batch_size, len(train_rows))
    total = steps.num_batches(len(train_rows), config.train.batch_size) * config.train.epochs
    return Setup(config, dataset, model, y_range, optim.build(config.optim, total), train_rows)


def init_state(setup: Setup, params: dict[str, jax.Array] | None = None) -> steps.TrainState:
    """Initial state; ``params`` injects weights (e.g. PyTorch's) instead of the seeded init."""
    if params is None:
        params = models.init_params(setup.model, rng.stream(setup.config.seed, "init"))
    params = {name: jnp.asarray(value, jnp.float32) for name, value in params.items()}
    return steps.TrainState(params, setup.optimizer.init(params), jnp.zeros((), jnp.int32))


def divergence_hint(ratings: np.ndarray, y_range: tuple[float, float] | None = None) -> str:
    """What to change after a divergence: the learning rate, or the scale (the data's or the biased model's
    output range) when that is the cause."""
    largest = float(np.max(np.abs(ratings))) if len(ratings) else 0.0
    if largest > 1e4:
        return (f"the ratings reach {largest:.3g}, a scale at which squared errors overflow float32; rescale "
                "them (e.g. to 0-5) or lower optim.learning_rate")
    if y_range is not None and max(abs(y_range[0]), abs(y_range[1])) > max(1e4, 100 * largest):
        return (f"model.y_range {list(y_range)} is far wider than the ratings (up to {largest:.3g}), so predictions "
                "and squared errors overflow float32; set it to the ratings' range (or null for their min and max)")
    return "lower optim.learning_rate"


def absurd_rmse(ratings: np.ndarray) -> float:
    """A validation RMSE above this means the model has left the ratings' scale: it diverged.

    Ten times the ratings' range (or their magnitude, when every rating is the same). The biased
    model's predictions stay inside its output range, so only the dot model can get there.
    """
    low, high = float(np.min(ratings)), float(np.max(ratings))
    return 10.0 * max(high - low, abs(high), 1.0)


def finite_tables(params) -> jax.Array:
    """bool[] (bool[K] for stacked members): every table entry finite."""
    def one(p):
        return jnp.all(jnp.stack([jnp.all(jnp.isfinite(t)) for t in jax.tree.leaves(p)]))

    if params["user_embedding"].ndim == 3:
        return jax.vmap(one)(params)
    return one(params)


def model_info(setup: Setup, members: int | None = None, method: str | None = None) -> dict:
    info = spec_of(setup.config).model_info(
        n_factors=setup.config.model.n_factors, y_range=list(setup.y_range) if setup.y_range else None,
        num_users=setup.dataset.ratings.num_users, num_items=setup.dataset.ratings.num_items)
    if members is not None:
        info.update(ensemble_size=members, ensemble_method=method)
    return info


def family(setup: Setup, layout=None, orders: Callable[[int], np.ndarray] | None = None) -> Family:
    """The one-model family.

    Args:
      setup: from :func:`make_setup`.
      layout: a ``jaxcf.core.distributed.Layout``, or None for one device.
      orders: ``epoch -> int32[n_train]`` positions into the training rows, instead of the seeded
        shuffle (the parity suite feeds torch's batch order through this).
    """
    config = setup.config
    ratings = setup.dataset.ratings
    train = setup.train_rows
    evaluation = metrics.Evaluation.of(setup.dataset, setup.y_range)
    row_l2 = config.optim.row_l2 > 0
    l2 = jnp.float32(config.optim.row_l2)
    users, items, targets = ratings.users[train], ratings.items[train], ratings.ratings[train]
    if layout is None:
        users, items, targets = jnp.asarray(users), jnp.asarray(items), jnp.asarray(targets)
        epoch_fn = steps.make_train_epoch(setup.optimizer, setup.y_range, config.train.batch_size, row_l2=row_l2)
    else:  # host arrays: every process keeps the training rows and copies only its part of each batch
        body = steps.make_epoch_body(setup.optimizer, setup.y_range, row_l2=row_l2)
        epoch_fn = distributed.ShardedEpoch(layout, body, config.train.batch_size)
    y_range = setup.y_range
    predict = scoring.pair_predictor(lambda p, u, i: models.score_pairs(p, u, i, y_range), evaluation.users,
                                     evaluation.items, config.train.eval_batch_size, layout)
    check_finite = jax.jit(finite_tables) if layout is None else (lambda p: layout.fetch(finite_tables, p))
    order_key = rng.stream(config.seed, "order")

    def epoch(state, number):
        order = orders(number) if orders is not None else shuffle(number)
        state, losses = epoch_fn(state, l2, users, items, targets, np.asarray(order, np.int32))
        return state, np.asarray(losses)  # the one host sync of the epoch

    def shuffle(number):
        return steps.shuffle_order(order_key, number, len(train), config.train.batch_size)

    def record(state, number, losses, carry, evaluate=True):
        avg, count, train_loss = metrics.debiased_ema(carry.get("avg_loss", 0.0), carry.get("batch_num", 0), losses)
        record = {"epoch": number + 1, "train_loss": train_loss,
                  "train_mse_epoch_mean": float(np.mean(losses, dtype=np.float64))}
        if evaluate:
            predictions = predict(state.params)
            record.update(evaluation.metrics(predictions))
            if evaluation.has("valid"):
                part = evaluation.part("valid")
                record["valid_loss_notebook"] = metrics.batch_mean_mse(predictions[part], evaluation.targets[part],
                                                                       128)
        return record, {"avg_loss": avg, "batch_num": count}

    return Family(
        name=config.model.kind,
        init=lambda: init_state(setup),
        epoch=epoch,
        record=record,
        params=lambda state: state.params,
        row_axes=distributed.single_row_axes,
        final=lambda params: metrics.final_metrics(setup.dataset, y_range, params),
        model_info=model_info(setup),
        finite=lambda state: check_finite(state.params),
        divergence_hint=divergence_hint(ratings.ratings[train], setup.y_range),
        scale=absurd_rmse(ratings.ratings[train]),
    )
