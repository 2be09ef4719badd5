"""Hyper-parameter sweeps of the notebook's models: a grid of configs times seeds, trained as few compiled
programs as possible.

Each member is a full config (the base config with one grid point and one seed applied). Members that
differ only in vmapped keys (``jaxcf.families.sgd.members.VMAPPED``: learning rate, weight decay, row L2,
Adam's betas and eps, and the seed) train side by side in one program (``jaxcf.families.sgd.members``, run
by the one loop of ``jaxcf.training.loop``); a grid over any other key (``model.n_factors``,
``train.batch_size``, ...) compiles one program per value. A member that diverges is flagged and the others
go on. Every member's data split comes from the *base* config's seed, so all see the same rows. The
summary holds per member its grid point, seed, final and best valid RMSE/MAE, per grid point the mean and
std over seeds, the best member and the ensemble of all members (every pair answered as ``predict``
answers it).

What does not live here: the CLI (``jaxcf.cli.sweep``), the vmapped family (``jaxcf.families.sgd.members``),
the loop (``jaxcf.training.loop``).
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxcf import families
from jaxcf.core import metrics, scoring
from jaxcf.core.config import apply_overrides, to_dict
from jaxcf.core.errors import ConfigError
from jaxcf.data import Dataset
from jaxcf.families.sgd import fit as sgd
from jaxcf.families.sgd import members
from jaxcf.families.sgd.members import Member, static_part
from jaxcf.training import loop as trainer


def check_sweepable(config) -> None:
    """The sweep trains the notebook's models (``bias``, ``dot``) by gradient steps.

    ``config`` is a config or its plain data (checked before the rest of it is validated, so that
    another family's own rules never hide this answer).

    Raises:
      ConfigError: for another family.
    """
    from jaxcf.families.sgd import BIAS, DOT

    if isinstance(config, dict):
        model = families.translate(config).get("model")
        kind = model.get("kind") if isinstance(model, dict) else None
        if not isinstance(kind, str):
            return  # the default kind, or a value the full validation names as wrong
        family = families.spec(kind)
    else:
        kind, family = config.model.kind, families.resolve(config)
    if family not in (BIAS, DOT):
        raise ConfigError(f"the sweep trains the bias and dot models by gradient steps; model.kind "
                          f"{kind} is trained by python -m jaxcf.train (or chosen by python -m "
                          "jaxcf.crossval --grid)")


def make_members(base_raw: dict, overrides: Sequence[str], grid: dict[str, list], seeds: int) -> list[Member]:
    """One member per grid point and seed, each validated as a full config.

    Raises:
      ConfigError: naming the grid point whose config is invalid.
    """
    base = families.from_dict(apply_overrides(base_raw, overrides))
    out = []
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        point = dict(zip(keys, values))
        for offset in range(seeds):
            sets = [*overrides, *(f"{k}={json.dumps(v)}" for k, v in point.items()), f"seed={base.seed + offset}"]
            try:
                config = families.from_dict(apply_overrides(base_raw, sets))
            except ConfigError as err:
                raise ConfigError(f"grid point {point}: {err}") from None
            # Record the values as the config resolved them (YAML reads `1e-3` as text, the config a number).
            out.append(Member(config, {key: _resolved(config, key) for key in keys}))
    return out


def _resolved(config, dotted: str) -> Any:
    value: Any = to_dict(config)
    for part in dotted.split("."):
        value = value[part]
    return value


def run_sweep(
    base, member_list: Sequence[Member], dataset_for: Callable[[Any], Dataset], *, quiet: bool = False,
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
        predictions = scoring.predict_pairs(params, evaluation.users, evaluation.items, setup.y_range,
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


