"""``python -m jaxcf.sweep``: a hyper-parameter sweep of the notebook's models, as few compiled programs as
possible (``jaxcf.training.sweep``).

    python -m jaxcf.sweep --config C [--grid KEY=V1,V2,... ...] [--seeds N] [--set KEY=VALUE ...]
                          [--holdout FRACTION] [--out results.json] [--quiet]

``--holdout F`` replaces the validation rows with a random fraction F of the training rows (the real
validation rows are then not used at all), for choosing hyper-parameters without looking at the split
one reports. The results JSON holds per member its grid point, seed, final and best valid RMSE/MAE,
per grid point the mean and std over seeds, the best member and the ensemble of all members.

What does not live here: the sweep itself (``jaxcf.training.sweep``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxcf import families
from jaxcf.cli import common as cli
from jaxcf.core.config import apply_overrides, read_yaml, resolve_path, to_dict
from jaxcf.core.configfile import parse_grid
from jaxcf.core.errors import ConfigError
from jaxcf.core.fileio import atomic_write_text, strict_json
from jaxcf.data import Dataset, holdout
from jaxcf.data import load as load_dataset
from jaxcf.training.sweep import check_sweepable, format_summary, make_members, run_sweep


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
        check_sweepable(apply_overrides(base_raw, args.set))
        base = families.load(args.config, args.set)
        check_sweepable(base)
        member_list = make_members(base_raw, args.set, parse_grid(args.grid), args.seeds)
        if any(m.config.mesh.data * m.config.mesh.model > 1 for m in member_list):
            raise ConfigError("the sweep trains on one device: drop mesh.* (an ensemble in python -m jaxcf.train "
                              "runs on a mesh)")
        cache: dict[str, Dataset] = {}

        def dataset_for(config) -> Dataset:
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
