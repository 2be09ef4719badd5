"""XLA's CPU thread settings on the notebook workload: is single-threaded XLA any faster?

    python bench/xla_threads.py [--rounds 3] [--json results/xla_threads.json]

Runs ``python -m jaxcf.train --config configs/bias.yaml --set optim.name=adam train.epochs=6 --quiet``
under each ``XLA_FLAGS`` setting below, alternating settings round by round, and reports the median
``train_seconds`` of epochs 2-6 (from ``metrics.jsonl``) and the CPU seconds of the whole process
(``wait4``'s rusage).
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

SETTINGS = {
    "default": "",
    "single-threaded": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
}


def run(flags: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "jaxcf.train", "--config", "configs/bias.yaml", "--set", "optim.name=adam",
               "train.epochs=6", "--quiet", "--workdir", str(workdir)]
        env = {**os.environ, "XLA_FLAGS": flags}
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(proc.stderr.read().decode()[-500:])
        proc.stderr.close()
        records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in {r["epoch"]: r for r in records}.values() if r["epoch"] > 1]
    return {"train_s": statistics.median(r["train_seconds"] for r in epochs),
            "process_cpu_s": usage.ru_utime + usage.ru_stime, "valid_rmse": records[-1]["valid_rmse"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    runs = {name: [] for name in SETTINGS}
    load_before = machine.load_average()
    for round_number in range(args.rounds):
        names = list(SETTINGS) if round_number % 2 == 0 else list(reversed(SETTINGS))
        for name in names:
            runs[name].append(run(SETTINGS[name]))
            print(f"round {round_number + 1} {name:<16} {runs[name][-1]['train_s']:.3f} s per epoch, process CPU "
                  f"{runs[name][-1]['process_cpu_s']:.1f} s", flush=True)
    summary = {name: {"train_s": statistics.median(r["train_s"] for r in values),
                      "process_cpu_s": statistics.median(r["process_cpu_s"] for r in values)}
               for name, values in runs.items()}
    for name, values in summary.items():
        print(f"{name:<16} median {values['train_s']:.3f} s per epoch, process CPU {values['process_cpu_s']:.1f} s")
    if args.json:
        machine.write_json(args.json, {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                                        "settings": SETTINGS, "runs": runs, "summary": summary},
                           load_before, "jax", "jaxlib")
    return 0


if __name__ == "__main__":
    sys.exit(main())
