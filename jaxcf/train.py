"""Training: the fit loop over compiled epochs, checkpoints and resume, and the CLI.

    python -m jaxcf.train --config configs/bias.yaml [--set key=value ...] [--workdir DIR]
                          [--resume] [--quiet]

What does not live here: the compiled step and epoch and the epoch's order (``jaxcf.steps``),
models (``jaxcf.models``), optimizers (``jaxcf.optim``), metrics (``jaxcf.evaluate``), checkpoint
formats (``jaxcf.checkpoint``).
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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcf import checkpoint, distributed, evaluate, export, models, optim
from jaxcf.config import Config, ConfigError, dump, load, to_dict, uses_ensemble_trainer
from jaxcf.data import DataError, Dataset
from jaxcf.data import load as load_dataset
from jaxcf.fileio import atomic_write_text
from jaxcf.steps import (
    TrainState,
    make_packed_sparse_step,
    make_train_epoch,
    make_train_step,
    rows_by_user,
    shuffle_order,
)

log = logging.getLogger("jaxcf.train")


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


class WorkdirError(ValueError):
    """A workdir that cannot be used as asked; the message is one line meant for the user."""


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
