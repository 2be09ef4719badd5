"""Evaluate one config on several splits: ml-100k's official five folds, or any list of splits.

    python -m jaxcf.crossval --config C [--splits u1,u2,u3,u4,u5] [--set KEY=VALUE ...]
                             [--holdout FRACTION] [--workdir DIR] [--out results.json]

For each split the config is trained by ``jaxcf.trainer.fit`` (any model, exactly as ``python -m
jaxcf.train`` would) into ``WORKDIR/<split>``. The exported model is then read back and scored on the
split's validation ratings (``jaxcf.evaluate.final_metrics``: RMSE, MAE and the ranking metrics of
``jaxcf.ranking``), so the figures are those of the model on disk. The summary gives each metric's
mean and sample standard deviation (ddof 1) over the splits.

``--holdout F`` trains on 1 - F of each split's training rows and scores on the other F (the split's
validation rows are not used at all): the way to choose hyper-parameters without looking at the
folds one reports.

``--protocol strong`` runs the strong-generalisation protocol instead (``jaxcf.strong``): users held
out of training entirely (``--held-users``), folded in from part of their ratings (``--history``),
scored on the rest, beside the fallback for unknown users and joint retraining.
``--choose-prior-scale 0.25,0.5,1,2,4`` first picks fold-in's regularisation on held-out users drawn
from the training users only.

What does not live here: training (``jaxcf.trainer``), the metrics themselves (``jaxcf.evaluate``,
``jaxcf.ranking``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxcf import cli, evaluate, export, trainer
from jaxcf.config import Config, ConfigError, load, to_dict
from jaxcf.data import Dataset, holdout
from jaxcf.data import load as load_dataset
from jaxcf.fileio import atomic_write_text, strict_json

SUMMARY_METRICS = ("valid_rmse", "valid_mae", "precision@10", "recall@10", "ndcg@10")


def split_dataset(config: Config, split: str | None, holdout_fraction: float | None) -> tuple[Config, Dataset]:
    """The config with ``data.split`` set, and its dataset (a holdout of its training rows if asked)."""
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, split=split))
    dataset = load_dataset(config.data, config.seed)
    if holdout_fraction is not None:
        dataset = holdout(dataset, holdout_fraction, config.seed)
    return config, dataset


def score_export(workdir: Path, dataset: Dataset) -> dict[str, float]:
    """RMSE, MAE and ranking metrics of the model exported in ``workdir`` on ``dataset``'s split."""
    model = export.read(workdir)
    y_range = tuple(model.model["y_range"]) if model.model["kind"] == "bias" else None
    return evaluate.final_metrics(dataset, y_range, model.weights)


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
    parser.add_argument("--protocol", choices=("split", "strong"), default="split",
                        help="split: score each split's validation rows (default); strong: held-out users folded in")
    parser.add_argument("--held-users", type=float, default=0.1, metavar="FRACTION",
                        help="strong: the fraction of users held out of training (default 0.1)")
    parser.add_argument("--history", type=float, default=0.8, metavar="FRACTION",
                        help="strong: the fraction of a held-out user's ratings folded in (default 0.8)")
    parser.add_argument("--prior-scale", type=float, default=None,
                        help="strong: fold-in's regularisation (default: jaxcf.foldin.PRIOR_SCALES by model kind)")
    parser.add_argument("--choose-prior-scale", metavar="S1,S2,...",
                        help="strong: pick the prior scale among these on the training users first")
    return parser.parse_args(argv)


def run_strong(args: argparse.Namespace, config: Config, splits: list) -> dict:
    """``--protocol strong`` on each split: prints the three answers' figures; returns the JSON-ready rows."""
    from jaxcf import strong

    rows = []
    for split in splits:
        name = split or "random"
        split_config, dataset = split_dataset(config, split, None)
        scale, chosen = args.prior_scale, None
        if args.choose_prior_scale:
            try:
                grid = [float(v) for v in args.choose_prior_scale.split(",")]
            except ValueError:
                raise ConfigError(f"--choose-prior-scale: expected numbers like 0.5,1,2; got "
                                  f"{args.choose_prior_scale!r}") from None
            scale, chosen = strong.choose_prior_scale(split_config, dataset, grid, held_fraction=args.held_users,
                                                      history_fraction=args.history)
            print(f"{name:>8}  prior scale chosen on the training users: {scale:g}  (fold-in RMSE "
                  + ", ".join(f"{k:g}: {v:.4f}" for k, v in chosen.items()) + ")", flush=True)
        result = strong.run(split_config, dataset, held_fraction=args.held_users, history_fraction=args.history,
                            prior_scale=scale)
        result.update(split=name, prior_scale_choice=chosen)
        rows.append(result)
        for answer in ("fallback", "fold_in", "joint"):
            figures = result[answer]
            print(f"{name:>8}  {answer:<9} rmse {figures['rmse']:.4f}  mae {figures['mae']:.4f}  "
                  f"ndcg@10 {figures['ndcg@10']:.4f}", flush=True)
    return {"protocol": "strong", "held_users": args.held_users, "history": args.history, "splits": rows}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        config = load(args.config, args.set)
        splits: list[str | None] = [config.data.split]
        if args.splits is not None:
            splits = [s.strip() for s in args.splits.split(",")]
            if not all(splits):
                raise ConfigError(f"--splits: empty split name in {args.splits!r}; e.g. --splits u1,u2,u3,u4,u5")
        stem = Path(args.config).stem if args.config else "run"
        workdir = args.workdir or Path("runs") / f"crossval-{stem}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S-%f')}"
        out_path = args.out or workdir / "crossval.json"
        if out_path.is_dir():
            raise ConfigError(f"--out {out_path}: is a directory; give the path of a JSON file to write")
        if not (0 < args.held_users < 1 and 0 < args.history < 1):
            raise ConfigError("--held-users and --history must be fractions in (0, 1)")
        if args.protocol == "strong":
            result = {"command": " ".join(["python -m jaxcf.crossval", *(argv if argv is not None else sys.argv[1:])]),
                      "config": to_dict(config), **run_strong(args, config, splits)}
            atomic_write_text(out_path, json.dumps(strict_json(result), indent=2, allow_nan=False) + "\n")
            print(f"results in {out_path}")
            return 0
        rows = []
        for split in splits:
            name = split or "random"
            split_config, dataset = split_dataset(config, split, args.holdout)
            start = time.perf_counter()
            with open(os.devnull, "w") as quiet_out:
                trainer.fit(split_config, dataset, workdir=workdir / name, quiet=True, out=quiet_out)
            seconds = time.perf_counter() - start
            metrics = score_export(workdir / name, dataset)
            rows.append({"split": name, "metrics": metrics, "seconds": seconds,
                         "num_train": len(dataset.split.train), "num_valid": len(dataset.split.valid)})
            print(f"{name:>8}  valid_rmse {metrics['valid_rmse']:.4f}  valid_mae {metrics['valid_mae']:.4f}  "
                  f"ndcg@10 {metrics['ndcg@10']:.4f}  {seconds:.0f}s", flush=True)
        summary = summarise(rows)
        result = {
            "command": " ".join(["python -m jaxcf.crossval", *(argv if argv is not None else sys.argv[1:])]),
            "config": to_dict(config),
            "holdout": args.holdout,
            "splits": rows,
            "summary": summary,
        }
        atomic_write_text(out_path, json.dumps(strict_json(result), indent=2, allow_nan=False) + "\n")
        for metric in SUMMARY_METRICS:
            print(f"{metric:>12}  {summary[metric]['mean']:.4f} ± {summary[metric]['std']:.4f}  "
                  f"over {len(rows)} split(s)")
        print(f"results in {out_path}")
        return 0

    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())
