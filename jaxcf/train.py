"""Training: the train step, a whole epoch as one compiled ``lax.scan``, the fit loop, and the CLI.

    python -m jaxcf.train --config configs/bias.yaml [--set key=value ...] [--workdir DIR]
                          [--resume] [--quiet]

The ratings go onto the device once. Each epoch is one jitted call: the epoch's permutation is
applied on the device, the batches are scanned, and the state buffers are donated. The host syncs
once per epoch (batch losses for the notebook's smoothed loss, the NaN check, validation, logging).

The last partial batch is trained on, as torch's DataLoader does (80,004 training ratings give 1,250
batches of 64 and one of 4): it is padded to the batch size with zero-weight entries, and the loss
is ``sum(w * err**2) / sum(w)``, so its gradient is exactly that of the 4 real ratings.

What does not live here: models (``jaxcf.models``), optimizers (``jaxcf.optim``), metrics
(``jaxcf.evaluate``), checkpoint formats (``jaxcf.checkpoint``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import fcntl
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcf import checkpoint, distributed, evaluate, export, models, optim
from jaxcf.config import Config, ConfigError, dump, load, to_dict, uses_ensemble_trainer
from jaxcf.data import DataError, Dataset
from jaxcf.data import load as load_dataset
from jaxcf.fileio import atomic_write_text

log = logging.getLogger("jaxcf.train")


class TrainState(NamedTuple):
    params: dict[str, jax.Array]
    opt_state: Any
    step: jax.Array  # int32[] optimizer steps taken


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


class WorkdirError(ValueError):
    """A workdir that cannot be used as asked; the message is one line meant for the user."""


# Ratings per chunk of a dense row-sparse step (see make_packed_sparse_step): [16384, 51] float32
# rows and gradients are 3.3 MB each, which stay in a 32 MiB L3 cache.
DENSE_CHUNK = 16_384


def weighted_mse(predictions: jax.Array, ratings: jax.Array, weights: jax.Array) -> jax.Array:
    """MSE over the entries with weight 1; padding entries (weight 0) contribute nothing."""
    err = predictions - ratings
    return jnp.sum(weights * err * err) / jnp.sum(weights)


def make_train_step(optimizer, y_range: tuple[float, float] | None) -> Callable:
    """A pure ``(state, users, items, ratings, weights) -> (state, loss)`` for one batch."""

    def loss_of_rows(rows, ratings, weights):
        return weighted_mse(models.score_rows(rows, y_range), ratings, weights)

    if isinstance(optimizer, optim.RowSparse):
        packed_step = make_packed_sparse_step(optimizer, y_range)

        def sparse_step(state, users, items, ratings, weights):
            # One step packs and unpacks the tables; make_train_epoch packs once per epoch instead.
            packed = optim.pack(optimizer, state.params, state.opt_state)
            packed, loss = packed_step(packed, users, items, ratings, weights)
            params, opt_state = optim.unpack(optimizer, packed)
            return TrainState(params, opt_state, state.step + 1), loss

        return sparse_step

    def dense_step(state, users, items, ratings, weights):
        def loss_fn(params):
            return loss_of_rows(models.gather_rows(params, users, items), ratings, weights)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1), loss

    return dense_step


def make_packed_sparse_step(
    optimizer: optim.RowSparse, y_range: tuple[float, float] | None, chunk_size: int = DENSE_CHUNK
) -> Callable:
    """A pure ``(packed, users, items, ratings, weights) -> (packed, loss)`` for a row-sparse optimizer.

    ``packed`` is :class:`jaxcf.optim.Packed`: each id kind's tables and optimizer slots side by side,
    so the rows gathered for the forward pass are the rows the optimizer updates (one gather and one
    scatter per id kind and batch).

    When every table is updated densely (large batches: see ``RowSparse.dense_rows_per_id``) and
    the batch is a multiple of ``chunk_size`` larger than it, the batch's gradients are computed
    ``chunk_size`` ratings at a time and summed into table-sized buffers, then every table is
    updated once: the same step (the same parameters score every chunk, and the sums are added in
    batch order, as one scatter of the whole batch adds them), but each chunk's rows and gradients
    stay in cache instead of streaming ``[batch, F]`` arrays through memory.
    """

    def loss_and_grads(packed, users, items, ratings, weights, total_weight):
        def loss_of_group_rows(group_rows):
            rows = optim.table_rows(packed, group_rows)
            err = models.score_rows(rows, y_range) - ratings
            return jnp.sum(weights * err * err) / total_weight

        gathered = optim.gather_rows(packed, users, items)
        loss, group_grads = jax.value_and_grad(loss_of_group_rows)(gathered)
        return loss, group_grads, gathered

    def step(packed, users, items, ratings, weights):
        # Padding entries must not count as touching a row (they would advance its moments).
        real = weights > 0
        ids = {"user": jnp.where(real, users, -1), "item": jnp.where(real, items, -1)}
        total_weight = jnp.sum(weights)
        batch = users.shape[0]
        chunked = (
            batch > chunk_size > 0
            and batch % chunk_size == 0
            and all(optim.updates_densely(optimizer, g, batch) for g in packed.groups.values())
        )
        if not chunked:
            loss, group_grads, gathered = loss_and_grads(packed, users, items, ratings, weights, total_weight)
            return optim.sparse_step(optimizer, packed, group_grads, ids["user"], ids["item"], gathered), loss

        def chunk(carry, xs):
            accs, loss = carry
            chunk_users, chunk_items, chunk_ratings, chunk_weights, chunk_ids = xs
            part, group_grads, _ = loss_and_grads(
                packed, chunk_users, chunk_items, chunk_ratings, chunk_weights, total_weight
            )
            accs = {g: optim.accumulate(accs[g], chunk_ids[g], group_grads[g]) for g in accs}
            return (accs, loss + part), None

        def split(x):
            return x.reshape(batch // chunk_size, chunk_size, *x.shape[1:])

        accs = {g: optim.zero_accumulator(group) for g, group in packed.groups.items()}
        xs = jax.tree.map(split, (users, items, ratings, weights, ids))
        (accs, loss), _ = jax.lax.scan(chunk, (accs, jnp.zeros((), jnp.float32)), xs)
        groups = {g: optim.apply_dense(optimizer, group, accs[g]) for g, group in packed.groups.items()}
        return optim.Packed(groups, packed.names, packed.widths), loss

    return step


def num_batches(num_ratings: int, batch_size: int) -> int:
    return -(-num_ratings // batch_size)


def epoch_index(order: jax.Array, batch_size: int, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """The epoch's batches as ``[num_batches, batch_size]`` positions and weights.

    The last partial batch is padded with weight-0 entries that point at a real row (so gathers
    stay in range) and contribute nothing to the loss or its gradient.
    """
    n = order.shape[0]
    batches = num_batches(n, batch_size)
    pad = batches * batch_size - n
    index = jnp.concatenate([order, jnp.zeros((pad,), order.dtype)])
    weights = jnp.concatenate([jnp.ones((n,), dtype), jnp.zeros((pad,), dtype)])
    return index.reshape(batches, batch_size), weights.reshape(batches, batch_size)


def epoch_batches(users, items, ratings, order, batch_size: int) -> tuple[jax.Array, ...]:
    """The epoch's batches as ``[num_batches, batch_size]`` arrays (users, items, ratings, weights);
    see :func:`epoch_index`."""
    index, weights = epoch_index(order, batch_size, ratings.dtype)
    return jnp.take(users, index), jnp.take(items, index), jnp.take(ratings, index), weights


def _batch(users, items, ratings, index, weights) -> tuple[jax.Array, ...]:
    """One batch, read inside the scan: its rows stay in cache instead of a whole epoch's batched
    copies of the columns being written out first."""
    return (
        users.at[index].get(mode="promise_in_bounds"),
        items.at[index].get(mode="promise_in_bounds"),
        ratings.at[index].get(mode="promise_in_bounds"),
        weights,
    )


def make_train_epoch(optimizer, y_range, batch_size: int, dense_chunk: int = DENSE_CHUNK) -> Callable:
    """A jitted ``(state, users, items, ratings, order) -> (state, float32[num_batches] losses)``.

    ``order`` is int32[n]: the epoch's permutation of the training rows. The state is donated.
    A row-sparse optimizer trains on packed tables (packed once before the scan, unpacked after);
    ``dense_chunk`` is its ``make_packed_sparse_step`` chunk size (0: no chunks).
    """
    if isinstance(optimizer, optim.RowSparse):
        packed_step = make_packed_sparse_step(optimizer, y_range, dense_chunk)

        def sparse_epoch(state, users, items, ratings, order):
            xs = epoch_index(order, batch_size, ratings.dtype)
            packed = optim.pack(optimizer, state.params, state.opt_state)
            packed, losses = jax.lax.scan(
                lambda packed, x: packed_step(packed, *_batch(users, items, ratings, *x)), packed, xs
            )
            params, opt_state = optim.unpack(optimizer, packed)
            return TrainState(params, opt_state, state.step + xs[0].shape[0]), losses

        return jax.jit(sparse_epoch, donate_argnums=(0,))

    step = make_train_step(optimizer, y_range)

    def epoch(state, users, items, ratings, order):
        def body(state, x):
            return step(state, *_batch(users, items, ratings, *x))

        return jax.lax.scan(body, state, epoch_index(order, batch_size, ratings.dtype))

    return jax.jit(epoch, donate_argnums=(0,))


def shuffle_order(key: jax.Array, epoch: int, num_ratings: int, batch_size: int) -> np.ndarray:
    """The training order of ``epoch`` (0-based): int32[num_ratings] positions into the training rows.

    A uniformly random permutation (NumPy's, seeded by ``key`` and ``epoch``: a pure function of
    them, so a resumed run replays exactly the order an uninterrupted run uses), cut into batches
    of ``batch_size`` as the notebook's shuffled DataLoader cuts it, with each batch's positions
    then put in ascending order. Which ratings share a batch is as random as the permutation; the
    order inside a batch changes only the rounding of the batch's sums. Training rows are stored by
    user (:attr:`Setup.train_rows`), so each batch reads and writes the user table in ascending
    row order: on CPU, twice as fast as random rows at large batches (``BENCHMARKS.md``).

    Drawn on the host: ``jax.random.permutation`` is a sort on XLA's CPU backend, 20x slower (21 s
    against 1.2 s for 16M positions with NumPy's ``permutation``, 0.84 s with :func:`_permutation`;
    ``bench/step_parts.py``).
    """
    seed = np.asarray(jax.random.key_data(jax.random.fold_in(key, epoch))).ravel()
    order = _permutation(np.random.default_rng(seed), num_ratings)
    full = num_ratings - num_ratings % batch_size
    order[:full].reshape(-1, batch_size).sort(axis=1)
    order[full:].sort()
    return order


# Positions per bucket of _permutation: 256 KB of int32, which a core's L2 cache holds.
SHUFFLE_BUCKET = 1 << 16


def _permutation(rng: np.random.Generator, n: int) -> np.ndarray:
    """A uniformly random permutation of ``range(n)`` as int32, by Rao and Sandelius's method.

    Each position goes to one of ``ceil(n / SHUFFLE_BUCKET)`` buckets uniformly at random, the
    buckets are laid end to end, and each is shuffled (Fisher-Yates) on its own. The result is
    uniform over all permutations (Sandelius 1962; Rao 1961), and each shuffle works inside the
    cache instead of swapping across all of memory: 0.84 s against NumPy's ``permutation`` 1.23 s
    for 16M positions on a 2-core CPU (``bench/step_parts.py``).
    """
    buckets = -(-n // SHUFFLE_BUCKET)
    if buckets <= 1:
        order = np.arange(n, dtype=np.int32)
        rng.shuffle(order)
        return order
    label = rng.integers(0, buckets, n, dtype=np.uint16)  # at most 65,535 buckets: 4 billion positions
    order = np.argsort(label, kind="stable").astype(np.int32)  # a radix sort of 16-bit keys
    for bucket in np.split(order, np.cumsum(np.bincount(label, minlength=buckets))[:-1]):
        rng.shuffle(bucket)  # a view: shuffled in place
    return order


def rows_by_user(users: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``rows`` stably sorted by user (a no-op for files sorted by user, as MovieLens's are)."""
    keys = users[rows]
    if np.all(keys[1:] >= keys[:-1]):
        return rows
    # A stable argsort as one sort of (user, position) pairs: NumPy's vectorised int64 sort, 4x
    # faster than argsort(kind="stable") for 16M rows.
    pairs = (keys.astype(np.int64) << 32) | np.arange(len(rows), dtype=np.int64)
    pairs.sort()
    return rows[pairs & 0xFFFFFFFF]


# ------------------------------------------------------------------------------------- fit


@dataclasses.dataclass
class Setup:
    """Everything derived from a config and a dataset before training starts."""

    config: Config
    dataset: Dataset
    model: Any
    y_range: tuple[float, float] | None
    optimizer: Any

    # The training rows ordered by user (stably: file order within a user), so that batches whose
    # positions ascend touch the user table in ascending order (see shuffle_order).
    train_rows: np.ndarray

    @property
    def valid_rows(self) -> np.ndarray:
        return self.dataset.split.valid


def make_setup(config: Config, dataset: Dataset) -> Setup:
    ratings = dataset.ratings
    y_range = None
    if config.model.kind == "bias":
        y_range = config.model.y_range or ratings.rating_range
        if not y_range[0] < y_range[1]:
            raise DataError(
                f"{ratings.source}: every rating is {y_range[0]}, so the biased model's range "
                "(min, max) is empty; set model.y_range: [low, high] or use model.kind: dot"
            )
        y_range = (float(y_range[0]), float(y_range[1]))
    model = models.build(config.model.kind, ratings.num_users, ratings.num_items, config.model.n_factors, y_range)
    train_rows = rows_by_user(ratings.users, dataset.split.train)
    return Setup(config, dataset, model, y_range, optim.build(config.optim), train_rows)


def init_state(setup: Setup, params: dict[str, jax.Array] | None = None) -> TrainState:
    """Initial state; ``params`` injects weights (e.g. PyTorch's) instead of the seeded init."""
    if params is None:
        params = models.init_params(setup.model, jax.random.fold_in(jax.random.key(setup.config.seed), 0))
    params = {name: jnp.asarray(value, jnp.float32) for name, value in params.items()}
    return TrainState(params, setup.optimizer.init(params), jnp.zeros((), jnp.int32))


@dataclasses.dataclass
class Progress:
    """Host-side state that must survive a resume besides the device state."""

    epoch: int = 0  # epochs completed
    avg_loss: float = 0.0  # the notebook's exponential moving average, not yet debiased
    batch_num: int = 0  # batches seen over all epochs
    history: list = dataclasses.field(default_factory=list)
    best_epoch: int = 0  # the epoch with the lowest valid RMSE so far (early stopping)
    best_rmse: float | None = None
    stopped_early: bool = False
    # The parameters of best_epoch, kept only when early stopping is on (a device copy: the live
    # state is donated to the next epoch). Saved in checkpoints beside the state, not in JSON.
    best_params: Any = dataclasses.field(default=None, repr=False, compare=False)

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "best_params"}


def fit(
    setup: Setup,
    state: TrainState | None = None,
    *,
    progress: Progress | None = None,
    orders: Callable[[int], np.ndarray] | None = None,
    on_epoch: Callable[[TrainState, Progress, dict], None] | None = None,
    show_progress: bool = False,
) -> tuple[TrainState, Progress]:
    """Trains for ``config.train.epochs`` epochs (continuing from ``progress.epoch``).

    Args:
      setup: from :func:`make_setup`.
      state: the starting state; None for a fresh seeded init.
      progress: host-side progress of a resumed run.
      orders: ``epoch -> int32[n_train]`` positions into the training rows; overrides the seeded
        shuffle (the parity suite feeds torch's batch order through this).
      on_epoch: called after each epoch with the new state, progress and metrics record.
      show_progress: draw a tqdm bar over epochs on stderr.

    Returns:
      (final state, progress with the metric history). Under a mesh (``config.mesh`` other than
      one device) the state is sharded and its tables are padded to a multiple of ``mesh.model``
      rows; ``distributed.to_host`` gives them back unpadded.

    Raises:
      TrainingDiverged: when an epoch's loss is NaN or infinite; the state of that epoch is dropped.
    """
    from tqdm.auto import tqdm

    config = setup.config
    ratings = setup.dataset.ratings
    progress = progress or Progress()
    train = setup.train_rows
    valid = setup.valid_rows
    valid_users, valid_items, valid_targets = ratings.users[valid], ratings.items[valid], ratings.ratings[valid]
    layout = distributed.make_layout(config)
    if layout is None:  # one device: the unsharded program
        state = state if state is not None else init_state(setup)
        users = jnp.asarray(ratings.users[train])
        items = jnp.asarray(ratings.items[train])
        targets = jnp.asarray(ratings.ratings[train])
        epoch_fn = make_train_epoch(setup.optimizer, setup.y_range, config.train.batch_size)
        predict_fn = evaluate.make_predict_fn(setup.y_range)

        def predict_valid(params):
            return evaluate.predict_chunked(predict_fn, params, valid_users, valid_items, config.train.eval_batch_size)

    else:  # a mesh: tables row-sharded over `model`, batches split over `data` (jaxcf.distributed)
        state = layout.init(lambda: init_state(setup)) if state is None else layout.place(state)
        # Host arrays: every process keeps the training rows and copies only its part of each batch.
        users, items, targets = ratings.users[train], ratings.items[train], ratings.ratings[train]
        epoch_fn = layout.make_train_epoch(
            setup.optimizer, setup.y_range, config.train.batch_size,
            make_step=make_train_step, make_packed_step=make_packed_sparse_step,
        )
        predict_valid = layout.make_predict(
            evaluate.make_predict_fn(setup.y_range), valid_users, valid_items, config.train.eval_batch_size
        )
    shuffle_key = jax.random.fold_in(jax.random.key(config.seed), 1)

    bar = tqdm(
        total=config.train.epochs, initial=progress.epoch, disable=not show_progress,
        desc="train", unit="epoch", leave=False, file=sys.stderr,
    )

    def order_of(epoch: int) -> np.ndarray:
        if orders is not None:
            return np.asarray(orders(epoch), np.int32)
        return shuffle_order(shuffle_key, epoch, len(train), config.train.batch_size)

    for epoch in range(progress.epoch, config.train.epochs):
        if progress.stopped_early:
            break
        start = time.perf_counter()
        # Drawn before the epoch starts, not beside it: on CPU the two contend for memory bandwidth,
        # and overlapping them was measured slower than one after the other (BENCHMARKS.md).
        state, losses = epoch_fn(state, users, items, targets, order_of(epoch))
        losses = np.asarray(losses)  # the one host sync of the epoch
        train_seconds = time.perf_counter() - start
        if not np.all(np.isfinite(losses)):
            bad = int(np.argmax(~np.isfinite(losses)))
            raise TrainingDiverged(
                f"training diverged in epoch {epoch + 1}: the loss of batch {bad + 1} is {losses[bad]}; "
                "lower optim.learning_rate (the last good checkpoint is kept)"
            )
        avg_loss, batch_num, train_loss = evaluate.debiased_ema(progress.avg_loss, progress.batch_num, losses)
        predictions = predict_valid(state.params)
        valid_mse = evaluate.mse(predictions, valid_targets)
        record = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "train_mse_epoch_mean": float(np.mean(losses, dtype=np.float64)),
            "valid_mse": valid_mse,
            "valid_rmse": math.sqrt(valid_mse),
            "valid_mae": evaluate.mae(predictions, valid_targets),
            "valid_loss_notebook": evaluate.batch_mean_mse(predictions, valid_targets, 128),
            "train_seconds": train_seconds,
            "seconds": time.perf_counter() - start,
        }
        improved = progress.best_rmse is None or record["valid_rmse"] < progress.best_rmse
        patience = config.train.early_stopping_patience
        best_epoch = epoch + 1 if improved else progress.best_epoch
        progress = Progress(
            epoch=epoch + 1,
            avg_loss=avg_loss,
            batch_num=batch_num,
            history=[*progress.history, record],
            best_epoch=best_epoch,
            best_rmse=record["valid_rmse"] if improved else progress.best_rmse,
            stopped_early=bool(patience) and epoch + 1 - best_epoch >= patience,
            best_params=(
                jax.tree.map(jnp.copy, state.params) if patience and improved else progress.best_params
            ),
        )
        bar.update(1)
        bar.set_postfix(valid_rmse=f"{record['valid_rmse']:.4f}")
        if on_epoch is not None:
            on_epoch(state, progress, record)
        if progress.stopped_early:
            break
    bar.close()
    return state, progress


# ------------------------------------------------------------------------------------- CLI


def _has_run(workdir: Path) -> bool:
    return any((workdir / name).exists() for name in ("config.yaml", "metrics.jsonl", checkpoint.CHECKPOINT_DIR))


def default_workdir(config_name: str | None) -> Path:
    stem = Path(config_name).stem if config_name else "run"
    return Path("runs") / f"{stem}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S-%f')}"


def _comparable(config: Config) -> dict:
    """The parts of a config a resume may not change (epochs, checkpointing and the devices may)."""
    raw = to_dict(config)
    raw["train"].pop("epochs")
    for section in ("checkpoint", "mesh", "distributed"):
        raw.pop(section)
    return raw


def _write_metrics(workdir: Path, history: list) -> None:
    atomic_write_text(workdir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))


def format_row(record: dict) -> str:
    return (
        f"{record['epoch']:>5d}  {record['train_loss']:>10.6f}  {record['valid_mse']:>9.6f}  "
        f"{record['valid_rmse']:>10.6f}  {record['seconds']:>7.2f}"
    )


HEADER = "epoch  train_loss  valid_mse  valid_rmse  seconds"


def _checkpoint_tree(state: TrainState, best_params, config: Config) -> dict:
    """What a checkpoint holds: the training state, and the best parameters under early stopping."""
    tree = {"train": state}
    if config.train.early_stopping_patience:
        tree["best_params"] = best_params if best_params is not None else state.params
    return tree


def restore_checkpoint(workdir: Path, setup: Setup, epoch: int | None = None) -> tuple[TrainState, Progress]:
    """Loads the training state saved after ``epoch`` (default: the newest) in ``workdir``.

    Raises:
      WorkdirError: when there is no such checkpoint.
    """
    template = init_state(setup)
    with checkpoint.manager(workdir) as mngr:
        epoch = mngr.latest_step() if epoch is None else epoch
        if epoch is None or epoch not in mngr.all_steps():
            raise WorkdirError(f"no checkpoint for epoch {epoch} in {workdir}")
        tree, saved = checkpoint.restore(mngr, epoch, _checkpoint_tree(template, template.params, setup.config))
    return tree["train"], Progress(**saved, best_params=tree.get("best_params"))


class Interrupted(Exception):
    """SIGINT arrived; the state after the last finished epoch was checkpointed."""

    def __init__(self, epoch: int, workdir: Path):
        super().__init__(
            f"interrupted: saved a checkpoint after epoch {epoch} in {workdir}; "
            f"continue with --workdir {workdir} --resume"
        )


class _SigintFlag:
    """Turns the first SIGINT into a flag checked between epochs; a second one aborts at once."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.raised:
            raise KeyboardInterrupt
        self.raised = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _check_workdir(workdir: Path, resume: bool, config: Config) -> None:
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"--workdir {workdir}: exists and is not a directory; choose another path")
    if resume:
        if not (workdir / "config.yaml").is_file():
            raise WorkdirError(f"--resume: {workdir} holds no run to continue; train without --resume to start one")
        if _comparable(load(workdir / "config.yaml")) != _comparable(config):
            raise WorkdirError(
                f"--resume: the config differs from the one saved in {workdir / 'config.yaml'} "
                "(only train.epochs, checkpoint.*, mesh.* and distributed.* may change); pass --config that file"
            )
    elif workdir.exists() and _has_run(workdir):
        raise WorkdirError(
            f"workdir {workdir} already holds a run; pass --resume to continue it, or choose a new --workdir"
        )


@contextlib.contextmanager
def workdir_lock(workdir: Path):
    """An exclusive lock on WORKDIR/.lock, held while a process trains there.

    ``flock`` is released by the kernel when the process dies, so a killed run never leaves a
    stale lock behind.

    Raises:
      WorkdirError: when another process holds it.
    """
    handle = open(workdir / ".lock", "a+")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirError(
                f"workdir {workdir} is in use by another training process; wait for it or choose another --workdir"
            ) from None
        yield
    finally:
        handle.close()


def run(
    config: Config,
    workdir: Path,
    *,
    resume: bool = False,
    quiet: bool = False,
    dataset: Dataset | None = None,
    out=None,
) -> Progress:
    """Trains ``config`` into ``workdir``: config.yaml, metrics.jsonl, checkpoints/, model/.

    With ``resume``, continues from the newest checkpoint (from the start when the run was stopped
    before its first checkpoint).

    Raises:
      ConfigError, DataError, WorkdirError: before anything is written.
      TrainingDiverged: the last good checkpoint is kept.
      Interrupted: on SIGINT, after checkpointing the last finished epoch.
    """
    if uses_ensemble_trainer(config):  # ensembles, row_l2 and schedules: jaxcf.ensemble trains those
        from jaxcf import ensemble

        return ensemble.run(config, workdir, resume=resume, quiet=quiet, dataset=dataset, out=out)
    out = out if out is not None else sys.stdout
    distributed.initialize(config.distributed)  # a no-op unless several processes are configured
    layout = distributed.make_layout(config)  # None for one device: nothing below changes for it
    primary = layout is None or layout.is_primary  # of several processes, process 0 writes the files
    if not primary:
        out = open(os.devnull, "w")  # closed when the process ends
    _check_workdir(workdir, resume, config)
    dataset = dataset if dataset is not None else load_dataset(config.data, config.seed)
    setup = make_setup(config, dataset)

    workdir.mkdir(parents=True, exist_ok=True)
    if layout is not None:
        layout.sync("jaxcf-workdir-checked")  # every process has checked the workdir before process 0 writes
    with workdir_lock(workdir) if primary else contextlib.nullcontext(), _SigintFlag() as sigint:
        if primary:
            _check_workdir(workdir, resume, config)  # again, now that no other process can start here
            atomic_write_text(workdir / "config.yaml", dump(config))
        state = init_state(setup) if layout is None else layout.init(lambda: init_state(setup))
        progress = Progress()
        with checkpoint.manager(workdir, keep=config.checkpoint.keep) as mngr:
            latest = mngr.latest_step() if resume else None
            if latest is not None:
                tree, saved = checkpoint.restore(mngr, latest, _checkpoint_tree(state, state.params, config))
                state, progress = tree["train"], Progress(**saved, best_params=tree.get("best_params"))
                print(f"resumed from epoch {progress.epoch} in {workdir}", file=out)
            elif resume:
                print(f"no checkpoint yet in {workdir}; starting from the beginning", file=out)
            print(HEADER, file=out)
            for record in progress.history:
                print(format_row(record), file=out)

            def on_epoch(state, progress, record):
                print(format_row(record), file=out, flush=True)
                if primary:
                    _write_metrics(workdir, progress.history)
                every = config.checkpoint.every_epochs
                last = progress.epoch == config.train.epochs or progress.stopped_early
                if last or sigint.raised or (every and progress.epoch % every == 0):
                    tree = _checkpoint_tree(state, progress.best_params, config)
                    checkpoint.save(mngr, progress.epoch, tree, progress.to_json())
                if sigint.raised and not last:
                    raise Interrupted(progress.epoch, workdir)

            show = not quiet and sys.stderr.isatty()
            state, progress = fit(setup, state, progress=progress, on_epoch=on_epoch, show_progress=show)
        if layout is not None:  # the export gets host copies without the mesh's padding rows
            logical = jax.eval_shape(lambda: init_state(setup))
            best = progress.best_params
            state = distributed.to_host(state, logical)
            progress.best_params = None if best is None else distributed.to_host(best, logical.params)
        if primary:
            export_run(setup, state, progress, workdir)
    return progress


def export_run(setup: Setup, state: TrainState, progress: Progress, workdir: Path) -> Path:
    ratings = setup.dataset.ratings
    train = setup.train_rows
    # Under early stopping the export holds the best epoch's parameters, not the last epoch's.
    params = progress.best_params if progress.best_params is not None else state.params
    return export.export_model(
        workdir,
        params=jax.device_get(params),
        user_ids=ratings.user_ids.raw,
        item_ids=ratings.item_ids.raw,
        train_users=ratings.users[train],
        train_items=ratings.items[train],
        config=to_dict(setup.config),
        model_info={
            "kind": setup.config.model.kind,
            "n_factors": setup.config.model.n_factors,
            "y_range": list(setup.y_range) if setup.y_range else None,
            "num_users": ratings.num_users,
            "num_items": ratings.num_items,
            "epoch": progress.best_epoch if progress.best_params is not None else progress.epoch,
        },
        data_info={
            "source": ratings.source,
            "sha256": ratings.sha256,
            "num_ratings": len(ratings),
            "num_train": len(train),
            "num_valid": len(setup.valid_rows),
            "split": setup.dataset.split.name,
        },
        metrics=progress.history,
        titles=setup.dataset.titles,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxcf.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML file, or the name of a shipped config (bias.yaml, dot.yaml, ...)")
    parser.add_argument(
        "--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE", help="override config keys"
    )
    parser.add_argument("--workdir", type=Path, help="output folder (default: a new folder under runs/)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --workdir")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.resume and args.workdir is None:
            raise WorkdirError("--resume needs --workdir: the folder of the run to continue")
        config_name = args.config
        if config_name is None and args.resume and (args.workdir / "config.yaml").is_file():
            config_name = str(args.workdir / "config.yaml")
        config = load(config_name, args.set)
        workdir = args.workdir or default_workdir(config_name)
        progress = run(config, workdir, resume=args.resume, quiet=args.quiet)
    except (ConfigError, DataError, WorkdirError, checkpoint.CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except Interrupted as err:
        print(str(err), file=sys.stderr)
        return 130
    final = progress.history[-1] if progress.history else {}
    if jax.process_index() == 0:  # of several processes, the one that wrote the outputs says so
        print(f"final valid_rmse {final.get('valid_rmse', float('nan')):.4f}; outputs in {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
