"""Does the Gibbs sampler finish every time? Consecutive short runs in subprocesses, each under a timeout.

    python bench/gibbs_finishes.py [--runs 10] [--timeout 600] [--json results/gibbs_finishes.json]

Runs ``python -m jaxcf.train --config configs/bpmf.yaml`` with a short schedule (30 sweeps, 10 burned,
2 chains, 10 samples) ``--runs`` times on ml-latest-small and ``--runs`` times on ml-100k's u4 (the
case that stopped at 0% CPU before jaxcf solved its F x F systems with plain XLA ops: docs/robustness.md),
alternating, and records each run's exit status, wall seconds and final validation RMSE. A run that
exceeds ``--timeout`` is killed and counted as hung. Exits 1 unless every run finished with status 0.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402

SHORT = ["train.epochs=30", "ensemble.burn_in=10", "ensemble.chains=2", "ensemble.size=10"]
CASES = {"ml-latest-small": [], "ml-100k-u4": ["data.name=ml-100k", "data.split=u4"]}


def one(case: str, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "jaxcf.train", "--config", "configs/bpmf.yaml", "--quiet", "--workdir",
                   str(Path(tmp) / "run"), "--set", *SHORT, *CASES[case]]
        start = time.perf_counter()
        try:
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"case": case, "status": "hung", "seconds": time.perf_counter() - start}
        seconds = time.perf_counter() - start
        final = None
        metrics = Path(tmp) / "run" / "metrics.jsonl"
        if metrics.is_file():
            final = json.loads(metrics.read_text().splitlines()[-1]).get("valid_rmse")
        return {"case": case, "status": done.returncode, "seconds": seconds, "valid_rmse": final,
                "stderr_tail": done.stderr[-300:] if done.returncode else ""}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    load_before = machine.load_average()
    runs = []
    for number in range(args.runs):
        for case in CASES:
            result = one(case, args.timeout)
            runs.append(result)
            rmse = f"valid RMSE {result['valid_rmse']:.4f}" if result.get("valid_rmse") is not None else ""
            print(f"run {number + 1:2d} {case:16s} status {result['status']}  {result['seconds']:6.1f} s  {rmse}",
                  flush=True)
    finished = sum(r["status"] == 0 for r in runs)
    print(f"{finished} of {len(runs)} runs finished with status 0; {sum(r['status'] == 'hung' for r in runs)} hung")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "benchmark": "gibbs_finishes", "command": " ".join(["python", *sys.argv]), "short_schedule": SHORT,
            "timeout_s": args.timeout, "runs": runs, "finished": finished, "load_average_before": load_before,
            "load_average_after": machine.load_average(), "machine": machine.describe("jax", "jaxlib"),
        }, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if finished == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
