"""One config on several splits (ml-100k's official five folds, or any list), each trained exactly as
``python -m jaxcf.train`` trains it and its export read back and scored on the split's validation and test
parts (``jaxcf.serving.heldout.split_metrics``), so the figures are those of the model on disk; and the
summary of a metric over splits (mean, sample standard deviation).

A holdout of each split's training rows (``holdout_fraction``) replaces its validation part and drops
its test part: the way to choose hyper-parameters without looking at the folds one reports.

What does not live here: the CLI (``jaxcf.cli.crossval``), the strong-generalisation protocol
(``jaxcf.training.strong``), training (``jaxcf.training.loop``), the metrics (``jaxcf.core.metrics``).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxcf import families
from jaxcf.core.configfile import parse_grid
from jaxcf.data import Dataset, holdout
from jaxcf.serving import export, heldout
from jaxcf.training import api
from jaxcf.training.workdir import test_key

SUMMARY_METRICS = ("valid_rmse", "valid_mae", "precision@10", "recall@10", "ndcg@10")
IMPLICIT_SUMMARY = ("ndcg@20", "recall@20", "map@20", "mrr", "coverage@20")


def split_dataset(config, split: str | None, holdout_fraction: float | None) -> tuple[Any, Dataset]:
    """The config with ``data.split`` set, and its dataset (a holdout of its training rows if asked; for
    an implicit-feedback model, of its training interactions)."""
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, split=split))
    dataset = families.prepare(config, families.load_data(config))
    if holdout_fraction is not None:
        dataset = holdout(dataset, holdout_fraction, config.seed)
    return config, dataset


def score_export(workdir: Path, dataset: Dataset) -> dict[str, float]:
    """The metrics of the model exported in ``workdir`` on ``dataset``'s validation and test parts."""
    return heldout.split_metrics(export.read(workdir), dataset)


def grid_points(items: Sequence[str]) -> list[dict]:
    """Every combination of ``--grid KEY=V1,V2`` values (one empty point without a grid)."""
    grid = parse_grid(items)
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))] or [{}]


def point_name(point: dict) -> str:
    return "-".join(f"{k.split('.')[-1]}{v}" for k, v in point.items()) or "."


def run_splits(config, splits: list, holdout_fraction: float | None, workdir: Path,
               on_split: Callable[[dict], None] | None = None) -> list[dict]:
    """Trains and scores ``config`` on each split (``on_split`` is called with each row); returns the rows."""
    rows = []
    for split in splits:
        name = split or "random"
        split_config, dataset = split_dataset(config, split, holdout_fraction)
        start = time.perf_counter()
        with open(os.devnull, "w") as quiet_out:
            api.run(split_config, dataset, workdir=workdir / name, quiet=True, out=quiet_out)
        seconds = time.perf_counter() - start
        scored = score_export(workdir / name, dataset)
        row = {"split": name, "rows": dataset.split.name, "metrics": scored, "seconds": seconds,
               "num_train": len(dataset.split.train), "num_valid": len(dataset.split.valid),
               "num_test": len(dataset.split.test)}
        rows.append(row)
        if on_split is not None:
            on_split(row)
    return rows


def reported(found: dict, name: str) -> str:
    """The key a summary reports for a metric: its validation figure, else its test one (``test_rmse``
    for a named fold, whose .test part is a test set)."""
    return name if name in found else test_key(name)


def summarise(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Mean and sample std (ddof 1; 0 for one split) of each metric over the splits."""
    out = {}
    for name in rows[0]["metrics"]:
        if not all(isinstance(r["metrics"][name], (int, float)) for r in rows):
            continue  # labels such as the protocol's name
        values = np.asarray([r["metrics"][name] for r in rows], np.float64)
        out[name] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
    return out


