"""Training from Python: ``jaxcf.fit(df)`` runs exactly what ``python -m jaxcf.train`` runs.

    import jaxcf, pandas as pd
    df = pd.read_csv("ratings.csv")                 # the config's user/item/rating columns
    model = jaxcf.fit(df)                            # bias.yaml's defaults and the notebook's split
    model = jaxcf.fit(df, config="best.yaml", overrides=["train.epochs=50"])   # or a Config object
    model = jaxcf.fit("train.csv", test="test.csv", overrides=["data.valid_fraction=0"])   # your own split
    model.history[-1]["valid_rmse"]                  # the records metrics.jsonl would hold
    model.save("runs/mine")                          # the export the CLI writes; load_model reads it

The data go through the CSV loader's checks and id rules (``jaxcf.data.ratings_from_frame``), the
config through the CLI's validation, and the training through the one loop (``jaxcf.training.loop.fit``):
in memory, or into ``workdir`` (checkpoints, ``metrics.jsonl``, ``model/``) when one is given.
Errors are the CLI's one-line errors, raised (``jaxcf.core.errors``).

What does not live here: the loop (``jaxcf.training.loop``), inference (``jaxcf.serving.inference``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxcf import families
from jaxcf.core.errors import ConfigError, WorkdirError
from jaxcf.data import from_frame
from jaxcf.families import Config
from jaxcf.serving.inference import Model
from jaxcf.training import loop as trainer


def resolve_config(config: Config | str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """A Config from a Config object, a YAML path or shipped name, or None (the defaults: bias.yaml's).

    Raises:
      ConfigError: as the CLI's ``--config``/``--set`` would.
    """
    if isinstance(config, Config):
        return families.replace(config, overrides)
    if config is not None and not isinstance(config, (str, Path)):
        raise ConfigError(f"config must be a Config, a YAML path or a shipped name; got {type(config).__name__}")
    return families.load(config, overrides)


def fit(
    data: Any = None,
    config: Config | str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    valid: Any = None,
    test: Any = None,
    workdir: str | Path | None = None,
    resume: bool = False,
    quiet: bool = False,
) -> Model:
    """Trains a model and returns it, ready for ``predict``, ``recommend`` and ``save``.

    Args:
      data: a pandas DataFrame with the config's ``data.user_col``, ``data.item_col`` and
        ``data.rating_col`` columns; or a path to a ratings CSV; or None for the dataset the
        config names (``data.name``, the bundled ml-latest-small by default).
      config: a :class:`jaxcf.Config`, a YAML path, a shipped config name (``"best.yaml"``), or None
        for the defaults (those of ``configs/bias.yaml``: the notebook's biased model).
      valid: the validation part, a DataFrame or a CSV path (as ``data.valid_path``): scored every
        epoch, may drive early stopping; instead of the random split of ``data``.
      test: the test part, a DataFrame or a CSV path (as ``data.test_path``): scored and recorded as
        ``test_*``, never used to choose anything.
      overrides: ``"key=value"`` strings, as the CLI's ``--set``.
      workdir: write the run there (config, checkpoints, metrics.jsonl, model/) as the CLI does;
        None trains in memory and writes nothing.
      resume: continue the run in ``workdir``.
      quiet: no progress bar (otherwise drawn on stderr when it is a terminal, and in notebooks; never into
        a redirected log).

    Returns:
      A :class:`jaxcf.serving.inference.Model`; ``model.history`` holds the per-epoch records.

    Raises:
      ConfigError, DataError, WorkdirError, CheckpointError, TrainingDiverged: one-line messages.
    """
    import pandas as pd

    if isinstance(data, (str, Path)):
        overrides = [*overrides, f"data.path={Path(data)}"]
        data = None
    for role, part in (("valid", valid), ("test", test)):
        if isinstance(part, (str, Path)):  # a path goes into the config, so that the run records it
            overrides = [*overrides, f"data.{role}_path={Path(part)}"]
    resolved = resolve_config(config, overrides)
    frames = {role: part for role, part in (("valid", valid), ("test", test)) if isinstance(part, pd.DataFrame)}
    for role, part in (("valid", valid), ("test", test)):
        if part is not None and not isinstance(part, (str, Path, pd.DataFrame)):
            raise ConfigError(f"{role} must be a pandas DataFrame or a path to a ratings CSV; got "
                                            f"{type(part).__name__}")
    dataset = None
    if isinstance(data, pd.DataFrame) or (frames and resolved.data.path is not None):
        train = data if isinstance(data, pd.DataFrame) else resolved.data.path
        dataset = from_frame(train, resolved.data, resolved.seed, **frames,
                             timestamps=families.resolve(resolved).times(resolved))
    elif frames:
        raise ConfigError("validation or test data go with your own training data: pass it as a "
                                        "DataFrame or a path")
    elif data is not None:
        raise ConfigError(
            f"data must be a pandas DataFrame, a path to a ratings CSV, or None; got {type(data).__name__}"
        )
    with open(os.devnull, "w") as silent:
        trained = trainer.fit(resolved, families, dataset, workdir=None if workdir is None else Path(workdir),
                              resume=resume, quiet=quiet, out=silent)
    model = Model(trained.export())
    if workdir is not None:
        model.path = Path(workdir) / "model"
    return model


def run(config, dataset=None, **options) -> trainer.Trained:
    """``jaxcf.training.loop.fit`` with its family from the registry (``jaxcf.families``): what the CLIs and
    the experiments call. ``options`` are the loop's (``workdir``, ``resume``, ``quiet``, ``out``, ...)."""
    return trainer.fit(config, families, dataset, **options)


def restore_checkpoint(workdir: str | Path, epoch: int | None = None):
    """The training state and progress saved after ``epoch`` (default: the newest sealed one) of the run in
    ``workdir``, on one device: for inspecting a run from Python.

    Returns:
      (state, ``jaxcf.training.loop.Progress``).

    Raises:
      WorkdirError: no run or no such checkpoint; CheckpointError: a damaged one.
    """
    workdir = Path(workdir)
    if not (workdir / "config.yaml").is_file():
        raise WorkdirError(f"{workdir} holds no run (no config.yaml)")
    config = families.load(workdir / "config.yaml", ["mesh.data=1", "mesh.model=1", "distributed.num_processes=1"])
    dataset = families.prepare(config, families.load_data(config))
    return trainer.restore(workdir, config, families.build(config, dataset), epoch)
