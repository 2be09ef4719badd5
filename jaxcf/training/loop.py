"""The one training loop: epochs of any model family, records, early stopping, the NaN guard, the
watchdog, checkpoints and resume, the mesh, and the export.

:func:`fit` trains a config on a dataset. With a ``workdir`` it writes ``config.yaml``, ``data.json``,
``metrics.jsonl`` after every epoch, checkpoints, and ``model/`` at the end, and it can ``resume``
(bitwise: a family's epoch is a pure function of its state and the epoch number, and everything
host-side is checkpointed). Without one it trains in memory (the Python API). Either way the loop is
the same: for each epoch the family runs it (``jaxcf.core.family``), the record is checked (a NaN or
absurd loss, parameter or metric stops the run with ``TrainingDiverged``: nothing is exported and the
last good checkpoint stays), early stopping watches the monitored metric and keeps the best
parameters, and the closing record is the exported model's, scored as a loaded model scores it
(``"final": true``, with ranking metrics).

It is one concept at some length: the loop, from the first epoch to the export, with everything it
owns (records, early stopping, the divergence check, checkpoints and resume, the mesh).

What does not live here: the families (it is handed one: ``jaxcf.families.build``; it imports none), workdir
plumbing (``jaxcf.training.workdir``), formats (``jaxcf.training.checkpoint``, ``jaxcf.serving.export``), the
CLI (``jaxcf.cli.train``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxcf.core import distributed, memory, processes
from jaxcf.core.config import dump, to_dict
from jaxcf.core.errors import JaxcfError, TrainingDiverged, WorkdirError
from jaxcf.core.family import Builder, Family
from jaxcf.core.fileio import atomic_write_text, strict_json
from jaxcf.data import Dataset
from jaxcf.serving import export
from jaxcf.training import checkpoint, guards
from jaxcf.training import workdir as wd


@dataclasses.dataclass
class Progress:
    """Host-side state that must survive a resume besides the device state."""

    epoch: int = 0  # epochs completed
    history: list = dataclasses.field(default_factory=list)
    best_epoch: int = 0  # the epoch with the lowest monitored metric so far (early stopping)
    best_value: float | None = None
    stopped_early: bool = False
    carry: dict = dataclasses.field(default_factory=dict)  # the family's host-side state
    # The parameters of best_epoch, kept only when early stopping is on (a device copy: the live
    # state is donated to the next epoch). Saved in checkpoints beside the state, not in JSON.
    best_params: Any = dataclasses.field(default=None, repr=False, compare=False)

    def to_json(self) -> dict:
        return strict_json({f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                               if f.name != "best_params"})


class Interrupted(JaxcfError):
    """SIGINT or SIGTERM arrived; the state after the last finished epoch was checkpointed."""

    def __init__(self, epoch: int, workdir: Path, signal_number: int):
        self.exit_status = 128 + signal_number
        super().__init__(
            f"interrupted: saved a checkpoint after epoch {epoch} in {workdir}; "
            f"continue with --workdir {workdir} --resume"
        )


@dataclasses.dataclass
class Trained:
    """A finished run: what the export holds.

    Attributes:
      params: host tables (float32[rows, d], or float32[K, rows, d] for an ensemble).
      model_info: the export's ``model`` section (kind, sizes, y_range, members).
      history: every epoch's record; the last is the exported model's (``"final": true``).
      config, dataset: what it was trained with.
    """

    params: dict[str, np.ndarray]
    model_info: dict
    history: list[dict]
    config: Any
    dataset: Dataset

    def export(self) -> export.Export:
        """The in-memory export (what ``model/`` holds), for ``jaxcf.serving.inference.Model``."""
        return export.build(**export_arguments(self))


def train(
    family: Family,
    config: Any,
    state: Any,
    progress: Progress | None = None,
    *,
    on_epoch: Callable[[Any, Progress, dict], None] | None = None,
    show_progress: bool = False,
    watchdog: guards.Watchdog | None = None,
) -> tuple[Any, Progress]:
    """Runs ``family``'s epochs from ``progress.epoch`` to ``config.train.epochs``.

    Args:
      family: a :class:`jaxcf.core.family.Family` (``jaxcf.families.build``).
      config: ``train.epochs``, ``train.eval_every`` and ``train.early_stopping_patience`` are read here.
      state: the starting state (placed).
      progress: host-side progress of a resumed run.
      on_epoch: called after each epoch with the new state, progress and record.
      show_progress: a tqdm bar over epochs on stderr.
      watchdog: armed around each epoch.

    Returns:
      (final state, progress).

    Raises:
      TrainingDiverged: from :func:`check_divergence`; that epoch's state is dropped.
    """
    progress = progress or Progress()
    patience = config.train.early_stopping_patience
    watchdog = watchdog or guards.Watchdog(0)
    bar = tqdm(total=config.train.epochs, initial=progress.epoch, disable=not show_progress,
               desc=model_label(family.model_info), unit="epoch", leave=False, file=sys.stderr)
    for epoch in range(progress.epoch, config.train.epochs):
        if progress.stopped_early:
            break
        watchdog.arm(f"epoch {epoch + 1}")
        start = time.perf_counter()
        state, losses = family.epoch(state, epoch)
        train_seconds = time.perf_counter() - start
        evaluate = (epoch + 1) % config.train.eval_every == 0 or epoch + 1 == config.train.epochs
        record, carry = family.record(state, epoch, losses, progress.carry, evaluate)
        check_divergence(family, state, epoch, losses, record)
        watchdog.disarm()
        record["train_seconds"] = train_seconds
        record["seconds"] = time.perf_counter() - start
        value = record.get(family.monitor)  # None for an epoch not evaluated (or nothing validated)
        better = (lambda a, b: a > b) if family.maximize else (lambda a, b: a < b)
        improved = value is not None and (progress.best_value is None or better(value, progress.best_value))
        best_epoch = epoch + 1 if improved else progress.best_epoch
        progress = Progress(
            epoch=epoch + 1,
            history=[*progress.history, record],
            best_epoch=best_epoch,
            best_value=value if improved else progress.best_value,
            stopped_early=bool(patience) and epoch + 1 - best_epoch >= patience,
            carry=carry,
            best_params=(jax.tree.map(jnp.copy, family.params(state)) if patience and improved
                         else progress.best_params),
        )
        bar.update(1)
        if value is not None:
            bar.set_postfix({family.monitor: f"{value:.4f}"})
        if on_epoch is not None:
            on_epoch(state, progress, record)
    bar.close()
    return state, progress


def model_label(model_info: dict) -> str:
    """What a run trains, in a word (the progress bar's label): its model kind."""
    return model_info.get("kind", "model")


def check_divergence(family: Family, state: Any, epoch: int, losses: np.ndarray, record: dict) -> None:
    """The loop's decision on what a family reported: a loss, a parameter or a model RMSE that is NaN,
    infinite or off the ratings' scale, or a problem the family named (``record["diverged"]``), ends the
    run with one line saying what to change; that epoch's state is dropped (the last good checkpoint
    stays).

    Raises:
      TrainingDiverged: naming the epoch, what went wrong and the family's hint.
    """
    where = f"training diverged in epoch {epoch + 1}"
    tail = f"{family.divergence_hint} (the last good checkpoint is kept)"
    problem = record.pop("diverged", None)
    if problem:
        raise TrainingDiverged(f"{where}: {problem}; {tail}")
    losses = np.asarray(losses).reshape(-1)
    if family.check_losses and not np.all(np.isfinite(losses)):
        bad = int(np.argmax(~np.isfinite(losses)))
        raise TrainingDiverged(f"{where}: the loss of batch {bad + 1} is {losses[bad]}; {tail}")
    if family.finite is not None and not bool(np.all(np.asarray(family.finite(state)))):
        raise TrainingDiverged(f"{where}: its last update made the parameters NaN or infinite; {tail}")
    value = record.get("valid_rmse_rows", record.get("test_rmse_rows"))
    if family.scale is not None and value is not None and not (math.isfinite(value) and value <= family.scale):
        raise TrainingDiverged(f"{where}: the model's RMSE {value:.4g} is far outside the ratings' scale; {tail}")


def _params_row_axes(tree: Any) -> Any:
    """Row axes of model tables: ``[rows, d]`` or ``[K, rows, d]``."""
    return jax.tree.map(lambda x: len(x.shape) - 2 if len(x.shape) >= 2 else None, tree)


def _host_params(family: Family, params: Any, layout) -> dict[str, np.ndarray]:
    if layout is None:
        return {name: np.asarray(table, np.float32) for name, table in jax.device_get(params).items()}
    logical = jax.eval_shape(lambda: family.params(family.init()))
    return distributed.to_host(params, logical, _params_row_axes)


def _checkpoint_tree(state: Any, best_params: Any, family: Family, config: Any) -> dict:
    tree = {"train": state}
    if config.train.early_stopping_patience:
        tree["best_params"] = best_params if best_params is not None else family.params(state)
    return tree


def _checkpoint_axes(tree: dict, family: Family) -> dict:
    """The row axis of every leaf of a checkpoint tree (for restoring under another mesh)."""
    axes = {"train": family.row_axes(tree["train"])}
    if "best_params" in tree:
        axes["best_params"] = _params_row_axes(tree["best_params"])
    return axes


def _close(family: Family, config: Any, dataset: Dataset, progress: Progress, params: dict) -> list[dict]:
    """The history with its closing record: the exported epoch's record completed with the exported
    model's metrics, scored as a loader scores it."""
    exported_epoch = progress.best_epoch if progress.best_params is not None else progress.epoch
    history = progress.history
    exported = next(r for r in reversed(history) if r["epoch"] == exported_epoch)
    final = {**exported, "final": True, **family.final(params)}
    if family.model_info.get("ensemble_size"):
        final["members"] = family.model_info["ensemble_size"]
    return [*history[:-1], final] if exported is history[-1] else [*history, final]


def export_arguments(trained: Trained) -> dict:
    dataset, config = trained.dataset, trained.config
    ratings = dataset.ratings
    exported = trained.history[-1]["epoch"] if trained.history else 0
    return {
        "params": trained.params,
        "user_ids": ratings.user_ids.raw,
        "item_ids": ratings.item_ids.raw,
        "train_users": ratings.users[dataset.split.train],
        "train_items": ratings.items[dataset.split.train],
        "train_ratings": ratings.ratings[dataset.split.train],
        "config": to_dict(config),
        "model_info": {**trained.model_info, "epoch": exported},
        "data_info": dataset.fingerprint(),
        "metrics": trained.history,
        "titles": dataset.titles,
    }


def fit(
    config: Any,
    builder: Builder,
    dataset: Dataset | None = None,
    *,
    workdir: Path | None = None,
    resume: bool = False,
    quiet: bool = False,
    out=None,
    orders: Callable | None = None,
    progress_bar: bool | None = None,
    on_stall: str = "raise",
) -> Trained:
    """Trains ``config`` (on ``dataset``, else the one its ``data`` section names).

    Args:
      config: a validated config (``jaxcf.families.Config``).
      builder: where the family comes from: ``jaxcf.families`` (the registry), or any object with its
        ``prepare``, ``build``, ``load`` and ``resolve`` (the loop imports no family).
      dataset: the data (default: ``data`` of the config), prepared by ``builder.prepare`` here.
      workdir: where to write the run (None: in memory, no checkpoints, nothing written).
      resume: continue the run in ``workdir`` from its newest checkpoint.
      quiet: no progress bar.
      out: where the per-epoch table goes (default stdout; ``os.devnull`` to silence).
      orders: ``epoch -> positions`` overriding the seeded shuffle (single models; the parity suite).
      progress_bar: draw the progress bar (None: only on a terminal or in a notebook; never when ``quiet``).
        The table's rows are written above it (``tqdm.write``), so neither corrupts the other.
      on_stall: what the watchdog does with a stalled epoch (``jaxcf.training.guards.Watchdog``): ``"raise"``
        TrainingStalled (the library; the caller's interpreter is never ended) or ``"exit"`` the process
        with status 3 after dumping every thread's stack (the CLIs).

    Returns:
      :class:`Trained`.

    Raises:
      ConfigError, DataError, WorkdirError, CheckpointError: before anything is written (or, for a
        checkpoint that cannot be written, with the previous ones intact).
      TrainingDiverged: the last good checkpoint is kept, nothing is exported.
      TrainingStalled: an epoch made no progress for ``train.stall_seconds`` (``on_stall="raise"``); the
        last checkpoint is kept. An epoch hung inside native code never returns to raise it.
      Interrupted: on SIGINT/SIGTERM, after checkpointing the last finished epoch.
    """
    out = out if out is not None else sys.stdout
    processes.initialize(config.distributed)  # a no-op unless several processes are configured
    layout = distributed.make_layout(config)  # None for one device: nothing below changes for it
    primary = layout is None or layout.is_primary  # of several processes, process 0 writes the files
    if not primary:
        out = open(os.devnull, "w")  # closed when the process ends
    if workdir is not None:
        wd.check(Path(workdir), resume, config, builder)
    dataset = builder.prepare(config, dataset if dataset is not None else builder.load_data(config))
    if resume:
        wd.check_data(Path(workdir), dataset.fingerprint())
    family = builder.build(config, dataset, layout, orders)
    ratings = dataset.ratings
    memory.check_state(family.init, f"lower model.n_factors or ensemble.size (the tables have {ratings.num_users} "
                       f"users and {ratings.num_items} items)", shards=layout.model if layout is not None else 1)

    def place(init):
        return init() if layout is None else layout.init(init, family.row_axes)

    show = not quiet and (wd.interactive() if progress_bar is None else progress_bar)
    if workdir is None:
        with guards.Watchdog(config.train.stall_seconds, on_stall=on_stall) as watchdog:
            state, progress = train(family, config, place(family.init), show_progress=show, watchdog=watchdog)
        return _finish(family, config, dataset, state, progress, layout)

    workdir = Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WorkdirError(f"--workdir {workdir}: cannot create it ({err.strerror}); choose another folder") from None
    if layout is not None:
        layout.sync("jaxcf-workdir-checked")  # every process has checked the workdir before process 0 writes
    lock = wd.lock(workdir) if primary else contextlib.nullcontext()
    with lock, guards.StopFlag() as stop, guards.Watchdog(config.train.stall_seconds, on_stall=on_stall) as watchdog:
        if primary:
            wd.check(workdir, resume, config, builder)  # again, now that no other process can start here
            with wd.writing(workdir, "the run's config"):
                atomic_write_text(workdir / "config.yaml", dump(config))
                wd.write_data(workdir, dataset.fingerprint())
        state, progress = None, Progress()
        with checkpoint.manager(workdir, keep=config.checkpoint.keep) as mngr:
            latest = None
            if resume:
                latest, removed = checkpoint.latest_sealed(mngr)
                for epoch in removed:
                    print(f"skipped the unsealed checkpoint of epoch {epoch} (its save was cut short)", file=out)
            if latest is not None:
                wd.check_checkpoint_config(workdir, checkpoint.saved_progress(mngr, latest).get("config"), config,
                                           latest, builder)
                template = place(family.init)
                target = _checkpoint_tree(template, family.params(template), family, config)
                tree, saved = checkpoint.restore(mngr, latest, target, _checkpoint_axes(target, family))
                del template
                state = tree["train"]
                saved.pop("config", None)
                progress = Progress(**saved, best_params=tree.get("best_params"))
                if progress.epoch > config.train.epochs:
                    raise WorkdirError(
                        f"--resume: the run in {workdir} has done {progress.epoch} epochs, more than "
                        f"train.epochs={config.train.epochs}; set train.epochs >= {progress.epoch} to continue it"
                    )
                print(f"resumed from epoch {progress.epoch} in {workdir}", file=out)
            elif resume:
                print(f"no checkpoint yet in {workdir}; starting from the beginning", file=out)
            if state is None:
                state = place(family.init)
            columns = wd.shown_columns(family.columns, dataset.split)
            print(wd.header(columns), file=out)
            for record in progress.history:
                print(wd.format_row(record, columns), file=out)

            def on_epoch(state, progress, record):
                tqdm.write(wd.format_row(record, columns), file=out)  # above the progress bar, never through it
                out.flush()
                if primary:
                    with wd.writing(workdir, "metrics.jsonl"):
                        wd.write_metrics(workdir, progress.history)
                every = config.checkpoint.every_epochs
                last = progress.epoch == config.train.epochs or progress.stopped_early
                if last or stop.raised or (every and progress.epoch % every == 0):
                    tree = _checkpoint_tree(state, progress.best_params, family, config)
                    checkpoint.save(mngr, progress.epoch, tree, {**progress.to_json(), "config": to_dict(config)})
                if stop.raised and not last:
                    raise Interrupted(progress.epoch, workdir, stop.signal_number)

            state, progress = train(family, config, state, progress, on_epoch=on_epoch, show_progress=show,
                                    watchdog=watchdog)
        trained = _finish(family, config, dataset, state, progress, layout)
        if primary:
            with wd.writing(workdir, "the model export (the previous one, if any, is intact)"):
                wd.write_metrics(workdir, trained.history)
                export.write(workdir, **export_arguments(trained))
    return trained


def restore(workdir: Path, config: Any, family: Family, epoch: int | None = None) -> tuple[Any, Progress]:
    """The training state and progress saved after ``epoch`` (default: the newest) of the run in ``workdir``
    (its config and ``family``, built on one device): ``jaxcf.training.api.restore_checkpoint`` calls it.

    Raises:
      WorkdirError: no such checkpoint; CheckpointError: a damaged one.
    """
    with checkpoint.manager(workdir, keep=config.checkpoint.keep) as mngr:
        epoch = mngr.latest_step() if epoch is None else epoch
        if epoch is None or epoch not in mngr.all_steps():
            raise WorkdirError(f"no checkpoint for epoch {epoch} in {workdir}")
        template = family.init()
        target = _checkpoint_tree(template, family.params(template), family, config)
        tree, saved = checkpoint.restore(mngr, epoch, target, _checkpoint_axes(target, family))
    saved.pop("config", None)
    return tree["train"], Progress(**saved, best_params=tree.get("best_params"))


def _finish(family: Family, config: Any, dataset: Dataset, state: Any, progress: Progress, layout) -> Trained:
    """Host copies of the exported parameters (the best epoch's under early stopping) and the closing record."""
    params = progress.best_params if progress.best_params is not None else family.params(state)
    host = _host_params(family, params, layout)
    progress.best_params = host if progress.best_params is not None else None
    history = _close(family, config, dataset, progress, host) if progress.history else []
    return Trained(host, dict(family.model_info), history, config, dataset)
