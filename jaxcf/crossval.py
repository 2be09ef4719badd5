"""Evaluate one config on several splits: ml-100k's official five folds, or any list of splits.

    python -m jaxcf.crossval --config C [--splits u1,u2,u3,u4,u5] [--set KEY=VALUE ...]
                             [--holdout FRACTION] [--workdir DIR] [--out results.json]

For each split the config is trained by ``jaxcf.train.run`` (a single model or an ensemble, exactly
as ``python -m jaxcf.train`` would) into ``WORKDIR/<split>``. The exported model is then read back
and scored on the split's validation ratings: RMSE, MAE and the ranking metrics of
``jaxcf.ranking``, so the figures are those of the model on disk. The summary gives each metric's
mean and sample standard deviation (ddof 1) over the splits.

``--holdout F`` trains on 1 - F of each split's training rows and scores on the other F (the split's
validation rows are not used at all): the way to choose hyper-parameters without looking at the
folds one reports.

What does not live here: training (``jaxcf.train``, ``jaxcf.ensemble``), the metrics themselves
(``jaxcf.evaluate``, ``jaxcf.ranking``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxcf import ensemble, ranking, train
from jaxcf.config import Config, ConfigError, load, to_dict
from jaxcf.data import DataError, Dataset
from jaxcf.data import load as load_dataset
from jaxcf.export import ModelError
from jaxcf.fileio import atomic_write_text
from jaxcf.sweep import holdout_split

SUMMARY_METRICS = ("valid_rmse", "valid_mae", "precision@10", "recall@10", "ndcg@10")


def split_dataset(config: Config, split: str | None, holdout: float | None) -> tuple[Config, Dataset]:
    """The config with ``data.split`` set, and its dataset (a holdout of its training rows if asked)."""
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, split=split))
    dataset = load_dataset(config.data, config.seed)
    if holdout is not None:
        dataset = holdout_split(dataset, holdout, config.seed)
    return config, dataset


def score_export(workdir: Path, dataset: Dataset) -> dict[str, float]:
    """RMSE, MAE and ranking metrics of the model exported in ``workdir`` on ``dataset``'s split."""
    model = ensemble.read_any(workdir)
    info = model.metadata["model"]
    y_range = tuple(info["y_range"]) if info["kind"] == "bias" else None
    ratings = dataset.ratings
    train_rows, valid_rows = dataset.split.train, dataset.split.valid
    predictions = ensemble.predict_pairs(model.weights, y_range, ratings.users[valid_rows], ratings.items[valid_rows])
    targets = ratings.ratings[valid_rows].astype(np.float64)
    diff = predictions.astype(np.float64) - targets
    metrics = {"valid_rmse": math.sqrt(float(np.mean(diff**2))), "valid_mae": float(np.mean(np.abs(diff)))}
    metrics.update(ranking.model_ranking_metrics(
        model.weights, y_range, ratings.num_items,
        (ratings.users[train_rows], ratings.items[train_rows]),
        (ratings.users[valid_rows], ratings.items[valid_rows], ratings.ratings[valid_rows]),
    ))
    return metrics


def summarise(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Mean and sample std (ddof 1; 0 for one split) of each metric over the splits."""
    out = {}
    for name in rows[0]["metrics"]:
        values = np.asarray([r["metrics"][name] for r in rows], np.float64)
        out[name] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxcf.crossval", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML file, or the name of a shipped config")
    parser.add_argument("--splits", help="comma-separated data.split values (ml-100k: u1,...,u5); "
                        "default: the config's own split")
    parser.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys")
    parser.add_argument("--holdout", type=float, default=None, metavar="FRACTION",
                        help="score on this fraction of each split's training rows instead of its validation rows")
    parser.add_argument("--workdir", type=Path, help="one sub-folder per split (default: a new folder under runs/)")
    parser.add_argument("--out", type=Path, help="results JSON (default: WORKDIR/crossval.json)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load(args.config, args.set)
        splits: list[str | None] = [config.data.split]
        if args.splits is not None:
            splits = [s.strip() for s in args.splits.split(",")]
            if not all(splits):
                raise ConfigError(f"--splits: empty split name in {args.splits!r}; e.g. --splits u1,u2,u3,u4,u5")
        stem = Path(args.config).stem if args.config else "run"
        workdir = args.workdir or Path("runs") / f"crossval-{stem}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S-%f')}"
        rows = []
        for split in splits:
            name = split or "random"
            split_config, dataset = split_dataset(config, split, args.holdout)
            start = time.perf_counter()
            with open("/dev/null", "w") as quiet_out:
                train.run(split_config, workdir / name, quiet=True, dataset=dataset, out=quiet_out)
            seconds = time.perf_counter() - start
            metrics = score_export(workdir / name, dataset)
            rows.append({"split": name, "metrics": metrics, "seconds": seconds,
                         "num_train": len(dataset.split.train), "num_valid": len(dataset.split.valid)})
            print(f"{name:>8}  valid_rmse {metrics['valid_rmse']:.4f}  valid_mae {metrics['valid_mae']:.4f}  "
                  f"ndcg@10 {metrics['ndcg@10']:.4f}  {seconds:.0f}s", flush=True)
    except (ConfigError, DataError, ModelError, train.WorkdirError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except train.TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    summary = summarise(rows)
    result = {
        "command": " ".join(["python -m jaxcf.crossval", *(argv if argv is not None else sys.argv[1:])]),
        "config": to_dict(config),
        "holdout": args.holdout,
        "splits": rows,
        "summary": summary,
    }
    out_path = args.out or workdir / "crossval.json"
    atomic_write_text(out_path, json.dumps(result, indent=2) + "\n")
    for metric in SUMMARY_METRICS:
        print(f"{metric:>12}  {summary[metric]['mean']:.4f} ± {summary[metric]['std']:.4f}  over {len(rows)} split(s)")
    print(f"results in {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
