"""Evaluate one config on several splits: ml-100k's official five folds, or any list of splits.

    python -m jaxcf.crossval --config C [--splits u1,u2,u3,u4,u5] [--set KEY=VALUE ...]
                             [--holdout FRACTION] [--workdir DIR] [--out results.json]

For each split the config is trained by ``jaxcf.trainer.fit`` (any model, exactly as ``python -m
jaxcf.train`` would) into ``WORKDIR/<split>``. The exported model is then read back and scored on the
split's validation and test ratings (ml-100k's folds: their .test part, a test set, reported as
``test_rmse``) (``jaxcf.metrics.final_metrics``: RMSE, MAE and the ranking metrics of
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

What does not live here: training (``jaxcf.trainer``), the metrics themselves (``jaxcf.metrics``,
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

from jaxcf import cli, export, metrics, trainer
from jaxcf.config import (
    Config,
    ConfigError,
    apply_overrides,
    from_dict,
    has_validation,
    is_implicit,
    load,
    read_yaml,
    resolve_path,
    to_dict,
)
from jaxcf.data import Dataset, holdout
from jaxcf.data import load as load_dataset
from jaxcf.data.implicit import from_config as implicit_data
from jaxcf.fileio import atomic_write_text, strict_json
from jaxcf.workdir import test_key

SUMMARY_METRICS = ("valid_rmse", "valid_mae", "precision@10", "recall@10", "ndcg@10")
IMPLICIT_SUMMARY = ("ndcg@20", "recall@20", "map@20", "mrr", "coverage@20")


def split_dataset(config: Config, split: str | None, holdout_fraction: float | None) -> tuple[Config, Dataset]:
    """The config with ``data.split`` set, and its dataset (a holdout of its training rows if asked; for
    an implicit-feedback model, of its training interactions)."""
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, split=split))
    dataset = load_dataset(config.data, config.seed)
    if is_implicit(config):
        dataset = implicit_data(dataset, config.data, config.seed)
    if holdout_fraction is not None:
        dataset = holdout(dataset, holdout_fraction, config.seed)
    return config, dataset


def score_export(workdir: Path, dataset: Dataset) -> dict[str, float]:
    """RMSE, MAE and ranking metrics of the model exported in ``workdir`` on ``dataset``'s split."""
    model = export.read(workdir)
    if model.model.get("feedback") == "implicit":
        from jaxcf import implicit_family

        return implicit_family.metrics(dataset, model.weights)
    y_range = tuple(model.model["y_range"]) if model.model["kind"] == "bias" else None
    return metrics.final_metrics(dataset, y_range, model.weights)


def raw_config(args: argparse.Namespace) -> dict:
    raw = read_yaml(resolve_path(args.config)) if args.config else {}
    return dict(raw or {})


def grid_points(args: argparse.Namespace) -> list[dict]:
    """Every combination of the ``--grid`` values (one empty point without a grid)."""
    import itertools

    from jaxcf.sweep import parse_grid

    grid = parse_grid(args.grid)
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))] or [{}]


def point_name(point: dict) -> str:
    return "-".join(f"{k.split('.')[-1]}{v}" for k, v in point.items()) or "."


def run_splits(config: Config, splits: list, holdout_fraction: float | None, workdir: Path) -> list[dict]:
    """Trains and scores ``config`` on each split; prints a line per split; returns the rows."""
    rows = []
    for split in splits:
        name = split or "random"
        split_config, dataset = split_dataset(config, split, holdout_fraction)
        start = time.perf_counter()
        with open(os.devnull, "w") as quiet_out:
            trainer.fit(split_config, dataset, workdir=workdir / name, quiet=True, out=quiet_out)
        seconds = time.perf_counter() - start
        scored = score_export(workdir / name, dataset)
        rows.append({"split": name, "rows": dataset.split.name, "metrics": scored, "seconds": seconds,
                     "num_train": len(dataset.split.train), "num_valid": len(dataset.split.valid),
                     "num_test": len(dataset.split.test)})
        label = name if split else dataset.split.name  # e.g. last-1-implicit, random-holdout0.1
        names = ("ndcg@20", "recall@20") if is_implicit(config) else ("valid_rmse", "valid_mae", "ndcg@10")
        shown = "  ".join(f"{key} {scored[key]:.4f}" for key in map(lambda n: reported(scored, n), names)
                          if isinstance(scored.get(key), float))
        print(f"{label:>8}  {shown}  {seconds:.0f}s", flush=True)
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
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="values of a config key to try (repeatable; every combination is run on every split)")
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
        if is_implicit(config):
            if args.prior_scale is not None or args.choose_prior_scale:
                raise ConfigError("--prior-scale and --choose-prior-scale are for rating models; an implicit "
                                  "model folds users in with its own regularisation")
            result = strong.run_implicit(split_config, dataset, held_fraction=args.held_users,
                                         history_fraction=args.history)
            result.update(split=name)
            rows.append(result)
            for answer in ("fallback", "fold_in", "joint"):
                figures = result[answer]
                print(f"{name:>8}  {answer:<9} ndcg@20 {figures['ndcg@20']:.4f}  recall@20 {figures['recall@20']:.4f}"
                      f"  users {figures['scored_users']}", flush=True)
            continue
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
        points = grid_points(args)
        if len(points) > 1 and args.holdout is None and not has_validation(config.data):
            raise ConfigError("--grid chooses among its points on validation rows, and these splits have none (a named "
                              "fold's .test part is a test set, never used to choose): add --holdout 0.1")
        results = []
        for point in points:
            point_config = config if not point else from_dict(apply_overrides(
                raw_config(args), [*args.set, *(f"{k}={json.dumps(v)}" for k, v in point.items())]))
            if point:
                print(f"grid point {json.dumps(point)}", flush=True)
            rows = run_splits(point_config, splits, args.holdout, workdir / point_name(point))
            results.append({"point": point, "splits": rows, "summary": summarise(rows)})
        monitor, sign = ("ndcg@20", -1) if is_implicit(config) else ("valid_rmse", 1)
        monitor = reported(results[0]["summary"], monitor)
        best = min(results, key=lambda r: sign * r["summary"][monitor]["mean"])
        result = {
            "command": " ".join(["python -m jaxcf.crossval", *(argv if argv is not None else sys.argv[1:])]),
            "config": to_dict(config),
            "holdout": args.holdout,
            **({"points": results, "best_point": best["point"]} if len(results) > 1 else {}),
            "splits": best["splits"],
            "summary": best["summary"],
        }
        atomic_write_text(out_path, json.dumps(strict_json(result), indent=2, allow_nan=False) + "\n")
        if len(results) > 1:
            for row in results:
                print(f"{monitor} {row['summary'][monitor]['mean']:.4f}  {json.dumps(row['point'])}")
            print(f"best point ({monitor}): {json.dumps(best['point'])}")
        for metric in IMPLICIT_SUMMARY if is_implicit(config) else SUMMARY_METRICS:
            summary = best["summary"]
            metric = reported(summary, metric)
            if metric not in summary:
                continue
            print(f"{metric:>12}  {summary[metric]['mean']:.4f} ± {summary[metric]['std']:.4f}  "
                  f"over {len(best['splits'])} split(s)")
        print(f"results in {out_path}")
        return 0

    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())
