"""Speed of this checkout against an earlier commit, side by side, alternating runs on one machine.

    python bench/before_after.py --before 22eb8d9 [--rounds 3] [--scale-ratings 5e6] [--json PATH]

Four workloads, each run as a command in both trees, alternating before/after each round so that
the host's noise falls on both alike:

- the notebook's: ``python -m jaxcf.train --config configs/bias.yaml --set optim.name=adam
  train.epochs=6 --quiet`` (its per-epoch ``train_seconds`` and ``seconds`` from ``metrics.jsonl``,
  median of epochs 2-6; the first compiles);
- a Gibbs sweep: BPMF (``configs/dot.yaml`` with ``ensemble.method=gibbs``: 2 chains, F 20) for 30
  sweeps keeping 10 samples
  (median ``train_seconds`` of sweeps 2-30);
- an iALS sweep: ``configs/ials.yaml`` (F 128, exact solves) for 6 sweeps (median of sweeps 2-6);
- ``python bench/scale.py --ratings 5e6 --epochs 3`` (each tree's own copy of the script: training
  ratings per second, median of epochs 2-3, and peak RSS).

Both are the public commands, so the comparison holds across internal API changes. The earlier
commit is checked out with ``git worktree`` into a temporary folder and removed afterwards. Prints
the medians and the after/before ratios, and writes every run to JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402

# Each workload: a shipped config and overrides that both trees accept (the Gibbs one is written as the
# notebook's dot model sampled by Gibbs, ``ensemble.method: gibbs``, which a tree from before ``model.kind:
# bpmf`` runs and a later one translates to ``model.kind: bpmf``), and the metric kept.
WORKLOADS = {
    "notebook": ("configs/bias.yaml", ["optim.name=adam", "train.epochs=6"], "valid_rmse"),
    "gibbs": ("configs/dot.yaml", ["ensemble.method=gibbs", "model.n_factors=20", "ensemble.chains=2",
                                   "ensemble.noise_precision=1.5", "train.epochs=30", "ensemble.size=10",
                                   "ensemble.burn_in=20"], "valid_rmse"),
    "ials": ("configs/ials.yaml", ["train.epochs=6"], "ndcg@20"),
}


def epochs(tree: Path, workload: str) -> dict:
    """One training command in ``tree``: the median ``train_seconds`` (the epoch or sweep alone) and
    ``seconds`` (with its record) from ``metrics.jsonl``, from the second epoch on (the first compiles)."""
    config, overrides, metric = WORKLOADS[workload]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "jaxcf.train", "--config", config, "--set", *overrides, "--quiet",
               "--workdir", str(workdir)]
        env = {**os.environ, "PYTHONPATH": str(tree), "JAXCF_COMPILATION_CACHE": "off"}
        subprocess.run(cmd, cwd=tree, env=env, check=True, capture_output=True)
        records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    later = [r for r in records if r["epoch"] > 1]
    later = list({r["epoch"]: r for r in later}.values())  # a closing record repeats its epoch
    return {
        "train_s": statistics.median(r["train_seconds"] for r in later),
        "epoch_s": statistics.median(r["seconds"] for r in later),
        metric: records[-1].get(metric),
    }


def scale(tree: Path, ratings: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "scale.json"
        cmd = [sys.executable, "bench/scale.py", "--ratings", ratings, "--epochs", "3", "--json", str(out)]
        env = {**os.environ, "PYTHONPATH": str(tree)}
        subprocess.run(cmd, cwd=tree, env=env, check=True, capture_output=True)
        result = json.loads(out.read_text())
    run = result["runs"][0] if "runs" in result else result
    return {"ratings_per_s": run["ratings_per_s"], "epoch_s": run["epoch_s"],
            "peak_rss_bytes": run.get("peak_rss_bytes")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the earlier commit (any git revision)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scale-ratings", default="5e6")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help=f"any of {','.join(WORKLOADS)}, comma-separated (default: all)")
    parser.add_argument("--no-scale", action="store_true", help="skip the synthetic scale workload")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    chosen = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in chosen if w not in WORKLOADS]
    if unknown or not chosen:
        parser.error(f"unknown workload(s) {unknown}; choose from {','.join(WORKLOADS)}")
    revision = subprocess.run(["git", "rev-parse", args.before], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    after = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        before_tree = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(before_tree), revision], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            names = (*chosen, "scale")
            runs = {label: {name: [] for name in names} for label in ("before", "after")}
            load_before = machine.load_average()
            for round_number in range(args.rounds):
                order = (("before", before_tree), ("after", ROOT)) if round_number % 2 == 0 else \
                    (("after", ROOT), ("before", before_tree))
                for label, tree in order:
                    for workload in chosen:
                        runs[label][workload].append(epochs(tree, workload))
                    if not args.no_scale:
                        runs[label]["scale"].append(scale(tree, args.scale_ratings))
                    print(f"round {round_number + 1} {label:>6}: "
                          + ", ".join(f"{w} {runs[label][w][-1]['train_s']:.3f} s" for w in chosen), flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before_tree)], cwd=ROOT, capture_output=True)
    summary = {}
    for label in ("before", "after"):
        summary[label] = ({} if args.no_scale else
                          {"scale_ratings_per_s": statistics.median(r["ratings_per_s"] for r in runs[label]["scale"])})
        for workload in chosen:
            summary[label][f"{workload}_train_s"] = statistics.median(r["train_s"] for r in runs[label][workload])
            summary[label][f"{workload}_epoch_s"] = statistics.median(r["epoch_s"] for r in runs[label][workload])
    ratio = {key: summary["after"][key] / summary["before"][key] for key in summary["after"]}
    for workload in chosen:
        key = f"{workload}_train_s"
        print(f"{workload} epoch (training): before {summary['before'][key]:.3f} s, after "
              f"{summary['after'][key]:.3f} s (after/before {ratio[key]:.3f})")
    if not args.no_scale:
        print(f"scale {args.scale_ratings}: before {summary['before']['scale_ratings_per_s'] / 1e6:.2f} M/s, after "
              f"{summary['after']['scale_ratings_per_s'] / 1e6:.2f} M/s "
              f"(after/before {ratio['scale_ratings_per_s']:.3f})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "before": revision, "after": after,
            "runs": runs, "summary": summary, "after_over_before": ratio, "load_average_before": load_before,
            "load_average_after": machine.load_average(), "machine": machine.describe("jax", "jaxlib"),
        }, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
