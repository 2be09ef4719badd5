"""Hyper-parameter sweeps: a grid of configs times seeds, trained as few compiled programs as possible.

    python -m jaxcf.sweep --config C [--grid KEY=V1,V2,... ...] [--seeds N] [--set KEY=VALUE ...]
                          [--holdout FRACTION] [--out results.json] [--quiet]

Each member is a full config (the base config with one grid point and one seed applied). Members
that differ only in vmapped keys (``jaxcf.members.VMAPPED``: learning rate, weight decay, row L2,
Adam's betas and eps, and the seed) train side by side in one program (``jaxcf.members``, run by the
one loop of ``jaxcf.trainer``); a grid over any other key (``model.n_factors``, ``train.batch_size``,
...) compiles one program per value. A member that diverges is flagged and the others go on.
Every member's data split comes from the *base* config's seed, so all see the same rows.
``--holdout F`` replaces the validation rows with a random fraction F of the training rows (the real
validation rows are then not used at all), for choosing hyper-parameters without looking at the split
one reports. The results JSON holds per member its grid point, seed, final and best valid RMSE/MAE,
per grid point the mean and std over seeds, the best member and the ensemble of all members.

What does not live here: the vmapped family (``jaxcf.members``), the loop (``jaxcf.trainer``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from jaxcf import cli, members, metrics, sgd, trainer
from jaxcf.config import Config, ConfigError, apply_overrides, from_dict, load, read_yaml, resolve_path, to_dict
from jaxcf.data import Dataset, holdout
from jaxcf.data import load as load_dataset
from jaxcf.fileio import atomic_write_text, strict_json
from jaxcf.members import Member, static_part

# ----------------------------------------------------------------------------------- CLI


# A number in exponent notation without a dot ("1e-5"), which YAML 1.1 leaves as text.
EXPONENT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def parse_grid(items: Sequence[str]) -> dict[str, list]:
    """``KEY=V1,V2,...`` strings -> ``{key: [values]}``; values are parsed as YAML scalars."""
    grid: dict[str, list] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or not text.strip():
            raise ConfigError(f"--grid expects KEY=V1,V2,... (e.g. optim.weight_decay=1e-5,1e-4); got {item!r}")
        if key == "seed":
            raise ConfigError("--grid seed=...: use --seeds N (members get seeds seed, seed+1, ...)")
        values = []
        for part in text.split(","):
            try:
                value = yaml.safe_load(part)
            except yaml.YAMLError:
                raise ConfigError(f"--grid {key}: cannot parse value {part!r}") from None
            if isinstance(value, str) and EXPONENT.match(value.strip()):  # YAML 1.1 reads 1e-5 as text
                value = float(value)
            values.append(value)
        if key in grid:
            raise ConfigError(f"--grid {key} is given twice; put all its values in one --grid")
        grid[key] = values
    return grid


def make_members(base_raw: dict, overrides: Sequence[str], grid: dict[str, list], seeds: int) -> list[Member]:
    """One member per grid point and seed, each validated as a full config.

    Raises:
      ConfigError: naming the grid point whose config is invalid.
    """
    base = from_dict(apply_overrides(base_raw, overrides))
    out = []
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        point = dict(zip(keys, values))
        for offset in range(seeds):
            sets = [*overrides, *(f"{k}={json.dumps(v)}" for k, v in point.items()), f"seed={base.seed + offset}"]
            try:
                config = from_dict(apply_overrides(base_raw, sets))
            except ConfigError as err:
                raise ConfigError(f"grid point {point}: {err}") from None
            # Record the values as the config resolved them (YAML reads `1e-3` as text, the config a number).
            out.append(Member(config, {key: _resolved(config, key) for key in keys}))
    return out


def _resolved(config: Config, dotted: str) -> Any:
    value: Any = to_dict(config)
    for part in dotted.split("."):
        value = value[part]
    return value


def run_sweep(
    base: Config, member_list: Sequence[Member], dataset_for: Callable[[Config], Dataset], *, quiet: bool = False,
    out=None,
) -> dict:
    """Trains every member (one program per static part) and summarises.

    Returns:
      The JSON-ready results: per member its grid point, seed, final and best valid RMSE/MAE and best
      epoch; per program its members and timing; the best member; the ensemble of all members.
    """
    out = out if out is not None else sys.stdout
    groups: dict[str, list[int]] = {}
    for index, member in enumerate(member_list):
        groups.setdefault(static_part(member.config), []).append(index)
    results: list[dict | None] = [None] * len(member_list)
    programs = []
    all_predictions = []
    for group_number, indices in enumerate(groups.values()):
        group = [member_list[i] for i in indices]
        dataset = dataset_for(group[0].config)
        start = time.perf_counter()

        def show(record, group_number=group_number):
            if not quiet:
                print(
                    f"program {group_number + 1}/{len(groups)} epoch {record['epoch']:>3d}  "
                    f"best member {np.nanmin(record['member_valid_rmse']):.4f}  "
                    f"ensemble of {record['members']} {record['valid_rmse']:.4f}  {record['seconds']:.2f}s",
                    file=out, flush=True,
                )

        config = group[0].config
        setup = sgd.make_setup(config, dataset)
        family = members.family(setup, group, allow_diverged=True, method="sweep")
        state, progress = trainer.train(family, config, family.init(),
                                        on_epoch=lambda state, progress, record, show=show: show(record))
        history = progress.history
        diverged = np.asarray(progress.carry.get("diverged", [False] * len(group)), bool)
        params = progress.best_params if progress.best_params is not None else state.params
        evaluation = metrics.Evaluation.of(dataset, setup.y_range)
        predictions = metrics.predict_pairs(params, evaluation.users, evaluation.items, setup.y_range,
                                            chunk=config.train.eval_batch_size, per_member=True)
        seconds = time.perf_counter() - start
        epoch_seconds = [r["seconds"] for r in history]
        programs.append({
            "members": len(group),
            "static": {k: v for k, v in json.loads(static_part(group[0].config)).items() if k != "data"},
            "split": dataset.split.name,
            "num_train": len(dataset.split.train),
            "num_valid": len(dataset.split.valid),
            "seconds": seconds,
            "epoch_seconds": epoch_seconds,
            "ensemble_valid_rmse": history[-1]["valid_rmse"],
        })
        all_predictions.append((dataset.split.name, evaluation, predictions[~diverged]))
        for k, i in enumerate(indices):
            curve = [r["member_valid_rmse"][k] for r in history]
            best = int(np.nanargmin(curve)) if not np.all(np.isnan(curve)) else 0
            results[i] = {
                "member": i,
                "program": group_number,
                "point": member_list[i].point,
                "seed": member_list[i].config.seed,
                "diverged": bool(diverged[k]),
                "valid_rmse": curve[-1],
                "valid_mae": history[-1]["member_valid_mae"][k],
                "best_valid_rmse": curve[best],
                "best_epoch": best + 1,
                "valid_rmse_by_epoch": curve,
            }
    finite = [r for r in results if r is not None and r["valid_rmse"] is not None and math.isfinite(r["valid_rmse"])]
    summary: dict[str, Any] = {
        "config": to_dict(base),
        "members": results,
        "programs": programs,
        "best_member": min(finite, key=lambda r: r["valid_rmse"]) if finite else None,
        "seconds": sum(p["seconds"] for p in programs),
    }
    # The ensemble of every member is meaningful only when all programs share one validation set.
    if len({name for name, _, _ in all_predictions}) == 1 and finite:
        evaluation = all_predictions[0][1]
        mean = np.concatenate([p for _, _, p in all_predictions]).astype(np.float64).mean(axis=0)
        scored = evaluation.metrics(mean)  # every pair answered as predict answers it
        summary["ensemble_of_all"] = {"members": len(finite), "valid_rmse": scored["valid_rmse"],
                                      "valid_mae": scored["valid_mae"]}
    summary["by_point"] = _by_point(results)
    return summary


def _by_point(results: list[dict]) -> list[dict]:
    """Per grid point: the members' mean and std of the final valid RMSE over seeds."""
    points: dict[str, list[float]] = {}
    for r in results:
        points.setdefault(json.dumps(r["point"], sort_keys=True), []).append(r["valid_rmse"])
    rows = []
    for key, values in points.items():
        values_arr = np.asarray(values, np.float64)
        rows.append({"point": json.loads(key), "seeds": len(values), "valid_rmse_mean": float(np.mean(values_arr)),
                     "valid_rmse_std": float(np.std(values_arr))})
    return sorted(rows, key=lambda r: r["valid_rmse_mean"] if math.isfinite(r["valid_rmse_mean"]) else math.inf)


def format_summary(summary: dict) -> str:
    lines = ["member  seed  valid_rmse  best_rmse@epoch  point"]
    for r in summary["members"]:
        flag = "  DIVERGED" if r["diverged"] else ""
        lines.append(
            f"{r['member']:>6d}  {r['seed']:>4d}  {r['valid_rmse']:>10.4f}  "
            f"{r['best_valid_rmse']:>9.4f}@{r['best_epoch']:<5d}  {json.dumps(r['point'])}{flag}"
        )
    if summary["best_member"] is not None:
        b = summary["best_member"]
        lines.append(
            f"best member: {b['member']} (seed {b['seed']}, {json.dumps(b['point'])}) valid_rmse {b['valid_rmse']:.4f}"
        )
    for row in summary["by_point"]:
        lines.append(
            f"point {json.dumps(row['point'])}: valid_rmse {row['valid_rmse_mean']:.4f} ± {row['valid_rmse_std']:.4f} "
            f"over {row['seeds']} seeds"
        )
    if "ensemble_of_all" in summary:
        e = summary["ensemble_of_all"]
        lines.append(
            f"ensemble of all {e['members']} members: valid_rmse {e['valid_rmse']:.4f}, valid_mae {e['valid_mae']:.4f}"
        )
    lines.append(f"{len(summary['members'])} models in {len(summary['programs'])} compiled program(s), "
                 f"{summary['seconds']:.1f}s")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxcf.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML file, or the name of a shipped config (bias.yaml, ...)")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="values of one config key to sweep (repeatable; the grid is their product)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per grid point: seed, seed+1, ... (default 1)")
    parser.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys for every member")
    parser.add_argument("--holdout", type=float, default=None, metavar="FRACTION",
                        help="validate on this fraction of the training rows instead of the validation split")
    parser.add_argument("--out", type=Path, help="results JSON (default: runs/sweep-<time>.json)")
    parser.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    return parser.parse_args(argv)


def check_out(path: Path) -> None:
    """Refuses a results path that cannot be written, before any model is trained.

    Raises:
      ConfigError: a folder, or a folder that cannot be created or written.
    """
    if path.is_dir():
        raise ConfigError(f"--out {path}: is a directory; give the path of a JSON file to write")
    parent = path.parent
    probe = parent if parent.exists() else next((p for p in parent.parents if p.exists()), Path("."))
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {path}: {probe} is not a writable folder; choose another path")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        if args.seeds < 1:
            raise ConfigError(f"--seeds must be >= 1; got {args.seeds}")
        out_path = args.out or Path("runs") / f"sweep-{dt.datetime.now().strftime('%Y%m%d-%H%M%S-%f')}.json"
        check_out(out_path)
        base_raw: Any = {}
        if args.config is not None:
            base_raw = read_yaml(resolve_path(args.config)) or {}
            if not isinstance(base_raw, dict):
                raise ConfigError(f"config file {args.config!r} must hold a mapping of sections")
        base = load(args.config, args.set)
        if base.ensemble.method != "seeds":
            raise ConfigError("the sweep trains SGD models; ensemble.method gibbs is trained by python -m jaxcf.train")
        member_list = make_members(base_raw, args.set, parse_grid(args.grid), args.seeds)
        if any(m.config.mesh.data * m.config.mesh.model > 1 for m in member_list):
            raise ConfigError("the sweep trains on one device: drop mesh.* (an ensemble in python -m jaxcf.train "
                              "runs on a mesh)")
        cache: dict[str, Dataset] = {}

        def dataset_for(config: Config) -> Dataset:
            key = json.dumps(to_dict(config)["data"], sort_keys=True)
            if key not in cache:
                # Every member's split comes from the base seed: members differ in init and order only.
                dataset = load_dataset(config.data, base.seed)
                dataset = holdout(dataset, args.holdout, base.seed) if args.holdout is not None else dataset
                if not len(dataset.split.valid):
                    raise ConfigError("the sweep compares its members on validation rows, and this data has none "
                                      "(data.valid_fraction 0, or a named fold's test set): add --holdout 0.1")
                cache[key] = dataset
            return cache[key]

        summary = run_sweep(base, member_list, dataset_for, quiet=args.quiet)
        summary["command"] = " ".join(["python -m jaxcf.sweep", *(argv if argv is not None else sys.argv[1:])])
        summary["holdout"] = args.holdout
        atomic_write_text(out_path, json.dumps(strict_json(summary), indent=2, allow_nan=False) + "\n")
        print(format_summary(summary))
        print(f"results in {out_path}")
        return 0

    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())
