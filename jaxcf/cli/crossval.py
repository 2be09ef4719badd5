"""``python -m jaxcf.crossval``: one config on several splits (ml-100k's official five folds, or any list of
splits), or the strong-generalisation protocol.

    python -m jaxcf.crossval --config C [--splits u1,u2,u3,u4,u5] [--set KEY=VALUE ...]
                             [--holdout FRACTION] [--grid KEY=V1,V2 ...] [--workdir DIR] [--out results.json]
    python -m jaxcf.crossval --config C --protocol strong [--held-users 0.1] [--history 0.8]
                             [--choose-prior-scale 0.25,0.5,1,2,4]

For each split the config is trained exactly as ``python -m jaxcf.train`` trains it, into
``WORKDIR/<split>``, and its export read back and scored on the split's validation and test parts
(ml-100k's folds: their .test part, a test set, reported as ``test_rmse``): ``jaxcf.training.crossval``.
The summary gives each metric's mean and sample standard deviation (ddof 1) over the splits.

``--holdout F`` trains on 1 - F of each split's training rows and scores on the other F (the split's
validation and test rows are not used at all): the way to choose hyper-parameters (``--grid``) without
looking at the folds one reports; a grid without validation rows is refused.

``--protocol strong`` runs the strong-generalisation protocol instead (``jaxcf.training.strong``): users held
out of training entirely (``--held-users``), folded in from part of their ratings (``--history``),
scored on the rest, beside the fallback for unknown users and joint retraining.
``--choose-prior-scale 0.25,0.5,1,2,4`` first picks fold-in's regularisation on held-out users drawn
from the training users only.

What does not live here: the splits' training and scoring (``jaxcf.training.crossval``), the protocol
(``jaxcf.training.strong``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from jaxcf import families
from jaxcf.cli import common as cli
from jaxcf.core.config import apply_overrides, has_validation, read_yaml, resolve_path, to_dict
from jaxcf.core.errors import ConfigError
from jaxcf.core.fileio import atomic_write_text, strict_json
from jaxcf.training.crossval import (
    IMPLICIT_SUMMARY,
    SUMMARY_METRICS,
    grid_points,
    point_name,
    reported,
    run_splits,
    split_dataset,
    summarise,
)


def raw_config(args: argparse.Namespace) -> dict:
    raw = read_yaml(resolve_path(args.config)) if args.config else {}
    return dict(raw or {})


def show_split(row: dict, implicit: bool) -> None:
    """One line per split as it finishes."""
    scored = row["metrics"]
    label = row["split"] if row["split"] != "random" else row["rows"]  # e.g. last-1-implicit, random-holdout0.1
    names = ("ndcg@20", "recall@20") if implicit else ("valid_rmse", "valid_mae", "ndcg@10")
    shown = "  ".join(f"{key} {scored[key]:.4f}" for key in (reported(scored, n) for n in names)
                      if isinstance(scored.get(key), float))
    print(f"{label:>8}  {shown}  {row['seconds']:.0f}s", flush=True)


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
                        help="strong: fold-in's regularisation (default: the model family's)")
    parser.add_argument("--choose-prior-scale", metavar="S1,S2,...",
                        help="strong: pick the prior scale among these on the training users first")
    return parser.parse_args(argv)


def run_strong(args: argparse.Namespace, config, splits: list) -> dict:
    """``--protocol strong`` on each split: prints the three answers' figures; returns the JSON-ready rows."""
    from jaxcf.training import strong

    rows = []
    for split in splits:
        name = split or "random"
        split_config, dataset = split_dataset(config, split, None)
        scale, chosen = args.prior_scale, None
        if families.resolve(config).implicit:
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
        config = families.load(args.config, args.set)
        implicit = families.resolve(config).implicit
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
        points = grid_points(args.grid)
        if len(points) > 1 and args.holdout is None and not all(
                has_validation(dataclasses.replace(config.data, split=split)) for split in splits):
            raise ConfigError("--grid chooses among its points on validation rows, and these splits have none (a named "
                              "fold's .test part is a test set, never used to choose): add --holdout 0.1")
        results = []
        for point in points:
            point_config = config if not point else families.from_dict(apply_overrides(
                raw_config(args), [*args.set, *(f"{k}={json.dumps(v)}" for k, v in point.items())]))
            if point:
                print(f"grid point {json.dumps(point)}", flush=True)
            rows = run_splits(point_config, splits, args.holdout, workdir / point_name(point),
                              on_split=lambda row: show_split(row, implicit))
            results.append({"point": point, "splits": rows, "summary": summarise(rows)})
        monitor, sign = ("ndcg@20", -1) if implicit else ("valid_rmse", 1)
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
        for metric in IMPLICIT_SUMMARY if implicit else SUMMARY_METRICS:
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
